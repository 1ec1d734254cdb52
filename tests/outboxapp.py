"""An application whose views commit orders and send a task for each with
``delay_on_commit``, on the database integration that ``FCC_DATABASE``
names (``"flask-sqlalchemy"``, ``"lite"``, ``"sessionmaker"``,
``"binds"``: a ``sessionmaker`` with per-model binds only, or ``"routing"``:
a session that writes to the primary and reads from ``FCC_REPLICA_URL``).

The task writes a :class:`Seen` row per run, so that the tests count how
many times each order's task ran. A view asked to ``kill`` the process
does so with SIGKILL right after its COMMIT, before the messages are
published; asked to ``kill_after_publish``, right after its first message
is published, before the rows of the messages published are deleted. The config comes as JSON in ``FCC_CONFIG``, as for ``taskapp``; with
``FCC_QUERY_LOG`` set, the process appends the time of each of its queries
to that file.
"""

from __future__ import annotations

import json
import os
import signal
import time
import typing as t

from celery import signals
from celery import Task
from flask import Flask
from flask import g
from flask import has_app_context
from flask import request
from sqlalchemy import create_engine
from sqlalchemy import Delete
from sqlalchemy import event
from sqlalchemy import orm
from sqlalchemy import Update
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from flask_celery_ctx import FlaskCelery

ext = FlaskCelery()

_KILL = "outboxapp.kill_after_commit"


class Base(orm.DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "outboxapp_order"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]


class Seen(Base):
    """A run of :func:`process`."""

    __tablename__ = "outboxapp_seen"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    task_id: orm.Mapped[str]
    order_id: orm.Mapped[int]
    name: orm.Mapped[str]


class RoutingSession(orm.Session):
    """Sends flushes, updates and deletes to the primary, and reads of
    unmapped tables to the replica, as SQLAlchemy's routing example does.
    The tests' replica is no replica: the models' rows are read on the
    primary, where they are written."""

    primary: Engine
    replica: Engine

    def get_bind(
        self, mapper: t.Any = None, clause: t.Any = None, **kw: t.Any
    ) -> Engine:
        if self._flushing or isinstance(clause, (Update, Delete)):
            return self.primary
        return self.primary if mapper is not None else self.replica


def create_app(config: dict[str, t.Any] | None = None) -> Flask:
    if os.environ.get("FCC_QUERY_LOG"):
        event.listen(Engine, "before_cursor_execute", _log_query)
    app = Flask("outboxapp")
    app.config.update(json.loads(os.environ.get("FCC_CONFIG", "{}")))
    app.config.update(config or {})
    url = app.config["SQLALCHEMY_DATABASE_URI"]
    options = app.config.get("SQLALCHEMY_ENGINE_OPTIONS", {})
    kind = app.config.get("FCC_DATABASE", "flask-sqlalchemy")
    if kind == "sessionmaker":
        # As the blog posts name it: the factory the views use themselves.
        global SessionLocal
        SessionLocal = orm.sessionmaker(create_engine(url, **options))
        ext.init_app(app, session=SessionLocal)
    elif kind == "binds":
        # Per-model binds, no default one.
        engine = create_engine(url, **options)
        ext.init_app(app, session=orm.sessionmaker(binds={Base: engine}))
    elif kind == "routing":
        # Reads on a replica, writes on the primary, as SQLAlchemy documents.
        replica = create_engine(app.config["FCC_REPLICA_URL"], **options)
        session = type(
            "Session",
            (RoutingSession,),
            {"primary": create_engine(url, **options), "replica": replica},
        )
        ext.init_app(app, session=orm.sessionmaker(class_=session, bind=replica))
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

    @app.post("/orders/<name>")
    def create_order(name: str) -> dict[str, t.Any]:
        """Commit an order and send its task; ``count`` orders and as many
        sends when given."""
        session = ext.session
        count = int(request.args.get("count", 1))
        orders = [
            Order(name=name if count == 1 else f"{name}-{i}") for i in range(count)
        ]
        session.add_all(orders)
        g.kill_after_publish = bool(request.args.get("kill_after_publish"))
        results = [process.delay_on_commit(order) for order in orders]
        if request.args.get("rollback"):
            session.rollback()
        else:
            session.info[_KILL] = bool(request.args.get("kill"))
            session.commit()
        return {
            "task_id": results[0].id,
            "order_id": orders[0].id,
            "task_ids": [result.id for result in results],
            "order_ids": [order.id for order in orders],
        }

    # No pool: each connection is closed with its session.
    own = orm.sessionmaker(create_engine(url, **{**options, "poolclass": NullPool}))

    @app.post("/own-session/orders/<name>")
    def create_order_in_own_session(name: str) -> dict[str, t.Any]:
        """A view that keeps a session of its own, not the app's; it waits
        ``pause`` seconds between the send and the commit."""
        with own() as session:
            order = Order(name=name)
            session.add(order)
            session.flush()
            result = process.delay_on_commit(order)
            time.sleep(float(request.args.get("pause", 0)))
            session.commit()
            return {"task_id": result.id, "order_id": order.id}

    @app.post("/session-local/orders/<name>")
    def create_order_in_session_local(name: str) -> dict[str, t.Any]:
        """A view as the blog posts write it, with ``FCC_DATABASE``
        ``"sessionmaker"``: a session of the factory given to
        ``FlaskCelery(session=...)``, not ``ext.session``, and a task of
        their ``DatabaseTask``; it waits ``pause`` seconds between the send
        and the commit."""
        session = SessionLocal()
        try:
            order = Order(name=name)
            session.add(order)
            session.flush()
            result = process_order.delay_on_commit(order)  # type: ignore[attr-defined]
            time.sleep(float(request.args.get("pause", 0)))
            session.commit()
            return {"task_id": result.id, "order_id": order.id}
        finally:
            session.close()

    return app


#: The session factory of the ``"sessionmaker"`` integration.
SessionLocal: orm.sessionmaker[orm.Session]


class DatabaseTask(Task):  # type: ignore[type-arg]
    """The blog posts' base class: a plain ``celery.Task`` with a session of
    its own, closed after each task."""

    _session: orm.Session | None = None

    @property
    def session(self) -> orm.Session:
        if self._session is None:
            self._session = SessionLocal()
        return self._session

    def after_return(self, *args: t.Any, **kwargs: t.Any) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


@ext.celery.task(base=DatabaseTask, bind=True)
def process_order(self: DatabaseTask, order: Order) -> str:
    """Record a run for the order, in the base class's session."""
    self.session.add(Seen(task_id=self.request.id, order_id=order.id, name=order.name))
    self.session.commit()
    return order.name


def _log_query(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
    """Append the time of each query of the process to ``FCC_QUERY_LOG``."""
    with open(os.environ["FCC_QUERY_LOG"], "a") as log:
        log.write(f"{time.time()} {statement.split()[0]}\n")


#: Called after each COMMIT, before the messages are published, when set.
after_commit: t.Callable[[], None] | None = None


@event.listens_for(orm.Session, "after_commit")
def _after_commit(session: orm.Session) -> None:
    if session.info.pop(_KILL, False):
        os.kill(os.getpid(), signal.SIGKILL)
    if after_commit is not None:
        after_commit()


@signals.after_task_publish.connect
def _after_publish(**kwargs: t.Any) -> None:
    if has_app_context() and g.get("kill_after_publish"):
        os.kill(os.getpid(), signal.SIGKILL)


@ext.celery.task(bind=True)
def process(self: Task, order: Order) -> str:  # type: ignore[type-arg]
    """Record a run for the order."""
    session = ext.session
    session.add(Seen(task_id=self.request.id, order_id=order.id, name=order.name))
    session.commit()
    return order.name


@ext.celery.task
def note(number: int) -> int:
    """A task that needs no database, for sends in bulk."""
    return number
