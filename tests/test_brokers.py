"""Real brokers: Redis, RabbitMQ, and the embedded SQLite transports."""

from __future__ import annotations

import subprocess
import sys
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


@pytest.mark.parametrize(
    ("url", "blocked", "expected"),
    [
        # The transport imports its client in a try, and fails later.
        (
            "rediss://127.0.0.1:6379/0",
            "redis",
            'Install it: pip install "celery[redis]"',
        ),
        # The transport's import fails.
        ("mongodb://localhost/db", "pymongo", 'pip install "celery[mongodb]"'),
        ("sqla+sqlite:///db.sqlite", "sqlalchemy", 'pip install "celery[sqlalchemy]"'),
        ("bogus://localhost", None, "'bogus', which kombu does not know. Use one of"),
    ],
)
def test_a_missing_broker_client_is_named(
    url: str, blocked: str | None, expected: str
) -> None:
    """In a process where the client's module cannot be imported, as where
    it is not installed."""
    script = (
        "import sys\n"
        + (f"sys.modules[{blocked!r}] = None\n" if blocked else "")
        + "from celery import Celery\n"
        "from flask_celery_ctx.worker import broker_problem\n"
        f"print(broker_problem(Celery(broker={url!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert expected in done.stdout
    assert done.stdout.startswith(f"The broker URL {url.rstrip('/')}")
