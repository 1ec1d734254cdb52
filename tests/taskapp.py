"""The application the tests run workers of, with ``flask celery worker``.

Its config comes as JSON in the ``FCC_CONFIG`` environment variable, so the
worker and the test that talks to it share one config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import typing as t
from logging.config import dictConfig

from celery import current_task
from celery import signals
from celery import Task
from celery.exceptions import Ignore
from celery.exceptions import Reject
from flask import Flask
from flask import g
from flask import has_app_context
from flask import has_request_context
from flask import request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import orm
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy import update

from flask_celery_ctx import ContextTask
from flask_celery_ctx import FlaskCelery

db = SQLAlchemy()
ext = FlaskCelery(carry_g=["request_id", "user_id"])

#: The logging config of the docs' example, which a worker started with
#: ``FCC_LOG_CARRIED=1`` in its environment uses.
LOGGING = {
    "version": 1,
    "filters": {
        "carried": {
            "()": "flask_celery_ctx.CarriedValuesFilter",
            "names": ["request_id"],
        }
    },
    "formatters": {
        "carried": {
            "format": "%(levelname)s [%(request_id)s %(task_id)s] %(name)s: %(message)s"
        }
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "filters": ["carried"],
            "formatter": "carried",
        }
    },
    "root": {"level": "INFO", "handlers": ["console"]},
}

if os.environ.get("FCC_LOG_CARRIED"):
    dictConfig(LOGGING)

    @signals.setup_logging.connect
    def keep_logging_config(**kwargs: t.Any) -> None:
        """Celery configures no logging when this signal has a receiver."""


class Item(db.Model):  # type: ignore[name-defined,misc]
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]


class Record(db.Model):  # type: ignore[name-defined,misc]
    """What a task's hooks saw, written on a connection of its own."""

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    task_id: orm.Mapped[str]
    hook: orm.Mapped[str]
    g_token: orm.Mapped[str | None]
    session_token: orm.Mapped[str | None]


def create_app(config: dict[str, t.Any] | None = None) -> Flask:
    # Counted in the worker's log: the app is built once per worker process.
    print(f"taskapp.create_app in process {os.getpid()}", file=sys.stderr)
    app = Flask(__name__)
    app.config.update(json.loads(os.environ.get("FCC_CONFIG", "{}")))
    app.config.update(config or {})
    db.init_app(app)
    ext.init_app(app)

    @app.teardown_appcontext
    def failing_teardown(exc: BaseException | None) -> None:
        if g.get("fail_teardown"):
            raise RuntimeError("a teardown function failed")

    @app.teardown_appcontext
    def report_exception(exc: BaseException | None) -> None:
        if exc is not None:
            print(f"teardown got {exc!r}", file=sys.stderr)

    @app.teardown_appcontext
    def report_marker(exc: BaseException | None) -> None:
        # What a context_state task left in g, seen in the worker's log.
        if "marker" in g:
            print(f"teardown_appcontext saw marker {g.marker}", file=sys.stderr)

    @app.before_request
    def take_request_id() -> None:
        if "X-Request-Id" in request.headers:
            g.request_id = request.headers["X-Request-Id"]

    @app.post("/carried")
    def send_carried_from_view() -> dict[str, str]:
        return {"id": carried.delay().id}

    if app.config.get("FCC_CREATE_ALL"):
        # Touch the database in the factory, as many apps do.
        with app.app_context():
            # The configured binds only: other test modules declare models of
            # binds that this app may not have.
            db.create_all([None, *app.config.get("SQLALCHEMY_BINDS", {})])
    return app


@signals.worker_init.connect
def report_context_at_start(**kwargs: t.Any) -> None:
    print(f"worker_init in an app context: {has_app_context()}", file=sys.stderr)


def record(hook: str) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            insert(Record).values(
                task_id=current_task.request.id,
                hook=hook,
                g_token=g.get("token"),
                session_token=db.session.info.get("token"),
            )
        )


class RecordingHooks:
    """Hooks that record the ``g`` and session they see."""

    def before_start(self, task_id: str, args: t.Any, kwargs: t.Any) -> None:
        g.token = task_id
        db.session.info["token"] = task_id
        record("before_start")

    def on_success(
        self, retval: t.Any, task_id: str, args: t.Any, kwargs: t.Any
    ) -> None:
        record("on_success")

    def on_failure(
        self, exc: t.Any, task_id: str, *args: t.Any, **kwargs: t.Any
    ) -> None:
        record("on_failure")

    def on_retry(self, exc: t.Any, task_id: str, *args: t.Any, **kwargs: t.Any) -> None:
        record("on_retry")

    def after_return(self, status: str, *args: t.Any, **kwargs: t.Any) -> None:
        record("after_return")


class HookedTask(RecordingHooks, ContextTask):
    pass


class LibraryTask(Task):  # type: ignore[type-arg]
    """A base class from a library that knows nothing of Flask."""


class ForeignTask(RecordingHooks, LibraryTask):
    """A library's base class, with hooks."""


@ext.celery.task
def add(x: int, y: int) -> int:
    return x + y


@ext.celery.task
def keep_in_g(value: t.Any) -> None:
    """Keep ``value`` on ``g``, for the time of the task."""
    g.kept = value


@ext.celery.task
def context_state(marker: str) -> dict[str, t.Any]:
    """Report what the context held when the task started, then mark it."""
    return mark_context(marker)


@ext.celery.task(base=LibraryTask)
def foreign_context_state(marker: str) -> dict[str, t.Any]:
    """:func:`context_state`, for a task of a library's base class."""
    return mark_context(marker)


def mark_context(marker: str) -> dict[str, t.Any]:
    state = {
        "g": g.get("marker"),
        "session": db.session.info.get("marker"),
        "request": has_request_context(),
        "pid": os.getpid(),
    }
    g.marker = marker
    db.session.info["marker"] = marker
    db.session.execute(select(1))
    return state


@ext.celery.task(base=HookedTask)
def hooked(fail: bool) -> str:
    record("body")
    if fail:
        raise ValueError("hooked task failed")
    return "done"


@ext.celery.task(base=HookedTask, bind=True, max_retries=1, default_retry_delay=0)
def hooked_retry(self: Task) -> str:  # type: ignore[type-arg]
    if not self.request.retries:
        raise self.retry()
    return "retried"


@ext.celery.task(base=ForeignTask)
def foreign(fail: bool) -> str:
    record("body")
    if fail:
        raise ValueError("foreign task failed")
    return "done"


@ext.celery.task(bind=True, max_retries=1, default_retry_delay=0)
def write_then(self: Task, how: str, name: str) -> str:  # type: ignore[type-arg]
    """Write a row, flush it, and then end the way ``how`` says."""
    db.session.add(Item(name=name))
    db.session.flush()
    if how == "commit":
        db.session.commit()
    elif how == "raise":
        raise ValueError("failed after a flush")
    elif how == "retry" and not self.request.retries:
        raise self.retry()
    elif how == "reject":
        raise Reject("rejected after a flush", requeue=False)
    elif how == "ignore":
        raise Ignore()
    elif how == "teardown_raise":
        g.fail_teardown = True
    elif how == "sleep":
        time.sleep(10)
    return how


@ext.celery.task(bind=True)
def wait_for_drop(self: Task) -> str:  # type: ignore[type-arg]
    """Note the backend of the session's connection, then query until the
    database drops it."""
    g.marker = "dropped"
    backend = db.session.scalar(text("select pg_backend_pid()"))
    with db.engine.begin() as conn:
        conn.execute(
            insert(Record).values(task_id=self.request.id, hook=f"backend:{backend}")
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.05)
        db.session.execute(text("select 1"))
    return "never dropped"


@ext.celery.task
def count_items(name: str) -> int:
    return db.session.scalar(select(func.count()).where(Item.name == name)) or 0


@ext.celery.task
def backend_pid() -> tuple[int, int]:
    return os.getpid(), db.session.scalar(text("select pg_backend_pid()"))


@ext.celery.task
def poison(item_id: int) -> str:
    """Fail a flush and swallow the error, leaving the session unusable."""
    from sqlalchemy.exc import IntegrityError

    db.session.add(Item(id=item_id, name="first"))
    db.session.add(Item(id=item_id, name="duplicate"))
    try:
        db.session.flush()
    except IntegrityError:
        return "swallowed"
    return "flushed"  # pragma: no cover


@ext.celery.task
def sleep_query(seconds: float, swallow: bool = False) -> str:
    """Block in the database, where a soft time limit may not reach, and
    maybe catch the limit and return as if nothing happened."""
    from celery.exceptions import SoftTimeLimitExceeded

    try:
        db.session.execute(text("select pg_sleep(:s)"), {"s": seconds})
    except SoftTimeLimitExceeded:
        if not swallow:
            raise
        return "swallowed"
    return "slept"


@ext.celery.task(bind=True)
def attempt_then_commit(self: Task, name: str, sleep: float) -> int:  # type: ignore[type-arg]
    """Write a row, note the attempt on a connection of its own, and on the
    first attempt sleep inside the open transaction."""
    db.session.add(Item(name=name))
    db.session.flush()
    with db.engine.begin() as conn:
        attempts = conn.scalar(
            select(func.count()).where(Record.task_id == self.request.id)
        )
        conn.execute(
            insert(Record).values(
                task_id=self.request.id, hook=f"attempt:{os.getpid()}"
            )
        )
    if not attempts:
        time.sleep(sleep)
    db.session.commit()
    return os.getpid()


def write_item(name: str) -> None:
    """Add an item in the task's session and commit."""
    db.session.add(Item(name=name))
    db.session.commit()


class WritingHooks(ContextTask):
    """Hooks that write an item each, in the task's session, and commit."""

    def on_failure(
        self, exc: t.Any, task_id: str, args: t.Any, *rest: t.Any, **kwargs: t.Any
    ) -> None:
        write_item(f"{args[1]}-on_failure")

    def on_retry(
        self, exc: t.Any, task_id: str, args: t.Any, *rest: t.Any, **kwargs: t.Any
    ) -> None:
        write_item(f"{args[1]}-on_retry")


@ext.celery.task
def add_item(name: str) -> None:
    write_item(name)


@ext.celery.task
def send_add_item(name: str) -> int:
    """Publish ``add_item`` from the task's process; return that process."""
    add_item.delay(name)
    return os.getpid()


@ext.celery.task
def write_error(request: t.Any, exc: BaseException, traceback: str) -> None:
    """An errback, called in the failed task's context."""
    write_item(f"{request.args[1]}-errback")


@ext.celery.task(base=WritingHooks, bind=True, max_retries=1, default_retry_delay=0)
def work_then(self: Task, how: str, name: str) -> str:  # type: ignore[type-arg]
    """Flush an item and queue a send on commit, both named after the
    attempt, then fail or retry as ``how`` says, or commit."""
    attempt = f"{name}-{self.request.retries}"
    db.session.add(Item(name=attempt))
    db.session.flush()
    add_item.delay_on_commit(f"{attempt}-sent")
    if how == "raise":
        raise ValueError("failed after a flush")
    if how == "retry" and not self.request.retries:
        raise self.retry()
    if how == "ignore":
        raise Ignore()
    if how == "reject":
        raise Reject("rejected after a flush", requeue=False)
    db.session.commit()
    return how


@ext.celery.task(bind=True, max_retries=2, default_retry_delay=0)
def retry_twice(self: Task, name: str) -> int:  # type: ignore[type-arg]
    """Record the ``g`` and session each attempt starts with, flush an item
    named after the attempt, retry twice, and commit on the last attempt."""
    attempt = self.request.retries
    record(f"attempt-{attempt}")
    g.token = db.session.info["token"] = str(attempt)
    db.session.add(Item(name=f"{name}-{attempt}"))
    db.session.flush()
    if attempt < 2:
        raise self.retry()
    db.session.commit()
    return attempt


def carried_values() -> dict[str, t.Any]:
    """The carried attributes that the task's ``g`` has."""
    return {name: g.get(name) for name in ("request_id", "user_id") if name in g}


@ext.celery.task
def carried() -> dict[str, t.Any]:
    return carried_values()


@ext.celery.task(base=LibraryTask)
def foreign_carried() -> dict[str, t.Any]:
    return carried_values()


@ext.celery.task
def collect(seen: list[t.Any] | None = None) -> list[t.Any]:
    """Add the request id the task sees to those seen before it."""
    return [*(seen or []), g.get("request_id")]


@ext.celery.task
def gather(results: list[t.Any]) -> list[t.Any]:
    """The body of a chord: its header's results and its own request id."""
    return [results, g.get("request_id")]


@ext.celery.task
def send_carried() -> str:
    """Send a task from a task, whose ``g`` carries values."""
    return str(carried.delay().id)


@ext.celery.task
def send_carried_on_commit() -> str:
    """Send a task from a task when its transaction commits."""
    db.session.execute(select(1))
    result = carried.delay_on_commit()
    db.session.commit()
    return str(result.id)


@ext.celery.task(bind=True, max_retries=1, default_retry_delay=0)
def carried_after_retry(self: Task) -> dict[str, t.Any]:  # type: ignore[type-arg]
    """Change ``g`` in the first attempt, then retry."""
    if not self.request.retries:
        g.request_id = "changed by the first attempt"
        raise self.retry()
    return carried_values()


@ext.celery.task
def log_carried(message: str) -> None:
    logging.getLogger("taskapp").warning(message)


@ext.celery.task
async def async_add(x: int, y: int) -> int:
    await asyncio.sleep(0)
    return x + y


@ext.celery.task(base=HookedTask, bind=True)
async def async_state(self: Task, name: str) -> dict[str, t.Any]:  # type: ignore[type-arg]
    """Report, from the coroutine, the task, ``g`` and session it sees, write
    an item in the task's session and commit."""
    await asyncio.sleep(0.01)
    record("body")
    db.session.add(Item(name=name))
    db.session.commit()
    return {
        "id": self.request.id,
        "current": current_task.request.id,
        "g": g.get("token"),
        "session": db.session.info.get("token"),
        "carried": carried_values(),
        "pid": os.getpid(),
    }


@ext.celery.task(base=HookedTask, bind=True, max_retries=2, default_retry_delay=0)
async def async_retry(self: Task) -> int:  # type: ignore[type-arg]
    await asyncio.sleep(0)
    if self.request.retries < 2:
        raise self.retry()
    return int(self.request.retries)


@ext.celery.task
async def async_fail() -> None:
    await asyncio.sleep(0)
    raise ValueError("the coroutine failed")


@ext.celery.task(soft_time_limit=1)
async def async_update_after(name: str, seconds: float) -> str:
    """Sleep, past the soft time limit, then rename an item in the task's
    session, its transaction left to the task's end."""
    try:
        await asyncio.sleep(seconds)
    except BaseException as exc:
        record(f"interrupted by {type(exc).__name__}")
        raise
    db.session.execute(update(Item).where(Item.name == name).values(name=f"{name}+"))
    return "slept"


async def _update_when_cancelled(name: str) -> None:
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        await asyncio.sleep(0.5)
        db.session.execute(
            update(Item).where(Item.name == name).values(name=f"{name}+")
        )
        raise


@ext.celery.task(soft_time_limit=1)
async def async_left_task(name: str) -> str:
    """Leave a task on the loop that renames an item, uncommitted, once
    cancelled; sleep past the soft time limit."""
    asyncio.get_running_loop().create_task(_update_when_cancelled(name))
    await asyncio.sleep(3)
    return "slept"


@ext.celery.task(soft_time_limit=1)
async def async_write_when_cancelled(name: str, seconds: float) -> str:
    """Sleep, past the soft time limit; write an item once cancelled."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        db.session.add(Item(name=name))
        db.session.commit()
        return "cancelled"
    return "slept"


@ext.celery.task(bind=True)
def sleep_unless_redelivered(self: Task, seconds: float) -> bool:  # type: ignore[type-arg]
    """Sleep, unless the broker says this message was delivered before;
    return whether it did."""
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    if not redelivered:
        time.sleep(seconds)
    return redelivered
