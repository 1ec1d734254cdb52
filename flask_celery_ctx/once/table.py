"""The table of the task ids whose work was committed,
``flask_celery_once``.

A task declared with ``once=True`` writes a row (its id, its name, the time,
its return value) in the transaction of its own work
(:mod:`~flask_celery_ctx.once.run`): the two commit together or not at all.
The primary key on the id is what refuses a second run's work. Rows older
than the retention are deleted by the workers
(:mod:`~flask_celery_ctx.once.prune`).

The table goes into the database the task's session writes to by default,
as the outbox's does (:func:`~flask_celery_ctx.outbox.table.written_to`),
and is created there on first use, or by a migration (see :doc:`/once`).
"""

from __future__ import annotations

import typing as t

from sqlalchemy import bindparam
from sqlalchemy import Column
from sqlalchemy import delete
from sqlalchemy import Float
from sqlalchemy import Index
from sqlalchemy import insert
from sqlalchemy import MetaData
from sqlalchemy import select
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import Text

from ..outbox.table import written_to
from ..owntables import OwnTable

if t.TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

#: The name of the table.
TABLE_NAME = "flask_celery_once"

metadata = MetaData()

#: The table: a row per task id whose work was committed. ``created`` is
#: when (seconds since the epoch), ``result`` the task's return value in
#: JSON (``NULL`` for ``None`` or a value JSON cannot hold).
table = Table(
    TABLE_NAME,
    metadata,
    Column("task_id", String(255), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("created", Float, nullable=False),
    Column("result", Text, nullable=True),
)
_by_creation = Index(f"{TABLE_NAME}_created", table.c.created)

#: The most rows one pruning statement deletes.
PRUNE_BATCH = 1000

# Built once: a task runs them every time.
_FIND = select(table.c.created, table.c.result).where(
    table.c.task_id == bindparam("task_id")
)
_RECORD = insert(table)

_own = OwnTable(table, _by_creation)


def engine_of(session: Session, task_name: str) -> Engine:
    """The engine whose database holds the records of the session's tasks:
    the one the session writes to by default, or, for a session with
    per-model binds only, the first one its transaction used.

    :param session: The task's session.
    :param task_name: The task, for the message.
    :raises RuntimeError: The session has no default bind and its
        transaction used no database yet.
    """
    engine = written_to(session)
    if engine is not None:
        return engine
    transaction = session.get_transaction()
    connections = [] if transaction is None else list(transaction._connections)
    if not connections:
        raise RuntimeError(
            f"Task {task_name!r} is declared with once=True, which records its id"
            " in the database its work is committed to, but the session has no"
            " default bind. Give the session a default bind, in the database"
            " the task writes to."
        )
    return t.cast("Engine", getattr(connections[0], "engine", connections[0]))


def find(conn: Connection, task_id: str) -> tuple[float, str | None] | None:
    """The record of ``task_id``, if its work was committed: its ``created``
    and ``result``.

    :param conn: The connection of the task's transaction.
    :param task_id: The task id.
    """
    row = conn.execute(_FIND, {"task_id": task_id}).first()
    return None if row is None else (row.created, row.result)


def record(
    conn: Connection, task_id: str, name: str, now: float, result: str | None
) -> None:
    """Insert the record of ``task_id`` in the task's transaction.

    :param conn: The connection of the task's transaction.
    :param task_id: The task id.
    :param name: The task's name.
    :param now: The time.
    :param result: The return value, in JSON.
    :raises sqlalchemy.exc.IntegrityError: The id has a record already,
        committed by another run meanwhile.
    """
    conn.execute(
        _RECORD,
        {"task_id": task_id, "name": name, "created": now, "result": result},
    )


def create(conn: Connection, engine: Engine) -> None:
    """Create the table when this process has not seen it yet (see
    :class:`~flask_celery_ctx.owntables.OwnTable`).

    :param conn: The connection of the task's transaction.
    :param engine: Its engine.
    """
    _own.create(engine, conn)


def created(engine: Engine) -> None:
    """Remember that the database of ``engine`` holds the table: a commit
    that wrote to it succeeded.

    :param engine: The engine.
    """
    _own.seen(engine)


def has_table(engine: Engine) -> bool:
    """Whether the database of ``engine`` has the table.

    :param engine: An engine.
    """
    return _own.exists(engine)


def prune(engine: Engine, before: float) -> int:
    """Delete the records created before ``before``, :data:`PRUNE_BATCH` at
    a time, each batch committed on its own.

    :param engine: An engine whose database has the table.
    :param before: The time, in seconds since the epoch.
    :return: How many records were deleted.
    """
    old = select(table.c.task_id).where(table.c.created < before).limit(PRUNE_BATCH)
    total = 0
    while True:
        with engine.begin() as conn:
            deleted = conn.execute(delete(table).where(table.c.task_id.in_(old)))
        total += deleted.rowcount
        if deleted.rowcount < PRUNE_BATCH:
            return total
