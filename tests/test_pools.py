"""Database safety in every worker pool: prefork, threads and gevent."""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy.engine import Engine

import taskapp
from conftest import backends
from conftest import FLASK
from conftest import WorkerFactory


def test_prefork_children_never_share_a_connection(
    workers: WorkerFactory, pg_admin: Engine
) -> None:
    """The factory touches the database, leaving a pooled connection in the
    parent; every child opens its own, and the parent's is never used."""
    worker = workers(pool="prefork", concurrency=3, FCC_CREATE_ALL=True)
    parents = backends(pg_admin, worker)
    assert len(parents) == 1, "the factory's connection is pooled in the parent"
    worker.client()
    results = [taskapp.backend_pid.delay() for _ in range(300)]
    pairs = {tuple(result.get(timeout=30)) for result in results}
    children = {pid for pid, _ in pairs}
    by_backend: dict[int, set[int]] = {}
    for pid, backend in pairs:
        by_backend.setdefault(backend, set()).add(pid)
    assert len(children) > 1
    assert all(len(pids) == 1 for pids in by_backend.values()), by_backend
    assert not parents & set(by_backend), "a child used the parent's connection"
    assert parents <= backends(pg_admin, worker), "the parent's connection survives"
    assert "ERROR" not in worker.log


@pytest.mark.parametrize(
    ("pool", "concurrency"), [("threads", 8), ("gevent", 20)], ids=["threads", "gevent"]
)
def test_concurrent_tasks_each_have_their_own_session(
    workers: WorkerFactory, pool: str, concurrency: int
) -> None:
    options = {"pool_size": concurrency, "max_overflow": 0}
    worker = workers(
        pool=pool, concurrency=concurrency, SQLALCHEMY_ENGINE_OPTIONS=options
    )
    worker.client()
    run = uuid.uuid4().hex[:6]
    writes = [taskapp.write_then.delay("commit", f"{run}-{i % 10}") for i in range(200)]
    states = [taskapp.context_state.delay("m") for _ in range(100)]
    assert {result.get(timeout=60) for result in writes} == {"commit"}
    assert {(s["g"], s["session"]) for s in (r.get(timeout=60) for r in states)} == {
        (None, None)
    }
    counts = [
        taskapp.count_items.delay(f"{run}-{i}").get(timeout=30) for i in range(10)
    ]
    assert counts == [20] * 10, "rows were lost"
    assert "already attached" not in worker.log
    assert "QueuePool limit" not in worker.log
    assert "connections: tasks will wait" not in worker.log


def test_warns_when_concurrency_exceeds_the_engine_pool(workers: WorkerFactory) -> None:
    worker = workers(pool="threads", concurrency=20)
    assert (
        "The threads pool runs up to 20 tasks at once, but the default engine has"
        " pool_size 5 + max_overflow 10 = 15 connections"
    ) in worker.log
    assert "SQLALCHEMY_ENGINE_OPTIONS to at least 20" in worker.log


def test_no_warning_for_prefork(workers: WorkerFactory) -> None:
    """Each prefork child has an engine of its own."""
    worker = workers(pool="prefork", concurrency=3, FCC_CREATE_ALL=True)
    assert "tasks at once" not in worker.log


def test_gevent_pool_from_config_is_patched(workers: WorkerFactory) -> None:
    """``worker_pool`` in the config, no ``--pool``: still patched first."""
    worker = workers.start(
        "redis", "postgres", {"CELERY_WORKER_POOL": "gevent"}, pool=None
    )
    worker.wait_ready()
    worker.client()
    assert taskapp.context_state.delay("m").get(timeout=20)["g"] is None
    assert "(gevent)" in worker.log


def test_unpatched_gevent_is_refused(workers: WorkerFactory) -> None:
    """``celery -A`` reads ``worker_pool`` too late to patch: refused."""
    celery = os.path.join(os.path.dirname(FLASK), "celery")
    worker = workers.start(
        "redis",
        "postgres",
        {"CELERY_WORKER_POOL": "gevent"},
        pool=None,
        command=(celery, "-A", "pushed_context"),
    )
    assert worker.process.wait(30) != 0
    assert "The gevent pool needs gevent's monkey patches" in worker.log


def test_eventlet_is_refused(workers: WorkerFactory) -> None:
    pytest.importorskip("eventlet")
    worker = workers.start("redis", "postgres", {}, pool="eventlet")
    assert worker.process.wait(30) != 0
    assert "The eventlet pool is not supported" in worker.log


def test_solo_worker_keeps_the_factorys_connection(
    workers: WorkerFactory, pg_admin: Engine
) -> None:
    """The solo pool runs tasks in the worker's own process: the connection
    the factory pooled is not inherited, and is reused rather than dropped
    unclosed for a new one."""
    worker = workers(pool="solo", FCC_CREATE_ALL=True)
    before = backends(pg_admin, worker)
    assert len(before) == 1, "the factory's connection is pooled"
    worker.client()
    assert (
        taskapp.count_items.delay(f"solo-{uuid.uuid4().hex[:6]}").get(timeout=20) == 0
    )
    assert backends(pg_admin, worker) == before
