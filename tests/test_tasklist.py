"""``flask celery tasks`` lists the app's tasks and the options they are
delivered with, from the app and its config alone."""

from __future__ import annotations

import json
import os
import subprocess
import typing as t

import redis
from celery import Task

import earlyapp
from conftest import FLASK
from conftest import REDIS_URL
from conftest import TESTS
from conftest import WorkerFactory

CONFIG = {
    "CELERY_TASK_DEFAULT_QUEUE": "main",
    "CELERY_TASK_ACKS_LATE": True,
    "CELERY_TASK_REJECT_ON_WORKER_LOST": True,
    "CELERY_TASK_IGNORE_RESULT": True,
    "CELERY_TASK_TIME_LIMIT": 20,
    "CELERY_TASK_SOFT_TIME_LIMIT": 10,
    "CELERY_TASK_ROUTES": {
        "earlyapp.sleep": {"queue": "slow"},
        "earlyapp.m*": {"queue": "sets", "routing_key": "sets.members"},
    },
    "CELERY_TASK_ANNOTATIONS": {
        "*": {"rate_limit": "50/s"},
        "earlyapp.echo": {"max_retries": 7, "acks_late": False},
    },
}

CONTEXT_TASK = "flask_celery_ctx.task.ContextTask"
# Celery 5.5 and later send a task's time limits in its messages.
SENT_LIMITS = ("time_limit", "task_time_limit") in Task.from_config


def flask_celery_tasks(
    config: dict[str, t.Any], *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLASK, "--app", "earlyapp:create_app", "celery", "tasks", *args],
        cwd=TESTS,
        env={**os.environ, "FCC_CONFIG": json.dumps(config)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def listed(config: dict[str, t.Any]) -> dict[str, dict[str, t.Any]]:
    result = flask_celery_tasks(config, "--json")
    assert result.returncode == 0, result.stderr
    return {task.pop("name"): task for task in json.loads(result.stdout)}


def row(**changes: t.Any) -> dict[str, t.Any]:
    """A task of earlyapp as CONFIG makes it, with some options changed."""
    return {
        "base": CONTEXT_TASK,
        "queue": "main",
        "exchange": "main",
        "routing_key": "main",
        "route_error": None,
        "acks_late": True,
        "reject_on_worker_lost": True,
        "ignore_result": True,
        "time_limit": 20,
        "soft_time_limit": 10,
        "rate_limit": "50/s",
        "max_retries": 3,
        **changes,
    }


def test_json_lists_the_options_after_the_config() -> None:
    """The config, its routes and annotations decide, and the decorator's
    options win; time limits are the config's on every Celery version, as
    the worker applies them."""
    tasks = listed(CONFIG)
    assert tasks == {
        "earlyapp.context_options": row(ignore_result=False),
        "earlyapp.decorated_options": row(
            acks_late=False, ignore_result=False, time_limit=30
        ),
        "earlyapp.echo": row(max_retries=7, acks_late=False),
        "earlyapp.foreign_options": row(
            base="earlyapp.LibraryTask", ignore_result=False
        ),
        "earlyapp.members": row(
            queue="sets",
            exchange="sets",
            routing_key="sets.members",
            ignore_result=False,
        ),
        "earlyapp.run_once": row(),
        "earlyapp.shared_options": row(ignore_result=False),
        "earlyapp.sleep": row(
            queue="slow", exchange="slow", routing_key="slow", ignore_result=False
        ),
    }


def test_defaults_without_config() -> None:
    tasks = listed({})
    assert tasks["earlyapp.echo"] == {
        "base": CONTEXT_TASK,
        "queue": "celery",
        "exchange": "celery",
        "routing_key": "celery",
        "route_error": None,
        "acks_late": False,
        "reject_on_worker_lost": False,
        "ignore_result": False,
        "time_limit": None,
        "soft_time_limit": None,
        "rate_limit": None,
        "max_retries": 3,
    }


def test_table() -> None:
    result = flask_celery_tasks(CONFIG)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "NAME", "BASE", "QUEUE", "ACKS_LATE", "REJECT_ON_WORKER_LOST",
        "IGNORE_RESULT", "TIME_LIMIT", "SOFT_TIME_LIMIT", "RATE_LIMIT",
        "MAX_RETRIES",
    ]  # fmt: skip
    assert lines[1:] and all(not line.startswith("celery.") for line in lines[1:])
    sleep = next(line for line in lines if line.startswith("earlyapp.sleep "))
    assert sleep.split() == [
        "earlyapp.sleep", CONTEXT_TASK, "slow", "True", "True", "False", "20",
        "10", "50/s", "3",
    ]  # fmt: skip


def test_a_route_that_fails_is_shown() -> None:
    """A route to a queue that task_queues lacks, with missing queues not
    created: Celery would refuse the send, and the listing says why."""
    config = {
        **CONFIG,
        "CELERY_TASK_CREATE_MISSING_QUEUES": False,
        "CELERY_TASK_QUEUES": {"main": {"exchange": "main", "routing_key": "main"}},
    }
    tasks = listed(config)
    assert tasks["earlyapp.sleep"]["queue"] is None
    assert tasks["earlyapp.sleep"]["route_error"] == (
        "QueueNotFound: \"Queue 'slow' missing from task_queues\""
    )
    assert tasks["earlyapp.echo"]["queue"] == "main"
    table = flask_celery_tasks(config).stdout
    assert "(QueueNotFound: \"Queue 'slow' missing from task_queues\")" in table


def test_a_worker_delivers_as_listed(workers: WorkerFactory) -> None:
    """What the listing says is what a worker of the app does: the options
    the task runs with, and the queue its message goes to."""
    default = workers.config()["CELERY_TASK_DEFAULT_QUEUE"]  # unique
    slow = f"{default}-slow"
    config = {
        **{k: v for k, v in CONFIG.items() if k != "CELERY_TASK_IGNORE_RESULT"},
        "CELERY_TASK_DEFAULT_QUEUE": default,
        "CELERY_TASK_ROUTES": {"earlyapp.sleep": {"queue": slow}},
    }
    worker = workers.start(
        "redis", "postgres", config,
        command=(FLASK, "--app", "earlyapp:create_app", "celery"),
    )  # fmt: skip
    tasks = listed(worker.config)
    listing = tasks["earlyapp.context_options"]
    assert listing["queue"] == default
    assert tasks["earlyapp.sleep"]["queue"] == slow

    worker.wait_ready()
    earlyapp.create_app(worker.config)
    ran = earlyapp.context_options.delay().get(timeout=30)
    assert {name: ran[name] for name in ("acks_late", "reject_on_worker_lost")} == {
        name: listing[name] for name in ("acks_late", "reject_on_worker_lost")
    }
    assert ran["rate_limit"] == listing["rate_limit"]
    if SENT_LIMITS:
        assert ran["timelimit"] == [listing["time_limit"], listing["soft_time_limit"]]

    # The worker consumes the default queue only: the message waits in the
    # listed one.
    client = redis.Redis.from_url(REDIS_URL)
    try:
        earlyapp.sleep.delay(0)
        assert client.llen(slow) == 1
    finally:
        client.delete(slow)
        client.close()


def test_lists_the_modules_of_the_imports_setting() -> None:
    """A worker imports the modules of ``imports`` at start; so does the
    command."""
    assert "imported_tasks.imported" not in listed({})
    tasks = listed({"CELERY_IMPORTS": ["imported_tasks"]})
    assert tasks["imported_tasks.imported"]["base"] == CONTEXT_TASK
