"""Read Celery's settings from a Flask config, strictly.

Two forms are accepted, and may be mixed as long as no setting is given twice:

- a ``CELERY`` dict with Celery's own lower-case setting names, as in Flask's
  documented pattern: ``CELERY = {"broker_url": "redis://"}``;
- upper-case keys with the prefix ``CELERY_``: ``CELERY_BROKER_URL``.

Anything that looks meant for Celery but that Celery would not read (a typo, a
Celery 3 name) is an error, not a silently ignored key.

The config is the one source of the broker and the result backend: Celery
reads them from the environment first, which would let a worker and the web
process use different ones, so a conflicting environment is an error too.
"""

from __future__ import annotations

import typing as t

from celery.app.defaults import SETTING_KEYS
from kombu.utils.url import maybe_sanitize_url

from .confighints import OLD_PREFIXES
from .confighints import PREFIX
from .confighints import unknown_key
from .confighints import unknown_name
from .errors import ConfigValueError

#: Defaults that differ from Celery's own, applied unless the config says
#: otherwise. JSON only: a pickled message is refused by the worker.
DEFAULTS: dict[str, t.Any] = {
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "task_serializer": "json",
    "result_serializer": "json",
    "broker_connection_retry_on_startup": True,
}

#: The environment variables that Celery reads before its config
#: (``celery.app.utils.Settings``), by the setting they override.
ENVIRONMENT_OVERRIDES = {
    "broker_url": "CELERY_BROKER_URL",
    "broker_read_url": "CELERY_BROKER_READ_URL",
    "broker_write_url": "CELERY_BROKER_WRITE_URL",
    "result_backend": "CELERY_RESULT_BACKEND",
}

# Settings that Celery takes from ``broker_url`` when the config has none.
_FALLBACKS = {"broker_read_url": "broker_url", "broker_write_url": "broker_url"}

#: The key that tests set to run tasks inline; read once, by ``init_app``.
EAGER_KEY = "CELERY_TASK_ALWAYS_EAGER"


def celery_settings(
    config: t.Mapping[str, t.Any], extra_settings: t.Iterable[str] = ()
) -> dict[str, t.Any]:
    """Return the Celery settings named in a Flask config.

    Only these settings are returned: the rest of the Flask config (the
    secret key, database URLs) never reaches Celery, where ``celery report``
    and ``inspect conf`` would print it.

    :param config: The Flask application's config.
    :param extra_settings: Names of settings that Celery does not know but a
        Celery plugin reads from ``app.conf``, spelled as the plugin reads
        them.
    :raises ValueError: A key is unknown, a Celery 3 name, or given twice. The
        message names the key and the right one.
    """
    known = SETTING_KEYS | set(extra_settings)
    by_upper = {name.upper(): name for name in known}
    settings: dict[str, t.Any] = {}
    source: dict[str, str] = {}

    def add(name: str, value: t.Any, key: str) -> None:
        if name in settings:
            raise ConfigValueError(
                f"The Celery setting {name!r} is given twice, as {source[name]}"
                f" and as {key}. Keep one of them. From the environment,"
                " Flask's from_prefixed_env() makes FLASK_CELERY__"
                f"{name} into CELERY[{name!r}], and FLASK_{key} into {key}."
            )
        settings[name] = value
        source[name] = key

    nested = config.get("CELERY", {})
    if not isinstance(nested, t.Mapping):
        raise ConfigValueError(
            "CELERY must be a dict of Celery settings, such as"
            f" {{'broker_url': 'redis://'}}, not {type(nested).__name__}."
        )
    for name, value in nested.items():
        if name not in known:
            raise ConfigValueError(unknown_name(name, known))
        add(name, value, f"CELERY[{name!r}]")

    for key, value in config.items():
        if key.startswith(PREFIX):
            name = by_upper.get(key[len(PREFIX) :])
            if name is None:
                raise ConfigValueError(unknown_key(key, value, by_upper))
            add(name, value, key)
        elif key.startswith(OLD_PREFIXES):
            raise ConfigValueError(unknown_key(key, value, by_upper))

    return {**DEFAULTS, **settings}


def check_environment(
    settings: t.Mapping[str, t.Any], environ: t.Mapping[str, str]
) -> None:
    """Refuse an environment variable that Celery would read in the place of
    the broker (to send to, or to consume from) or the result backend of the
    config, unless it says the same.

    :param settings: The settings read from the config.
    :param environ: The environment, ``os.environ``.
    :raises ValueError: A variable differs from the config; the message names
        both values, passwords masked, and what to do.
    """
    for name, variable in ENVIRONMENT_OVERRIDES.items():
        value = environ.get(variable)
        if value:  # Celery ignores an empty one
            problem = override_problem(
                settings, name, value, f"The environment variable {variable}",
                f"Unset the environment variable {variable}",
            )  # fmt: skip
            if problem is not None:
                raise ConfigValueError(problem)


def override_problem(
    settings: t.Mapping[str, t.Any], name: str, value: str, source: str, undo: str
) -> str | None:
    """Say what is wrong when ``source`` gives setting ``name`` a value that
    differs from the config's; ``None`` when it is the same.

    :param settings: The settings read from the config.
    :param name: A key of :data:`ENVIRONMENT_OVERRIDES`.
    :param value: The value that ``source`` gives.
    :param source: Where the value comes from, to start the message with.
    :param undo: How to take that value away, to end the message with.

    :meta private:
    """
    configured = settings.get(name)
    fallback = _FALLBACKS.get(name)
    if configured is None and fallback is not None:
        used = settings.get(fallback)
        said = f"nothing, so Celery uses its {fallback}, {_masked(used)!r}"
        configured = used
    else:
        said = "nothing" if configured is None else repr(_masked(configured))
    if value == configured:
        return None
    key = f"{PREFIX}{name.upper()}"
    return (
        f"{source} sets Celery's {name} to {_masked(value)!r}, but the app's"
        f" config ({key} or CELERY[{name!r}]) says {said}. The Flask config is"
        " the one source of the broker and the result backend, so that the"
        " workers and the app that sends tasks use the same ones."
        f" {undo}, or give the value you mean to {key} in the app's config."
    )


def _masked(value: t.Any) -> t.Any:
    return maybe_sanitize_url(value) if isinstance(value, str) else value
