"""The relay: publishes what waits in the outbox, from inside every worker
and from ``flask celery outbox relay``. Every app installs it; SQLAlchemy is
imported only once the app has a database.

A worker of a :class:`~flask_celery_ctx.FlaskCelery` app starts a thread
(the :class:`RelayStep` bootstep) that looks at the outbox of each of the
app's databases every ``outbox_relay_interval`` seconds, claims the rows
available, publishes them in order, and deletes them. Nothing else is to be
deployed.

A relay that dies mid-batch leaves its rows claimed; they are available
again when the claim ends (``outbox_lease``), and another relay publishes
them. So a task is delivered at least once: a row published but not yet
deleted when its relay died is published again, with the same task id.
"""

from __future__ import annotations

import logging
import threading
import time
import typing as t

from celery import bootsteps
from kombu.exceptions import OperationalError

from ..db import database
from . import enabled
from . import lease
from . import max_attempts
from . import relay_interval

if t.TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.engine import Engine

    from ..extension import FlaskCelery

logger = logging.getLogger("flask_celery_ctx")

#: The most rows a relay claims at once.
BATCH = 100


def engines(ext: FlaskCelery) -> list[Engine]:
    """The engines of the app whose databases may hold an outbox: its
    synchronous engines.

    :param ext: The extension.
    """
    found = database(ext.app)
    if found is None:
        return []
    named = found.engines(ext.app)
    return [n.engine for n in named if not n.engine.dialect.is_async]


def relay(engine: Engine, celery: Celery[t.Any], batch: int = BATCH) -> int:
    """Publish the available rows of one database's outbox, a batch at a
    time, until none is left or the broker fails.

    A row whose publish fails for another reason (its task is gone, its
    arguments no longer fit, the serializer refuses them) counts an attempt,
    and waits for the backoff or is kept as dead; the broker's failures count
    none.

    :param engine: An engine whose database may have the table.
    :param celery: The Celery app to publish with.
    :param batch: The most rows to claim at once.
    :return: How many tasks were published.
    """
    from . import table as outbox

    if not outbox.has_table(engine):
        return 0
    outbox.check_columns(engine)
    seconds = lease(celery)
    total = 0
    while True:
        rows = outbox.claim(engine, batch, seconds)
        if not rows:
            return total
        published: list[str] = []
        for index, row in enumerate(rows):
            try:
                outbox.publish(celery, row)
            except Exception as exc:
                if not _from_broker(celery, exc):
                    _failed(engine, celery, row, exc)
                    continue
                unsent = [left.id for left in rows[index:]]
                logger.warning(
                    "The outbox relay could not reach the broker; %d %s wait"
                    " in the outbox: %s",
                    len(unsent),
                    tasks_word(len(unsent)),
                    outbox.describe(exc),
                )
                outbox.release(engine, unsent, time.time())
                return total + _delete(engine, published)
            published.append(row.id)
        total += _delete(engine, published)
        if len(rows) < batch:
            return total


def _from_broker(celery: Celery[t.Any], error: Exception) -> bool:
    """Whether ``error`` tells of the broker, not of a row: kombu's
    ``OperationalError``, the network's, and the connection and channel
    errors of the broker's client library (but ``KeyError``, which kombu's
    Redis transport counts as a connection error too)."""
    if isinstance(error, (OperationalError, OSError)):
        return True
    with celery.connection_for_write() as conn:
        found = (*conn.connection_errors, *conn.channel_errors)
    return isinstance(error, tuple(e for e in found if not issubclass(e, KeyError)))


def _failed(
    engine: Engine, celery: Celery[t.Any], row: t.Any, error: Exception
) -> None:
    from . import table as outbox

    if outbox.fail(engine, celery, row, error):
        logger.error(
            "The outbox relay gave up task %s[%s] after %d attempts; it is"
            " kept in the outbox as dead (see `flask celery outbox list`): %s",
            row.name,
            row.task_id,
            row.attempts + 1,
            outbox.describe(error),
            exc_info=error,
        )
    else:
        logger.warning(
            "The outbox relay could not send task %s[%s] (attempt %d of %d),"
            " tried again later: %s",
            row.name,
            row.task_id,
            row.attempts + 1,
            max_attempts(celery),
            outbox.describe(error),
            exc_info=error,
        )


def relay_all(ext: FlaskCelery) -> int:
    """Publish the available rows of every database of the app.

    :param ext: The extension.
    :return: How many tasks were published.
    """
    return sum(relay(engine, ext.celery) for engine in engines(ext))


def _delete(engine: Engine, ids: t.Sequence[str]) -> int:
    from . import table as outbox

    if ids:
        outbox.remove(engine, ids)
    return len(ids)


class RelayThread(threading.Thread):
    """Runs :func:`relay_all` every ``interval`` seconds until stopped.

    :param ext: The extension.
    :param interval: Seconds between two rounds.
    """

    def __init__(self, ext: FlaskCelery, interval: float) -> None:
        super().__init__(name="flask-celery-outbox-relay", daemon=True)
        self.ext = ext
        self.interval = interval
        self._stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                sent = relay_all(self.ext)
            except Exception:
                logger.exception("The outbox relay failed; it tries again.")
            else:
                if sent:
                    logger.info("The outbox relay sent %d %s.", sent, tasks_word(sent))
            if self._stopped.wait(self.interval):
                return

    def stop(self) -> None:
        """Stop after the current round; wait for it a little."""
        self._stopped.set()
        if self.is_alive():
            self.join(10)


class RelayStep(bootsteps.StartStopStep):
    """The worker bootstep that runs a :class:`RelayThread` in the worker's
    main process, when the app uses a database and the outbox is on."""

    label = "Outbox relay"
    requires = ("celery.worker.components:Pool",)

    def create(self, parent: t.Any) -> RelayThread | None:  # type: ignore[override]
        ext: FlaskCelery | None = getattr(parent.app, "flask_celery", None)
        if ext is None or not enabled(ext.celery):
            return None
        interval = relay_interval(ext.celery)
        try:
            app = ext.app
        except RuntimeError:
            return None  # never bound: no database to relay from
        if not interval or database(app) is None:
            return None
        return RelayThread(ext, interval)


def install(celery: Celery[t.Any]) -> None:
    """Add the relay to the workers of ``celery``.

    :param celery: The Celery app.
    """
    celery.steps["worker"].add(RelayStep)


def tasks_word(count: int) -> str:
    """ "task" or "tasks", for ``count`` of them."""
    return "task" if count == 1 else "tasks"
