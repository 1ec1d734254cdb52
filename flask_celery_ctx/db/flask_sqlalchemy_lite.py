"""Flask-SQLAlchemy-Lite: ``db.session`` and ``db.get_session(name)`` are
plain sessions cached in ``g._sqlalchemy_sessions``, which Flask-SQLAlchemy-
Lite closes in a ``teardown_appcontext`` function. Its engines, sync and
async, are reached in an application context.

Async sessions (``db.async_session``) are closed by Flask-SQLAlchemy-Lite's
own teardown function only: closing one needs the event loop it was used in.
"""

from __future__ import annotations

import typing as t
from importlib.metadata import version

from flask import Flask
from flask.ctx import AppContext
from flask.globals import _cv_app

from .base import Database
from .base import extension_of_type
from .base import NamedEngine
from .base import Teardown

if t.TYPE_CHECKING:
    from flask_sqlalchemy_lite import SQLAlchemy
    from sqlalchemy.orm import Session

# Where Flask-SQLAlchemy-Lite keeps a context's sessions, in ``g``.
_SESSIONS = "_sqlalchemy_sessions"
_ASYNC_SESSIONS = "_sqlalchemy_async_sessions"


def find(app: Flask) -> FlaskSQLAlchemyLite | None:
    """The adapter for the app's Flask-SQLAlchemy-Lite extension, if it has
    one.

    :param app: The Flask application.
    """
    db = extension_of_type(app, "flask_sqlalchemy_lite", "SQLAlchemy")
    return None if db is None else FlaskSQLAlchemyLite(db)


class FlaskSQLAlchemyLite(Database):
    """The sessions and engines of a ``flask_sqlalchemy_lite.SQLAlchemy``.

    :param db: The extension.
    """

    name = "Flask-SQLAlchemy-Lite"

    def __init__(self, db: SQLAlchemy) -> None:
        self.db = db

    def session(self) -> Session:
        return self.db.session

    def existing_session(self, ctx: AppContext) -> Session | None:
        sessions: dict[str, Session] = ctx.g.get(_SESSIONS, {})
        return sessions.get("default")

    def sessions(self, ctx: AppContext) -> list[Session]:
        return list(ctx.g.get(_SESSIONS, {}).values())

    def take_sessions(self, ctx: AppContext) -> list[Session]:
        return list(ctx.g.pop(_SESSIONS, {}).values())

    def teardown_substitutes(self) -> list[tuple[Teardown, Teardown]]:
        # Flask-SQLAlchemy-Lite 0.2 closes the async sessions of a context in
        # an async teardown function, which Flask runs in an event loop of its
        # own, in a thread of its own, at every pop: also when the context
        # opened none, as a task that uses no async session.
        from flask_sqlalchemy_lite import _extension

        close = getattr(_extension, "_close_async_sessions", None)
        if close is None or not version("flask-sqlalchemy-lite").startswith("0.2."):
            return []

        def close_async_sessions(exc: BaseException | None) -> None:
            ctx = _cv_app.get()
            if _ASYNC_SESSIONS in ctx.g:
                ctx.app.ensure_sync(close)(exc)

        return [(close, close_async_sessions)]

    def engines(self, app: Flask) -> list[NamedEngine]:
        with app.app_context():
            engines = dict(self.db.engines)
            async_engines = dict(self.db.async_engines)
        named = [
            NamedEngine(
                engine,
                "the default engine" if key == "default" else f"the engine {key!r}",
                f"SQLALCHEMY_ENGINES[{key!r}] (as a dict with 'url')",
            )
            for key, engine in engines.items()
        ]
        named += [
            NamedEngine(
                engine.sync_engine,
                f"the async engine {key!r}",
                f"SQLALCHEMY_ASYNC_ENGINES[{key!r}] (as a dict with 'url')",
            )
            for key, engine in async_engines.items()
        ]
        return named
