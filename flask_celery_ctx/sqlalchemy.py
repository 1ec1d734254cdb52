"""Flask-SQLAlchemy support, found through ``app.extensions``.

Flask-SQLAlchemy is optional: every function here does nothing for an app
that does not use it.
"""

from __future__ import annotations

import typing as t

from flask import Flask
from flask.ctx import AppContext

if t.TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy
    from sqlalchemy.engine import Engine


def get_db(app: Flask) -> SQLAlchemy | None:
    """Return the app's Flask-SQLAlchemy extension, or ``None``.

    :param app: The Flask application.
    """
    return app.extensions.get("sqlalchemy")


def discard_session(app: Flask, app_ctx: AppContext) -> None:
    """Close the session of an application context that has been popped.

    Flask-SQLAlchemy removes the session in a ``teardown_appcontext``
    function, but Flask stops calling teardown functions at the first one that
    raises, so a failing teardown registered after Flask-SQLAlchemy's would
    leave the session, its open transaction and its connection behind. This
    closes such a session: its transaction is rolled back and its connection
    goes back to the pool.

    :param app: The application the context belongs to.
    :param app_ctx: The application context, already popped.
    """
    db = get_db(app)
    if db is None:
        return
    # Flask-SQLAlchemy scopes sessions by ``id()`` of the app context.
    registry = getattr(db.session.registry, "registry", None)
    if isinstance(registry, dict):
        session = registry.pop(id(app_ctx), None)
        if session is not None:
            session.close()


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


def pool_capacity(engine: Engine) -> int | None:
    """The most connections an engine's pool hands out at once: its
    ``pool_size`` plus its ``max_overflow``, or ``None`` for no limit.

    :param engine: A SQLAlchemy engine.
    """
    pool = engine.pool
    size = getattr(pool, "size", None)
    overflow = getattr(pool, "_max_overflow", None)
    if not callable(size) or not isinstance(overflow, int) or overflow < 0:
        return None
    return int(size()) + overflow
