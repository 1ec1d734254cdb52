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
