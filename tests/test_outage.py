"""An outage does not stall the web: with the broker or the result backend
down, refusing connections or silent, a view that commits K sends with
``delay_on_commit`` returns within a bound whatever K; the K rows stay in
the outbox and a relay publishes each once when the broker is back.

Brokers here are private servers on free ports: a ``redis-server`` this
module starts and stops, a port nobody listens on, a listener that
accepts connections and never answers, or one whose full queue makes the
kernel drop the packets of a connect, as a broker host that does not answer. The database is PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import typing as t
import uuid

import pytest
import redis
from flask import Flask
from kombu import Connection
from kombu import Consumer
from kombu import Queue
from kombu.message import Message
from sqlalchemy import text
from sqlalchemy.engine import Engine

import outboxapp
from flask_celery_ctx.db import database
from flask_celery_ctx.outbox import cleanup
from flask_celery_ctx.outbox import publish
from flask_celery_ctx.outbox import table as outbox
from flask_celery_ctx.outbox.relay import relay_all
from outboxapp import Order
from outboxapp import Seen

from conftest import emptied
from conftest import FLASK
from conftest import new_postgres_database
from conftest import RABBITMQ_URL
from conftest import require
from conftest import RUN
from conftest import TESTS
from conftest import Worker

#: The longest a commit may take with the broker refusing connections, and
#: with a broker that does not answer (the publish timeout is 0.5 s): far
#: under what a publish retried per send costs (0.7 s each refused, 135 s
#: for a broker that never answers), and loose enough for a loaded machine.
#: bench/outage.py measures the latency itself.
REFUSED_BOUND = 2.0
SILENT_BOUND = 4.0


@pytest.fixture(scope="module")
def url() -> t.Iterator[str]:
    """An empty PostgreSQL database with ``outboxapp``'s tables."""
    with new_postgres_database("outage", outboxapp.Base.metadata) as found:
        yield found


@pytest.fixture
def engine(url: str) -> t.Iterator[Engine]:
    with emptied(url, Seen, Order, outbox.table) as found:
        yield found


_cleanups: list[t.Callable[[], None]] = []


@pytest.fixture(autouse=True)
def _cleanup() -> t.Iterator[None]:
    publish.forget()
    yield
    publish.forget()
    while _cleanups:
        _cleanups.pop()()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def silent_listener(port: int) -> t.Callable[[], None]:
    """Accept connections on ``port`` and never answer, until the test
    ends or the function returned is called."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(128)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()

    def close() -> None:
        # A close alone leaves the port listening while the thread waits in
        # accept(); a shutdown wakes it.
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        server.close()
        for sock in accepted:
            sock.close()

    _cleanups.append(close)
    return close


def dropping_listener(port: int) -> t.Callable[[], None]:
    """Drop the packets of new connections to ``port``, as a broker host
    that does not answer: a listener whose queue of connections not yet
    accepted is full, so that the kernel drops their SYNs and a connect
    waits for its timeout. The function returned ends it."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(0)
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)

    def close() -> None:
        filler.close()
        server.close()

    _cleanups.append(close)
    return close


def start_redis(port: int, password: str | None = None) -> str:
    """Start a private Redis on ``port``; its URL."""
    if not shutil.which("redis-server"):
        pytest.skip("needs redis-server to run a private Redis")
    auth = ["--requirepass", password] if password else []
    server = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    process = subprocess.Popen(
        [*server, "--save", "", *auth],
        stdout=subprocess.DEVNULL,
    )

    def stop() -> None:
        process.terminate()
        process.wait(20)

    _cleanups.append(stop)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        try:
            redis.Redis(port=port, password=password, socket_timeout=2).ping()
            return f"redis://:{password or ''}@127.0.0.1:{port}/0"
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(0.05)
    pytest.fail(
        f"the private Redis on port {port} did not start (exit code {process.poll()})"
    )


def make_app(url: str, **extra: t.Any) -> Flask:
    app = outboxapp.create_app(
        {
            "SQLALCHEMY_DATABASE_URI": url,
            "SECRET_KEY": "outage",
            "CELERY_TASK_DEFAULT_QUEUE": f"fcc-{RUN}-{uuid.uuid4().hex[:6]}",
            "CELERY_OUTBOX_RELAY_INTERVAL": 0.2,
            "CELERY_OUTBOX_LEASE": 1,
            **extra,
        }
    )

    def dispose() -> None:
        for named in database(app).engines(app):  # type: ignore[union-attr]
            named.engine.dispose()

    _cleanups.append(dispose)
    return app


def commit(app: Flask, count: int) -> tuple[float, dict[str, t.Any]]:
    """POST a view that commits ``count`` orders, a send each; the seconds
    it took and its answer."""
    client = app.test_client()
    started = time.perf_counter()
    response = client.post(f"/orders/outage?count={count}")
    took = time.perf_counter() - started
    assert response.status_code == 200
    return took, t.cast("dict[str, t.Any]", response.json)


def relay(app: Flask) -> int:
    """Publish the rows of the outbox once their lease (1 s) is over, as a
    worker's relay does; how many."""
    time.sleep(1.1)
    with app.app_context():
        return relay_all(outboxapp.ext)


def task_ids(engine: Engine) -> list[str]:
    cleanup.flush()  # the rows of published sends, deleted in the background
    return [row.task_id for row in outbox.pending(engine)]


def queued(broker: str, queue: str) -> list[str]:
    """The task ids of the messages waiting in a Redis queue, first sent
    first (kombu pushes on the left)."""
    client = redis.Redis.from_url(broker)
    found = client.lrange(queue, 0, -1)
    return [json.loads(m)["headers"]["id"] for m in reversed(found)]


def down(fault: str, port: int) -> tuple[str, t.Callable[[], None]]:
    """A Redis URL on ``port``, where nothing listens, a listener never
    answers, or the packets of a connect are dropped; and what ends the
    fault."""
    faults = {"silent": silent_listener, "dropped": dropping_listener}
    end = faults[fault](port) if fault in faults else lambda: None
    return f"redis://:secret@127.0.0.1:{port}/0", end


@pytest.mark.parametrize("count", [1, 12, 100])
@pytest.mark.parametrize("role", ["broker", "broker and result backend"])
@pytest.mark.parametrize("fault", ["refused", "silent", "dropped"])
def test_a_commit_returns_at_once_and_the_relay_sends_later(
    url: str,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    role: str,
    count: int,
) -> None:
    port = free_port()
    broker, end = down(fault, port)
    backend = {"CELERY_RESULT_BACKEND": broker} if "backend" in role else {}
    app = make_app(url, CELERY_BROKER_URL=broker, **backend)
    with caplog.at_level(logging.WARNING, "flask_celery_ctx"):
        took, answer = commit(app, count)
    print(f"{fault} {role}, {count} sends: the commit took {took:.3f} s")
    assert took < (REFUSED_BOUND if fault == "refused" else SILENT_BOUND)
    assert sorted(task_ids(engine)) == sorted(answer["task_ids"])
    what = "refused the connection" if fault == "refused" else "did not answer"
    [line] = [r.getMessage() for r in caplog.records if "outbox" in r.getMessage()]
    assert line.startswith(f"{count} task")
    assert f"redis://:**@127.0.0.1:{port}/0 {what}" in line
    assert "secret" not in line

    end()
    healthy = start_redis(port, "secret")
    queue = app.config["CELERY_TASK_DEFAULT_QUEUE"]
    assert relay(app) == count
    assert task_ids(engine) == []
    sent = queued(healthy, queue)
    assert sorted(sent) == sorted(answer["task_ids"])  # each once


def test_a_redis_stopped_as_broker_and_result_backend(
    url: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """One private Redis is the broker and the result backend; the process
    published through it and subscribed to a result, then Redis is stopped.
    The next commit of 12 sends returns within the bound and says once that
    they wait; nothing advises restarting the app; once Redis is back on its
    port, a relay sends each once."""
    port = free_port()
    first = start_redis(port, "secret")
    stop = _cleanups[-1]
    app = make_app(url, CELERY_BROKER_URL=first, CELERY_RESULT_BACKEND=first)
    queue = app.config["CELERY_TASK_DEFAULT_QUEUE"]
    _, served = commit(app, 3)
    assert queued(first, queue) == served["task_ids"]
    with app.app_context(), contextlib.suppress(Exception):
        # The result consumer subscribes, and keeps its connection.
        outboxapp.ext.celery.AsyncResult(served["task_ids"][0]).get(timeout=0.2)
    stop()
    _cleanups.remove(stop)
    with caplog.at_level(logging.WARNING):
        took, answer = commit(app, 12)
    print(f"Redis stopped, 12 sends: the commit took {took:.3f} s")
    assert took < REFUSED_BOUND
    assert sorted(task_ids(engine)) == sorted(answer["task_ids"])
    [line] = [r.getMessage() for r in caplog.records if "outbox" in r.getMessage()]
    assert line.startswith("12 tasks wait in the outbox: the broker at redis://:**@")
    assert "must be restarted" not in caplog.text

    healthy = start_redis(port, "secret")
    assert relay(app) == 12
    assert task_ids(engine) == []
    assert sorted(queued(healthy, queue)) == sorted(answer["task_ids"])


def test_a_relay_does_not_wait_for_ever_on_a_silent_broker(
    url: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay publishes as the web process does after its commit: no
    retries, and timeouts (Celery's ``broker_connection_timeout`` here), so
    that a broker and result backend that never answer leave the rows in
    the outbox for the next round, in a worker and in ``flask celery outbox
    relay`` alike; once the broker is back, each is sent once."""
    port = free_port()
    broker, end = down("silent", port)
    settings = {
        "CELERY_BROKER_URL": broker,
        "CELERY_RESULT_BACKEND": broker,
        "CELERY_BROKER_CONNECTION_TIMEOUT": 1,
    }
    app = make_app(url, **settings)
    _, answer = commit(app, 12)
    publish.forget()  # the web process's hold is no relay's business
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "flask_celery_ctx"):
        assert relay(app) == 0
    assert time.monotonic() - started < 1.1 + 5
    assert sorted(task_ids(engine)) == sorted(answer["task_ids"])
    publish.forget()
    with caplog.at_level(logging.WARNING, "flask_celery_ctx"):
        assert relay(app) == 0  # the next look: no second warning
    [said] = [r.getMessage() for r in caplog.records if "relay" in r.getMessage()]
    assert said.startswith("The outbox relay cannot reach the broker at redis://")
    assert ": it did not answer within 1 s. The tasks in the outbox wait" in said
    env = {
        **os.environ,
        "FCC_CONFIG": json.dumps(
            {
                "SQLALCHEMY_DATABASE_URI": url,
                "SECRET_KEY": "outage",
                "CELERY_TASK_DEFAULT_QUEUE": app.config["CELERY_TASK_DEFAULT_QUEUE"],
                "CELERY_OUTBOX_LEASE": 1,
                **settings,
            }
        ),
    }
    done = subprocess.run(
        [FLASK, "--app", "outboxapp:create_app", "celery", "outbox", "relay"],
        cwd=TESTS, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Sent 0 tasks from the outbox; 12 wait"), done.stdout

    end()
    healthy = start_redis(port, "secret")
    publish.forget()  # as HOLD seconds do
    caplog.clear()
    with caplog.at_level(logging.INFO, "flask_celery_ctx"):
        assert relay(app) == 12
    assert "The outbox relay reached the broker at redis://" in caplog.text
    queue = app.config["CELERY_TASK_DEFAULT_QUEUE"]
    assert sorted(queued(healthy, queue)) == sorted(answer["task_ids"])


def test_a_worker_runs_each_task_once_after_a_silent_broker(
    url: str, engine: Engine
) -> None:
    """100 sends of a commit wait for a silent broker and result backend;
    a real worker started once Redis is back relays and runs each once."""
    port = free_port()
    broker, end = down("silent", port)
    app = make_app(url, CELERY_BROKER_URL=broker, CELERY_RESULT_BACKEND=broker)
    took, answer = commit(app, 100)
    assert took < SILENT_BOUND
    assert len(task_ids(engine)) == 100

    end()
    healthy = start_redis(port, "secret")
    config = {
        key: app.config[key]
        for key in (
            "SQLALCHEMY_DATABASE_URI",
            "SECRET_KEY",
            "CELERY_TASK_DEFAULT_QUEUE",
            "CELERY_OUTBOX_RELAY_INTERVAL",
            "CELERY_OUTBOX_LEASE",
        )
    }
    config |= {"CELERY_BROKER_URL": healthy, "CELERY_RESULT_BACKEND": healthy}
    worker = Worker(config, command=(FLASK, "--app", "outboxapp:create_app", "celery"))
    _cleanups.append(worker.stop)
    worker.wait_ready()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_runs(engine)) < 100:
        time.sleep(0.2)
    runs = _runs(engine)
    assert sorted(runs) == sorted(answer["order_ids"])
    assert set(runs.values()) == {1}
    assert task_ids(engine) == []


def _runs(engine: Engine) -> dict[int, int]:
    with engine.connect() as conn:
        found = conn.execute(
            text("SELECT order_id, count(*) FROM outboxapp_seen GROUP BY order_id")
        )
        return {row[0]: row[1] for row in found}


def test_a_result_backend_down_delays_no_send(url: str, engine: Engine) -> None:
    """The broker is up, the Redis result backend refuses: the commit's
    sends are published at once."""
    broker = start_redis(free_port())
    backend = f"redis://127.0.0.1:{free_port()}/1"
    app = make_app(url, CELERY_BROKER_URL=broker, CELERY_RESULT_BACKEND=backend)
    took, answer = commit(app, 12)
    assert took < REFUSED_BOUND
    assert task_ids(engine) == []
    queue = app.config["CELERY_TASK_DEFAULT_QUEUE"]
    assert queued(broker, queue) == answer["task_ids"]


def test_after_a_failure_commits_leave_their_sends_then_try_again(
    url: str,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed attempt spares the next commits of the process the attempt
    for ``HOLD`` seconds; the first commit after that publishes again."""
    monkeypatch.setattr(publish, "HOLD", 1.0)
    port = free_port()
    app = make_app(url, CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/0")
    _, first = commit(app, 3)
    healthy = start_redis(port)
    with caplog.at_level(logging.WARNING, "flask_celery_ctx"):
        took, second = commit(app, 3)
    assert took < REFUSED_BOUND
    assert "refused the connection (" in caplog.text  # remembered, not tried
    queue = app.config["CELERY_TASK_DEFAULT_QUEUE"]
    assert queued(healthy, queue) == []
    time.sleep(1.0)
    _, third = commit(app, 3)
    assert queued(healthy, queue) == third["task_ids"]
    waiting = first["task_ids"] + second["task_ids"]
    assert sorted(task_ids(engine)) == sorted(waiting)
    assert relay(app) == 6
    assert sorted(queued(healthy, queue)) == sorted(waiting + third["task_ids"])


def test_a_silent_amqp_broker(url: str, engine: Engine) -> None:
    """An AMQP broker that accepts connections and never answers: the
    commit returns within the bound; RabbitMQ receives each send once from
    the relay."""
    require("RabbitMQ", RABBITMQ_URL, 5672)
    port = free_port()
    silent_listener(port)
    app = make_app(url, CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{port}//")
    took, answer = commit(app, 12)
    assert took < SILENT_BOUND
    assert sorted(task_ids(engine)) == sorted(answer["task_ids"])

    queue = app.config["CELERY_TASK_DEFAULT_QUEUE"]
    relay_app = make_app(
        url, CELERY_BROKER_URL=RABBITMQ_URL, CELERY_TASK_DEFAULT_QUEUE=queue
    )
    assert relay(relay_app) == 12
    received = consume(queue, 12)
    assert sorted(received) == sorted(answer["task_ids"])


@pytest.mark.parametrize("value", [0, -1, "0.5s", True])
def test_a_wrong_publish_timeout_is_refused(value: t.Any) -> None:
    with pytest.raises(ValueError, match="CELERY_OUTBOX_PUBLISH_TIMEOUT"):
        outboxapp.create_app(
            {
                "SQLALCHEMY_DATABASE_URI": "sqlite://",
                "CELERY_OUTBOX_PUBLISH_TIMEOUT": value,
            }
        )


class Proxy:
    """Forwards a local port to RabbitMQ; :meth:`cut` closes every
    connection through it, as a broker restart does."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()
        _cleanups.append(self.close)

    def _accept(self) -> None:
        while True:
            try:
                client = self.server.accept()[0]
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)

    def cut(self) -> None:
        while self.open:
            sock = self.open.pop()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.server.close()
        self.cut()


def test_a_broker_restarted_between_two_commits(
    url: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection a thread keeps from its last commit is dead once the
    broker's connections were cut: the next commit publishes on a new one,
    at once."""
    require("RabbitMQ", RABBITMQ_URL, 5672)
    proxy = Proxy(("127.0.0.1", 5672))
    broker = f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
    app = make_app(url, CELERY_BROKER_URL=broker)
    _, first = commit(app, 3)
    assert task_ids(engine) == []
    proxy.cut()
    with caplog.at_level(logging.WARNING, "flask_celery_ctx"):
        took, second = commit(app, 3)
    assert "outbox" not in caplog.text
    assert took < REFUSED_BOUND
    assert task_ids(engine) == []
    received = consume(app.config["CELERY_TASK_DEFAULT_QUEUE"], 6)
    assert received == first["task_ids"] + second["task_ids"]


def test_commits_of_new_threads_share_a_connection(url: str, engine: Engine) -> None:
    """A server that runs each request in a thread of its own, as ``flask
    run`` does, publishes the commits of its requests over one connection
    kept by the process, not over a new one at each request."""
    require("RabbitMQ", RABBITMQ_URL, 5672)
    proxy = Proxy(("127.0.0.1", 5672))
    broker = f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
    app = make_app(url, CELERY_BROKER_URL=broker)
    sent: list[str] = []
    for _ in range(3):
        request = threading.Thread(
            target=lambda: sent.extend(commit(app, 2)[1]["task_ids"])
        )
        request.start()
        request.join()
    assert len(sent) == 6
    assert task_ids(engine) == []
    assert len(proxy.open) == 2  # one connection: the client's socket and RabbitMQ's
    assert consume(app.config["CELERY_TASK_DEFAULT_QUEUE"], 6) == sent


def consume(queue: str, count: int) -> list[str]:
    """The task ids of ``count`` messages taken from a RabbitMQ queue, which
    is deleted then."""
    received: list[str] = []

    def on_message(body: t.Any, message: Message) -> None:
        received.append(message.headers["id"])
        message.ack()

    with Connection(RABBITMQ_URL) as conn:
        declared = Queue(queue, auto_delete=False)
        with Consumer(conn, [declared], callbacks=[on_message]):
            deadline = time.monotonic() + 30
            while len(received) < count and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=1)
        declared.bind(conn).delete()
    return received
