"""The outbox table: the sends of ``delay_on_commit``, written in the
transaction they wait for, so that a commit cannot lose them.

:mod:`~flask_celery_ctx.send` calls :func:`write` when the transaction
(or a savepoint of it) commits: a row per send goes into
``flask_celery_outbox`` on the session's connection, and is committed or
rolled back with the rest. After the commit the sends are published at once
and :func:`remove` deletes their rows, in batches
(:mod:`~flask_celery_ctx.outbox.cleanup`). A row left behind, because the broker
could not be reached or the process died between the COMMIT and the
publish, is published later by a relay (:mod:`~flask_celery_ctx.outbox.relay`).

Each row holds what is needed to send the task again as it would have been
sent: its name, its arguments (model instances as references), and the
options of ``apply_async``, its ``task_id`` and ``headers`` included, and
the trace context it was queued in (:mod:`.tracecontext`). A row
is *available* from a time on: the process that wrote it has until then to
publish it (the lease, setting ``outbox_lease``); a relay claims the rows it
publishes for as long.

A row whose publish fails for another reason than the broker is tried again
later, ``outbox_max_attempts`` times at most, and then kept as *dead* with
its last error, until ``flask celery outbox retry`` or ``drop``.

Statements that list rows list at most :data:`CHUNK` of them, whatever the
number of sends of a transaction.
"""

from __future__ import annotations

import datetime
import logging
import time
import typing as t
import uuid
from weakref import WeakSet

from kombu.utils.json import dumps
from kombu.utils.json import loads
from sqlalchemy import and_
from sqlalchemy import case
from sqlalchemy import Column
from sqlalchemy import delete
from sqlalchemy import Float
from sqlalchemy import func
from sqlalchemy import Index
from sqlalchemy import insert
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import not_
from sqlalchemy import or_
from sqlalchemy import select
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import Text
from sqlalchemy import text
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import UnboundExecutionError

from ..owntables import OwnTable
from . import retry_delay
from . import settings
from .tracecontext import continued

if t.TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.engine import Engine
    from sqlalchemy.engine import Row
    from sqlalchemy.orm import Session
    from sqlalchemy.sql import Select

    from .publish import Attempt

logger = logging.getLogger("flask_celery_ctx")

#: The name of the table.
TABLE_NAME = "flask_celery_outbox"

metadata = MetaData()

#: The outbox table. Rows are published in the order of ``created``, then
#: ``position`` (the order of the sends of one transaction). ``attempts``
#: counts the failed publishes other than the broker's, ``last_error`` tells
#: the last, and ``dead`` is the time a row was given up (``NULL`` while it
#: is tried).
table = Table(
    TABLE_NAME,
    metadata,
    Column("id", String(32), primary_key=True),
    Column("task_id", String(255), nullable=False),
    Column("name", String(255), nullable=False),
    Column("message", Text, nullable=False),
    Column("created", Float, nullable=False),
    Column("position", Integer, nullable=False),
    Column("available", Float, nullable=False),
    Column("claim", String(32), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("dead", Float, nullable=True),
)
_by_availability = Index(f"{TABLE_NAME}_available", table.c.available)
#: The order rows are claimed in: with it, a claim reads the first rows of
#: the index, not every row of the table, sorted.
_by_order = Index(f"{TABLE_NAME}_order", table.c.created, table.c.position)

_own = OwnTable(table, _by_availability, _by_order)
# Engines whose table is known to have every column, in this process.
_complete: WeakSet[Engine] = WeakSet()

#: The most rows a statement lists: PostgreSQL takes 65,535 parameters at
#: most, older SQLite 999.
CHUNK = 500
#: The longest error message stored in a row.
ERROR_LENGTH = 2000


class Message(t.NamedTuple):
    """What a row holds of a send."""

    #: The task's name.
    name: str
    #: Its id.
    task_id: str
    #: The message, as JSON: ``args``, ``kwargs`` (model instances as
    #: references), ``options`` (delays counted from the commit) and
    #: ``trace``.
    message: str


def check_options(task_name: str, options: dict[str, t.Any]) -> None:
    """Refuse, when a send is queued, options that a row cannot hold.

    :param task_name: The task, for the message.
    :param options: The options of ``apply_async``.
    :raises TypeError: An option cannot be stored as JSON; the message names
        it and what to do.
    """
    try:
        dumps(options)
    except TypeError:
        pass
    else:
        return
    for name, value in options.items():
        try:
            dumps(value)
        except TypeError:
            raise TypeError(
                f"The option {name}={value!r} of task {task_name!r} cannot be"
                " stored in the outbox that delay_on_commit writes to. Pass it"
                " by name or as plain values (a queue's name rather than a"
                " Queue), or set CELERY_OUTBOX = False in the app's config to"
                " send after the commit without the outbox."
            ) from None


def message(
    args: t.Any,
    kwargs: t.Any,
    options: dict[str, t.Any],
    trace: dict[str, dict[str, str]] | None,
    now: float,
) -> str:
    """The JSON a row holds of a send whose instances are references.

    :param args: Positional arguments.
    :param kwargs: Keyword arguments.
    :param options: Options of ``apply_async``; a ``countdown`` is stored as
        an ``eta`` and a relative ``expires`` as a time, counted from ``now``.
    :param trace: The trace context it was queued in (:mod:`.tracecontext`).
    :param now: The time of the commit.
    """
    found: dict[str, t.Any] = {"args": list(args or ()), "kwargs": dict(kwargs or {})}
    if trace:
        found["trace"] = trace
    found["options"] = _absolute(dict(options), now)
    return dumps(found)


def write(
    session: Session, messages: t.Sequence[Message], seconds: float, now: float
) -> tuple[Engine, list[str]]:
    """Insert a row per message on the session's connection, in its
    transaction, available after ``seconds``, the lease.

    The table is in the database of :func:`written_to` (the default
    engine, or the primary of a session that routes writes); a session with
    per-model binds only uses the first database its transaction opened.
    The rows go through the connection the transaction holds on that
    database, when it holds one.

    :param session: The session, in the transaction that commits, flushed.
    :param messages: The messages, in the order they are to be published.
    :param seconds: Seconds the process has to publish them itself.
    :param now: The time of the commit.
    :return: The engine written to, and the ids of the rows, in order.
    """
    engine = _engine_of(session)
    conn = session.connection(bind_arguments={"bind": engine})
    try:
        _own.create(engine, conn)
    except Exception as exc:
        raise OutboxTableError(engine, exc) from exc
    available = now + seconds
    # Unique ids: one random prefix per commit, and the position.
    prefix = uuid.uuid4().hex[:24]
    rows: list[dict[str, t.Any]] = [
        {
            "id": f"{prefix}{position:08x}",
            "task_id": found.task_id,
            "name": found.name,
            "message": found.message,
            "created": now,
            "position": position,
            "available": available,
            "attempts": 0,
        }
        for position, found in enumerate(messages)
    ]
    if rows:
        try:
            if len(rows) == 1:
                # One row: a plain execute, without executemany's batching.
                conn.execute(_INSERT, rows[0])
            else:
                for chunk in _chunks(rows):
                    conn.execute(_INSERT, chunk)
        except DBAPIError as exc:
            if sqlstate(exc) == _INSUFFICIENT_PRIVILEGE:
                raise OutboxTableError(engine, exc) from exc
            raise
    return engine, [str(row["id"]) for row in rows]


_INSERT = insert(table)


def remove(engine: Engine, ids: t.Sequence[str]) -> None:
    """Delete the rows of sends that were published, :data:`CHUNK` at a
    time.

    :param engine: The engine the rows were written to.
    :param ids: Their ids.
    """
    # Each statement committed on its own: no BEGIN and COMMIT round trips.
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for chunk in _chunks(ids):
            if engine.dialect.name == "postgresql":
                conn.execute(_DELETE_ARRAY, {"ids": list(chunk)})
            else:
                conn.execute(delete(table).where(table.c.id.in_(chunk)))
    _own.seen(engine)


#: On PostgreSQL, the ids as one array: far less work for the process than
#: a parameter per id.
_DELETE_ARRAY = text(
    f"DELETE FROM {TABLE_NAME} WHERE id = ANY(CAST(:ids AS varchar[]))"
)


def has_table(engine: Engine) -> bool:
    """Whether the database of ``engine`` has the outbox table.

    :param engine: An engine.
    """
    return _own.exists(engine)


def check_columns(engine: Engine) -> None:
    """Refuse a table made by an older version, which lacks columns.

    :param engine: An engine whose database has the table.
    :raises RuntimeError: A column is missing; the message names it and how
        to add it.
    """
    if engine in _complete:
        return
    from sqlalchemy import inspect

    with engine.connect() as conn:
        found = {column["name"] for column in inspect(conn).get_columns(TABLE_NAME)}
    missing = [column for column in table.c if column.name not in found]
    if missing:
        names = ", ".join(column.name for column in missing)
        adds = " ".join(
            f"ALTER TABLE {TABLE_NAME} ADD COLUMN {column.name}"
            f" {column.type.compile(engine.dialect)};"
            for column in missing
        )
        raise RuntimeError(
            f"The table {TABLE_NAME} of {engine.url} lacks the column(s)"
            f" {names}, which this version of Flask-Celery-Ctx needs. Add"
            f" them, by a migration or with: {adds}"
        )
    _complete.add(engine)


def pending(engine: Engine, limit: int | None = None) -> list[Row[t.Any]]:
    """The rows in the outbox of ``engine``, dead ones included, in the
    order they are published.

    :param engine: An engine whose database has the table.
    :param limit: The most rows to return.
    """
    with engine.connect() as conn:
        query = select(table).order_by(table.c.created, table.c.position)
        return list(conn.execute(query.limit(limit)))


class Summary(t.NamedTuple):
    """What waits in an outbox."""

    #: The rows not dead.
    waiting: int
    #: The dead rows.
    dead: int
    #: The row not dead that is available first, if any.
    first: Row[t.Any] | None


def summary(engine: Engine) -> Summary:
    """Count what waits in the outbox of ``engine``.

    :param engine: An engine whose database has the table.
    """
    alive = table.c.dead.is_(None)
    with engine.connect() as conn:
        waiting, dead = conn.execute(
            select(
                func.coalesce(func.sum(case((alive, 1), else_=0)), 0),
                func.coalesce(func.sum(case((alive, 0), else_=1)), 0),
            ).select_from(table)
        ).one()
        first = conn.execute(
            select(table).where(alive).order_by(table.c.available).limit(1)
        ).first()
    return Summary(waiting, dead, first)


class Health(t.NamedTuple):
    """The rows of an outbox by state, and how old the oldest are."""

    #: The rows available, or waiting after a failed attempt.
    waiting: int
    #: The rows left to the process that wrote them or to a relay.
    leased: int
    #: The dead rows.
    dead: int
    #: When the oldest row not dead was committed, if any.
    oldest: float | None
    #: When the oldest waiting row was committed, if any.
    oldest_waiting: float | None


def health(engine: Engine, now: float) -> Health:
    """Count the rows of the outbox of ``engine`` by :func:`state`, in one
    query.

    :param engine: An engine whose database has the table.
    :param now: The time.
    """
    alive = table.c.dead.is_(None)
    leased = and_(
        alive,
        table.c.available > now,
        or_(table.c.claim.is_not(None), table.c.attempts == 0),
    )
    waiting = and_(alive, not_(leased))
    with engine.connect() as conn:
        found = conn.execute(
            select(
                func.coalesce(func.sum(case((waiting, 1), else_=0)), 0),
                func.coalesce(func.sum(case((leased, 1), else_=0)), 0),
                func.coalesce(func.sum(case((alive, 0), else_=1)), 0),
                func.min(case((alive, table.c.created))),
                func.min(case((waiting, table.c.created))),
            ).select_from(table)
        ).one()
    return Health(*found)


def state(row: Row[t.Any], now: float) -> str:
    """``"dead"``, ``"leased"`` (to the process that wrote it or to a
    relay), or ``"waiting"`` (available, or after a failed attempt).

    :param row: A row of the outbox.
    :param now: The time.
    """
    if row.dead is not None:
        return "dead"
    # As in health().
    if row.available > now and (row.claim is not None or not row.attempts):
        return "leased"
    return "waiting"


def next_available(engine: Engine) -> float | None:
    """When the first row of the outbox of ``engine`` is available, or
    ``None`` when it is empty: one query.

    :param engine: An engine whose database has the table.
    """
    # Without BEGIN and ROLLBACK round trips.
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        found: float | None = conn.scalar(
            select(func.min(table.c.available)).where(table.c.dead.is_(None))
        )
        return found


def claim(
    engine: Engine, limit: int, seconds: float, now: float | None = None
) -> list[Row[t.Any]]:
    """Take up to ``limit`` available rows, dead ones left out, for
    ``seconds``, for one relay.

    On PostgreSQL the rows are locked with ``FOR UPDATE SKIP LOCKED``, so
    that relays claiming at the same moment pass each other's rows by;
    everywhere, a row is claimed only if it is still available when it is
    updated, so that two relays never hold the same row.

    :param engine: An engine whose database has the table.
    :param limit: The most rows to claim.
    :param seconds: How long the claim lasts.
    :param now: The time.
    :return: The rows claimed, in the order they are to be published.
    """
    now = time.time() if now is None else now
    token = uuid.uuid4().hex
    order = (table.c.created, table.c.position)
    available = (table.c.available <= now, table.c.dead.is_(None))
    with engine.begin() as conn:
        ids = conn.scalars(claimable(limit, now)).all()
        if not ids:
            return []
        claimed: list[Row[t.Any]] = []
        # By their ids, in the order they were found: the claim column has
        # no index.
        for chunk in _chunks(ids):
            conn.execute(
                update(table)
                .where(table.c.id.in_(chunk), *available)
                .values(available=now + seconds, claim=token)
            )
            claimed += conn.execute(
                select(table)
                .where(table.c.id.in_(chunk), table.c.claim == token)
                .order_by(*order)
            )
        return claimed


def claimable(limit: int, now: float) -> Select[tuple[str]]:
    """The ids of the first ``limit`` rows available at ``now``, locked,
    those locked by another relay skipped: the first statement of
    :func:`claim`. It reads the first entries of the index on the order of
    the rows, however many wait.

    :param limit: The most rows.
    :param now: The time.
    """
    return (
        select(table.c.id)
        .where(table.c.available <= now, table.c.dead.is_(None))
        .order_by(table.c.created, table.c.position)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def release(engine: Engine, ids: t.Sequence[str], at: float) -> None:
    """Make claimed rows available again from ``at``, their attempts
    unchanged.

    :param engine: The engine of the rows.
    :param ids: Their ids.
    :param at: The time.
    """
    with engine.begin() as conn:
        for chunk in _chunks(ids):
            conn.execute(
                update(table)
                .where(table.c.id.in_(chunk))
                .values(available=at, claim=None)
            )


def fail(
    engine: Engine, celery: Celery[t.Any], row: Row[t.Any], error: BaseException
) -> bool:
    """Count a failed publish of a claimed row: it is tried again after the
    backoff (``outbox_retry_backoff``), or kept as dead after
    ``outbox_max_attempts``.

    :param engine: The engine of the row.
    :param celery: The Celery app, for its settings.
    :param row: The row, as claimed.
    :param error: Why its publish failed.
    :return: Whether the row is dead now.
    """
    now = time.time()
    attempts = row.attempts + 1
    dead: bool = attempts >= settings(celery).max_attempts
    values: dict[str, t.Any] = {
        "attempts": attempts,
        "last_error": describe(error, ERROR_LENGTH),
        "claim": None,
    }
    if dead:
        values["dead"] = now
    else:
        values["available"] = now + retry_delay(celery, attempts)
    with engine.begin() as conn:
        conn.execute(
            update(table)
            .where(table.c.id == row.id, table.c.claim == row.claim)
            .values(**values)
        )
    return dead


def retry(engine: Engine, key: str | None = None) -> int:
    """Make dead rows waiting again, available at once, their attempts
    reset.

    :param engine: An engine whose database has the table.
    :param key: The id or task id of one row; ``None`` for every dead row.
    :return: How many rows wait again.
    """
    query = update(table).where(table.c.dead.is_not(None))
    if key is not None:
        query = query.where(or_(table.c.id == key, table.c.task_id == key))
    values = {"dead": None, "attempts": 0, "last_error": None, "claim": None}
    with engine.begin() as conn:
        return conn.execute(query.values(available=time.time(), **values)).rowcount


def drop(engine: Engine, key: str) -> int:
    """Delete a dead row.

    :param engine: An engine whose database has the table.
    :param key: The id or task id of the row.
    :return: How many rows were deleted.
    """
    query = delete(table).where(
        table.c.dead.is_not(None), or_(table.c.id == key, table.c.task_id == key)
    )
    with engine.begin() as conn:
        return conn.execute(query).rowcount


def publish(celery: Celery[t.Any], row: Row[t.Any], attempt: Attempt) -> bool:
    """Send the task of a row, as it was to be sent after its commit, by its
    task's ``apply_async``, in the trace it was queued in, through a bounded
    attempt.

    :param celery: The Celery app.
    :param row: A row of the outbox.
    :param attempt: The attempt that publishes it: no retries, and timeouts
        that a broker which never answers cannot make a relay wait past.
    :return: Whether it was published; if not, the broker failed, now or
        earlier in the attempt.
    :raises celery.exceptions.NotRegistered: The app has no task of the
        row's name (any more).
    """
    from celery.exceptions import NotRegistered

    message = loads(row.message)
    task = celery.tasks.get(row.name)
    if task is None:
        celery.loader.import_default_modules()
        task = celery.tasks.get(row.name)
    if task is None:
        raise NotRegistered(
            f"The app has no task {row.name!r}: it was renamed or removed."
        )
    with continued(message.get("trace")):
        return attempt.publish(
            task, message["args"], message["kwargs"], message["options"]
        )


def describe(error: BaseException, length: int = 300) -> str:
    """A short account of an error, for a log or a row: its type and
    message; for a database error, the driver's, without the statement.

    :param error: The error.
    :param length: The most characters.
    """
    message = str(error)
    if isinstance(error, KeyError) and len(error.args) == 1:
        message = str(error.args[0])  # not its repr
    if isinstance(error, DBAPIError) and error.orig is not None:
        # The driver's first line: the next ones quote the statement.
        error = error.orig
        message = str(error).partition("\n")[0]
    found = f"{type(error).__name__}: {message}".strip()
    return found if len(found) <= length else found[: length - 3] + "..."


def written_to(session: Session) -> Engine | None:
    """The engine ``session`` writes the outbox rows to, or ``None`` for a
    session with per-model binds only.

    The rows are written with the commit's writes, so the session is asked
    as during a flush, for an ``INSERT`` into the table: a session that
    routes flushes and other writes to a primary, and reads to replicas
    (SQLAlchemy's documented ``get_bind`` recipe), names the primary.

    :param session: A session.
    """
    flushing = session._flushing
    session._flushing = True
    try:
        bind = session.get_bind(clause=insert(table))
    except UnboundExecutionError:
        return None
    finally:
        session._flushing = flushing
    return t.cast("Engine", getattr(bind, "engine", bind))


def _engine_of(session: Session) -> Engine:
    engine = written_to(session)
    if engine is not None:
        return engine
    # Per-model binds only: the first database the transaction used.
    transaction = session.get_transaction()
    connections = [] if transaction is None else list(transaction._connections)
    if not connections:
        raise RuntimeError(
            "delay_on_commit writes to the outbox table in the session's"
            " database, but the session has no default bind and its"
            " transaction used no database. Give the session a default"
            " bind, or set CELERY_OUTBOX = False in the app's config."
        )
    return t.cast("Engine", getattr(connections[0], "engine", connections[0]))


class OutboxTableError(RuntimeError):
    """The outbox table is missing and cannot be created, or the app's
    database role may not write to it.

    :param engine: The engine of the database.
    :param cause: What the database answered.
    """

    def __init__(self, engine: Engine, cause: BaseException | str) -> None:
        reason = str(getattr(cause, "orig", None) or cause).strip().splitlines()[0]
        super().__init__(
            f"delay_on_commit cannot write to the outbox table {TABLE_NAME!r} in"
            f" {engine.url!r}: {reason}. Create the table with a migration run"
            " by a role that may, and grant the app's role SELECT, INSERT,"
            " UPDATE and DELETE on it (docs: on-commit, 'Creating the table"
            " by a migration'), or set CELERY_OUTBOX = False in the app's"
            " config to send after the commit without the outbox."
        )


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, as psycopg and psycopg2 report it.

    :param exc: An error that SQLAlchemy raised.
    """
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


# SQLSTATE of "permission denied".
_INSUFFICIENT_PRIVILEGE = "42501"


def _absolute(options: dict[str, t.Any], now: float) -> dict[str, t.Any]:
    """Options whose delays count from the commit: ``countdown`` as an
    ``eta``, and a relative ``expires`` as a time."""
    countdown = options.pop("countdown", None)
    if countdown is not None and options.get("eta") is None:
        options["eta"] = _at(now) + datetime.timedelta(seconds=float(countdown))
    expires = options.get("expires")
    if isinstance(expires, (int, float)) and not isinstance(expires, bool):
        options["expires"] = _at(now) + datetime.timedelta(seconds=float(expires))
    return options


def _at(now: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(now, datetime.timezone.utc)


_T = t.TypeVar("_T")


def _chunks(items: t.Sequence[_T]) -> t.Iterator[t.Sequence[_T]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]
