"""An application whose tasks are unique for a while, on the database
integration that ``FCC_DATABASE`` names (``"flask-sqlalchemy"``, ``"lite"``
or ``"sessionmaker"``).

Each run of a task writes a :class:`Run` row, so that the tests count runs;
:func:`gated` waits, after its row, until the test writes a :class:`Gate`
row of its name, so that the tests send while it runs. The config comes as
JSON in ``FCC_CONFIG``, as for ``taskapp``.
"""

from __future__ import annotations

import json
import os
import time
import typing as t

from celery import Task
from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy import orm
from sqlalchemy import select

from flask_celery_ctx import FlaskCelery

ext = FlaskCelery()


class Base(orm.DeclarativeBase):
    pass


class Document(Base):
    __tablename__ = "uniqueapp_document"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    title: orm.Mapped[str]


class Run(Base):
    """A run of a task."""

    __tablename__ = "uniqueapp_run"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    task_id: orm.Mapped[str]
    name: orm.Mapped[str]


class Gate(Base):
    """Lets the :func:`gated` task of its name finish."""

    __tablename__ = "uniqueapp_gate"
    name: orm.Mapped[str] = orm.mapped_column(primary_key=True)


def create_app(config: dict[str, t.Any] | None = None) -> Flask:
    app = Flask("uniqueapp")
    app.config.update(json.loads(os.environ.get("FCC_CONFIG", "{}")))
    app.config.update(config or {})
    url = app.config["SQLALCHEMY_DATABASE_URI"]
    options = app.config.get("SQLALCHEMY_ENGINE_OPTIONS", {})
    kind = app.config.get("FCC_DATABASE", "flask-sqlalchemy")
    if kind == "sessionmaker":
        ext.init_app(app, session=orm.sessionmaker(create_engine(url, **options)))
    elif kind == "flask-sqlalchemy":
        from flask_sqlalchemy import SQLAlchemy

        ext.init_app(app)
        SQLAlchemy(app)
    elif kind == "lite":
        from flask_sqlalchemy_lite import SQLAlchemy as SQLAlchemyLite

        app.config["SQLALCHEMY_ENGINES"] = {"default": {"url": url, **options}}
        ext.init_app(app)
        SQLAlchemyLite(app)
    else:
        raise ValueError(kind)
    return app


def _record(task: Task, name: str) -> None:  # type: ignore[type-arg]
    session = ext.session
    session.add(Run(task_id=task.request.id, name=name))
    session.commit()


def _wait_for_gate(name: str) -> None:
    session = ext.session
    deadline = time.monotonic() + 30
    while session.get(Gate, name) is None and time.monotonic() < deadline:
        session.rollback()  # a fresh snapshot
        time.sleep(0.05)


@ext.celery.task(bind=True, unique_for=60)
def gated(self: Task, name: str) -> str:  # type: ignore[type-arg]
    """Record a run, then wait for the gate of ``name``, 30 s at most."""
    _record(self, name)
    _wait_for_gate(name)
    return name


@ext.celery.task(bind=True, unique_for=60)
def failing(self: Task, name: str) -> None:  # type: ignore[type-arg]
    """Record a run, then fail."""
    _record(self, name)
    raise RuntimeError(f"{name} fails")


@ext.celery.task(bind=True, unique_for=60, max_retries=1, default_retry_delay=2)
def retried(self: Task, name: str) -> int:  # type: ignore[type-arg]
    """Record a run; the first attempt retries, after waiting for the gate."""
    _record(self, name)
    if not self.request.retries:
        _wait_for_gate(name)
        raise self.retry()
    return int(self.request.retries)


@ext.celery.task(bind=True, unique_for=60, unique_key=lambda document: document.id)
def index(self: Task, document: Document) -> str:  # type: ignore[type-arg]
    """Record a run of the document's title."""
    _record(self, document.title)
    return document.title


@ext.celery.task(bind=True, unique_for=60)
def resend(self: Task, name: str) -> bool:  # type: ignore[type-arg]
    """Send itself again while it runs: whether that returned its own id."""
    return bool(resend.delay(name).id == self.request.id)


@ext.celery.task
def note(number: int) -> int:
    """A task with no option: unique only when sent with ``unique_for``."""
    return number


def runs(session: orm.Session, name: str) -> list[str]:
    """The task ids of the runs of ``name``."""
    return list(session.scalars(select(Run.task_id).where(Run.name == name)))
