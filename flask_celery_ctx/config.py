"""Read Celery's settings from a Flask config, strictly.

Two forms are accepted, and may be mixed as long as no setting is given twice:

- a ``CELERY`` dict with Celery's own lower-case setting names, as in Flask's
  documented pattern: ``CELERY = {"broker_url": "redis://"}``;
- upper-case keys with the prefix ``CELERY_``: ``CELERY_BROKER_URL``.

Anything that looks meant for Celery but that Celery would not read (a typo, a
Celery 3 name) is an error, not a silently ignored key.
"""

from __future__ import annotations

import difflib
import typing as t

from celery.app.defaults import _TO_NEW_KEY  # type: ignore[attr-defined]
from celery.app.defaults import SETTING_KEYS

#: Defaults that differ from Celery's own, applied unless the config says
#: otherwise. JSON only: a pickled message is refused by the worker.
DEFAULTS: dict[str, t.Any] = {
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "task_serializer": "json",
    "result_serializer": "json",
    "broker_connection_retry_on_startup": True,
}

_PREFIX = "CELERY_"
# Prefixes of Celery 3 setting names that are not ``CELERY_`` + a new name.
_OLD_PREFIXES = ("CELERYD_", "CELERYBEAT_", "CELERYMON_", "BROKER_")


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
            raise ValueError(
                f"The Celery setting {name!r} is given twice, as {source[name]}"
                f" and as {key}. Keep one of them."
            )
        settings[name] = value
        source[name] = key

    nested = config.get("CELERY", {})
    if not isinstance(nested, t.Mapping):
        raise ValueError(
            "CELERY must be a dict of Celery settings, such as"
            f" {{'broker_url': 'redis://'}}, not {type(nested).__name__}."
        )
    for name, value in nested.items():
        if name not in known:
            raise ValueError(
                f"CELERY[{name!r}] is not a Celery setting. {_hint(name, known)}"
            )
        add(name, value, f"CELERY[{name!r}]")

    for key, value in config.items():
        if key.startswith(_PREFIX):
            name = by_upper.get(key[len(_PREFIX) :])
            if name is None:
                raise ValueError(_unknown_key(key, by_upper))
            add(name, value, key)
        elif key.startswith(_OLD_PREFIXES):
            raise ValueError(_unknown_key(key, by_upper))

    return {**DEFAULTS, **settings}


def _unknown_key(key: str, by_upper: t.Mapping[str, str]) -> str:
    new = _TO_NEW_KEY.get(key)
    if new is not None:
        return (
            f"{key} is a Celery 3 setting name that Celery no longer reads."
            f" Use {_PREFIX}{new.upper()} (or CELERY[{new!r}]) instead."
        )
    prefixed = [_PREFIX + upper for upper in by_upper]
    return f"{key} is not a Celery setting. {_hint(key, prefixed, prefix=True)}"


def _hint(name: str, candidates: t.Iterable[str], prefix: bool = False) -> str:
    new = _TO_NEW_KEY.get(name)
    if new is not None:
        return f"It is a Celery 3 name: use {new!r}."
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    if close:
        return f"Did you mean {close[0]}?" if prefix else f"Did you mean {close[0]!r}?"
    return "See https://docs.celeryq.dev/en/stable/userguide/configuration.html"
