"""The relay: publishes what waits in the outbox, from inside every worker
and from ``flask celery outbox relay``. Every app installs it; SQLAlchemy is
imported only once the app has a database.

A worker of a :class:`~flask_celery_ctx.FlaskCelery` app starts a thread
(the :class:`RelayStep` bootstep) that looks at the outbox of each of the
app's databases every ``outbox_relay_interval`` seconds, claims the rows
available, publishes them in order, and deletes them. Nothing else is to be
deployed.

A relay that dies mid-batch leaves its rows claimed, and those of the
claim it made ahead; they are available again when the claim ends
(``outbox_lease``), and another relay publishes them. So a task is
delivered at least once: a row published but not yet deleted when its
relay died is published again, with the same task id.
"""

from __future__ import annotations

import logging
import threading
import time
import typing as t
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor

from celery import bootsteps

from ..db import database
from . import enabled
from . import settings
from .publish import Attempt
from .untraced import untraced

if t.TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.engine import Engine

    from ..extension import FlaskCelery

logger = logging.getLogger("flask_celery_ctx")

#: The rows of a relay's first claim, and the fewest it claims at once.
BATCH = 100
#: The most rows a relay claims at once. Each claim and each delete costs
#: the database round trips whatever its size, so a relay that publishes
#: fast claims more at once: what it publishes in a quarter of the lease at
#: the pace of its last batch, between :data:`BATCH` and this.
MAX_BATCH = 1000
#: Seconds between two looks for the outbox table in a database without it:
#: the longest a relay takes to find a table another process created.
TABLE_LOOKUP = 600.0


#: The (app, broker URL) that a relay of this process could not reach at
#: its last try.
_unreachable: set[tuple[int, str]] = set()
_unreachable_lock = threading.Lock()


def engines(ext: FlaskCelery) -> list[Engine]:
    """The engines of the app whose databases may hold an outbox: its
    synchronous engines, and the one its session writes the outbox to (the
    primary, for a session that routes writes and reads apart).

    :param ext: The extension.
    """
    found = database(ext.app)
    if found is None:
        return []
    named = [n.engine for n in found.engines(ext.app)]
    return _unique([*named, *write_engines(ext)])


def write_engines(ext: FlaskCelery) -> list[Engine]:
    """The engines the app's session writes outbox rows to, as
    :func:`~flask_celery_ctx.outbox.table.written_to` finds them; every
    engine of the app for a session with per-model binds only.

    :param ext: The extension.
    """
    from .table import written_to

    found = database(ext.app)
    if found is None:
        return []
    with ext.app.app_context():
        engine = written_to(found.session())
    if engine is None:
        return _unique([n.engine for n in found.engines(ext.app)])
    return _unique([engine])


def _unique(found: list[Engine]) -> list[Engine]:
    """The synchronous engines of ``found``, each once, in order."""
    return list({e: None for e in found if not e.dialect.is_async})


def relay(engine: Engine, celery: Celery[t.Any], batch: int = BATCH) -> int:
    """Publish the available rows of one database's outbox, a batch at a
    time, until none is left or the broker fails.

    The queries that claim, release and delete rows create no span or
    trace; each publish continues the trace its send was queued in
    (:mod:`~flask_celery_ctx.outbox.tracecontext`).

    A row whose publish fails for another reason (its task is gone, its
    arguments no longer fit, the serializer refuses them) counts an attempt,
    and waits for the backoff or is kept as dead; the broker's failures count
    none.

    :param engine: An engine whose database may have the table.
    :param celery: The Celery app to publish with.
    :param batch: The rows of the first claim, and the fewest claimed at
        once; later claims grow while publishing is fast (:data:`MAX_BATCH`).
    :return: How many tasks were published.
    """
    from . import table as outbox

    with untraced():
        if not outbox.has_table(engine):
            return 0
        outbox.check_columns(engine)
    attempt = Attempt(celery, _publish_timeout(celery))
    try:
        # Before any claim: while the broker is down, a look claims nothing
        # and adds no failed publish to the sends' traces.
        with untraced():
            reachable = attempt.connect()
        if not reachable:
            _broker_down(celery, f"it {attempt.failure}")
            return 0
        _broker_up(celery)
        return _drain(engine, celery, attempt, batch)
    finally:
        attempt.close(report=False)


def _drain(engine: Engine, celery: Celery[t.Any], attempt: Attempt, batch: int) -> int:
    """Claim and publish batches of rows until none is left or the broker
    fails. The database's part runs beside the publishes, in a thread of its
    own, in the order it is asked: the next claim while a batch is
    published, then the deletion of the rows it published. A relay so
    publishes at the broker's pace, not waiting for the database between
    two batches.

    :return: How many tasks were published.
    """
    from . import table as outbox

    seconds = settings(celery).lease
    total = 0
    size = asked = batch
    database = ThreadPoolExecutor(1, thread_name_prefix="flask-celery-outbox-relay")

    def later(call: t.Callable[..., t.Any], *args: t.Any) -> Future[t.Any]:
        return database.submit(_untraced, call, *args)

    done: list[Future[t.Any]] = []
    try:
        claimed: Future[t.Any] | None = later(outbox.claim, engine, asked, seconds)
        while claimed is not None:
            rows = claimed.result()
            if not rows:
                break
            # A claim that is not full was the last.
            full, asked = len(rows) == asked, size
            claimed = later(outbox.claim, engine, asked, seconds) if full else None
            started = time.monotonic()
            published, unsent = _publish_rows(engine, celery, attempt, rows)
            total += len(published)
            if published:
                done.append(later(outbox.remove, engine, published))
            if unsent:
                done.append(later(outbox.release, engine, unsent, time.time()))
                if claimed is not None:
                    done.append(later(_release_claim, engine, claimed))
                break
            size = _next_size(batch, len(rows), time.monotonic() - started, seconds)
    finally:
        database.shutdown(wait=True)
    for future in done:
        future.result()  # a failed statement fails the relay, as before
    return total


def _publish_rows(
    engine: Engine, celery: Celery[t.Any], attempt: Attempt, rows: t.Sequence[t.Any]
) -> tuple[list[str], list[str]]:
    """Publish the rows of a batch, in order, until the broker fails.

    :return: The ids of the rows published, and of those left unsent when
        the broker failed.
    """
    from . import table as outbox

    published: list[str] = []
    for index, row in enumerate(rows):
        try:
            sent = outbox.publish(celery, row, attempt)
        except Exception as exc:
            if not attempt.is_broker_error(exc):
                _failed(engine, celery, row, exc)
                continue
            sent, failure = False, f"it failed: {outbox.describe(exc)}"
        else:
            failure = f"it {attempt.failure}"
        if sent:
            published.append(row.id)
            continue
        _broker_down(celery, failure)
        return published, [left.id for left in rows[index:]]
    return published, []


def _release_claim(engine: Engine, claimed: Future[t.Any]) -> None:
    """Make the rows of a claim made ahead available again at once."""
    from . import table as outbox

    outbox.release(engine, [row.id for row in claimed.result()], time.time())


def _untraced(call: t.Callable[..., t.Any], *args: t.Any) -> t.Any:
    with untraced():
        return call(*args)


def _broker_down(celery: Celery[t.Any], failure: str) -> None:
    """Say that the broker failed a relay: a warning the first time, until a
    relay of this process reaches it again.

    :param failure: What happened, as "it refused the connection".
    """
    url = celery.connection_for_write().as_uri()
    with _unreachable_lock:
        first = (id(celery), url) not in _unreachable
        _unreachable.add((id(celery), url))
    logger.log(
        logging.WARNING if first else logging.DEBUG,
        "The outbox relay cannot reach the broker at %s: %s. The tasks in the"
        " outbox wait for it; the relay tries again at each look, and says"
        " when it is back.",
        url,
        failure,
    )


def _broker_up(celery: Celery[t.Any]) -> None:
    """Say that a relay reached the broker again, after :func:`_broker_down`."""
    if not _unreachable:
        return
    url = celery.connection_for_write().as_uri()
    with _unreachable_lock:
        if (id(celery), url) not in _unreachable:
            return
        _unreachable.discard((id(celery), url))
    logger.info("The outbox relay reached the broker at %s again.", url)


def _next_size(batch: int, rows: int, elapsed: float, lease: float) -> int:
    """How many rows to claim next: what the pace of the last batch, ``rows``
    published in ``elapsed`` seconds, publishes in a quarter of the lease,
    between ``batch`` and :data:`MAX_BATCH`, so that a claim is published
    long before another relay may take its rows."""
    fits = rows * lease / (4 * elapsed) if elapsed > 0 else MAX_BATCH
    return int(min(max(batch, MAX_BATCH), max(batch, fits)))


def _publish_timeout(celery: Celery[t.Any]) -> float:
    """How long a relay's publish waits for the broker: Celery's
    ``broker_connection_timeout``, or ``outbox_publish_timeout`` if longer.
    A relay is on no request's path, and a broker that never answers must
    not hold it for ever."""
    configured = celery.conf.get("broker_connection_timeout")
    return max(settings(celery).publish_timeout, float(configured or 4.0))


def _failed(
    engine: Engine, celery: Celery[t.Any], row: t.Any, error: Exception
) -> None:
    from . import table as outbox

    with untraced():
        dead = outbox.fail(engine, celery, row, error)
    if dead:
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
            settings(celery).max_attempts,
            outbox.describe(error),
            exc_info=error,
        )


def relay_all(ext: FlaskCelery) -> int:
    """Publish the available rows of every database of the app, but those
    that are read-only.

    :param ext: The extension.
    :return: How many tasks were published.
    """
    total = 0
    for engine in engines(ext):
        try:
            total += relay(engine, ext.celery)
        except Exception as exc:
            if not _refuses_writes(exc):
                raise
    return total


class RelayThread(threading.Thread):
    """Publishes what waits in the outbox of each database of the app, until
    stopped.

    An idle relay asks each database one question, when the next row is
    available, and sleeps until then: at most ``outbox_lease`` seconds, for
    a row committed meanwhile is not available sooner, and at least
    ``interval``. A database without the table is asked again every
    :data:`TABLE_LOOKUP` seconds. A database that refuses writes, a
    read-only replica, is left alone after its first refusal. Its queries
    are not traced (:mod:`~flask_celery_ctx.outbox.untraced`); each publish
    is traced in the trace its send was queued in
    (:mod:`~flask_celery_ctx.outbox.tracecontext`).

    :param ext: The extension.
    :param interval: The least seconds between two looks at a database.
    """

    def __init__(self, ext: FlaskCelery, interval: float) -> None:
        super().__init__(name="flask-celery-outbox-relay", daemon=True)
        self.ext = ext
        self.interval = interval
        self._stopped = threading.Event()
        self._engines: list[Engine] | None = None
        # When to look at each database next.
        self._next: dict[Engine, float] = {}
        self._read_only: set[Engine] = set()
        # The databases whose oldest waiting row was too old at last look.
        self._alerting: set[Engine] = set()

    def run(self) -> None:
        while not self._stopped.wait(self.round()):
            pass

    def round(self) -> float:
        """Look at the databases whose time has come.

        :return: Seconds until the next look.
        """
        now = time.time()
        try:
            if self._engines is None:
                self._engines = engines(self.ext)
        except Exception:
            logger.exception("The outbox relay failed; it tries again.")
            return self.interval
        for engine in self._engines:
            if engine in self._read_only or self._next.get(engine, now) > now:
                continue
            try:
                self._next[engine] = self._look(engine, now)
            except Exception as exc:
                if _refuses_writes(exc):
                    self._read_only.add(engine)
                    logger.info(
                        "The outbox relay leaves %r alone: it is read-only.",
                        engine.url,
                    )
                    continue
                logger.exception("The outbox relay failed; it tries again.")
                self._next[engine] = now + self.interval
        upcoming = [at for e, at in self._next.items() if e not in self._read_only]
        return max(self.interval, min(upcoming, default=now) - time.time())

    def _look(self, engine: Engine, now: float) -> float:
        """Relay what is available in the outbox of ``engine``.

        :return: When to look again.
        """
        from . import table as outbox

        with untraced():
            if not outbox.has_table(engine):
                return now + TABLE_LOOKUP
            available = outbox.next_available(engine)
        latest = now + settings(self.ext.celery).lease
        if available is None or available > now:
            self._watch(engine, available is not None)
            return latest if available is None else min(available, latest)
        sent = relay(engine, self.ext.celery)
        if sent:
            logger.info("The outbox relay sent %d %s.", sent, tasks_word(sent))
        self._watch(engine, True)
        return now

    def _watch(self, engine: Engine, rows: bool) -> None:
        """Warn once when the oldest waiting row of ``engine`` is older than
        the setting ``outbox_alert_age``, and tell when none is any more.

        :param rows: Whether the outbox may have rows; if not, it is not
            asked.
        """
        from . import table as outbox

        oldest = None
        if rows:
            with untraced():
                oldest = outbox.health(engine, time.time()).oldest_waiting
        limit = settings(self.ext.celery).alert_age
        age = None if oldest is None else time.time() - oldest
        late = age is not None and age > limit
        if late and engine not in self._alerting:
            self._alerting.add(engine)
            logger.warning(
                "The oldest task waiting in the outbox of %s was committed"
                " %.0f s ago, more than CELERY_OUTBOX_ALERT_AGE (%g s): the"
                " broker may be down, or its publish fails. See `flask celery"
                " outbox list`.",
                engine.url,
                age,
                limit,
            )
        elif not late and engine in self._alerting:
            self._alerting.discard(engine)
            logger.info(
                "The outbox of %s has no task waiting for more than %g s any more.",
                engine.url,
                limit,
            )

    def stop(self) -> None:
        """Stop after the current round; wait for it a little."""
        self._stopped.set()
        if self.is_alive():
            self.join(10)


def _refuses_writes(exc: BaseException) -> bool:
    """Whether a database error says that the database is read-only."""
    from .table import sqlstate

    orig = getattr(exc, "orig", None)
    return sqlstate(exc) == "25006" or getattr(orig, "sqlite_errorcode", None) == 8


class RelayStep(bootsteps.StartStopStep):
    """The worker bootstep that runs a :class:`RelayThread` in the worker's
    main process, when the app uses a database and the outbox is on. It
    first logs, as errors, what keeps the app's database role from using
    the outbox table (:mod:`~flask_celery_ctx.outbox.access`)."""

    label = "Outbox relay"
    requires = ("celery.worker.components:Pool",)

    def create(self, parent: t.Any) -> RelayThread | None:  # type: ignore[override]
        ext: FlaskCelery | None = getattr(parent.app, "flask_celery", None)
        if ext is None or not enabled(ext.celery):
            return None
        try:
            app = ext.app
        except RuntimeError:
            return None  # never bound: no database to relay from
        if database(app) is None:
            return None
        from .access import problems

        with untraced():
            for error in problems(ext):
                logger.error("%s", error)
        interval = settings(ext.celery).relay_interval
        return RelayThread(ext, interval) if interval else None


def install(celery: Celery[t.Any]) -> None:
    """Add the relay to the workers of ``celery``.

    :param celery: The Celery app.
    """
    celery.steps["worker"].add(RelayStep)


def tasks_word(count: int) -> str:
    """ "task" or "tasks", for ``count`` of them."""
    return "task" if count == 1 else "tasks"
