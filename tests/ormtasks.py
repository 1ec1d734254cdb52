"""Models and tasks of the on-commit and model-argument tests.

Workers load this module through ``CELERY_IMPORTS``. ``Remote`` lives in the
bind ``other``, which only the apps of these tests configure.
"""

from __future__ import annotations

import time
import typing as t
import uuid

from celery import current_task
from celery import Task
from flask import g
from flask import has_app_context
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import ForeignKey
from sqlalchemy import ForeignKeyConstraint
from sqlalchemy import orm
from sqlalchemy import select
from sqlalchemy.engine import Engine

from flask_celery_ctx import ContextTask

from taskapp import db
from taskapp import ext
from taskapp import Item


def config(other_url: str) -> dict[str, t.Any]:
    """The config of the workers and apps of these tests, with the bind
    ``other`` at ``other_url``, whose tables it creates."""
    engine = create_engine(other_url)
    db.metadatas["other"].create_all(engine)
    engine.dispose()
    return {"CELERY_IMPORTS": ["ormtasks"], "SQLALCHEMY_BINDS": {"other": other_url}}


class Pair(db.Model):  # type: ignore[name-defined,misc]
    """A model with a composite primary key."""

    a: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=False)
    b: orm.Mapped[str] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]


class Remote(db.Model):  # type: ignore[name-defined,misc]
    """A model in another database."""

    __bind_key__ = "other"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]


class PlainBase(orm.DeclarativeBase):
    """A base that is not ``db.Model``, as plain SQLAlchemy and
    Flask-SQLAlchemy-Lite users declare their models."""


class Plain(PlainBase):
    """A model of a plain declarative base, in the default database."""

    __tablename__ = "plain_model"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]


class Forum(db.Model):  # type: ignore[name-defined,misc]
    """A model whose collections load eagerly, each its own way."""

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]
    moderators: orm.Mapped[list[Moderator]] = orm.relationship(lazy="joined")
    topics: orm.Mapped[list[Topic]] = orm.relationship(lazy="selectin")
    tags: orm.Mapped[list[Tag]] = orm.relationship(lazy="subquery")


class Moderator(db.Model):  # type: ignore[name-defined,misc]
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    forum_id: orm.Mapped[int] = orm.mapped_column(ForeignKey("forum.id"))
    name: orm.Mapped[str]


class Topic(db.Model):  # type: ignore[name-defined,misc]
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    forum_id: orm.Mapped[int] = orm.mapped_column(ForeignKey("forum.id"))
    name: orm.Mapped[str]


class Tag(db.Model):  # type: ignore[name-defined,misc]
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    forum_id: orm.Mapped[int] = orm.mapped_column(ForeignKey("forum.id"))
    name: orm.Mapped[str]


class Order(db.Model):  # type: ignore[name-defined,misc]
    """A model with a composite key and an eager-joined collection."""

    region: orm.Mapped[str] = orm.mapped_column(primary_key=True)
    number: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=False)
    name: orm.Mapped[str]
    lines: orm.Mapped[list[OrderLine]] = orm.relationship(lazy="joined")


class OrderLine(db.Model):  # type: ignore[name-defined,misc]
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    region: orm.Mapped[str]
    number: orm.Mapped[int]
    name: orm.Mapped[str]
    __table_args__ = (
        ForeignKeyConstraint(["region", "number"], ["order.region", "order.number"]),
    )


class Document(db.Model):  # type: ignore[name-defined,misc]
    """The base of joined-table inheritance, keyed by UUID, with an
    eager-joined collection."""

    id: orm.Mapped[uuid.UUID] = orm.mapped_column(primary_key=True, default=uuid.uuid4)
    kind: orm.Mapped[str]
    name: orm.Mapped[str]
    notes: orm.Mapped[list[Note]] = orm.relationship(lazy="joined")
    __mapper_args__: t.ClassVar[dict[str, t.Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "document",
    }


class Report(Document):
    """A subclass with a table of its own."""

    id: orm.Mapped[uuid.UUID] = orm.mapped_column(
        ForeignKey("document.id"), primary_key=True
    )
    pages: orm.Mapped[int]
    __mapper_args__: t.ClassVar[dict[str, t.Any]] = {"polymorphic_identity": "report"}


class Note(db.Model):  # type: ignore[name-defined,misc]
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    document_id: orm.Mapped[uuid.UUID] = orm.mapped_column(ForeignKey("document.id"))
    name: orm.Mapped[str]


class Animal(db.Model):  # type: ignore[name-defined,misc]
    """The base of single-table inheritance."""

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    kind: orm.Mapped[str]
    name: orm.Mapped[str]
    __mapper_args__: t.ClassVar[dict[str, t.Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "animal",
    }


class Dog(Animal):
    """A subclass in its base's table, with an eager-joined collection."""

    toys: orm.Mapped[list[Toy]] = orm.relationship(lazy="joined")
    __mapper_args__: t.ClassVar[dict[str, t.Any]] = {"polymorphic_identity": "dog"}


class Toy(db.Model):  # type: ignore[name-defined,misc]
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    animal_id: orm.Mapped[int] = orm.mapped_column(ForeignKey("animal.id"))
    name: orm.Mapped[str]


class Job(db.Model):  # type: ignore[name-defined,misc]
    """A row that stores the id of the task sent for it."""

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]
    task_id: orm.Mapped[str | None]


@event.listens_for(Engine, "before_cursor_execute")
def _count_statements(*args: t.Any) -> None:
    # The statements of a task that counts them, its loading included.
    if has_app_context() and getattr(current_task, "count_statements", False):
        g.setdefault("statements", []).append(args[2])


def describe_value(value: t.Any) -> t.Any:
    """What the task sees of an argument, in JSON."""
    if isinstance(value, (db.Model, PlainBase)):
        state = orm.object_session(value)
        return {
            "model": type(value).__name__,
            "name": getattr(value, "name"),  # noqa: B009 (models of two bases)
            "attached": state is db.session(),
        }
    if isinstance(value, dict):
        return {k: describe_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [describe_value(v) for v in value]}
    return value


def _describe(task: Task, args: t.Any, kwargs: t.Any) -> dict[str, t.Any]:  # type: ignore[type-arg]
    return {
        "args": describe_value(list(args)),
        "kwargs": describe_value(kwargs),
        "statements": list(g.get("statements", [])),
        "argsrepr": task.request.get("argsrepr"),
        "kwargsrepr": task.request.get("kwargsrepr"),
        "request_args": task.request.args,
    }


@ext.celery.task(bind=True, count_statements=True)
def describe(self: Task, *args: t.Any, **kwargs: t.Any) -> dict[str, t.Any]:  # type: ignore[type-arg]
    return _describe(self, args, kwargs)


@ext.celery.task(bind=True, allow_missing_instances=True)
def describe_or_none(self: Task, *args: t.Any, **kwargs: t.Any) -> dict[str, t.Any]:  # type: ignore[type-arg]
    return _describe(self, args, kwargs)


@ext.celery.task(bind=True, max_retries=1, default_retry_delay=0)
def retried(self: Task, item: Item) -> dict[str, t.Any]:  # type: ignore[type-arg]
    """Retry once, then describe the item: retries send the references."""
    if not self.request.retries:
        raise self.retry()
    return {"retries": self.request.retries, **describe_value(item)}


SEEN_BY_HOOKS: list[t.Any] = []


class SeeingTask(ContextTask):
    """Records what ``before_start`` gets, in this process."""

    def before_start(self, task_id: str, args: t.Any, kwargs: t.Any) -> None:
        SEEN_BY_HOOKS.append((list(args), dict(kwargs)))


@ext.celery.task(base=SeeingTask)
def seen_by_hooks(*args: t.Any, **kwargs: t.Any) -> None:
    pass


@ext.celery.task
def same(*args: t.Any) -> list[t.Any]:
    """Return the arguments themselves: inline, the caller compares them."""
    return list(args)


@ext.celery.task
def seen_item(item_id: int) -> dict[str, t.Any]:
    """When the task ran, and the committed name of the item then, read on a
    connection of its own."""
    with db.engine.connect() as conn:
        name = conn.scalar(select(Item.name).where(Item.id == item_id))
    return {"at": time.time(), "name": name}


@ext.celery.task
def seen_remote(remote_id: int) -> str | None:
    remote = db.session.get(Remote, remote_id)
    return remote.name if remote else None


@ext.celery.task(bind=True)
def job_task(self: Task, job: Job) -> dict[str, t.Any]:  # type: ignore[type-arg]
    """Whether the job row stores this task's id."""
    return {"name": job.name, "mine": job.task_id == self.request.id}


@ext.celery.task
def add_item(name: str) -> int:
    """Add an item and commit."""
    item = Item(name=name)
    db.session.add(item)
    db.session.commit()
    return item.id


@ext.celery.task
def count_named(name: str) -> int:
    return len(db.session.scalars(select(Item).where(Item.name == name)).all())


@ext.celery.task(count_statements=True)
def count_loaded(items: t.Sequence[Item]) -> dict[str, t.Any]:
    """What the task got of many instances, and the queries that loaded them."""
    return {
        "ids": len({item.id for item in items}),
        "names": sorted({item.name for item in items}),
        "attached": all(orm.object_session(item) is db.session() for item in items),
        "queries": len(g.get("statements", [])),
    }


_COLLECTIONS = ("moderators", "topics", "tags", "lines", "notes", "toys")


@ext.celery.task
def related(*instances: t.Any) -> list[dict[str, t.Any]]:
    """The class, the name and the eagerly loaded collections of each
    instance, as the task sees them."""
    return [
        {
            **describe_value(instance),
            "related": {
                attr: sorted(each.name for each in getattr(instance, attr))
                for attr in _COLLECTIONS
                if hasattr(instance, attr)
            },
        }
        for instance in instances
    ]


class DatabaseTask(Task):  # type: ignore[type-arg]
    """A base class of the kind blog posts show: a plain ``celery.Task`` with
    a session of its own, closed after each task."""

    _session: orm.Session | None = None

    @property
    def session(self) -> orm.Session:
        if self._session is None:
            self._session = orm.Session(db.engine)
        return self._session

    def after_return(self, *args: t.Any, **kwargs: t.Any) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


@ext.celery.task(base=DatabaseTask, bind=True)
def rename(self: DatabaseTask, item: Item, name: str) -> dict[str, t.Any]:
    """Rename the item in the base class's session."""
    own = self.session.get(Item, item.id)
    assert own is not None
    own.name = name
    self.session.commit()
    return {"item": describe_value(item), "renamed": own.name}


class CallingTask(Task):  # type: ignore[type-arg]
    """A base class whose ``__call__`` calls ``run`` itself, as Flask's
    documented ``FlaskTask`` does."""

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        g.called_by_base = True
        return self.run(*args, **kwargs)


@ext.celery.task(base=CallingTask)
def called(item: Item) -> dict[str, t.Any]:
    return {"item": describe_value(item), "base": g.get("called_by_base", False)}
