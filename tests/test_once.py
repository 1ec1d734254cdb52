"""``@ext.celery.task(once=True)``: the work of a task id commits once, with
real workers of ``dbapp`` on real PostgreSQL and Redis, on each database
integration; pool processes killed at the moments that matter, messages
published twice. Rows are counted in the database."""

from __future__ import annotations

import os
import signal
import sys
import time
import typing as t
import uuid
from pathlib import Path

import pytest
from celery.exceptions import WorkerLostError
from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.engine import Engine

from flask_celery_ctx import FlaskCelery
from flask_celery_ctx.db import database
from flask_celery_ctx.errors import ConfigValueError
from flask_celery_ctx.migrations import library_tables
from flask_celery_ctx.once.table import table as once_table

import dbapp
import oncetasks
from conftest import FLASK
from conftest import TESTS
from conftest import Worker
from conftest import WorkerFactory

INTEGRATIONS = ["flask-sqlalchemy", "lite", "sessionmaker"]
#: Kept short: a message the killed threads worker held comes back after it.
VISIBILITY = 10


@pytest.fixture(scope="module")
def tables(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    dbapp.Base.metadata.create_all(engine)
    engine.dispose()


def command(integration: str) -> tuple[str, ...]:
    """How a worker of ``dbapp`` starts: where Flask-SQLAlchemy cannot be
    imported, unless it is the integration."""
    app = ("--app", "dbapp:create_app", "celery")
    if integration == "flask-sqlalchemy":
        return (FLASK, *app)
    return (sys.executable, str(TESTS / "without_flask_sqlalchemy.py"), *app)


_started: list[Worker] = []


@pytest.fixture(scope="module", autouse=True)
def _stop_workers(workers: WorkerFactory) -> t.Iterator[None]:
    yield
    while _started:
        workers.stop(_started.pop())


def start(
    workers: WorkerFactory,
    integration: str = "flask-sqlalchemy",
    pool: str = "solo",
    concurrency: int = 1,
    **config: t.Any,
) -> Worker:
    worker = workers(
        pool=pool,
        concurrency=concurrency,
        command=command(integration),
        FCC_DATABASE=integration,
        CELERY_IMPORTS=["oncetasks"],
        **config,
    )
    if worker not in _started:
        _started.append(worker)
    return worker


_apps: list[Flask] = []


@pytest.fixture(autouse=True)
def _dispose_engines() -> t.Iterator[None]:
    yield
    while _apps:
        app = _apps.pop()
        for named in database(app).engines(app):  # type: ignore[union-attr]
            named.engine.dispose()


def client(worker: Worker) -> Flask:
    """The in-process app that sends tasks to ``worker``."""
    app = dbapp.create_app(worker.config)
    _apps.append(app)
    return app


def notes(engine: Engine, name: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text("SELECT count(*) FROM dbapp_note WHERE name = :n"), {"n": name}
            )
        )


def records(engine: Engine, task_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text("SELECT count(*) FROM flask_celery_once WHERE task_id = :i"),
                {"i": task_id},
            )
        )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=INTEGRATIONS)
def integration(request: pytest.FixtureRequest, tables: None) -> str:
    return str(request.param)


def test_same_message_published_twice_commits_once(
    workers: WorkerFactory, integration: str, pg_admin: Engine
) -> None:
    worker = start(workers, integration)
    client(worker)
    name, task_id = unique("twice"), uuid.uuid4().hex
    first = oncetasks.write.apply_async((name,), task_id=task_id)
    value = first.get(timeout=30)
    second = oncetasks.write.apply_async((name,), task_id=task_id)
    assert second.get(timeout=30) == value
    # Published twice while the first is not done: the same.
    other = uuid.uuid4().hex
    both = [oncetasks.write.apply_async((name,), task_id=other) for _ in range(2)]
    assert [r.get(timeout=30)["name"] for r in both] == [name, name]
    assert second.state == both[1].state == "SUCCESS"
    assert notes(pg_admin, name) == 2  # one per task id
    assert records(pg_admin, task_id) == records(pg_admin, other) == 1
    worker.wait_for(f"oncetasks.write[{task_id}] skipped (once=True)")
    worker.wait_for(f"oncetasks.write[{other}] skipped (once=True)")
    assert "committed at" in worker.log


def test_a_skip_sends_no_callback_twice(
    workers: WorkerFactory, tables: None, pg_admin: Engine
) -> None:
    """The first run stored its result: the skip stores nothing and sends
    nothing again."""
    worker = start(workers)
    client(worker)
    name, linked, task_id = unique("link"), unique("linked"), uuid.uuid4().hex
    callback = dbapp.write.si(linked, "commit")
    first = oncetasks.write.apply_async((name,), task_id=task_id, link=callback)
    value = first.get(timeout=30)
    oncetasks.write.apply_async((name,), task_id=task_id, link=callback)
    worker.wait_for(f"oncetasks.write[{task_id}] skipped (once=True)")
    # The solo worker runs in order: a callback sent by the skip ran before.
    assert oncetasks.count.delay(linked).get(timeout=30) == 1
    assert first.get(timeout=30) == value
    assert notes(pg_admin, name) == 1
    assert "Its result is stored already" in worker.log


def test_duplicates_running_at_once_commit_once(
    workers: WorkerFactory, tables: None, pg_admin: Engine
) -> None:
    """Both pass the look for the record; the second's insert of it waits
    for the first's commit, then fails on its key: its work is rolled
    back."""
    worker = start(workers, pool="threads", concurrency=2)
    client(worker)
    name, task_id = unique("together"), uuid.uuid4().hex
    results = [
        oncetasks.write.apply_async((name,), {"pause": 2}, task_id=task_id)
        for _ in range(2)
    ]
    assert [r.get(timeout=30)["name"] for r in results] == [name, name]
    assert notes(pg_admin, name) == 1
    assert records(pg_admin, task_id) == 1
    worker.wait_for(
        f"oncetasks.write[{task_id}] skipped (once=True): another run of the"
        " same id committed"
    )


def test_a_failure_is_rolled_back_and_not_recorded(
    workers: WorkerFactory, integration: str, pg_admin: Engine
) -> None:
    worker = start(workers, integration)
    client(worker)
    name, task_id = unique("fails"), uuid.uuid4().hex
    result = oncetasks.fails.apply_async((name,), task_id=task_id)
    with pytest.raises(ValueError, match="failed after a flush"):
        result.get(timeout=30)
    assert notes(pg_admin, name) == 0
    assert records(pg_admin, task_id) == 0


def test_a_commit_in_the_body_is_refused(
    workers: WorkerFactory, pg_admin: Engine
) -> None:
    worker = start(workers)
    client(worker)
    name = unique("commits")
    result = oncetasks.commits.delay(name)
    with pytest.raises(Exception, match="declared with once=True") as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "OnceCommitError"
    assert notes(pg_admin, name) == 0
    assert records(pg_admin, result.id) == 0
    # A savepoint is not a commit.
    name = unique("savepoint")
    assert oncetasks.savepoint.delay(name).get(timeout=30) == "released"
    assert notes(pg_admin, name) == 1


def test_a_retry_is_a_new_attempt_of_the_same_id(
    workers: WorkerFactory, pg_admin: Engine
) -> None:
    worker = start(workers)
    client(worker)
    name = unique("retries")
    result = oncetasks.retries.delay(name)
    assert result.get(timeout=30) == 1
    # The attempt that retried was rolled back; the one that returned, kept.
    assert notes(pg_admin, f"{name}-0") == 0
    assert notes(pg_admin, f"{name}-1") == 1
    assert records(pg_admin, result.id) == 1


def wait_for_pid(path: Path, worker: Worker, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        if worker.process.poll() is not None:
            pytest.fail(f"the worker exited:\n{worker.log}")
        time.sleep(0.05)
    pytest.fail(f"the task did not reach {path.name}:\n{worker.log}")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
@pytest.mark.parametrize("stop", ["after_commit", "before_commit"])
def test_a_killed_pool_process_commits_once(
    workers: WorkerFactory,
    tables: None,
    pg_admin: Engine,
    tmp_path: Path,
    pool: str,
    stop: str,
) -> None:
    """SIGKILL where the task blocks: after the library's COMMIT, before the
    ack (the redelivery is skipped), or before the COMMIT (the redelivery
    runs the body again). The message comes back: acks_late, and
    reject_on_worker_lost for a prefork child; the broker's visibility
    timeout for the threads pool, whose pool process is the worker."""
    options: dict[str, t.Any] = {
        "CELERY_BROKER_TRANSPORT_OPTIONS": {
            "visibility_timeout": VISIBILITY,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        }
    }
    worker = start(workers, pool=pool, **options)
    client(worker)
    name = unique(f"{pool}-{stop}")
    result = oncetasks.write.apply_async(
        (name,), {"stop": stop, "directory": str(tmp_path)}
    )
    pid = wait_for_pid(tmp_path / f"{stop}.pid", worker)
    delivered = time.monotonic()
    assert notes(pg_admin, name) == (1 if stop == "after_commit" else 0)
    if pool == "threads":
        assert pid == worker.process.pid
    os.kill(pid, signal.SIGKILL)
    if pool == "threads":
        worker.process.wait(30)
        workers.stop(worker)  # gone: forget it
        # kombu 5.3's Redis transport restores unacknowledged messages at a
        # new consumer's first look, then at one look in ten (100 s): the
        # replacement starts once the message is visible again.
        time.sleep(max(0.0, delivered + VISIBILITY + 1 - time.monotonic()))
        replacement = workers.another(
            worker, pool="threads", command=command("flask-sqlalchemy")
        )
        _started.append(replacement)
        replacement.wait_ready()
    value = result.get(timeout=VISIBILITY * 4)
    assert result.state == "SUCCESS"
    assert value["name"] == name
    assert notes(pg_admin, name) == 1, "the work was committed twice"
    assert records(pg_admin, result.id) == 1
    runner = worker if pool == "prefork" else replacement
    if stop == "after_commit":
        # The first run's return value, from its record.
        assert value["pid"] == pid
        runner.wait_for(f"oncetasks.write[{result.id}] skipped (once=True)")
    else:
        assert value["pid"] != pid
        assert f"oncetasks.write[{result.id}] skipped" not in runner.log
    if pool == "prefork":
        assert WorkerLostError.__name__ in worker.log


def test_workers_prune_records_past_the_retention(
    workers: WorkerFactory, tables: None, pg_admin: Engine
) -> None:
    old, recent = uuid.uuid4().hex, uuid.uuid4().hex
    once_table.create(pg_admin, checkfirst=True)
    now = time.time()
    with pg_admin.begin() as conn:
        conn.execute(
            once_table.insert(),
            [
                {"task_id": old, "name": "x", "created": now - 7200},
                {"task_id": recent, "name": "x", "created": now - 60},
            ],
        )
    worker = start(workers, CELERY_ONCE_RETENTION=3600)
    worker.wait_for("records of once tasks past their retention")
    assert records(pg_admin, old) == 0
    assert records(pg_admin, recent) == 1


@pytest.fixture
def app(postgres_url: str, tables: None) -> t.Iterator[Flask]:
    """A ``dbapp`` app in this process, for the pytest plugin's fixtures."""
    app = dbapp.create_app(
        {"FCC_DATABASE": "flask-sqlalchemy", "SQLALCHEMY_DATABASE_URI": postgres_url}
    )
    _apps.append(app)
    yield app


def test_celery_eager_honours_once(
    app: Flask, celery_eager: t.Any, pg_admin: Engine
) -> None:
    name, task_id = unique("eager"), uuid.uuid4().hex
    first = oncetasks.write.apply_async((name,), task_id=task_id)
    second = oncetasks.write.apply_async((name,), task_id=task_id)
    assert first.state == second.state == "SUCCESS"
    assert second.result == first.result
    assert notes(pg_admin, name) == 1
    assert records(pg_admin, task_id) == 1
    # In the test's context, too: the task commits the test's session.
    with app.app_context():
        again = oncetasks.write.apply_async((name,), task_id=task_id)
        assert again.result == first.result
    assert notes(pg_admin, name) == 1
    with pytest.raises(ValueError, match="failed after a flush"):
        oncetasks.fails.delay(name)
    assert notes(pg_admin, name) == 1


def test_the_option_and_the_setting_are_checked() -> None:
    ext = FlaskCelery()

    def job() -> None:
        pass

    task = ext.celery.task(once="yes", shared=False)(job)
    with pytest.raises(TypeError, match=r"once='yes' of task .* must be True or False"):
        task.name  # noqa: B018 (the task is made when first used)
    app = Flask(__name__)
    app.config["CELERY_ONCE_RETENTION"] = 0
    with pytest.raises(ConfigValueError, match="CELERY_ONCE_RETENTION must be"):
        ext.init_app(app)


def test_autogenerate_leaves_the_table_alone() -> None:
    assert "flask_celery_once" in library_tables()
