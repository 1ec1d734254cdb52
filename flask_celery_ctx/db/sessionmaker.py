"""Plain SQLAlchemy: a ``sessionmaker`` or a ``scoped_session`` handed to
:class:`~flask_celery_ctx.FlaskCelery` with ``session=``.

The session is opened on first use of
:attr:`~flask_celery_ctx.FlaskCelery.session` in an application context and
closed when the context ends, by a ``teardown_appcontext`` function: a
``sessionmaker``'s session is kept in ``g``; a ``scoped_session`` keeps its
own (by thread, unless it was given a ``scopefunc``) and is ``remove()``\\ d.
The engines are those the factory is bound to, ``bind`` and ``binds``.
"""

from __future__ import annotations

import typing as t
from contextlib import AbstractContextManager
from contextlib import contextmanager
from contextlib import nullcontext

from flask import Flask
from flask import g
from flask.ctx import AppContext

from ..errors import ConfigTypeError
from .base import Database
from .base import NamedEngine

if t.TYPE_CHECKING:
    from sqlalchemy.orm import scoped_session
    from sqlalchemy.orm import Session
    from sqlalchemy.orm import sessionmaker
    from sqlalchemy.util import ScopedRegistry

# Where a context keeps the session of a ``sessionmaker``, in ``g``.
_SESSION = "_flask_celery_ctx_session"


class SessionFactory(Database):
    """The sessions of a ``sessionmaker`` or ``scoped_session``, one per
    application context, and the engines it is bound to.

    :param factory: The session factory.
    :raises TypeError: ``factory`` is neither.
    """

    name = "SQLAlchemy session factory"

    def __init__(self, factory: sessionmaker[t.Any] | scoped_session[t.Any]) -> None:
        from sqlalchemy.orm import scoped_session
        from sqlalchemy.orm import sessionmaker

        if isinstance(factory, scoped_session):
            self.scoped: scoped_session[t.Any] | None = factory
            self.factory: sessionmaker[t.Any] = factory.session_factory
        elif isinstance(factory, sessionmaker):
            self.scoped = None
            self.factory = factory
        else:
            raise ConfigTypeError(
                f"FlaskCelery(session=...) takes a sqlalchemy.orm.sessionmaker or"
                f" scoped_session, not {factory!r}. Pass the factory your code"
                " makes sessions with, such as 'SessionLocal ="
                " sessionmaker(engine)', not a session."
            )

    def session(self) -> Session:
        if self.scoped is not None:
            scoped: Session = self.scoped()
            return scoped
        session: Session | None = g.get(_SESSION)
        if session is None:
            session = self.factory()
            setattr(g, _SESSION, session)
        return session

    def lend_session(self) -> AbstractContextManager[None]:
        if self.scoped is None:
            return nullcontext()
        return _lent(self.scoped.registry, self.session())

    def existing_session(self, ctx: AppContext) -> Session | None:
        if self.scoped is not None:
            return self.scoped() if self.scoped.registry.has() else None
        return ctx.g.get(_SESSION)  # type: ignore[no-any-return]

    def take_sessions(self, ctx: AppContext) -> list[Session]:
        session = self.existing_session(ctx)
        if session is None:
            return []
        if self.scoped is not None:
            self.scoped.registry.clear()
        else:
            ctx.g.pop(_SESSION)
        return [session]

    def close(self, exc: BaseException | None = None) -> None:
        """Close the current context's session, if it opened one: a
        ``teardown_appcontext`` function.

        :param exc: The exception the context ends with; unused.
        """
        if self.scoped is not None:
            self.scoped.remove()
            return
        session: Session | None = g.pop(_SESSION, None)
        if session is not None:
            session.close()

    def engines(self, app: Flask) -> list[NamedEngine]:
        from sqlalchemy.engine import Engine

        binds = [
            self.factory.kw.get("bind"),
            *self.factory.kw.get("binds", {}).values(),
        ]
        engines: list[Engine] = []
        for bind in binds:
            engine = getattr(bind, "sync_engine", bind)
            if isinstance(engine, Engine) and engine not in engines:
                engines.append(engine)
        return [
            NamedEngine(
                engine,
                f"the engine of the session factory ({engine.url!r})",
                "its create_engine() call",
            )
            for engine in engines
        ]


@contextmanager
def _lent(registry: ScopedRegistry[Session], session: Session) -> t.Iterator[None]:
    """Make ``session`` the one a ``scoped_session``'s registry gives in this
    thread, for a while: a coroutine's thread, when the registry is scoped
    by thread."""
    if registry.has():
        yield  # the same scope
        return
    registry.set(session)
    try:
        yield
    finally:
        registry.clear()
