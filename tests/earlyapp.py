"""An application whose tasks are touched at import time, before
``init_app``, as a beat schedule or a router that reads task names does."""

from __future__ import annotations

import json
import os
import time
import typing as t
from pathlib import Path

from celery import shared_task
from celery import Task
from flask import Flask
from kombu import serialization

from flask_celery_ctx import FlaskCelery

ext = FlaskCelery()


def _dumps(value: t.Any) -> str:
    return json.dumps(value, default=lambda value: {"__set__": sorted(value)})


def _loads(data: str | bytes) -> t.Any:
    return json.loads(
        data, object_hook=lambda d: set(d["__set__"]) if "__set__" in d else d
    )


# A serializer of the app's own, which JSON's does not replace: it sends sets.
serialization.register(
    "setjson",
    _dumps,
    _loads,
    content_type="application/x-setjson",
    content_encoding="utf-8",
)

#: The options each task reports, as the worker runs it.
OPTIONS = ("acks_late", "reject_on_worker_lost", "serializer", "rate_limit")


class LibraryTask(Task):  # type: ignore[type-arg]
    """A base class from a library that knows nothing of Flask."""


def report(task: Task) -> dict[str, t.Any]:  # type: ignore[type-arg]
    return {
        **{name: getattr(task, name) for name in OPTIONS},
        "timelimit": list(task.request.timelimit or (None, None)),
    }


@ext.celery.task(bind=True, ignore_result=False)
def context_options(self: Task) -> dict[str, t.Any]:  # type: ignore[type-arg]
    return report(self)


@shared_task(bind=True, ignore_result=False)
def shared_options(self: Task) -> dict[str, t.Any]:  # type: ignore[type-arg]
    return report(self)


@ext.celery.task(bind=True, base=LibraryTask, ignore_result=False)
def foreign_options(self: Task) -> dict[str, t.Any]:  # type: ignore[type-arg]
    return report(self)


@ext.celery.task(
    bind=True, ignore_result=False, acks_late=False, serializer="json", time_limit=30
)
def decorated_options(self: Task, value: t.Any = None) -> dict[str, t.Any]:  # type: ignore[type-arg]
    """Options given in the decorator, which win over the config."""
    return report(self)


@ext.celery.task
def run_once(path: str) -> int:
    """On the first attempt, write the process id to ``path`` and hang; on
    the next, return the process id."""
    marker = Path(path)
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(60)
    return os.getpid()


@ext.celery.task(ignore_result=False)
def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@ext.celery.task(ignore_result=False)
def members(values: set[int]) -> list[int]:
    return sorted(values)


@ext.celery.task
def echo(value: t.Any) -> t.Any:
    return value


#: Read at import time, which binds every task to the Celery config of the
#: moment: Celery's defaults.
SCHEDULE = {
    task.name: task.name
    for task in (
        context_options,
        shared_options,
        foreign_options,
        decorated_options,
        run_once,
        sleep,
        members,
        echo,
    )
}


def create_app(config: dict[str, t.Any] | None = None) -> Flask:
    app = Flask("earlyapp")
    app.config.update(json.loads(os.environ.get("FCC_CONFIG", "{}")))
    app.config.update(config or {})
    ext.init_app(app)
    return app
