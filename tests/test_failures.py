"""Failure hygiene: what one task's failure, a dropped database connection, a
killed child or a restarted broker leave for the next tasks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import typing as t
import uuid
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import Engine

from flask_celery_ctx.db import base as db_base

import taskapp
from conftest import idle_in_transaction
from conftest import make_app
from conftest import Worker
from conftest import WorkerFactory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port}")


def outcomes(results: list[t.Any]) -> list[bool]:
    """Whether each task succeeded."""
    for result in results:
        result.get(timeout=30, propagate=False)
    return [result.successful() for result in results]


@pytest.mark.parametrize(("pool", "concurrency"), [("solo", 1), ("prefork", 2)])
def test_swallowed_database_error_does_not_poison_later_tasks(
    workers: WorkerFactory, pg_admin: Engine, pool: str, concurrency: int
) -> None:
    worker = workers(pool=pool, concurrency=concurrency)
    worker.client()
    base = 10_000_000 + uuid.uuid4().int % 1_000_000 * 10
    assert taskapp.poison.delay(base).get(timeout=20) == "swallowed"
    assert taskapp.poison.delay(base + 1).get(timeout=20) == "swallowed"
    assert all(outcomes([taskapp.count_items.delay("x") for _ in range(10)]))
    assert "PendingRollbackError" not in worker.log
    assert idle_in_transaction(pg_admin, worker.application_name) == 0


def terminate_backends(engine: Engine, worker: Worker) -> int:
    with engine.connect() as conn:
        return len(
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                    " datname = current_database() AND application_name = :name"
                ),
                {"name": worker.application_name},
            ).all()
        )


@pytest.mark.parametrize("pre_ping", [False, True], ids=["plain", "pool_pre_ping"])
@pytest.mark.parametrize(("pool", "concurrency"), [("solo", 1), ("prefork", 2)])
def test_dropped_connections(
    workers: WorkerFactory,
    pg_admin: Engine,
    pool: str,
    concurrency: int,
    pre_ping: bool,
) -> None:
    """The database drops the worker's connections: at most the first task on
    each dropped connection fails, none with ``pool_pre_ping``."""
    options = {"pool_pre_ping": True} if pre_ping else {}
    worker = workers.start(
        "redis",
        "postgres",
        {"SQLALCHEMY_ENGINE_OPTIONS": options},
        pool=pool,
        concurrency=concurrency,
    )
    worker.wait_ready()
    worker.client()
    assert all(outcomes([taskapp.backend_pid.delay() for _ in range(20)]))
    assert terminate_backends(pg_admin, worker) >= 1
    after = outcomes([taskapp.backend_pid.delay() for _ in range(40)])
    if pre_ping:
        assert all(after), after
    else:
        assert after.count(False) <= concurrency, after
        assert all(after[concurrency * 2 :]), after
    worker.stop()


@pytest.mark.parametrize("swallow", [False, True], ids=["raised", "swallowed"])
def test_soft_time_limit_in_a_blocking_query(
    workers: WorkerFactory, pg_admin: Engine, swallow: bool
) -> None:
    """The limit interrupts the driver mid-query: the connection, busy on the
    server, must not go back to the pool, even when the task catches the
    limit and returns."""
    worker = workers.start(
        "redis", "postgres", {"CELERY_TASK_SOFT_TIME_LIMIT": 1}, pool="prefork"
    )
    worker.wait_ready()
    worker.client()
    result = taskapp.sleep_query.delay(3, swallow)
    result.get(timeout=30, propagate=False)
    if swallow:
        assert result.result == "swallowed"
    else:
        assert type(result.result).__name__ == "SoftTimeLimitExceeded"
        # The failed task's session was invalidated, not asked to roll back.
        assert "Rolling back a task's session failed" not in worker.log
    assert all(outcomes([taskapp.backend_pid.delay() for _ in range(5)]))
    time.sleep(3)  # until the server is done with the interrupted query
    assert idle_in_transaction(pg_admin, worker.application_name) == 0
    assert all(outcomes([taskapp.backend_pid.delay() for _ in range(5)]))
    worker.stop()


class InfoConnection(sqlite3.Connection):
    """A sqlite3 connection with an ``info()`` method, as MySQLdb's
    connections have: it reports no transaction status."""

    def info(self) -> str:
        return "no status here"


@taskapp.ext.celery.task
def select_one() -> int | None:
    return taskapp.db.session.scalar(select(1))


def test_connection_that_reports_no_status_goes_back_to_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection is looked at after each task for an interrupted query;
    one whose driver reports no status is kept."""
    # Which dialects report no status, as if no connection was looked at yet.
    monkeypatch.setattr(db_base, "_NO_STATUS", set())
    app = make_app(
        {
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'info.sqlite'}",
            "SQLALCHEMY_ENGINE_OPTIONS": {"connect_args": {"factory": InfoConnection}},
        }
    )
    with app.app_context():
        engine = taskapp.db.engine
    invalidated: list[object] = []
    event.listen(engine, "invalidate", lambda *args: invalidated.append(args))
    assert select_one.apply().get() == 1
    assert select_one.apply().get() == 1
    assert invalidated == []


def test_statement_timeout_stops_a_query_the_soft_limit_cannot(
    workers: WorkerFactory, pg_admin: Engine
) -> None:
    """``statement_timeout`` ends a query on the server, in every pool."""
    options = {"connect_args": {"options": "-c statement_timeout=500"}}
    worker = workers(SQLALCHEMY_ENGINE_OPTIONS=options)
    worker.client()
    started = time.monotonic()
    result = taskapp.sleep_query.delay(10)
    result.get(timeout=30, propagate=False)
    assert result.failed()
    assert "statement timeout" in str(result.result)
    assert time.monotonic() - started < 8
    assert all(outcomes([taskapp.backend_pid.delay() for _ in range(3)]))


def test_killed_child_redelivers_and_never_commits_half_done_work(
    workers: WorkerFactory, pg_admin: Engine
) -> None:
    worker = workers(
        pool="prefork",
        concurrency=1,
        CELERY_TASK_ACKS_LATE=True,
        CELERY_TASK_REJECT_ON_WORKER_LOST=True,
    )
    app = worker.client()
    name = f"killed-{uuid.uuid4().hex[:6]}"
    result = taskapp.attempt_then_commit.delay(name, 30)
    deadline = time.monotonic() + 20
    pid = None
    while pid is None:
        assert time.monotonic() < deadline, "the first attempt never started"
        with app.app_context():
            hook = taskapp.db.session.scalar(
                select(taskapp.Record.hook).where(taskapp.Record.task_id == result.id)
            )
        pid = int(hook.split(":")[1]) if hook else None
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    assert result.get(timeout=60) != pid, "the task ran again in a new child"
    with app.app_context():
        count = select(func.count()).where(taskapp.Item.name == name)
        assert taskapp.db.session.scalar(count) == 1, "the killed attempt committed"
    assert idle_in_transaction(pg_admin, worker.application_name) == 0


class PrivateBroker:
    """A broker server this test starts, stops and restarts on its own."""

    url: str

    def start(self) -> None: ...
    def stop(self) -> None: ...

    def restart(self) -> None:
        self.stop()
        self.start()


class PrivateRedis(PrivateBroker):
    def __init__(self, tmp: Path) -> None:
        if not shutil.which("redis-server"):
            pytest.skip("needs redis-server to run a private Redis")
        self.port = free_port()
        self.dir = tmp
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Append-only with fsync always: what the broker acknowledged survives.
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(20)


class PrivateRabbitMQ(PrivateBroker):
    def __init__(self) -> None:
        if not shutil.which("rabbitmq-server"):
            pytest.skip("needs rabbitmq-server to run a private RabbitMQ node")
        # The server runs as the rabbitmq user, who cannot enter pytest's
        # private temporary directories.
        self.dir = tmp = Path(tempfile.mkdtemp(prefix="fcc-rabbitmq-"))
        self.port = free_port()
        self.node = f"fcc{uuid.uuid4().hex[:6]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        (tmp / "mnesia").mkdir()
        (tmp / "log").mkdir()
        (tmp / "plugins").write_text("[].")
        (tmp / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
        )
        subprocess.run(["chown", "-R", "rabbitmq", str(tmp)], check=False)
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(tmp / "rabbitmq.conf"),
            "RABBITMQ_MNESIA_BASE": str(tmp / "mnesia"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(tmp / "feature_flags"),
            "RABBITMQ_LOG_BASE": str(tmp / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(tmp / "plugins"),
        }
        self.server = subprocess.Popen(
            ["rabbitmq-server"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, timeout=90)

    def ctl(self, *args: str) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        self.ctl("start_app")
        wait_for_port(self.port)

    def stop(self) -> None:
        self.ctl("stop_app")

    def shutdown(self) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, "stop"],
            env=self.env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        self.server.wait(60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(params=["redis", "rabbitmq"])
def private_broker(
    request: pytest.FixtureRequest, tmp_path: Path
) -> t.Iterator[PrivateBroker]:
    broker: PrivateBroker
    if request.param == "redis":
        broker = PrivateRedis(tmp_path)
        broker.start()
        yield broker
        broker.stop()
    else:
        broker = PrivateRabbitMQ()
        yield broker
        broker.shutdown()


def test_broker_restart(workers: WorkerFactory, private_broker: PrivateBroker) -> None:
    """The worker reconnects, and tasks the broker accepted before its
    restart are all run."""
    config: dict[str, t.Any] = {
        "CELERY_BROKER_URL": private_broker.url,
        "CELERY_RESULT_BACKEND": None,
        "CELERY_TASK_IGNORE_RESULT": True,
        "CELERY_WORKER_PREFETCH_MULTIPLIER": 1,
        "CELERY_TASK_ACKS_LATE": True,
    }
    if isinstance(private_broker, PrivateRabbitMQ):
        # Accepted means confirmed: RabbitMQ writes a persistent message to
        # disk before it confirms it, and may lose an unconfirmed one when it
        # restarts.
        config["CELERY_BROKER_TRANSPORT_OPTIONS"] = {"confirm_publish": True}
    worker = workers.start("redis", "postgres", config, pool="solo")
    worker.wait_ready()
    app = worker.client()
    name = f"restart-{uuid.uuid4().hex[:6]}"
    # One slow task keeps the worker busy while the others wait in the broker.
    taskapp.attempt_then_commit.delay(f"{name}-slow", 3)
    for _ in range(10):
        taskapp.write_then.delay("commit", name)
    private_broker.restart()
    for _ in range(10):
        taskapp.write_then.delay("commit", name)

    def count() -> int:
        with app.app_context():
            query = select(func.count()).where(taskapp.Item.name == name)
            return taskapp.db.session.scalar(query) or 0

    # After it reconnects, a worker may leave a delivered message unread for
    # up to 10 s, until its event loop next wakes (seen with Celery 5.4 and
    # 5.5 on RabbitMQ): slow, but nothing lost. The deadline allows 10 s for
    # each of the 20 tasks.
    deadline = time.monotonic() + 240
    while count() < 20:
        assert time.monotonic() < deadline, f"{count()} of 20 tasks ran:\n{worker.log}"
        time.sleep(0.5)
    assert worker.log.count("Connected to") >= 2, "the worker never reconnected"
    worker.stop()


def test_dropped_connection_still_tears_down(
    workers: WorkerFactory, pg_admin: Engine
) -> None:
    """The database drops the connection of a running task's session: the
    context is still torn down, its teardown functions run, and the next task
    of the same thread gets a fresh ``g``."""
    worker = workers(pool="threads", concurrency=1)
    worker.client()
    result = taskapp.wait_for_drop.delay()
    deadline = time.monotonic() + 20
    backend = None
    while backend is None and time.monotonic() < deadline:
        with pg_admin.connect() as conn:
            backend = conn.scalar(
                select(taskapp.Record.hook).where(taskapp.Record.task_id == result.id)
            )
        time.sleep(0.05)
    assert backend is not None, "the task did not start"
    with pg_admin.connect() as conn:
        assert conn.scalar(
            text("SELECT pg_terminate_backend(:pid)"),
            {"pid": int(backend.split(":")[1])},
        )
    result.get(timeout=20, propagate=False)
    assert "terminating connection" in str(result.result), result.result
    worker.wait_for("teardown got OperationalError", timeout=20)
    assert taskapp.context_state.delay("m").get(timeout=20)["g"] is None
    assert idle_in_transaction(pg_admin, worker.application_name) == 0


WATCHED = """
import signal, sys

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import create_engine, event, text

from flask_celery_ctx import FlaskCelery
from flask_celery_ctx.db import base

url, when = sys.argv[1:]
db = SQLAlchemy()
ext = FlaskCelery()
app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://" if when == "later" else url
db.init_app(app)
ext.init_app(app)


@ext.celery.task
def select_one():
    return db.session.scalar(text("select 1"))


class Interrupted(Exception):
    pass


def interrupt(*args):
    raise Interrupted


@ext.celery.task
def busy(engine):
    signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        db.session.execute(text("select pg_sleep(3)"), bind_arguments={"bind": engine})
    except Interrupted:
        return "interrupted"
    return "slept"


if when == "later":
    assert select_one.apply().get() == 1
    print("sqlite only:", "psycopg" in sys.modules, base.libpq_seen)
    engine = create_engine(url)  # imports psycopg only now
else:
    with app.app_context():  # a pooled connection, before any task
        db.session.execute(text("select 1"))
        engine = db.engine
    print("watching:", base._watching)
invalidated = []
event.listen(engine, "invalidate", lambda conn, record, exc: invalidated.append(exc))
print("busy:", busy.apply((engine,)).get())
print("invalidated:", invalidated, base.libpq_seen)
"""


@pytest.mark.parametrize("when", ["later", "before"])
def test_a_libpq_connection_is_looked_at_for_a_busy_query(
    postgres_url: str, when: str
) -> None:
    """A task that swallowed the interruption of its query leaves a busy
    connection, which is closed, not rolled back while busy: whether the
    process opened it before its first task (``before``), or only after
    tasks that used SQLite, which are not looked at (``later``)."""
    done = subprocess.run(
        [sys.executable, "-c", WATCHED, postgres_url, when],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    first = "sqlite only: False False" if when == "later" else "watching: False"
    assert done.stdout.splitlines() == [
        first,
        "busy: interrupted",
        "invalidated: [None] True",
    ], done.stderr
    assert "Exception during reset" not in done.stderr
