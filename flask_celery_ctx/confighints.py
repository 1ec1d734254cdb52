"""What to write instead of a config key that Celery would not read: the
messages of :func:`~flask_celery_ctx.config.celery_settings`.

Each message names the key and the fix: the new name of a Celery 3 name, the
closest Celery setting to a typo, the ``CELERY`` dict for a dict of settings
under another name, and ``extra_settings`` for a setting of a Celery
extension.
"""

from __future__ import annotations

import difflib
import typing as t

from celery.app.defaults import _TO_NEW_KEY  # type: ignore[attr-defined]

#: The prefix of the Flask config keys that are Celery settings.
PREFIX = "CELERY_"
#: Prefixes of Celery 3 names that are not ``CELERY_`` + a new name; a Flask
#: config key with one of them is meant for Celery.
OLD_PREFIXES = ("CELERYD_", "CELERYBEAT_", "CELERYMON_", "BROKER_")

# The prefixes that Celery 3 names lost in lower-case dicts of settings,
# as in ``always_eager`` for ``CELERY_ALWAYS_EAGER``.
_STRIPPED = ("", PREFIX, "CELERYD_", "CELERYBEAT_", "CELERYMON_")

# Names that apps give their dict of Celery settings; Flask-Celery-Ctx reads
# it from ``CELERY``.
_DICT_NAMES = frozenset(
    {"CELERY_CONFIG", "CELERY_CONF", "CELERY_SETTINGS", "CELERY_CONFIGURATION"}
)

# Settings of Celery extensions, which Celery does not know, by the start of
# their name (a whole name when it does not end with ``_``).
_EXTENSIONS = {
    "redbeat_": "celery-redbeat",
    "beat_": "a beat scheduler that keeps its schedule in a database, such as"
    " sqlalchemy-celery-beat (beat_dburi, beat_schema)",
    "singleton_": "celery-singleton",
    "ONCE": "celery-once",
}

_DOCS = "https://docs.celeryq.dev/en/stable/userguide/configuration.html"


def unknown_key(key: str, value: t.Any, by_upper: t.Mapping[str, str]) -> str:
    """The message for a Flask config key meant for Celery that is not one
    of its settings.

    :param key: The key, such as ``CELERY_ALWAYS_EAGER``.
    :param value: Its value.
    :param by_upper: The known setting names, by their upper-case spelling.
    """
    old = celery3_name(key)
    if old is not None:
        new = _TO_NEW_KEY[old]
        said = (
            "is a Celery 3 setting name, which"
            if old == key
            else f"is not a Celery setting but the Celery 3 name {old}, which"
        )
        return (
            f"{key} {said} Celery no longer reads."
            f" Did you mean {PREFIX}{new.upper()} (or CELERY[{new!r}])?"
        )
    if key in _DICT_NAMES:
        fix = f"rename {key} to CELERY"
        if not isinstance(value, t.Mapping):
            fix = f"make {key} a dict, not a module's name, and {fix}"
        return (
            f"{key} is not a Celery setting. Flask-Celery-Ctx reads Celery's"
            " settings from a dict named CELERY, as in"
            " CELERY = {'broker_url': 'redis://'}, or from CELERY_ keys such"
            f" as CELERY_BROKER_URL: {fix}."
        )
    close = difflib.get_close_matches(
        key, [PREFIX + upper for upper in by_upper], n=1, cutoff=0.75
    )
    if not key.startswith(PREFIX):
        return f"{key} is not a Celery setting. {_guess(close)}"
    name = key[len(PREFIX) :]
    spelling = name if name == "ONCE" else name.lower()
    return f"{key} is not a Celery setting. {_fix(spelling, close, own=True)}"


def unknown_name(name: str, known: t.Iterable[str]) -> str:
    """The message for a name in the ``CELERY`` dict that is not a setting.

    :param name: The name, such as ``always_eager``.
    :param known: The known setting names.
    """
    start = f"CELERY[{name!r}] is not a Celery setting."
    old = celery3_name(name)
    if old is not None:
        new = _TO_NEW_KEY[old]
        return f"{start} It is the Celery 3 name {old}: did you mean {new!r}?"
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f"{start} {_fix(name, [repr(c) for c in close])}"


def celery3_name(name: str) -> str | None:
    """The Celery 3 setting name that ``name`` spells, in any case, with or
    without the prefix it had: ``always_eager`` and ``CELERY_ALWAYS_EAGER``
    for ``CELERY_ALWAYS_EAGER``, ``concurrency`` and ``CELERY_CONCURRENCY``
    for ``CELERYD_CONCURRENCY``. Its new name is ``_TO_NEW_KEY[old]``.

    :param name: A name that is no setting of today's Celery.
    """
    upper = name.upper()
    bare = upper.removeprefix(PREFIX)
    for candidate in (upper, *(prefix + bare for prefix in _STRIPPED)):
        if candidate in _TO_NEW_KEY:
            return candidate
    return None


def _fix(spelling: str, close: t.Sequence[str], own: bool = False) -> str:
    """What to do about a name of no Celery setting: the closest setting,
    the extension it may belong to, and how to name it to Flask-Celery-Ctx.

    :param own: Whether the name is a ``CELERY_`` key of the Flask config,
        which may be a setting of the app's own.
    """
    extension = next(
        (
            owner
            for start, owner in _EXTENSIONS.items()
            if spelling == start
            or (start.endswith("_") and spelling.lower().startswith(start))
        ),
        None,
    )
    name_it = (
        "name it, spelled as the extension reads it from app.conf:"
        f" FlaskCelery(extra_settings=[{spelling!r}])."
    )
    if extension is not None:
        return f"It is a setting of {extension}, not of Celery: {name_it}"
    fix = f"{_guess(close)} If a Celery extension reads it, {name_it}"
    if own:
        fix += (
            f" If the app reads it, rename it: keys that start with {PREFIX}"
            " are Celery's."
        )
    return fix


def _guess(close: t.Sequence[str]) -> str:
    return f"Did you mean {close[0]}?" if close else f"See {_DOCS}."
