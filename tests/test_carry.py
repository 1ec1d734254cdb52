"""Values of ``g`` named by ``carry_g`` travel from where a task is sent into
the task, through workflows, retries and ``delay_on_commit``."""

from __future__ import annotations

import json
import logging
import threading
import typing as t
import urllib.request
import uuid

import pytest
from celery import chain
from celery import chord
from celery import group
from celery import signals
from celery.result import AsyncResult
from flask import Flask
from flask import g
from kombu.exceptions import EncodeError
from sqlalchemy import select
from werkzeug.serving import make_server

from flask_celery_ctx import CarriedValuesFilter
from flask_celery_ctx import FlaskCelery
from flask_celery_ctx.testing import OnCommitRecorder

import taskapp
from conftest import WorkerFactory
from taskapp import db


@pytest.fixture
def client(workers: WorkerFactory) -> Flask:
    """The in-process app of a solo worker on Redis."""
    return workers().client()


def test_a_view_carries_its_values_through_a_threaded_server(client: Flask) -> None:
    httpd = make_server("127.0.0.1", 0, client, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        sent = urllib.request.Request(
            f"http://127.0.0.1:{httpd.server_port}/carried",
            method="POST",
            headers={"X-Request-Id": "req-view"},
        )
        with urllib.request.urlopen(sent, timeout=30) as response:
            task_id = json.load(response)["id"]
    finally:
        httpd.shutdown()
        thread.join()
    assert AsyncResult(task_id).get(timeout=30) == {"request_id": "req-view"}


def test_present_values_arrive_and_absent_ones_stay_absent(client: Flask) -> None:
    with client.test_request_context():
        g.request_id = "req-1"
        g.user_id = 7
        both = taskapp.carried.delay()
        del g.user_id
        one = taskapp.carried.delay()
        g.other = "not carried"
    assert both.get(timeout=30) == {"request_id": "req-1", "user_id": 7}
    assert one.get(timeout=30) == {"request_id": "req-1"}


def test_nothing_is_carried_from_outside_a_context(client: Flask) -> None:
    with client.app_context():
        g.request_id = "gone with its context"
    assert taskapp.carried.delay().get(timeout=30) == {}


def test_values_travel_as_a_header_not_as_arguments(client: Flask) -> None:
    sent: list[tuple[t.Any, dict[str, t.Any]]] = []

    def look(body: t.Any, headers: dict[str, t.Any], **kwargs: t.Any) -> None:
        sent.append((body, dict(headers)))

    signals.before_task_publish.connect(look)
    try:
        with client.app_context():
            g.request_id = "req-header"
            result = taskapp.carried.delay()
    finally:
        signals.before_task_publish.disconnect(look)
    assert result.get(timeout=30) == {"request_id": "req-header"}
    ((body, headers),) = sent
    assert body[:2] == ((), {})
    assert json.loads(headers["flask_g"]) == {"request_id": "req-header"}


def test_a_task_of_another_base_class_gets_them(client: Flask) -> None:
    with client.app_context():
        g.request_id = "req-foreign"
        result = taskapp.foreign_carried.delay()
    assert result.get(timeout=30) == {"request_id": "req-foreign"}


def test_a_task_sent_by_name_gets_them(client: Flask) -> None:
    with client.app_context():
        g.request_id = "req-by-name"
        result = taskapp.ext.celery.send_task("taskapp.carried")
    assert result.get(timeout=30) == {"request_id": "req-by-name"}


def test_a_task_sending_a_task_passes_its_values_on(client: Flask) -> None:
    with client.app_context():
        g.request_id = "req-parent"
        g.user_id = 3
        child_id = taskapp.send_carried.delay().get(timeout=30)
    child: dict[str, t.Any] = AsyncResult(child_id).get(timeout=30)
    assert child == {"request_id": "req-parent", "user_id": 3}


def test_a_chain_carries_them_to_every_task(client: Flask) -> None:
    with client.app_context():
        g.request_id = "req-chain"
        result = chain(taskapp.collect.s(), taskapp.collect.s(), taskapp.collect.s())()
    assert result.get(timeout=30) == ["req-chain"] * 3


def test_a_link_callback_gets_them(client: Flask) -> None:
    callback = taskapp.collect.s()
    linked = callback.freeze()
    with client.app_context():
        g.request_id = "req-link"
        taskapp.collect.apply_async(link=callback)
    assert linked.get(timeout=30) == ["req-link", "req-link"]


def test_a_group_and_a_chord_carry_them(client: Flask) -> None:
    with client.app_context():
        g.request_id = "req-group"
        grouped = group(taskapp.collect.s() for _ in range(3))()
        g.request_id = "req-chord"
        chorded = chord(taskapp.collect.s() for _ in range(3))(taskapp.gather.s())
    assert grouped.get(timeout=30) == [["req-group"]] * 3
    assert chorded.get(timeout=30) == [[["req-chord"]] * 3, "req-chord"]


def test_a_retry_keeps_the_values_the_task_was_sent_with(client: Flask) -> None:
    with client.app_context():
        g.request_id = "req-retry"
        result = taskapp.carried_after_retry.delay()
    assert result.get(timeout=30) == {"request_id": "req-retry"}


def test_delay_on_commit_carries_the_values_of_the_time_it_was_queued(
    client: Flask,
) -> None:
    with client.test_request_context():
        g.request_id = "req-queued"
        db.session.execute(select(1))
        result = taskapp.carried.delay_on_commit()
        g.request_id = "req-changed-before-the-commit"
        db.session.commit()
    assert result.get(timeout=30) == {"request_id": "req-queued"}


def test_delay_on_commit_from_a_task(client: Flask) -> None:
    with client.app_context():
        g.request_id = "req-task-commit"
        child_id = taskapp.send_carried_on_commit.delay().get(timeout=30)
    assert AsyncResult(child_id).get(timeout=30) == {"request_id": "req-task-commit"}


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_other_pools(workers: WorkerFactory, pool: str) -> None:
    workers(pool=pool, concurrency=2).client()
    with taskapp.ext.app.app_context():
        g.request_id = f"req-{pool}"
        results = [taskapp.carried.delay() for _ in range(4)]
    assert [r.get(timeout=30) for r in results] == [{"request_id": f"req-{pool}"}] * 4


def test_rabbitmq(workers: WorkerFactory) -> None:
    workers(broker="rabbitmq").client()
    with taskapp.ext.app.app_context():
        g.request_id = "req-amqp"
        g.user_id = {"nested": [1, 2.5, None, True]}
        result = chain(taskapp.collect.s(), taskapp.carried.si())()
    assert result.get(timeout=30) == {
        "request_id": "req-amqp",
        "user_id": {"nested": [1, 2.5, None, True]},
    }


def test_inline_tasks_see_the_same_values(app: Flask) -> None:
    with app.test_request_context():
        g.request_id = "req-inline"
        assert taskapp.carried.delay().get() == {"request_id": "req-inline"}


def test_inline_task_in_a_context_of_its_own(app: Flask) -> None:
    """A task applied outside any context, with the header a message would
    have, gets a context of its own and the values on its ``g``."""
    header = {"flask_g": json.dumps({"request_id": "req-apply", "other": 1})}
    result = taskapp.carried.apply(headers=header)
    assert result.get() == {"request_id": "req-apply"}


def test_a_value_json_refuses_is_an_error_naming_the_attribute(app: Flask) -> None:
    with app.test_request_context():
        g.user_id = object()
        with pytest.raises(EncodeError, match=r"g\.user_id is <object"):
            taskapp.carried.delay()
        with pytest.raises(EncodeError, match=r"g\.user_id is <object"):
            taskapp.carried.delay_on_commit()


def test_a_malformed_header_is_logged_and_ignored(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    result = taskapp.carried.apply(headers={"flask_g": "[1, 2]"})
    assert result.get() == {}
    assert "header that is not a JSON object" in caplog.text


@pytest.mark.parametrize(
    ("names", "error", "message"),
    [
        ("request_id", TypeError, r"not the string 'request_id': write carry_g=\['"),
        ([3], TypeError, "as strings, not 3"),
        (["request-id"], ValueError, "'request-id', which is not the name"),
    ],
)
def test_names_are_checked(names: t.Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        FlaskCelery(carry_g=names)


def test_the_log_filter_in_the_web_process(app: Flask) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    handler.addFilter(CarriedValuesFilter(names=["request_id", "tenant"]))
    logger = logging.getLogger(f"carry-{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.warning("outside")
    with app.test_request_context():
        g.request_id = "req-log"
        g.user_id = 5
        logger.warning("inside")
    outside, inside = records
    assert (outside.request_id, outside.tenant, outside.task_id) == ("-", "-", "-")  # type: ignore[attr-defined]
    assert (inside.request_id, inside.user_id, inside.tenant) == ("req-log", 5, "-")  # type: ignore[attr-defined]


def test_the_log_filter_in_the_worker(workers: WorkerFactory) -> None:
    """The docs' dictConfig example: the worker's log names the request id
    and the task id on the task's records."""
    worker = workers.start(
        "redis", "postgres", {}, pool="prefork", concurrency=1,
        env={"FCC_LOG_CARRIED": "1"},
    )  # fmt: skip
    worker.wait_ready()
    worker.client()
    with taskapp.ext.app.app_context():
        g.request_id = "req-worker-log"
        result = taskapp.log_carried.delay("logged by the task")
    result.get(timeout=30)
    line = f"WARNING [req-worker-log {result.id}] taskapp: logged by the task"
    worker.wait_for(line)
    workers.stop(worker)


def test_the_on_commit_recorder_runs_tasks_with_them(
    app: Flask, celery_on_commit: OnCommitRecorder
) -> None:
    with app.test_request_context():
        g.request_id = "req-recorded"
        db.session.execute(select(1))
        taskapp.carried.delay_on_commit()
        db.session.commit()
    # Outside any context, as a worker runs it: in a context of its own.
    (result,) = celery_on_commit.run()
    assert result.get() == {"request_id": "req-recorded"}
