"""Tasks run with the options of the config they are bound to, whenever
they were first touched; options given in the decorator win."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult
from kombu.exceptions import EncodeError

import earlyapp
from conftest import FLASK
from conftest import Worker
from conftest import WorkerFactory

ANNOTATIONS = {"*": {"rate_limit": "50/s"}}


@pytest.fixture(scope="module")
def early_worker(workers: WorkerFactory) -> Worker:
    """A prefork worker of ``earlyapp``, whose config asks for late acks,
    redelivery of a killed task's message and an annotation."""
    worker = workers.start(
        "redis",
        "postgres",
        {
            "CELERY_TASK_ACKS_LATE": True,
            "CELERY_TASK_REJECT_ON_WORKER_LOST": True,
            "CELERY_WORKER_PREFETCH_MULTIPLIER": 1,
            "CELERY_ACCEPT_CONTENT": ["json", "setjson"],
            "CELERY_TASK_ANNOTATIONS": ANNOTATIONS,
        },
        pool="prefork",
        concurrency=1,
        command=(FLASK, "--app", "earlyapp:create_app", "celery"),
    )
    worker.wait_ready()
    return worker


def test_touched_before_init_app_runs_with_the_config(early_worker: Worker) -> None:
    """Every kind of task runs with the config's options in the worker, and
    with the annotations; the decorator's options win."""
    earlyapp.create_app(early_worker.config)
    config = {
        "acks_late": True,
        "reject_on_worker_lost": True,
        "serializer": "json",
        "rate_limit": "50/s",
        "timelimit": [None, None],
    }
    for task in (
        earlyapp.context_options,
        earlyapp.shared_options,
        earlyapp.foreign_options,
    ):
        assert task.delay().get(timeout=30) == config, task.name
    assert earlyapp.decorated_options.delay().get(timeout=30) == {
        **config,
        "acks_late": False,
        "timelimit": [30, None],
    }


def test_killed_pool_process_redelivers(early_worker: Worker, tmp_path: Path) -> None:
    """SIGKILL the pool process while it runs the task: the message, acked
    late, is redelivered and the task completes in a new process."""
    earlyapp.create_app(early_worker.config)
    marker = tmp_path / "first-attempt"
    result = earlyapp.run_once.delay(str(marker))
    deadline = time.monotonic() + 30
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline, "the first attempt never started"
        time.sleep(0.1)
    killed = int(marker.read_text())
    os.kill(killed, signal.SIGKILL)
    assert result.get(timeout=60) != killed, "the task ran again in a new process"


# Celery 5.5 and later copy the time limits of the config onto tasks, whose
# messages then carry them; before, the worker's own config decides them.
SENT_LIMITS = ("time_limit", "task_time_limit") in Task.from_config

SECOND = {
    "CELERY_TASK_IGNORE_RESULT": True,
    "CELERY_TASK_SERIALIZER": "setjson",
    "CELERY_TASK_SOFT_TIME_LIMIT": 1,
    "CELERY_TASK_TIME_LIMIT": 20,
}


def test_options_of_a_second_app(early_worker: Worker) -> None:
    """After rebinding to an app of another config, tasks are sent with its
    serializer, time limits and ignore_result; back to the first, with the
    first's."""
    earlyapp.create_app(early_worker.config)
    earlyapp.create_app({**early_worker.config, **SECOND})

    assert earlyapp.members.delay({3, 1, 2}).get(timeout=30) == [1, 2, 3]
    if SENT_LIMITS:
        with pytest.raises(SoftTimeLimitExceeded):
            earlyapp.sleep.delay(5).get(timeout=30)
    ignored = earlyapp.echo.delay("ignored")
    # The worker runs one task at a time, in the order sent.
    limits = earlyapp.context_options.delay().get(timeout=30)["timelimit"]
    assert limits == ([20, 1] if SENT_LIMITS else [None, None])
    assert AsyncResult(ignored.id).state == "PENDING", "the result was stored"

    earlyapp.create_app(early_worker.config)
    with pytest.raises(EncodeError):
        earlyapp.members.delay({1})
    assert earlyapp.echo.delay("kept").get(timeout=30) == "kept"
    assert earlyapp.sleep.delay(1.5).get(timeout=30) == "slept"


def test_decorator_options_win_over_a_second_app(early_worker: Worker) -> None:
    earlyapp.create_app({**early_worker.config, **SECOND})
    with pytest.raises(EncodeError):
        earlyapp.decorated_options.delay({"a set"})
    report = earlyapp.decorated_options.delay().get(timeout=30)
    assert report["timelimit"] == [30, 1 if SENT_LIMITS else None]


def test_annotations_follow_the_config(early_worker: Worker) -> None:
    """The annotations of the bound config apply; those of the config before
    are undone, options that Celery reads from the config or not."""
    annotated = {
        "earlyapp.members": {"serializer": "setjson"},
        "earlyapp.echo": {"expires": -1},
    }
    earlyapp.create_app({**early_worker.config, "CELERY_TASK_ANNOTATIONS": annotated})
    assert earlyapp.members.delay({2, 1}).get(timeout=30) == [1, 2]
    with pytest.raises(TaskRevokedError):
        earlyapp.echo.delay("expired").get(timeout=30)

    earlyapp.create_app(early_worker.config)
    with pytest.raises(EncodeError):
        earlyapp.members.delay({1})
    assert earlyapp.echo.delay("kept").get(timeout=30) == "kept"
