"""One trace from the request to the task, in Sentry and in OpenTelemetry,
whether the web process publishes the task right after its commit or a
worker's relay publishes it after a broker outage.

A web process (``tracedapp.py``, both tools on) commits an order and sends
its task with ``delay_on_commit``; a real worker, traced the same way,
runs it. Each process appends the spans it records to a file; the test
compares the trace of the request's span with the trace of the task's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import typing as t
import uuid
from pathlib import Path

import pytest

from flask_celery_ctx.outbox.tracecontext import RELAY_SPAN

from conftest import FLASK
from conftest import new_postgres_database
from conftest import REDIS_URL
from conftest import require
from conftest import RUN
from conftest import TESTS
from conftest import Worker

pytest.importorskip("sentry_sdk")
pytest.importorskip("opentelemetry.instrumentation.flask")
pytest.importorskip("opentelemetry.instrumentation.celery")

TOOLS = ("sentry", "opentelemetry")


@pytest.fixture(scope="module")
def url() -> t.Iterator[str]:
    """An empty PostgreSQL database with ``outboxapp``'s tables and the
    outbox table."""
    import outboxapp
    from flask_celery_ctx.outbox import table as outbox

    require("Redis", REDIS_URL, 6379)
    # The outbox table before the worker starts: its relay looks for the
    # table once a while.
    with new_postgres_database(
        "traces", outboxapp.Base.metadata, outbox.metadata
    ) as found:
        yield found


def spans(path: Path) -> list[dict[str, t.Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def web(config: dict[str, t.Any], path: Path, traced: bool = True) -> str:
    """Post an order in a web process, traced or not; the id of its task."""
    done = subprocess.run(
        [sys.executable, str(TESTS / "tracedapp.py")],
        cwd=TESTS,
        env={
            **os.environ,
            "FCC_CONFIG": json.dumps(config),
            "FCC_TRACE_FILE": str(path),
            **({} if traced else {"FCC_UNTRACED": "1"}),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout.splitlines()[-1])["task_id"])


def request_trace(path: Path, tool: str) -> str:
    """The trace id of the one request the web process recorded."""
    roots = [s for s in spans(path) if s["tool"] == tool and s["parent_id"] is None]
    assert len(roots) == 1, roots
    return str(roots[0]["trace_id"])


def task_traces(path: Path, tool: str, task_id: str) -> set[str]:
    """The trace ids of the worker's spans of a task, once each tool
    recorded some."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = {
            s["trace_id"]
            for s in spans(path)
            if s["tool"] == tool and s["task_id"] == task_id
        }
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"{tool} recorded no span of task {task_id} in the worker")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_one_trace_from_the_request_to_the_task(
    url: str, tmp_path: Path, pool: str
) -> None:
    """A send published at once after the commit, and one published by the
    worker's relay after the web process found the broker down: in both
    tools, every span of each task is in its request's trace, and the
    worker records no other trace: the relay's queries create none."""
    config = {
        "SQLALCHEMY_DATABASE_URI": url,
        "SECRET_KEY": "traces",
        "CELERY_BROKER_URL": REDIS_URL,
        "CELERY_TASK_DEFAULT_QUEUE": f"fcc-{RUN}-{uuid.uuid4().hex[:6]}",
        "CELERY_TASK_IGNORE_RESULT": True,
        "CELERY_OUTBOX_RELAY_INTERVAL": 0.2,
        "CELERY_OUTBOX_LEASE": 1,
    }
    in_worker = tmp_path / "worker.jsonl"
    worker = Worker(
        config,
        pool=pool,
        concurrency=2,
        command=(FLASK, "--app", "tracedapp:create_app", "celery"),
        env={"FCC_TRACE_FILE": str(in_worker)},
    )
    try:
        worker.wait_ready()
        at_once = tmp_path / "at-once.jsonl"
        sent = web(config, at_once)
        # Nothing listens on port 9: the row waits for the worker's relay.
        relayed = tmp_path / "relayed.jsonl"
        waited = web({**config, "CELERY_BROKER_URL": "redis://127.0.0.1:9/0"}, relayed)
        requests = set()
        for path, task_id in ((at_once, sent), (relayed, waited)):
            for tool in TOOLS:
                expected = request_trace(path, tool)
                found = task_traces(in_worker, tool, task_id)
                assert found == {expected}, (path.name, tool, spans(in_worker))
                requests.add(expected)
        time.sleep(1)  # the relay's next rounds
        # The relay's claims and deletes made no trace of their own.
        assert {s["trace_id"] for s in spans(in_worker)} == requests
        # Its publish is a span of the request's trace, in Sentry as well.
        recorded = [s for s in spans(in_worker) if s["tool"] == "sentry"]
        [relay] = [s for s in recorded if s["name"] == RELAY_SPAN]
        assert relay["trace_id"] == request_trace(relayed, "sentry")
        published = [s["op"] for s in recorded if s["parent_id"] == relay["span_id"]]
        assert published in (["queue.publish"], ["queue.submit.celery"]), recorded

        # Sends queued outside any trace: the relay publishes each in a new
        # trace, not all in its thread's.
        down = {**config, "CELERY_BROKER_URL": "redis://127.0.0.1:9/0"}
        untraced = [web(down, tmp_path / "untraced.jsonl", traced=False)]
        untraced.append(web(down, tmp_path / "untraced.jsonl", traced=False))
        for tool in TOOLS:
            first, second = (task_traces(in_worker, tool, i) for i in untraced)
            assert not first & second, (tool, spans(in_worker))
    finally:
        worker.stop()
        print(worker.log)
    assert "could not be sent after the commit" not in worker.log
