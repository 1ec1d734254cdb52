"""After every task in a worker the session is removed, whatever happened:
its transaction is rolled back and its connection goes back to the pool."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.engine import Engine

import taskapp
from conftest import idle_in_transaction
from conftest import WorkerFactory

OUTCOMES = ["raise", "retry", "reject", "ignore", "teardown_raise", "success"]


def run(how: str, name: str) -> None:
    result = taskapp.write_then.delay(how, name)
    if how not in ("reject", "ignore"):  # these store no result
        result.get(timeout=20, propagate=False)


@pytest.mark.parametrize("how", OUTCOMES)
@pytest.mark.parametrize(
    ("pool", "concurrency"), [("solo", 1), ("prefork", 1), ("threads", 2)]
)
def test_session_removed_after_each_outcome(
    workers: WorkerFactory, pg_admin: Engine, how: str, pool: str, concurrency: int
) -> None:
    worker = workers(pool=pool, concurrency=concurrency)
    worker.client()
    name = f"{how}-{uuid.uuid4().hex[:6]}"
    run(how, name)
    # Nothing of the uncommitted work survived, and the next task is fine.
    assert taskapp.count_items.delay(name).get(timeout=20) == 0
    assert idle_in_transaction(pg_admin, worker.application_name) == 0


def test_teardown_functions_get_the_task_exception(workers: WorkerFactory) -> None:
    worker = workers()
    worker.client()
    result = taskapp.write_then.delay("raise", f"raise-{uuid.uuid4().hex[:6]}")
    result.get(timeout=20, propagate=False)
    worker.wait_for("teardown got ValueError('failed after a flush')", timeout=20)


def test_commit_is_kept(workers: WorkerFactory) -> None:
    workers().client()
    name = f"commit-{uuid.uuid4().hex[:6]}"
    assert taskapp.write_then.delay("commit", name).get(timeout=20) == "commit"
    assert taskapp.count_items.delay(name).get(timeout=20) == 1


def test_soft_time_limit_rolls_back(workers: WorkerFactory, pg_admin: Engine) -> None:
    worker = workers(pool="prefork", concurrency=1, CELERY_TASK_SOFT_TIME_LIMIT=1)
    worker.client()
    name = f"sleep-{uuid.uuid4().hex[:6]}"
    result = taskapp.write_then.delay("sleep", name)
    result.get(timeout=20, propagate=False)
    assert type(result.result).__name__ == "SoftTimeLimitExceeded"
    assert taskapp.count_items.delay(name).get(timeout=20) == 0
    assert idle_in_transaction(pg_admin, worker.application_name) == 0
    assert "idle in transaction" not in worker.log
