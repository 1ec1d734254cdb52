"""The table of unique sends, ``flask_celery_unique``, and the statements
that claim and release its rows (see :mod:`flask_celery_ctx.unique`).

A row per key held: the primary key, the task's name and the key, is the
unique constraint that concurrent senders meet on. A send claims a key with
one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` that takes over a row
that expired or that its own task id holds, and returns nothing for a row
held by another; then a ``SELECT`` reads who holds it. PostgreSQL and
SQLite have that statement; other databases are refused with an error.

The table is created on first use, like the outbox's, or by a migration
(``table.create(op.get_bind(), checkfirst=True)``).
"""

from __future__ import annotations

import time
import typing as t
from weakref import WeakKeyDictionary

from sqlalchemy import bindparam
from sqlalchemy import Column
from sqlalchemy import delete
from sqlalchemy import Float
from sqlalchemy import MetaData
from sqlalchemy import select
from sqlalchemy import String
from sqlalchemy import Table

from ..db import database
from ..owntables import OwnTable

if t.TYPE_CHECKING:
    from flask import Flask
    from sqlalchemy.engine import Connection
    from sqlalchemy.engine import Engine
    from sqlalchemy.sql import Executable

#: The name of the table.
TABLE_NAME = "flask_celery_unique"

metadata = MetaData()

#: A row per key held: the task's name and the key (the primary key, the
#: unique constraint senders meet on), the id of the task that holds it,
#: and when the hold expires, in seconds since the epoch.
table = Table(
    TABLE_NAME,
    metadata,
    Column("name", String(255), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("task_id", String(255), nullable=False),
    Column("expires", Float, nullable=False),
)

_own = OwnTable(table)
# The engine each app claims on, outside a transaction of the caller.
_engines: WeakKeyDictionary[Flask, Engine] = WeakKeyDictionary()


def claim_alone(
    engine: Engine, name: str, key: str, task_id: str, seconds: float
) -> str:
    """:func:`claim` in a transaction of its own, committed at once.

    :param engine: The engine of the table.
    :param name: The task's name.
    :param key: The key.
    :param task_id: The id of the send.
    :param seconds: How long the claim lasts.
    :return: The id of the task that holds the key.
    """
    # Before a connection is taken: creating the table takes others.
    _own.create(engine)
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        return claim(conn, engine, name, key, task_id, seconds)


def claim(
    conn: Connection,
    engine: Engine,
    name: str,
    key: str,
    task_id: str,
    seconds: float,
    now: float | None = None,
) -> str:
    """Claim a key for a task id, or find who holds it.

    :param conn: The connection to claim on: autocommit, or in the
        caller's transaction.
    :param engine: Its engine.
    :param name: The task's name.
    :param key: The key.
    :param task_id: The id of the send.
    :param seconds: How long the claim lasts.
    :param now: The time.
    :return: The id of the task that holds the key: ``task_id`` when the key
        was free, expired, or held by that id already (a send published
        again).
    :raises RuntimeError: The database is not PostgreSQL or SQLite.
    """
    _own.create(engine, conn)
    claiming, holding = _statements(engine.dialect.name)
    now = time.time() if now is None else now
    values = {
        "name": name,
        "key": key,
        "task_id": task_id,
        "expires": now + seconds,
        "now": now,
    }
    while True:
        if conn.execute(claiming, values).first() is not None:
            return task_id
        holder: str | None = conn.scalar(holding, values)
        if holder is not None:
            return holder
        # Deleted in between: its task finished. Claim again.


def release(engine: Engine, name: str, key: str, task_id: str) -> None:
    """Delete a row, if ``task_id`` still holds it.

    :param engine: The engine of the table.
    :param name: The task's name.
    :param key: The key.
    :param task_id: The id of the task that claimed it.
    """
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(_RELEASE, {"name": name, "key": key, "task_id": task_id})


def engine_of(app: Flask) -> Engine:
    """The engine whose database holds the table of ``app``: the one its
    session writes to (the primary of a session that routes writes), found
    once.

    :param app: The Flask application.
    :raises RuntimeError: The app has no database.
    """
    found = _engines.get(app)
    if found is not None:
        return found
    from ..outbox.table import written_to

    db = database(app)
    if db is None:
        raise RuntimeError(
            "unique_for keeps its keys in the app's database, but the app has"
            " none: no Flask-SQLAlchemy, Flask-SQLAlchemy-Lite or"
            " FlaskCelery(session=...). Set up the database, or send without"
            " unique_for."
        )
    with app.app_context():
        found = written_to(db.session())
    if found is None:  # per-model binds only
        found = db.engines(app)[0].engine
    _engines[app] = found
    return found


_KEY = (table.c.name == bindparam("name"), table.c.key == bindparam("key"))
_RELEASE = delete(table).where(*_KEY, table.c.task_id == bindparam("task_id"))
_HOLDER = select(table.c.task_id).where(*_KEY)

# By dialect: the statement that claims a key, and the one that reads who
# holds it; made once, so that a send does not build them again.
_built: dict[str, tuple[Executable, Executable]] = {}


def _statements(dialect: str) -> tuple[Executable, Executable]:
    """The statements of :func:`claim` on ``dialect``: ``INSERT ... ON
    CONFLICT DO UPDATE`` of an expired row, or of one the same task id
    holds, returning the task id; and the ``SELECT`` of the holder.

    :raises RuntimeError: The dialect has no ``ON CONFLICT``.
    """
    found = _built.get(dialect)
    if found is not None:
        return found
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    else:
        raise RuntimeError(
            f"unique_for keeps its keys in the app's database, with an INSERT"
            f" ... ON CONFLICT that {dialect} lacks: it needs PostgreSQL or"
            " SQLite. Send without unique_for on this database."
        )
    task_id: t.Any = bindparam("task_id")
    expires: t.Any = bindparam("expires")
    statement = insert(table).values(
        name=bindparam("name"), key=bindparam("key"), task_id=task_id, expires=expires
    )
    claiming = statement.on_conflict_do_update(
        index_elements=[table.c.name, table.c.key],
        set_={"task_id": task_id, "expires": expires},
        where=(table.c.expires <= bindparam("now")) | (table.c.task_id == task_id),
    ).returning(table.c.task_id)
    found = _built[dialect] = (claiming, _HOLDER)
    return found
