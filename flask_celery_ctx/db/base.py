"""The interface of a database integration, and what all of them share.

An adapter says where an application context keeps its sessions and which
engines the app has; :class:`Database` builds on that what the rest of the
extension needs: the session a task loads its arguments into, the session
that ``delay_on_commit`` waits for, the rollback of a failed task, the end of
a task's sessions, and the engines a forked process must forget.

Nothing here imports SQLAlchemy: an adapter exists only for an app that uses
a database, and the sessions and engines it hands out bring their library.
"""

from __future__ import annotations

import logging
import sys
import typing as t
from abc import ABC
from abc import abstractmethod
from contextlib import AbstractContextManager
from contextlib import nullcontext
from threading import Lock

from celery.exceptions import SoftTimeLimitExceeded
from flask import Flask
from flask import has_app_context
from flask.ctx import AppContext
from flask.globals import app_ctx

if t.TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

logger = logging.getLogger("flask_celery_ctx")

#: A ``teardown_appcontext`` function.
Teardown = t.Callable[[BaseException | None], t.Any]

# libpq's PQTRANS_ACTIVE: a command is in progress on the connection.
_LIBPQ_ACTIVE = 1


class NamedEngine(t.NamedTuple):
    """An engine of the app, named for messages."""

    #: The engine; for an async engine, its ``sync_engine``.
    engine: Engine
    #: What a message calls it: ``"the default engine"``.
    name: str
    #: Where its pool is configured: ``"SQLALCHEMY_ENGINE_OPTIONS"``.
    setting: str


class Database(ABC):
    """The sessions and engines of one app's database integration.

    One instance serves one Flask app, found by
    :func:`~flask_celery_ctx.db.database`; it never holds the app, which
    methods that need it take as an argument.
    """

    #: The integration's name, for messages.
    name: t.ClassVar[str]

    @abstractmethod
    def session(self) -> Session:
        """The current application context's session, created on first use:
        the one a task's model instances are loaded into.

        :raises RuntimeError: No application context is active.
        """

    @abstractmethod
    def existing_session(self, ctx: AppContext) -> Session | None:
        """The session :meth:`session` returns in ``ctx``, if ``ctx`` has
        opened it already; never open one.

        :param ctx: An application context, active or popped.
        """

    def sessions(self, ctx: AppContext) -> list[Session]:
        """Every session ``ctx`` has opened; never open one.

        :param ctx: An application context, active or popped.
        """
        session = self.existing_session(ctx)
        return [] if session is None else [session]

    @abstractmethod
    def take_sessions(self, ctx: AppContext) -> list[Session]:
        """Called after the teardown functions of ``ctx`` ran: forget the
        sessions of ``ctx`` that teardown did not close, and return them.

        :param ctx: A popped application context.
        """

    @abstractmethod
    def engines(self, app: Flask) -> list[NamedEngine]:
        """Every engine of the app, async engines included.

        :param app: The Flask application.
        """

    def teardown_substitutes(self) -> list[tuple[Teardown, Teardown]]:
        """The integration's own ``teardown_appcontext`` functions that a
        task's context can run for less, each with the function called in its
        place (see :mod:`flask_celery_ctx.appcontext`). A substitute does what
        the function does, in the current context.
        """
        return []

    def session_in_transaction(self) -> Session | None:
        """The current application context's session, when it exists and a
        transaction is in progress in it; ``None`` otherwise. Never opens a
        session.
        """
        if not has_app_context():
            return None
        session = self.existing_session(app_ctx._get_current_object())  # type: ignore[attr-defined]
        return session if session is not None and session.in_transaction() else None

    def lend_session(self) -> AbstractContextManager[None]:
        """Called in a task's thread before the task's coroutine runs in
        another (see :mod:`flask_celery_ctx.coroutines`): return what the
        other thread enters so that :meth:`session` gives it the task's
        session there. Sessions kept by the application context need
        nothing.
        """
        return nullcontext()

    def rollback(self) -> None:
        """Roll back the sessions the current application context has
        opened; open none.

        What was flushed is undone and the sends waiting for the commit are
        dropped (see :mod:`flask_celery_ctx.send`); the sessions stay
        usable. A session whose connection cannot roll back (a query was
        interrupted, or the database dropped it) is invalidated instead: its
        connections are closed, which ends their transactions on the server.
        """
        if not has_app_context():
            return
        for session in self.sessions(app_ctx._get_current_object()):  # type: ignore[attr-defined]
            if _is_unsafe(session):
                invalidate(session)
                continue
            try:
                session.rollback()
            except Exception:
                logger.warning("Rolling back a session failed", exc_info=True)
                invalidate(session)

    def teardown(
        self,
        ctx: AppContext,
        pop: t.Callable[[AppContext, BaseException | None], None],
        exc: BaseException | None,
    ) -> None:
        """Pop a task's context with ``pop(ctx, exc)``, which runs its teardown
        functions, and make sure its sessions are gone after it. This never
        leaves a session behind: whatever state the connections are in, the
        context must be torn down.

        Before: a session whose connection a query was interrupted on is
        invalidated. A soft time limit raises in whatever the task was doing,
        possibly inside the database driver in the middle of a query, and the
        task may even catch it and return. Such a connection cannot roll back
        (psycopg: "another command is already in progress"), and once the
        server finishes the query it would sit idle in a transaction. Closing
        it ends the query and the transaction on the server. A connection
        that cannot even be looked at (the database dropped it) is
        invalidated too.

        After, even when a teardown function raised: the sessions teardown
        left behind are invalidated. Flask stops calling teardown functions
        at the first one that raises, so a failing function registered after
        the one that closes the sessions leaves them, their transactions and
        their connections behind. Such a session is invalidated: its
        connections are closed, which ends their transactions on the server,
        instead of going back to the pool in a state nobody checked.

        :param ctx: The task's application context, still active.
        :param pop: Pops the context.
        :param exc: The exception the task raised, if any.
        """
        for session in self.sessions(ctx):
            invalidate_if_interrupted(session, exc)
        try:
            pop(ctx, exc)
        finally:
            for session in self.take_sessions(ctx):
                invalidate(session)

    def dispose_inherited_connections(self, app: Flask) -> None:
        """Make a forked process open connections of its own.

        An app factory that touches the database leaves pooled connections
        in the worker's parent process. A forked child must never use them:
        two processes on one connection corrupt its protocol stream.
        Disposing with ``close=False`` forgets them without closing them, so
        the parent's stay valid; a plain ``dispose()`` in the child would
        close the parent's connections under it.

        :param app: The Flask application.
        """
        for named in self.engines(app):
            named.engine.dispose(close=False)


def extension_of_type(app: Flask, module: str, name: str) -> t.Any:
    """The extension of ``app`` that is an instance of the class ``name`` of
    ``module``, or ``None``. The module is not imported: an app that has
    such an extension has imported it.

    :param app: The Flask application.
    :param module: The module that defines the extension's class.
    :param name: The class's name.
    """
    cls = getattr(sys.modules.get(module), name, None)
    if cls is None:
        return None
    for extension in app.extensions.values():
        if isinstance(extension, cls):
            return extension
    return None


def pool_limits(engine: Engine) -> tuple[int, int] | None:
    """An engine pool's ``pool_size`` and ``max_overflow``: together, the
    most connections it hands out at once. ``None`` for a pool without such
    a limit.

    :param engine: A SQLAlchemy engine.
    """
    pool = engine.pool
    size = getattr(pool, "size", None)
    overflow = getattr(pool, "_max_overflow", None)
    if not callable(size) or not isinstance(overflow, int) or overflow < 0:
        return None
    return int(size()), overflow


# The dialects whose DBAPI connections report no status (no
# ``info.transaction_status``): those of other drivers than libpq's, such as
# sqlite3's and MySQLdb's.
_NO_STATUS: set[type] = set()

# The modules of the drivers whose connections report libpq's status.
_LIBPQ_DRIVERS = ("psycopg", "psycopg2")

#: Whether a connection of this process may report libpq's status, as
#: :func:`watch_connections` learns. Until one may, no connection can be
#: found busy, and :func:`_is_unsafe` does not look.
libpq_seen = False
_watching = False
_watch_lock = Lock()


def watch_connections() -> None:
    """Learn whether a connection of this process may report libpq's
    status: any connection opened from now on, as it connects; and, for
    connections an app opened before, whether a driver built on libpq is
    imported already. Called once an app's database integration is found,
    before its tasks run.
    """
    global _watching, libpq_seen
    if _watching:
        return
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    with _watch_lock:
        if _watching:
            return
        event.listen(Pool, "connect", _on_connect)
        if any(name in sys.modules for name in _LIBPQ_DRIVERS):
            libpq_seen = True
        _watching = True


def _on_connect(dbapi_connection: t.Any, record: t.Any) -> None:
    global libpq_seen
    if not libpq_seen and _status(dbapi_connection) is not None:
        libpq_seen = True


def _status(dbapi_connection: t.Any) -> t.Any:
    """A DBAPI connection's libpq transaction status, or ``None``."""
    # Not a mere "info": MySQLdb's connections have an info() method.
    return getattr(getattr(dbapi_connection, "info", None), "transaction_status", None)


def invalidate_if_interrupted(session: Session, exc: BaseException | None) -> None:
    """Invalidate a session before its context is popped when a query may
    have been interrupted on it: by a soft time limit, or as
    :func:`_is_unsafe` finds (see :meth:`Database.teardown`).

    :param session: A session of the context.
    :param exc: The exception the task raised, if any.
    """
    if isinstance(exc, SoftTimeLimitExceeded) or _is_unsafe(session):
        invalidate(session)


def _is_unsafe(session: Session) -> bool:
    """Whether a connection of the session is still running a command, as
    libpq drivers (psycopg, psycopg2) report it, or cannot be looked at.
    Only they can be found busy: while no connection of the process may
    report libpq's status, this does not look."""
    if not libpq_seen:
        return False
    try:
        transaction = session.get_transaction()
        if transaction is None:
            return False
        for entry in transaction._connections.values():
            connection = entry[0]
            dialect = type(connection.dialect)
            if dialect in _NO_STATUS or connection.invalidated:
                continue
            dbapi = connection.connection.dbapi_connection
            if dbapi is None:
                continue
            status = _status(dbapi)
            if status is None:
                _NO_STATUS.add(dialect)
                continue
            if status == _LIBPQ_ACTIVE:
                return True
    except Exception:
        return True
    return False


def invalidate(session: Session) -> None:
    """Invalidate a session, closing its connections, logging what that
    raised.

    :param session: The session.
    """
    try:
        session.invalidate()
    except Exception:
        logger.warning("Invalidating a session failed", exc_info=True)
