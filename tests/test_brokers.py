"""Real brokers: Redis, RabbitMQ, and the embedded SQLite transports."""

from __future__ import annotations

import uuid

import pytest

import taskapp
from conftest import WorkerFactory

BROKERS = ["redis", "rabbitmq", "sqlite", "sqlbroker"]


@pytest.mark.parametrize("broker", BROKERS)
def test_round_trip(workers: WorkerFactory, broker: str) -> None:
    database = "sqlite" if broker in ("sqlite", "sqlbroker") else "postgres"
    workers(broker=broker, database=database).client()
    assert [taskapp.add.delay(i, i).get(timeout=30) for i in range(3)] == [0, 2, 4]
    name = f"{broker}-{uuid.uuid4().hex[:6]}"
    assert taskapp.write_then.delay("commit", name).get(timeout=30) == "commit"
    assert taskapp.count_items.delay(name).get(timeout=30) == 1


def test_rebinding_between_brokers(workers: WorkerFactory) -> None:
    """Test suites build an app per test: each init_app rebinds the client."""
    redis = workers(broker="redis")
    sqlite = workers(broker="sqlite", database="sqlite")
    for worker in (redis, sqlite, redis):
        worker.client()
        assert taskapp.add.delay(20, 22).get(timeout=30) == 42


def test_unreachable_broker_at_worker_start(workers: WorkerFactory) -> None:
    worker = workers.start(
        "redis", "postgres", {"CELERY_BROKER_URL": "redis://127.0.0.1:9/0"}
    )
    worker.wait_for("Cannot reach the broker at redis://")
    assert "set CELERY_BROKER_URL (or CELERY['broker_url'])" in worker.log
    worker.stop()


def test_pickled_message_is_refused(workers: WorkerFactory) -> None:
    worker = workers()
    worker.client()
    taskapp.add.apply_async((1, 2), serializer="pickle")
    worker.wait_for("untrusted content of type pickle")
    # The worker goes on with the next task.
    assert taskapp.add.delay(1, 2).get(timeout=20) == 3
