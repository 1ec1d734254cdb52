"""Every task in a worker runs in a fresh context of the bound app, which
spans its hooks, whatever its base class."""

from __future__ import annotations

import contextvars
import gc
import time
import typing as t
import uuid
import weakref

import pytest
from celery.app.trace import build_tracer
from celery.result import AsyncResult
from flask import Flask
from sqlalchemy import select

import taskapp
from conftest import FLASK
from conftest import WorkerFactory

POOLS = [("solo", 1), ("prefork", 2), ("threads", 4)]
# A task of FlaskCelery's base class, and one of a library's.
STATE_TASKS = pytest.mark.parametrize(
    "task",
    [taskapp.context_state, taskapp.foreign_context_state],
    ids=["ContextTask", "foreign"],
)


@STATE_TASKS
@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_fresh_context_per_task(
    workers: WorkerFactory, pool: str, concurrency: int, task: t.Any
) -> None:
    workers(pool=pool, concurrency=concurrency).client()
    results = [task.delay(f"m{i}") for i in range(12)]
    states = [result.get(timeout=20) for result in results]
    assert [state["g"] for state in states] == [None] * 12
    assert [state["session"] for state in states] == [None] * 12
    assert not any(state["request"] for state in states)


@STATE_TASKS
@pytest.mark.parametrize(("pool", "concurrency"), [("solo", 1), ("prefork", 2)])
def test_testing_gives_each_task_a_fresh_request_context(
    workers: WorkerFactory, pool: str, concurrency: int, task: t.Any
) -> None:
    """Under TESTING each task pushes an app context of its own under its test
    request context: ``g`` is not shared and teardown_appcontext runs."""
    worker = workers(pool=pool, concurrency=concurrency, TESTING=True)
    worker.client()
    # One after another: with two processes, at least one runs several.
    markers = [f"{pool}-{task.name}-{uuid.uuid4().hex[:6]}-{i}" for i in range(6)]
    states = [task.delay(marker).get(timeout=20) for marker in markers]
    assert [state["g"] for state in states] == [None] * 6
    assert [state["session"] for state in states] == [None] * 6
    assert all(state["request"] for state in states)
    for marker in markers:
        worker.wait_for(f"teardown_appcontext saw marker {marker}\n", timeout=10)


@STATE_TASKS
@pytest.mark.parametrize("testing", [False, True], ids=["app", "TESTING"])
def test_context_pushed_at_worker_start_is_not_reused(
    workers: WorkerFactory, task: t.Any, testing: bool
) -> None:
    """``celery -A module worker``, from a module that leaves a context
    pushed, as tutorials do: the solo pool runs tasks in that very thread.
    Under TESTING the task's request context must not settle on it."""
    worker = workers.start(
        "redis",
        "postgres",
        {"TESTING": testing},
        command=(FLASK.replace("flask", "celery"), "-A", "pushed_context"),
    )
    worker.wait_ready()
    worker.client()
    states = [task.delay(f"m{i}").get(timeout=20) for i in range(3)]
    assert [state["g"] for state in states] == [None] * 3
    assert [state["session"] for state in states] == [None] * 3
    assert [state["request"] for state in states] == [testing] * 3


def hooks_seen(app: t.Any, task_id: str) -> dict[str, tuple[str | None, str | None]]:
    """What each hook of a task saw, once ``after_return`` (which runs after
    the result is stored) has run."""
    deadline = time.monotonic() + 20
    while True:
        with app.app_context():
            records = taskapp.db.session.scalars(
                select(taskapp.Record).where(taskapp.Record.task_id == task_id)
            ).all()
        seen = {r.hook: (r.g_token, r.session_token) for r in records}
        if "after_return" in seen or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


@pytest.mark.parametrize(
    "task", [taskapp.hooked, taskapp.foreign], ids=["ContextTask", "foreign"]
)
@pytest.mark.parametrize("fail", [False, True], ids=["success", "failure"])
@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_hooks_share_the_body_context(
    workers: WorkerFactory, task: t.Any, fail: bool, pool: str, concurrency: int
) -> None:
    app = workers(pool=pool, concurrency=concurrency).client()
    result: AsyncResult[t.Any] = task.delay(fail)
    result.get(timeout=20, propagate=False)
    assert result.failed() is fail
    seen = hooks_seen(app, result.id)
    outcome = "on_failure" if fail else "on_success"
    assert set(seen) == {"before_start", "body", outcome, "after_return"}
    # before_start set both tokens; every later hook saw the same g and session.
    assert set(seen.values()) == {(result.id, result.id)}


def test_retry_hook_shares_the_body_context(workers: WorkerFactory) -> None:
    app = workers().client()
    result = taskapp.hooked_retry.delay()
    assert result.get(timeout=20) == "retried"
    assert hooks_seen(app, result.id)["on_retry"] == (result.id, result.id)


@pytest.mark.parametrize(("pool", "concurrency"), [("solo", 1), ("prefork", 2)])
def test_app_is_built_once_per_worker(
    workers: WorkerFactory, pool: str, concurrency: int
) -> None:
    worker = workers(pool=pool, concurrency=concurrency)
    worker.client()
    for result in [taskapp.add.delay(i, i) for i in range(20)]:
        result.get(timeout=20)
    assert worker.log.count("taskapp.create_app in process") == 1


class Kept:
    """A value a test can tell is freed."""


def test_nothing_of_a_task_stays_alive_after_it(app: Flask) -> None:
    """The call a worker's thread keeps from one task to the next keeps
    nothing of the last task: not its arguments, not its ``g``.

    The task is traced as a worker traces it, by the tracer Celery builds,
    in a context of its own that lives on, as a pool thread's does."""
    task = taskapp.keep_in_g
    celery = taskapp.ext.celery
    # Celery's stubs take no subclass of Celery here.
    task.__trace__ = build_tracer(
        task.name,
        task,
        celery.loader,
        "test",
        app=celery,  # type: ignore[arg-type]
    )
    thread_context = contextvars.Context()
    for _ in range(2):  # the thread's first task, then the next
        kept = Kept()
        freed = weakref.ref(kept)
        retval, info, _, _ = thread_context.run(
            task.__trace__, str(uuid.uuid4()), [kept], {}, {"args": [kept]}
        )
        assert info is None, retval
        del kept
        gc.collect()
        assert freed() is None
