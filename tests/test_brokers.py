"""Real brokers: Redis, RabbitMQ, and the embedded SQLite transports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kombu import Connection

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
    """What to do is said below the banner, where the user looks, and again
    with each retry."""
    worker = workers.start(
        "redis", "postgres", {"CELERY_BROKER_URL": "redis://127.0.0.1:9/0"}
    )
    # The URL as the consumer's error shows it, which depends on kombu's
    # version (5.4 masks an empty password: redis://:**@...).
    url = Connection("redis://127.0.0.1:9/0").as_uri()
    hint = (
        f"Start the broker at {url}, or set CELERY_BROKER_URL"
        " (or CELERY['broker_url']) in the Flask config"
    )
    deadline = time.monotonic() + 30
    while worker.log.count(hint) < 2:
        assert time.monotonic() < deadline, worker.log
        time.sleep(0.2)
    worker.stop()
    log = worker.log
    banner = log.index("[queues]")
    assert banner < log.index("Trying again in") < log.index(hint)
    assert hint not in log[:banner]


PROJECT = Path(__file__).parent.parent

REDIS_APP = """
from flask import Flask
from flask_celery_ctx import FlaskCelery

ext = FlaskCelery()


def create_app():
    app = Flask(__name__)
    app.config["CELERY_BROKER_URL"] = "redis://127.0.0.1:6379/0"
    ext.init_app(app)
    return app
"""


def test_redis_without_celerys_redis_extra(tmp_path: Path) -> None:
    """``pip install flask-celery-ctx redis``: kombu's Redis transport needs
    ``packaging`` too, which only ``celery[redis]`` installs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    installed = subprocess.run(
        [venv / "bin" / "pip", "install", "--quiet", PROJECT, "redis"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if installed.returncode != 0:
        message = f"pip could not install the project: {installed.stderr[-2000:]}"
        pytest.fail(message) if os.environ.get("CI") == "true" else pytest.skip(message)
    # kombu 5.7's Redis transport imports packaging, which neither kombu nor
    # redis requires; should one of them come to require it, the user who
    # removes it is in the same place.
    subprocess.run(
        [venv / "bin" / "pip", "uninstall", "--quiet", "--yes", "packaging"],
        capture_output=True, timeout=120,
    )  # fmt: skip
    no_packaging = subprocess.run([venv / "bin" / "python", "-c", "import packaging"])
    assert no_packaging.returncode != 0, "packaging is installed"
    (tmp_path / "shop.py").write_text(REDIS_APP)
    for command in (["worker", "--pool", "solo"], ["beat"], ["purge", "-f"]):
        result = subprocess.run(
            [venv / "bin" / "flask", "--app", "shop:create_app", "celery", *command],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1, (command, result.stdout)
        assert "Traceback" not in result.stderr, (command, result.stderr)
        assert (
            "Error: The broker URL redis://127.0.0.1:6379/0 needs the client library of"
            " the 'redis' transport, which is not installed or fails to import"
            " (ModuleNotFoundError: No module named 'packaging')."
            ' Install it: pip install "celery[redis]".'
        ) in result.stderr, (command, result.stderr)


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
