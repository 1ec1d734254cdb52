"""The Celery app of the extension is the current one in every thread of the
process, as in the threads that serve requests."""

from __future__ import annotations

import gc
import json
import threading
import time
import typing as t
import urllib.request

import pytest
from celery.result import AsyncResult
from flask import Flask
from werkzeug.serving import make_server

from flask_celery_ctx import FlaskCelery

import sharedapp
from conftest import FLASK
from conftest import Worker
from conftest import WorkerFactory


@pytest.fixture(scope="module")
def shared_worker(workers: WorkerFactory) -> Worker:
    """A worker of ``sharedapp``, on Redis."""
    worker = workers.start(
        "redis",
        "postgres",
        {},
        command=(FLASK, "--app", "sharedapp:create_app", "celery"),
    )
    worker.wait_ready()
    return worker


@pytest.fixture
def server(shared_worker: Worker) -> t.Iterator[str]:
    """The URL of ``sharedapp`` served by a threaded server, as ``flask run``
    serves it: each request in a thread of its own."""
    app = sharedapp.create_app(shared_worker.config)
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(10)


def call(method: str, url: str) -> t.Any:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        return json.load(response)


def poll_result(server: str, task_id: str) -> t.Any:
    """Ask the result view until the task is done."""
    deadline = time.monotonic() + 30
    while True:
        answer = call("GET", f"{server}/result/{task_id}")
        if answer["ready"]:
            return answer["value"]
        assert time.monotonic() < deadline, "the task never finished"
        time.sleep(0.1)


@pytest.mark.parametrize("kind", ["shared", "own"])
def test_views_in_request_threads(server: str, kind: str) -> None:
    """A view sends a ``@shared_task`` or an ``@ext.celery.task`` task, and
    another reads its result with ``AsyncResult(id)``, no app given."""
    task_id = call("POST", f"{server}/{kind}/2/3")["id"]
    assert poll_result(server, task_id) == [5, "sharedapp"]


# A result sent from a thread keeps that thread's result backend (Celery keeps
# one per thread) and its Redis connection, which only garbage collection
# closes; redis-py 5.0 (the lowest versions) reports that as a
# ResourceWarning. It is collected here, not in a later test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_shared_task_from_a_thread(shared_worker: Worker) -> None:
    sharedapp.create_app(shared_worker.config)
    sent: list[AsyncResult[t.Any]] = []
    thread = threading.Thread(
        target=lambda: sent.append(sharedapp.shared_add.delay(4, 5))
    )
    thread.start()
    thread.join(30)
    assert sent[0].app is sharedapp.ext.celery
    assert sent[0].get(timeout=30) == [9, "sharedapp"]
    sent.clear()
    gc.collect()


def test_last_init_app_wins_in_every_thread() -> None:
    """A second extension bound later is the current app everywhere, and
    binding the first again makes it current again."""
    first = sharedapp.create_app({"CELERY_BROKER_URL": "memory://"})
    second_ext = FlaskCelery()
    second_ext.init_app(Flask("second"))

    def current_in_thread() -> t.Any:
        seen: list[t.Any] = []
        thread = threading.Thread(target=lambda: seen.append(AsyncResult("x").app))
        thread.start()
        thread.join(10)
        return seen[0]

    assert current_in_thread() is second_ext.celery
    assert AsyncResult("x").app is second_ext.celery
    sharedapp.ext.init_app(Flask("again"))
    assert current_in_thread() is sharedapp.ext.celery
    assert AsyncResult("x").app is sharedapp.ext.celery
    assert first.extensions["celery"] is sharedapp.ext
