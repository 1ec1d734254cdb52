"""Flask-SQLAlchemy: ``db.session`` is a ``scoped_session`` whose registry
holds a session per application context, by ``id()`` of the context, and
which Flask-SQLAlchemy removes in a ``teardown_appcontext`` function."""

from __future__ import annotations

import typing as t
from importlib.metadata import version

from flask import Flask
from flask.ctx import AppContext
from flask.globals import _cv_app

from .base import Database
from .base import extension_of_type
from .base import invalidate
from .base import invalidate_if_interrupted
from .base import NamedEngine
from .base import Teardown

if t.TYPE_CHECKING:
    from collections.abc import Callable

    from flask_sqlalchemy import SQLAlchemy
    from sqlalchemy.orm import Session


def find(app: Flask) -> FlaskSQLAlchemy | None:
    """The adapter for the app's Flask-SQLAlchemy extension, if it has one.

    :param app: The Flask application.
    """
    db = extension_of_type(app, "flask_sqlalchemy", "SQLAlchemy")
    return None if db is None else FlaskSQLAlchemy(db)


class FlaskSQLAlchemy(Database):
    """The sessions and engines of a ``flask_sqlalchemy.SQLAlchemy``.

    :param db: The extension.
    """

    name = "Flask-SQLAlchemy"

    def __init__(self, db: SQLAlchemy) -> None:
        self.db = db
        # The sessions by ``id()`` of their context: the dict of the
        # ``scoped_session``'s registry, which both keep for their life. A
        # custom ``scopefunc`` makes another registry: nothing to find.
        registry = getattr(db.session.registry, "registry", None)
        self._by_context: dict[int, Session] = (
            registry if isinstance(registry, dict) else {}
        )

    def session(self) -> Session:
        return self.db.session()

    def existing_session(self, ctx: AppContext) -> Session | None:
        return self._by_context.get(id(ctx))

    def sessions(self, ctx: AppContext) -> list[Session]:
        session = self._by_context.get(id(ctx))
        return [] if session is None else [session]

    def take_sessions(self, ctx: AppContext) -> list[Session]:
        session = self._by_context.pop(id(ctx), None)
        return [] if session is None else [session]

    def teardown_substitutes(self) -> list[tuple[Teardown, Teardown]]:
        # Flask-SQLAlchemy 3.1's teardown function calls db.session.remove(),
        # whose registry looks up the context's id through the app_ctx proxy
        # three times.
        from flask_sqlalchemy import SQLAlchemy
        from flask_sqlalchemy.session import _app_ctx_id

        registry = self.db.session.registry
        if (
            not version("flask-sqlalchemy").startswith("3.1.")
            or type(self.db)._teardown_session is not SQLAlchemy._teardown_session
            or getattr(registry, "scopefunc", None) is not _app_ctx_id
            or getattr(registry, "registry", None) is not self._by_context
        ):
            return []
        return [(self.db._teardown_session, self._remove_session)]

    def _remove_session(self, exc: BaseException | None) -> None:
        """``db.session.remove()``, with the context's id read once."""
        key = id(_cv_app.get())
        session = self._by_context.get(key)
        if session is not None:
            session.close()
        self._by_context.pop(key, None)

    def teardown(
        self,
        ctx: AppContext,
        pop: Callable[[AppContext, BaseException | None], None],
        exc: BaseException | None,
    ) -> None:
        # Database.teardown for the one session of a context, with a dict
        # look-up in place of calls: it runs after every task.
        key = id(ctx)
        session = self._by_context.get(key)
        if session is not None:
            invalidate_if_interrupted(session, exc)
        try:
            pop(ctx, exc)
        finally:
            left = self._by_context.pop(key, None)
            if left is not None:
                invalidate(left)

    def engines(self, app: Flask) -> list[NamedEngine]:
        with app.app_context():
            engines = dict(self.db.engines)
        return [
            NamedEngine(engine, "the default engine", "SQLALCHEMY_ENGINE_OPTIONS")
            if key is None
            else NamedEngine(
                engine,
                f"the engine of bind {key!r}",
                f"SQLALCHEMY_BINDS[{key!r}] (as a dict with 'url')",
            )
            for key, engine in engines.items()
        ]
