"""The transactional outbox of ``delay_on_commit``: no task lost between the
commit and the broker.

- :mod:`~flask_celery_ctx.outbox.table`: the table, and the rows written in
  the committing transaction, deleted once published;
- :mod:`~flask_celery_ctx.outbox.publish`: the publish right after the
  commit, one attempt bounded in time;
- :mod:`~flask_celery_ctx.outbox.relay`: what publishes the rows left
  behind, from a thread in every worker;
- :mod:`~flask_celery_ctx.outbox.tracecontext`: the trace context each row
  keeps, under which the relay publishes it;
- :mod:`~flask_celery_ctx.outbox.cli`: ``flask celery outbox list`` and
  ``relay``.

This module holds the settings alone and imports no SQLAlchemy: every app
reads them, with a database or without.
"""

from __future__ import annotations

import typing as t
import weakref

if t.TYPE_CHECKING:
    from celery import Celery

#: The settings of the outbox, read from the Flask config as Celery
#: settings are: ``CELERY_OUTBOX`` or ``CELERY = {"outbox": ...}``.
SETTINGS = (
    "outbox",
    "outbox_lease",
    "outbox_relay_interval",
    "outbox_max_attempts",
    "outbox_retry_backoff",
    "outbox_publish_timeout",
    "outbox_alert_age",
)
#: Seconds a row is left to the process that wrote it, or to the relay that
#: claimed it, before another relay may publish it.
DEFAULT_LEASE = 30.0
#: Seconds between two looks of a worker's relay at the outbox.
DEFAULT_RELAY_INTERVAL = 5.0
#: Failed publishes of a row, other than the broker's, after which it is
#: kept as dead.
DEFAULT_MAX_ATTEMPTS = 5
#: Seconds before a row whose publish failed is tried again; doubled at each
#: attempt, up to :data:`MAX_BACKOFF`.
DEFAULT_RETRY_BACKOFF = 30.0
#: The longest wait between two attempts, in seconds.
MAX_BACKOFF = 3600.0
#: Seconds the publish after a commit waits for the broker to connect and to
#: answer, before it leaves the sends to the relay.
DEFAULT_PUBLISH_TIMEOUT = 0.5
#: How many leases the oldest waiting row may be old before a worker's
#: relay warns, when ``outbox_alert_age`` is not set.
ALERT_LEASES = 3


def check_settings(settings: t.Mapping[str, t.Any]) -> None:
    """Refuse values of the outbox settings that would fail only at a
    commit.

    :param settings: The Celery settings read from the Flask config.
    :raises ValueError: A setting has a wrong value; the message names it.
    """
    value = settings.get("outbox", True)
    if not isinstance(value, bool):
        raise ValueError(
            f"CELERY_OUTBOX must be True or False, not {value!r}: False sends"
            " the messages of delay_on_commit without the outbox table."
        )
    value = settings.get("outbox_max_attempts")
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < 1
    ):
        raise ValueError(
            f"CELERY_OUTBOX_MAX_ATTEMPTS must be a whole number, 1 or more, not"
            f" {value!r}: how many times a relay tries to send a row before it"
            " keeps it as dead."
        )
    for name in ("outbox_lease", "outbox_relay_interval", "outbox_retry_backoff"):
        value = settings.get(name)
        if value is not None and not _is_seconds(value):
            raise ValueError(
                f"CELERY_{name.upper()} must be a number of seconds, 0 or more,"
                f" not {value!r}."
            )
    for name, meaning in _ABOVE_ZERO.items():
        value = settings.get(name)
        if value is not None and not (_is_seconds(value) and value > 0):
            raise ValueError(
                f"CELERY_{name.upper()} must be a number of seconds, more than 0,"
                f" not {value!r}: {meaning}."
            )


# Settings in seconds that must be above 0, with what each says.
_ABOVE_ZERO = {
    "outbox_publish_timeout": "how long the publish after a commit waits for"
    " the broker before it leaves the tasks to the relay",
    "outbox_alert_age": "how old the oldest task waiting in the outbox may be"
    " before a worker logs a warning",
}


def _is_seconds(value: object) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    )


class Settings(t.NamedTuple):
    """The outbox settings of a Celery app, as :func:`settings` read them."""

    #: Setting ``outbox``: whether on-commit sends go through the outbox.
    on: bool
    #: Setting ``outbox_lease``, in seconds.
    lease: float
    #: Setting ``outbox_relay_interval``, in seconds; ``0`` when the workers
    #: do not relay.
    relay_interval: float
    #: Setting ``outbox_max_attempts``.
    max_attempts: int
    #: Setting ``outbox_retry_backoff``, in seconds.
    retry_backoff: float
    #: Setting ``outbox_publish_timeout``, in seconds.
    publish_timeout: float
    #: Setting ``outbox_alert_age``, in seconds: :data:`ALERT_LEASES` leases
    #: when it is not set.
    alert_age: float
    #: The URL of the broker that sends are published to.
    broker: str


# The settings read, per Celery app.
_read: weakref.WeakKeyDictionary[Celery[t.Any], Settings] = weakref.WeakKeyDictionary()


def settings(celery: Celery[t.Any]) -> Settings:
    """The outbox settings of ``celery``, read once: at the first call after
    :meth:`~flask_celery_ctx.FlaskCelery.init_app`, which reads the config
    (:func:`forget`). Each commit that sends on commit needs them, and a
    lookup in Celery's settings costs microseconds.

    :param celery: The Celery app.
    """
    found = _read.get(celery)
    if found is None:
        found = _read[celery] = _from(celery.conf)
    return found


def forget(celery: Celery[t.Any]) -> None:
    """Read the settings of ``celery`` again at the next :func:`settings`.

    :param celery: The Celery app, just configured.
    """
    _read.pop(celery, None)


def _from(conf: t.Any) -> Settings:
    def seconds(name: str, default: float) -> float:
        value = conf.get(name)
        return default if value is None else float(value)

    lease = seconds("outbox_lease", DEFAULT_LEASE)
    attempts = conf.get("outbox_max_attempts")
    return Settings(
        on=bool(conf.get("outbox", True)),
        lease=lease,
        relay_interval=seconds("outbox_relay_interval", DEFAULT_RELAY_INTERVAL),
        max_attempts=DEFAULT_MAX_ATTEMPTS if attempts is None else int(attempts),
        retry_backoff=seconds("outbox_retry_backoff", DEFAULT_RETRY_BACKOFF),
        publish_timeout=seconds("outbox_publish_timeout", DEFAULT_PUBLISH_TIMEOUT),
        alert_age=seconds("outbox_alert_age", ALERT_LEASES * lease),
        broker=str(conf.broker_write_url or conf.broker_url),
    )


def enabled(celery: Celery[t.Any]) -> bool:
    """Whether on-commit sends of ``celery``'s tasks go through the outbox:
    setting ``outbox`` (default true), and never in eager mode, where no
    message is sent.

    :param celery: The Celery app.
    """
    return settings(celery).on and not celery.conf.task_always_eager


def retry_delay(celery: Celery[t.Any], attempts: int) -> float:
    """Seconds before a row that failed ``attempts`` times is tried again:
    the setting ``outbox_retry_backoff``, doubled at each attempt after the
    first, at most :data:`MAX_BACKOFF`.

    :param celery: The Celery app.
    :param attempts: The failed attempts so far, 1 or more.
    """
    backoff = settings(celery).retry_backoff
    return float(min(backoff * 2 ** min(attempts - 1, 32), MAX_BACKOFF))
