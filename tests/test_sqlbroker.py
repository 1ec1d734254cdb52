"""The ``sqlbroker+`` transport: a killed worker's task runs again, once.

Workers are started as users start them and killed with SIGKILL, as an
out-of-memory killer or a power cut stops them: no warm shutdown gives their
messages back. The broker is a SQLite file, the database PostgreSQL, where a
killed attempt's open transaction is rolled back.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time
import typing as t
import uuid
from pathlib import Path

import pytest
from celery.result import AsyncResult
from flask import Flask
from kombu import Connection
from kombu import Exchange
from kombu import Queue
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import Table
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

import taskapp
from conftest import Worker
from conftest import WorkerFactory

#: A worker that dies mid-task leaves its message to another worker.
LEASED: dict[str, t.Any] = {
    "CELERY_TASK_ACKS_LATE": True,
    "CELERY_TASK_REJECT_ON_WORKER_LOST": True,
    "CELERY_WORKER_PREFETCH_MULTIPLIER": 1,
    "CELERY_BROKER_TRANSPORT_OPTIONS": {"visibility_timeout": 5},
}


def kill(worker: Worker) -> None:
    """SIGKILL the worker and its pool's processes, as a container's end
    kills them all."""
    pid = worker.process.pid
    pool = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for process in [pid, *map(int, pool)]:
        os.kill(process, signal.SIGKILL)
    worker.process.wait()


def attempts(app: Flask, task_id: str) -> list[int]:
    """The pids of the processes that started an ``attempt_then_commit``."""
    with app.app_context():
        hooks = taskapp.db.session.scalars(
            select(taskapp.Record.hook).where(taskapp.Record.task_id == task_id)
        ).all()
    return [int(hook.split(":")[1]) for hook in hooks]


def committed(app: Flask, name: str) -> int:
    with app.app_context():
        query = select(func.count()).where(taskapp.Item.name == name)
        return taskapp.db.session.scalar(query) or 0


def wait_started(app: Flask, result: AsyncResult[t.Any], timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while not (started := attempts(app, result.id)):
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.1)
    return started[0]


def messages_left(worker: Worker, timeout: float = 10) -> int:
    """Rows left in the broker's message table once the worker had time to
    acknowledge what it ran: acknowledged messages are deleted."""
    url = worker.config["CELERY_BROKER_URL"].removeprefix("sqlbroker+")
    engine = create_engine(url)
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            count: int = conn.scalar(text("SELECT count(*) FROM kombu_message"))
        if not count or time.monotonic() > deadline:
            engine.dispose()
            return count
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("pool", "broker"),
    [("threads", "sqlite"), ("prefork", "sqlite"), ("solo", "sqlite"),
     ("threads", "postgres")],
)  # fmt: skip
def test_killed_workers_task_runs_again_on_the_next_worker(
    workers: WorkerFactory, pool: str, broker: str, request: pytest.FixtureRequest
) -> None:
    config = dict(LEASED)
    if broker == "postgres":
        config["CELERY_BROKER_URL"] = "sqlbroker+" + request.getfixturevalue(
            "postgres_url"
        )
    first = workers.start("sqlbroker", "postgres", config, pool=pool, concurrency=2)
    first.wait_ready()
    app = first.client()
    name = f"killed-{uuid.uuid4().hex[:6]}"
    result = taskapp.attempt_then_commit.delay(name, 60)
    wait_started(app, result)
    kill(first)

    second = workers.another(first, pool=pool, concurrency=2)
    second.wait_ready()
    pid = result.get(timeout=90)
    # Run again from the start, once, and committed once.
    assert len(attempts(app, result.id)) == 2
    assert committed(app, name) == 1
    assert second.log.count(f"[{result.id}] received") == 1
    assert second.log.count(f"[{result.id}] succeeded") == 1
    assert pid != first.process.pid
    assert messages_left(second) == 0
    second.stop()


def test_redelivered_task_knows_it(workers: WorkerFactory) -> None:
    first = workers.start("sqlbroker", "postgres", LEASED, pool="threads")
    first.wait_ready()
    first.client()
    result = taskapp.sleep_unless_redelivered.delay(60)
    first.wait_for(f"[{result.id}] received")
    kill(first)
    second = workers.another(first, pool="threads")
    second.wait_ready()
    assert result.get(timeout=90) is True
    second.stop()


@pytest.mark.parametrize("broker", ["sqlite", "postgres"])
def test_several_workers_one_killed_every_task_commits_once(
    workers: WorkerFactory, broker: str, request: pytest.FixtureRequest
) -> None:
    """Two workers share a backlog; one is killed with tasks in hand. Every
    task commits once; only the killed worker's tasks are run twice."""
    config = dict(LEASED)
    if broker == "postgres":
        config["CELERY_BROKER_URL"] = "sqlbroker+" + request.getfixturevalue(
            "postgres_url"
        )
    first = workers.start("sqlbroker", "postgres", config, pool="threads")
    survivor = workers.another(first, pool="threads", concurrency=2)
    first.wait_ready()
    survivor.wait_ready()
    app = first.client()
    run = uuid.uuid4().hex[:6]
    names = [f"backlog-{run}-{i}" for i in range(20)]
    results = [taskapp.attempt_then_commit.delay(name, 1) for name in names]
    # Kill the first worker once it is busy.
    deadline = time.monotonic() + 30
    while first.process.pid not in {p for r in results for p in attempts(app, r.id)}:
        assert time.monotonic() < deadline, f"the first worker is idle:\n{first.log}"
        time.sleep(0.1)
    kill(first)

    for result in results:
        result.get(timeout=120)
    runs = {r.id: attempts(app, r.id) for r in results}
    again = [r for r, pids in runs.items() if len(pids) > 1]
    print(f"{len(again)} of {len(results)} tasks ran twice: {again}")
    # The killed worker held at most its prefetch: 1 per thread, no more.
    assert len(again) <= 2
    for pids in runs.values():
        # Run again only when the first attempt died with its worker.
        assert len(pids) == 1 or (len(pids) == 2 and pids[0] == first.process.pid)
    assert [committed(app, name) for name in names] == [1] * len(names)
    assert messages_left(survivor) == 0
    survivor.stop()


def test_long_task_stays_with_its_living_worker(workers: WorkerFactory) -> None:
    """A task longer than the visibility timeout, or one that waits for its
    countdown, is not given to another worker: its worker renews the lease,
    even while its solo pool blocks the worker's loop."""
    config = {**LEASED, "CELERY_BROKER_TRANSPORT_OPTIONS": {"visibility_timeout": 1}}
    first = workers.start("sqlbroker", "postgres", config, pool="solo")
    first.wait_ready()
    idle = workers.another(first, pool="solo")
    idle.wait_ready()
    app = first.client()
    name = f"long-{uuid.uuid4().hex[:6]}"
    result = taskapp.attempt_then_commit.delay(name, 8)
    # Held by a worker until its time comes, well after the timeout.
    later = taskapp.attempt_then_commit.apply_async((f"{name}-later", 0), countdown=6)
    assert result.get(timeout=60) in (first.process.pid, idle.process.pid)
    assert later.get(timeout=60) in (first.process.pid, idle.process.pid)
    assert len(attempts(app, result.id)) == 1
    assert len(attempts(app, later.id)) == 1
    assert committed(app, name) == 1
    first.stop()
    idle.stop()


def test_killed_pool_process_gives_its_task_back_at_once(
    workers: WorkerFactory,
) -> None:
    """When only a prefork child dies, its worker rejects the message with
    ``requeue``: it runs again in a new child without waiting for the
    visibility timeout, and is deleted once done."""
    config = {**LEASED, "CELERY_BROKER_TRANSPORT_OPTIONS": {"visibility_timeout": 3600}}
    worker = workers.start("sqlbroker", "postgres", config, pool="prefork")
    worker.wait_ready()
    app = worker.client()
    name = f"child-{uuid.uuid4().hex[:6]}"
    result = taskapp.attempt_then_commit.delay(name, 60)
    child = wait_started(app, result)
    os.kill(child, signal.SIGKILL)
    assert result.get(timeout=60) != child
    assert len(attempts(app, result.id)) == 2
    assert committed(app, name) == 1
    assert messages_left(worker) == 0
    worker.stop()


@pytest.mark.parametrize("broker", ["sqlite", "postgres"])
def test_pool_processes_forked_after_connecting_publish_on_their_own(
    workers: WorkerFactory, broker: str, request: pytest.FixtureRequest
) -> None:
    """Each prefork child, forked after the worker connected to the broker,
    runs one task that publishes another: every child opens connections of
    its own, and all the tasks run."""
    config: dict[str, t.Any] = {"CELERY_WORKER_MAX_TASKS_PER_CHILD": 1}
    if broker == "postgres":
        config["CELERY_BROKER_URL"] = "sqlbroker+" + request.getfixturevalue(
            "postgres_url"
        )
    worker = workers.start(
        "sqlbroker", "postgres", config, pool="prefork", concurrency=2
    )
    worker.wait_ready()
    app = worker.client()
    name = f"forked-{uuid.uuid4().hex[:6]}"
    results = [taskapp.send_add_item.delay(name) for _ in range(30)]
    pids = {result.get(timeout=120) for result in results}
    assert len(pids) == 30
    deadline = time.monotonic() + 120
    while committed(app, name) < 30 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert committed(app, name) == 30
    assert worker.process.poll() is None
    assert "Traceback" not in worker.log
    assert messages_left(worker) == 0
    worker.stop()


def test_messages_kombus_transport_delivered_are_not_run_again(
    tmp_path: Path,
) -> None:
    """kombu's own transport leaves every message it delivered in the table,
    hidden: a broker file switched to ``sqlbroker+`` does not run them
    again."""
    url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    queue = Queue("switched", Exchange("switched"), "switched")
    with Connection(f"sqla+{url}") as conn:
        conn.Producer().publish(
            {"n": 1}, exchange=queue.exchange, routing_key="switched", declare=[queue]
        )
        delivered = queue(conn).get()
        assert delivered is not None
        delivered.ack()
    with Connection(
        f"sqlbroker+{url}", transport_options={"visibility_timeout": 0.1}
    ) as conn:
        conn.Producer().publish(
            {"n": 2}, exchange=queue.exchange, routing_key="switched", declare=[queue]
        )
        time.sleep(0.5)
        message = queue(conn).get()
        assert message is not None
        assert message.payload == {"n": 2}
        message.ack()
        assert queue(conn).get() is None


@pytest.mark.parametrize("value", ["soon", 0, -5, float("inf"), None, True])
def test_bad_visibility_timeout_is_refused(tmp_path: Path, value: t.Any) -> None:
    url = f"sqlbroker+sqlite:///{tmp_path / 'broker.sqlite'}"
    options = {"visibility_timeout": value}
    with (
        Connection(url, transport_options=options) as conn,
        pytest.raises(ValueError) as info,
    ):
        conn.channel()
    assert str(info.value) == (
        "visibility_timeout in CELERY_BROKER_TRANSPORT_OPTIONS must be a number"
        f" of seconds above 0, not {value!r}."
    )


def _declare_and_put(url: str, barrier: t.Any, results: t.Any) -> None:
    barrier.wait()
    try:
        with Connection(url) as conn:
            Queue("together", channel=conn.default_channel).declare()
            conn.SimpleQueue("together").put({"n": 1})
        results.put("ok")
    except Exception as exc:
        results.put(repr(exc))


def test_processes_starting_together_on_a_new_broker(tmp_path: Path) -> None:
    """Workers started at the same moment on a new broker database each
    create its tables and the same queue: none fails for the others."""
    context = multiprocessing.get_context("spawn")
    for round in range(5):
        url = f"sqlbroker+sqlite:///{tmp_path}/broker-{round}.sqlite"
        barrier, results = context.Barrier(6), context.Queue()
        processes = [
            context.Process(target=_declare_and_put, args=(url, barrier, results))
            for _ in range(6)
        ]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(30)
        assert outcomes == ["ok"] * 6, outcomes
        with Connection(url) as conn:
            assert conn.SimpleQueue("together").qsize() == 6


def test_tables_another_process_creates_meanwhile(tmp_path: Path) -> None:
    """Another process creates each table between this one's check and its
    ``CREATE TABLE``, as workers starting together do: the connection opens
    all the same."""
    url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    other = create_engine(url)
    created: list[str] = []

    def create_first(table: Table, connection: t.Any, **kw: t.Any) -> None:
        if table.name not in created:
            created.append(table.name)
            table.create(other)

    event.listen(Table, "before_create", create_first)
    try:
        with Connection(f"sqlbroker+{url}") as conn:
            conn.SimpleQueue("meanwhile").put({"n": 1})
            assert conn.SimpleQueue("meanwhile").qsize() == 1
    finally:
        event.remove(Table, "before_create", create_first)
        other.dispose()
    assert sorted(created) == ["kombu_message", "kombu_queue"]


def test_message_that_cannot_be_stored_raises(tmp_path: Path) -> None:
    """A put on a database locked for writes for longer than its timeout
    raises, for the producer to retry or report, and stores nothing."""
    path = tmp_path / "broker.sqlite"
    options = {"connect_args": {"timeout": 0.1}}
    with Connection(f"sqlbroker+sqlite:///{path}", transport_options=options) as conn:
        queue = conn.SimpleQueue("locked")
        queue.put({"n": 1})
        lock = sqlite3.connect(path)
        lock.execute("BEGIN IMMEDIATE")  # others read, none writes
        try:
            with pytest.raises(OperationalError, match="database is locked"):
                queue.put({"n": 2})
        finally:
            lock.rollback()
            lock.close()
        queue.put({"n": 3})
        assert [queue.get(timeout=1).payload for _ in range(2)] == [
            {"n": 1},
            {"n": 3},
        ]
