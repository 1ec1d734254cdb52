"""Tasks declared with ``async def`` run to completion in the task's context,
through the app's ``ensure_sync``, in every pool but gevent's."""

from __future__ import annotations

import time
import typing as t
import uuid

import pytest
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from flask import Flask
from flask import g
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy import update
from sqlalchemy.engine import Engine

from flask_celery_ctx import ContextTask
from flask_celery_ctx import FlaskCelery

import taskapp
from conftest import idle_in_transaction
from conftest import WorkerFactory
from taskapp import Item
from taskapp import Record


def hooks_seen(client: Flask, task_id: str) -> list[tuple[str, str | None, str | None]]:
    """What each hook of a task saw, once ``after_return``, which runs after
    the result is stored (and not after a retry), ran."""
    deadline = time.monotonic() + 30
    while True:
        with client.app_context():
            rows = taskapp.db.session.execute(
                select(Record.hook, Record.g_token, Record.session_token)
                .where(Record.task_id == task_id)
                .order_by(Record.id)
            )
            seen = [(row.hook, row.g_token, row.session_token) for row in rows]
        if (
            "after_return" in (hook for hook, *_ in seen)
        ) or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("pool", "concurrency"), [("solo", 1), ("prefork", 2), ("threads", 4)]
)
def test_runs_in_the_task_context_and_session(
    workers: WorkerFactory, pool: str, concurrency: int
) -> None:
    client = workers(pool=pool, concurrency=concurrency, FCC_CREATE_ALL=True).client()
    name = f"async-{uuid.uuid4().hex[:8]}"
    with client.app_context():
        g.request_id = "req-async"
        result = taskapp.async_state.delay(name)
        sums = [taskapp.async_add.delay(i, i) for i in range(8)]
    state = result.get(timeout=30)
    assert [s.get(timeout=30) for s in sums] == [2 * i for i in range(8)]
    # The request and the current task, in the coroutine's thread.
    assert state["id"] == state["current"] == result.id
    # The g and session that before_start marked, and the carried values.
    assert (state["g"], state["session"]) == (result.id, result.id)
    assert state["carried"] == {"request_id": "req-async"}
    assert hooks_seen(client, result.id) == [
        (hook, result.id, result.id)
        for hook in ("before_start", "body", "on_success", "after_return")
    ]
    with client.app_context():
        count = taskapp.db.session.scalar(select(func.count()).where(Item.name == name))
    assert count == 1


def test_retries_and_failures(workers: WorkerFactory) -> None:
    client = workers(FCC_CREATE_ALL=True).client()
    retried = taskapp.async_retry.delay()
    failed = taskapp.async_fail.delay()
    assert retried.get(timeout=30) == 2
    with pytest.raises(ValueError, match="the coroutine failed"):
        failed.get(timeout=30)
    hooks = [hook for hook, *_ in hooks_seen(client, retried.id)]
    assert hooks == [
        "before_start", "on_retry",
        "before_start", "on_retry",
        "before_start", "on_success", "after_return",
    ]  # fmt: skip


def test_refused_on_the_gevent_pool(workers: WorkerFactory) -> None:
    workers(pool="gevent", concurrency=4).client()
    assert taskapp.add.delay(1, 2).get(timeout=30) == 3
    with pytest.raises(RuntimeError, match="which the gevent pool cannot run"):
        taskapp.async_add.delay(1, 2).get(timeout=30)


def test_inline(app: Flask) -> None:
    assert taskapp.async_add.delay(1, 2).get() == 3
    assert taskapp.async_add(2, 3) == 5
    with app.test_request_context():
        g.request_id = "req-inline"
        state = taskapp.async_state.apply(("inline",)).get()
    assert state["carried"] == {"request_id": "req-inline"}


def test_on_a_third_party_base_class(app: Flask) -> None:
    """Declared on ``ext.celery``, the task derives from ContextTask too."""

    class LibraryTask(Task):  # type: ignore[type-arg]
        pass

    @taskapp.ext.celery.task(base=LibraryTask, shared=False)
    async def fetch(url: str) -> str:
        return f"{url} {g.get('request_id')}"

    with app.test_request_context():
        g.request_id = "req-base"
        assert fetch.apply(("u",)).get() == "u req-base"


def test_refused_on_a_class_that_is_not_a_context_task() -> None:
    ext = FlaskCelery()

    class Fetch(Task):  # type: ignore[type-arg]
        name = "tests.library_fetch"

        async def run(self, url: str) -> str:
            return url

    with pytest.raises(
        TypeError, match="declared with 'async def' on a base class that is not"
    ):
        ext.celery.register_task(Fetch())


def test_a_class_based_task(app: Flask) -> None:
    class Fetch(ContextTask):
        name = "tests.fetch"

        async def run(self, value: int) -> list[t.Any]:
            return [value, g.get("request_id")]

    task: Task[t.Any, t.Any] = taskapp.ext.celery.register_task(Fetch())
    with app.app_context():
        g.request_id = "req-class"
        assert task.apply((1,)).get() == [1, "req-class"]


def _count(client: Flask, name: str) -> int:
    with client.app_context():
        query = select(func.count()).where(Item.name == name)
        return taskapp.db.session.scalar(query) or 0


def _rename(client: Flask, name: str) -> None:
    """Rename an item as the web would, waiting at most 2 s for its lock."""
    with client.app_context():
        session = taskapp.db.session
        session.execute(text("SET LOCAL lock_timeout = '2s'"))
        session.execute(update(Item).where(Item.name == name).values(name=f"{name}!"))
        session.commit()


def test_soft_time_limit_cancels_the_coroutine(
    workers: WorkerFactory, pg_admin: Engine
) -> None:
    """At the soft time limit the coroutine is cancelled, and the task ends
    once it has: nothing it would do later opens a session, no connection
    stays in a transaction, the row it would update is not locked."""
    worker = workers(pool="prefork", concurrency=1, FCC_CREATE_ALL=True)
    client = worker.client()
    name = f"limited-{uuid.uuid4().hex[:8]}"
    with client.app_context():
        taskapp.db.session.add(Item(name=name))
        taskapp.db.session.commit()
    result = taskapp.async_update_after.delay(name, 3)
    with pytest.raises(SoftTimeLimitExceeded):
        result.get(timeout=30)
    with client.app_context():
        hooks = taskapp.db.session.scalars(
            select(Record.hook).where(Record.task_id == result.id)
        ).all()
    assert hooks == ["interrupted by CancelledError"]
    time.sleep(3)  # past the end of the sleep, had it gone on
    assert idle_in_transaction(pg_admin, worker.application_name) == 0
    _rename(client, name)
    assert _count(client, f"{name}!") == 1

    # A coroutine that handles its cancellation does it in the task's
    # context, and its result is the task's.
    result = taskapp.async_write_when_cancelled.delay(name + "-cancelled", 3)
    assert result.get(timeout=30) == "cancelled"
    assert _count(client, name + "-cancelled") == 1
    time.sleep(3)
    assert idle_in_transaction(pg_admin, worker.application_name) == 0


def test_tasks_left_on_the_loop_end_within_the_context(
    workers: WorkerFactory, pg_admin: Engine
) -> None:
    """A task that the coroutine left on its loop is cancelled before the
    task's context ends: what it does then is in the task's session, rolled
    back at the end."""
    worker = workers(pool="prefork", concurrency=1, FCC_CREATE_ALL=True)
    client = worker.client()
    name = f"left-{uuid.uuid4().hex[:8]}"
    with client.app_context():
        taskapp.db.session.add(Item(name=name))
        taskapp.db.session.commit()
    result = taskapp.async_left_task.delay(name)
    with pytest.raises(SoftTimeLimitExceeded):
        result.get(timeout=30)
    time.sleep(3)  # past the end of the sleep, had it gone on
    assert idle_in_transaction(pg_admin, worker.application_name) == 0
    _rename(client, name)
    assert _count(client, f"{name}!") == 1


def test_threads_pool_enforces_no_soft_time_limit(
    workers: WorkerFactory, pg_admin: Engine
) -> None:
    """Celery's threads pool enforces no time limit: the coroutine runs to
    its end, in the task's context, and its transaction ends with it."""
    worker = workers(pool="threads", concurrency=2, FCC_CREATE_ALL=True)
    client = worker.client()
    name = f"unlimited-{uuid.uuid4().hex[:8]}"
    with client.app_context():
        taskapp.db.session.add(Item(name=name))
        taskapp.db.session.commit()
    assert taskapp.async_update_after.delay(name, 2).get(timeout=30) == "slept"
    assert idle_in_transaction(pg_admin, worker.application_name) == 0
    # The task did not commit: its rename was rolled back.
    _rename(client, name)
    assert _count(client, f"{name}!") == 1
