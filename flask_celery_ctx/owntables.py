"""The library's own tables: the outbox of ``delay_on_commit``, the records
of ``once=True`` and the keys of ``unique_for``.

Each is created by the first process that needs it, unless a migration
made it before (see :mod:`flask_celery_ctx.migrations`), and each process
remembers the databases that have it, so that it asks each database once.
"""

from __future__ import annotations

import typing as t
from weakref import WeakSet

from sqlalchemy import inspect
from sqlalchemy.schema import CreateIndex
from sqlalchemy.schema import CreateTable

if t.TYPE_CHECKING:
    from sqlalchemy import Index
    from sqlalchemy import Table
    from sqlalchemy.engine import Connection
    from sqlalchemy.engine import Engine
    from sqlalchemy.sql.expression import Executable


class OwnTable:
    """A table of the library's, created when first needed.

    :param table: The table.
    :param indexes: Its indexes, created with it.
    """

    def __init__(self, table: Table, *indexes: Index) -> None:
        self.table = table
        self._statements: list[Executable] = [
            CreateTable(table, if_not_exists=True),
            *(CreateIndex(index, if_not_exists=True) for index in indexes),
        ]
        self._seen: WeakSet[Engine] = WeakSet()

    def exists(self, engine: Engine) -> bool:
        """Whether the database of ``engine`` has the table.

        :param engine: An engine.
        """
        if engine in self._seen:
            return True
        with engine.connect() as conn:
            found = inspect(conn).has_table(self.table.name)
        if found:
            self._seen.add(engine)
        return found

    def seen(self, engine: Engine) -> None:
        """Remember that the database of ``engine`` has the table: a commit
        that wrote to it succeeded.

        :param engine: The engine.
        """
        self._seen.add(engine)

    def create(self, engine: Engine, conn: Connection | None = None) -> None:
        """Create the table when this process has not seen it yet.

        On SQLite, on ``conn``, in its transaction: another connection would
        wait for the lock that transaction may hold; the table is known once
        a commit has made it. Elsewhere, in a transaction of its own, so that
        two processes creating it at once do not fail.

        :param engine: The engine of the database.
        :param conn: The connection of the transaction that needs the table;
            without it, SQLite's table is left to that transaction.
        :raises Exception: What the database answered, when the table is
            still missing: the role may not create it.
        """
        if engine in self._seen:
            return
        if engine.dialect.name == "sqlite":
            if conn is None:
                return
            if inspect(conn).has_table(self.table.name):
                self._seen.add(engine)
                return
            for statement in self._statements:
                conn.execute(statement)
            return
        if self.exists(engine):
            return
        try:
            with engine.begin() as own:
                for statement in self._statements:
                    own.execute(statement)
        except Exception:
            # Another process created it at the same moment, or this one may not.
            if not self.exists(engine):
                raise
        self._seen.add(engine)
