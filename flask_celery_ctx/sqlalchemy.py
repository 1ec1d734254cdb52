"""Flask-SQLAlchemy support, found through ``app.extensions``.

Flask-SQLAlchemy is optional: every function here does nothing for an app
that does not use it.
"""

from __future__ import annotations

import logging
import typing as t

from celery.exceptions import SoftTimeLimitExceeded
from flask import Flask
from flask import has_app_context
from flask.ctx import AppContext
from flask.globals import app_ctx as current_app_ctx

logger = logging.getLogger("flask_celery_ctx")

# libpq's PQTRANS_ACTIVE: a command is in progress on the connection.
_LIBPQ_ACTIVE = 1

if t.TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session


def get_db(app: Flask) -> SQLAlchemy | None:
    """Return the app's Flask-SQLAlchemy extension, or ``None``.

    :param app: The Flask application.
    """
    return app.extensions.get("sqlalchemy")


def sessions_by_context(app: Flask) -> dict[int, Session] | None:
    """Return Flask-SQLAlchemy's sessions of the app, by ``id()`` of the
    application context each belongs to; ``None`` without Flask-SQLAlchemy.

    :param app: The Flask application.
    """
    db = get_db(app)
    registry = None if db is None else getattr(db.session.registry, "registry", None)
    return registry if isinstance(registry, dict) else None


def discard_session(sessions: dict[int, Session], app_ctx: AppContext) -> None:
    """Invalidate the session an application context left behind when popped.

    Flask-SQLAlchemy removes the session in a ``teardown_appcontext``
    function, but Flask stops calling teardown functions at the first one that
    raises, so a failing teardown registered after Flask-SQLAlchemy's would
    leave the session, its open transaction and its connection behind; so does
    a session whose connection is in no state to roll back (a soft time limit
    caught by the task interrupted the driver mid-query). Whatever went wrong,
    such a session is invalidated: its connections are closed, which ends
    their transactions on the server, instead of going back to the pool to
    serve the next task in an unknown state.

    :param sessions: The app's sessions, from :func:`sessions_by_context`.
    :param app_ctx: The application context, already popped.
    """
    session = sessions.pop(id(app_ctx), None)
    if session is not None:
        session.invalidate()


def rollback_sessions(app: Flask) -> None:
    """Roll back the session of the current application context, if it has
    opened one; never open one.

    What was flushed is undone and the sends waiting for the commit are
    dropped (see :mod:`flask_celery_ctx.oncommit`); the session stays usable.
    A session whose connection is still running a command (a soft time limit
    interrupted the driver mid-query), or whose rollback fails, is
    invalidated instead: its connections are closed, which ends their
    transactions on the server.

    :param app: The Flask application.
    """
    sessions = sessions_by_context(app)
    if sessions is None or not has_app_context():
        return
    session = sessions.get(id(current_app_ctx._get_current_object()))  # type: ignore[attr-defined]
    if session is None:
        return
    if _has_busy_connection(session):
        session.invalidate()
        return
    try:
        session.rollback()
    except Exception:
        logger.warning("Rolling back a task's session failed", exc_info=True)
        session.invalidate()


def invalidate_interrupted_session(session: Session, exc: BaseException | None) -> None:
    """Close the connections of a task's session instead of returning them to
    the pool, when a query of the task was interrupted.

    A soft time limit raises in whatever the task was doing, possibly inside
    the database driver in the middle of a query, and the task may even catch
    it and return. Such a connection cannot roll back (psycopg: "another
    command is already in progress"), and once the server finishes the query
    it would sit idle in a transaction. Closing it ends the query and the
    transaction on the server. Call it before the context is torn down.

    :param session: The session of the task's context.
    :param exc: The exception the task raised, if any.
    """
    if isinstance(exc, SoftTimeLimitExceeded) or _has_busy_connection(session):
        session.invalidate()


def _has_busy_connection(session: Session) -> bool:
    """Whether a connection of the session is still running a command, as
    libpq drivers (psycopg, psycopg2) report it."""
    transaction = session.get_transaction()
    if transaction is None:
        return False
    for connection, *_ in transaction._connections.values():
        dbapi = connection.connection.dbapi_connection
        status = getattr(getattr(dbapi, "info", None), "transaction_status", None)
        if status == _LIBPQ_ACTIVE:
            return True
    return False


def get_engines(app: Flask) -> dict[str | None, Engine]:
    """Return the app's Flask-SQLAlchemy engines by bind key, binds included.

    :param app: The Flask application.
    """
    db = get_db(app)
    if db is None:
        return {}
    with app.app_context():
        return dict(db.engines)


def dispose_inherited_connections(app: Flask) -> None:
    """Make a forked process open connections of its own.

    An app factory that touches the database leaves pooled connections in the
    worker's parent process. A forked child must never use them: two
    processes on one connection corrupt its protocol stream. Disposing with
    ``close=False`` forgets them without closing them, so the parent's stay
    valid; a plain ``dispose()`` in the child would close the parent's
    connections under it.

    :param app: The Flask application.
    """
    for engine in get_engines(app).values():
        engine.dispose(close=False)


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
