"""One application whose tasks use ``ext.session``, on the database
integration that ``FCC_DATABASE`` in its config names:

- ``"flask-sqlalchemy"``: Flask-SQLAlchemy, registered after FlaskCelery;
- ``"lite"``: Flask-SQLAlchemy-Lite, registered after FlaskCelery, with an
  async engine too;
- ``"sessionmaker"`` and ``"scoped"``: a plain SQLAlchemy ``sessionmaker``
  or ``scoped_session`` given to ``init_app``.

The models are plain ``DeclarativeBase`` classes. The config comes as JSON
in ``FCC_CONFIG``, as for ``taskapp``; the factory queries the database
before the worker forks, as many apps do.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import typing as t

from celery import current_task
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from flask import Flask
from flask import g
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import orm
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import Engine

from flask_celery_ctx import ContextTask
from flask_celery_ctx import FlaskCelery
from flask_celery_ctx.db import database

ext = FlaskCelery()


class Base(orm.DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "dbapp_note"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]


class Tag(Base):
    __tablename__ = "dbapp_tag"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]


def async_url(url: str) -> str:
    return url.replace("postgresql+psycopg:", "postgresql+psycopg_async:")


def create_app(config: dict[str, t.Any] | None = None) -> Flask:
    app = Flask("dbapp")
    app.config.update(json.loads(os.environ.get("FCC_CONFIG", "{}")))
    app.config.update(config or {})
    url = app.config["SQLALCHEMY_DATABASE_URI"]
    options = app.config.get("SQLALCHEMY_ENGINE_OPTIONS", {})
    kind = app.config["FCC_DATABASE"]
    if kind in ("sessionmaker", "scoped"):
        factory = orm.sessionmaker(create_engine(url, **options))
        ext.init_app(
            app, session=orm.scoped_session(factory) if kind == "scoped" else factory
        )
    elif kind == "flask-sqlalchemy":
        from flask_sqlalchemy import SQLAlchemy

        ext.init_app(app)
        SQLAlchemy(app)
    elif kind == "lite":
        from flask_sqlalchemy_lite import SQLAlchemy as SQLAlchemyLite

        app.config["SQLALCHEMY_ENGINES"] = {"default": {"url": url, **options}}
        if url.startswith("postgresql"):
            app.config["SQLALCHEMY_ASYNC_ENGINES"] = {
                "default": {"url": async_url(url), **options}
            }
        ext.init_app(app)
        SQLAlchemyLite(app)
    else:
        raise ValueError(kind)

    # Registered after the database's: Flask calls it before.
    @app.teardown_appcontext
    def failing_teardown(exc: BaseException | None) -> None:
        if g.get("fail_teardown"):
            raise RuntimeError("a teardown function failed")

    @app.teardown_appcontext
    def report_exception(exc: BaseException | None) -> None:
        if exc is not None:
            print(f"teardown got {exc!r}", file=sys.stderr)

    if url.startswith("postgresql"):
        with app.app_context():
            backends = [ext.session.scalar(text("select pg_backend_pid()"))]
            if kind == "lite" and app.config.get("FCC_ASYNC_IN_FACTORY"):
                backends.append(asyncio.run(async_backend_pid(app)))
        # Read by the tests: the connections pooled before a fork.
        print(f"dbapp.create_app backends {json.dumps(backends)}", file=sys.stderr)
    return app


async def async_backend_pid(app: Flask) -> int:
    db = app.extensions["sqlalchemy"]
    async with db.async_engine.connect() as conn:
        return int((await conn.execute(text("select pg_backend_pid()"))).scalar_one())


@event.listens_for(Engine, "before_cursor_execute")
def _count_statements(*args: t.Any) -> None:
    # The statements of a task that counts them, its loading included.
    if getattr(current_task, "count_statements", False):
        g.setdefault("statements", []).append(args[2])


@ext.celery.task
def state(marker: str) -> dict[str, t.Any]:
    """What the context held when the task started; then mark it."""
    seen = {
        "g": g.get("marker"),
        "session": ext.session.info.get("marker"),
        "integration": database(ext.app).name,  # type: ignore[union-attr]
        "flask_sqlalchemy": "flask_sqlalchemy" in sys.modules,
    }
    g.marker = marker
    ext.session.info["marker"] = marker
    ext.session.execute(select(1))
    return seen


@ext.celery.task
def write(name: str, how: str) -> str:
    """Add a note, flush it, and end as ``how`` says."""
    ext.session.add(Note(name=name))
    ext.session.flush()
    if how == "commit":
        ext.session.commit()
    elif how == "raise":
        raise ValueError("failed after a flush")
    elif how == "teardown_raise":
        g.fail_teardown = True
    return how


@ext.celery.task
def count(name: str) -> int:
    return ext.session.scalar(select(func.count()).where(Note.name == name)) or 0


@ext.celery.task
def backend() -> tuple[int, int]:
    return os.getpid(), ext.session.scalar(text("select pg_backend_pid()"))


@ext.celery.task
def async_backend() -> tuple[int, int]:
    return os.getpid(), asyncio.run(async_backend_pid(ext.app))


@ext.celery.task(soft_time_limit=1)
def sleep_query(seconds: float) -> str:
    """Block in the database, catch the soft time limit, and return."""
    try:
        ext.session.execute(text("select pg_sleep(:s)"), {"s": seconds})
    except SoftTimeLimitExceeded:
        time.sleep(0.1)
        return "swallowed"
    return "slept"


def describe_value(value: t.Any) -> t.Any:
    if isinstance(value, Base):
        return {
            "model": type(value).__name__,
            "name": value.name,  # type: ignore[attr-defined]
            "attached": orm.object_session(value) is ext.session,
        }
    if isinstance(value, dict):
        return {k: describe_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe_value(v) for v in value]
    return value


@ext.celery.task(bind=True, count_statements=True)
def describe(self: Task, *args: t.Any, **kwargs: t.Any) -> dict[str, t.Any]:  # type: ignore[type-arg]
    return {
        "args": describe_value(list(args)),
        "kwargs": describe_value(kwargs),
        "statements": list(g.get("statements", [])),
    }


class NotesHookSession(ContextTask):
    def before_start(self, task_id: str, args: t.Any, kwargs: t.Any) -> None:
        g.hook_session = id(ext.session)


@ext.celery.task(base=NotesHookSession)
async def async_session(name: str) -> dict[str, t.Any]:
    """Write a note in the session the coroutine sees, which the hook saw."""
    await asyncio.sleep(0)
    ext.session.add(Note(name=name))
    ext.session.commit()
    return {
        "integration": database(ext.app).name,  # type: ignore[union-attr]
        "hook_session": id(ext.session) == g.hook_session,
    }
