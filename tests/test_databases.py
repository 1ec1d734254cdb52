"""The same behaviour on every database integration: Flask-SQLAlchemy,
Flask-SQLAlchemy-Lite, and a plain SQLAlchemy ``sessionmaker`` or
``scoped_session``, with real workers of ``dbapp`` on real PostgreSQL.

The workers of the integrations other than Flask-SQLAlchemy run where
Flask-SQLAlchemy cannot be imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import typing as t
import uuid
from importlib import metadata

import pytest
from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.engine import Engine

from flask_celery_ctx.db import database
from flask_celery_ctx.testing import start_worker

import dbapp
from conftest import backends
from conftest import FLASK
from conftest import idle_in_transaction
from conftest import TESTS
from conftest import Worker
from conftest import WorkerFactory

INTEGRATIONS = ["flask-sqlalchemy", "lite", "sessionmaker", "scoped"]
POOLS = {"solo": 1, "prefork": 2, "threads": 2}
NAMES = {
    "flask-sqlalchemy": "Flask-SQLAlchemy",
    "lite": "Flask-SQLAlchemy-Lite",
    "sessionmaker": "SQLAlchemy session factory",
    "scoped": "SQLAlchemy session factory",
}


@pytest.fixture(scope="session")
def dbapp_tables(postgres_url: str) -> None:
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
    """Stop this module's workers when it ends: the PostgreSQL server's
    connections are counted, and other modules start workers of their own."""
    yield
    while _started:
        workers.stop(_started.pop())


def start(
    workers: WorkerFactory, integration: str, pool: str, **config: t.Any
) -> Worker:
    """The shared worker of ``dbapp`` on this integration and pool."""
    worker = workers(
        pool=pool,
        concurrency=POOLS[pool],
        command=command(integration),
        FCC_DATABASE=integration,
        FCC_ASYNC_IN_FACTORY=True,
        **config,
    )
    if worker not in _started:
        _started.append(worker)
    return worker


@pytest.fixture(params=INTEGRATIONS)
def integration(request: pytest.FixtureRequest, dbapp_tables: None) -> str:
    return str(request.param)


@pytest.fixture(params=POOLS)
def pool(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def worker(workers: WorkerFactory, integration: str, pool: str) -> Worker:
    return start(workers, integration, pool)


@pytest.fixture
def solo_worker(workers: WorkerFactory, integration: str) -> Worker:
    return start(workers, integration, "solo")


_apps: list[Flask] = []


def make_app(config: dict[str, t.Any]) -> Flask:
    """A ``dbapp`` app in this process, whose engines are disposed after the
    test."""
    app = dbapp.create_app(config)
    _apps.append(app)
    return app


@pytest.fixture(autouse=True)
def _dispose_dbapp_engines() -> t.Iterator[None]:
    yield
    while _apps:
        app = _apps.pop()
        for named in database(app).engines(app):  # type: ignore[union-attr]
            named.engine.dispose()


def make_client(worker: Worker) -> t.Iterator[Flask]:
    yield make_app({**worker.config, "FCC_ASYNC_IN_FACTORY": False})


@pytest.fixture
def client(worker: Worker) -> t.Iterator[Flask]:
    """The in-process app that sends tasks to ``worker``."""
    yield from make_client(worker)


@pytest.fixture
def solo_client(solo_worker: Worker) -> t.Iterator[Flask]:
    yield from make_client(solo_worker)


def settle(engine: Engine, worker: Worker) -> int:
    """Connections of the worker idle in transaction, once they settle."""
    deadline = time.monotonic() + 5
    while (count := idle_in_transaction(engine, worker.application_name)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    return count


def test_each_task_gets_a_fresh_session(
    worker: Worker, client: Flask, integration: str
) -> None:
    results = [dbapp.state.delay("m") for _ in range(10)]
    seen = [result.get(timeout=30) for result in results]
    assert (
        seen
        == [
            {
                "g": None,
                "session": None,
                "integration": NAMES[integration],
                "flask_sqlalchemy": integration == "flask-sqlalchemy",
            }
        ]
        * 10
    )


@pytest.mark.parametrize("how", ["raise", "teardown_raise"])
def test_uncommitted_work_is_rolled_back(
    worker: Worker, client: Flask, pg_admin: Engine, how: str
) -> None:
    name = f"{how}-{uuid.uuid4().hex[:6]}"
    dbapp.write.delay(name, how).get(timeout=30, propagate=False)
    assert dbapp.count.delay(name).get(timeout=30) == 0
    assert dbapp.write.delay(name, "commit").get(timeout=30) == "commit"
    assert dbapp.count.delay(name).get(timeout=30) == 1
    assert settle(pg_admin, worker) == 0
    assert "non-checked-in connection" not in worker.log


@pytest.mark.parametrize("task", ["backend", "async_backend"])
def test_prefork_children_never_share_a_backend(
    workers: WorkerFactory,
    integration: str,
    pg_admin: Engine,
    task: str,
) -> None:
    """The factory queried before the fork: every child opens connections
    of its own, and the parent's are never used."""
    if task == "async_backend" and integration != "lite":
        pytest.skip("only Flask-SQLAlchemy-Lite has async engines here")
    worker = start(workers, integration, "prefork")
    line = worker.log.split("dbapp.create_app backends ", 1)[1].split("\n", 1)[0]
    parents = set(json.loads(line))
    assert parents <= backends(pg_admin, worker), "pooled in the parent"
    for _ in make_client(worker):
        results = [getattr(dbapp, task).delay() for _ in range(60)]
        pairs = {tuple(result.get(timeout=30)) for result in results}
    by_backend: dict[int, set[int]] = {}
    for pid, backend in pairs:
        by_backend.setdefault(backend, set()).add(pid)
    assert all(len(pids) == 1 for pids in by_backend.values()), by_backend
    assert not parents & set(by_backend), "a child used the parent's connection"
    assert parents <= backends(pg_admin, worker), "the parent's connections survive"


def test_delay_on_commit(solo_worker: Worker, solo_client: Flask) -> None:
    name = f"on-commit-{uuid.uuid4().hex[:6]}"
    ext = dbapp.ext
    with solo_client.app_context():
        ext.session.add(dbapp.Note(name=name))
        dropped = dbapp.count.delay_on_commit(name)
        ext.session.rollback()
        ext.session.add(dbapp.Note(name=name))
        sent = dbapp.count.delay_on_commit(name)
        ext.session.commit()
    # The worker saw the committed row: the task was sent after the commit.
    assert sent.get(timeout=30) == 1
    # A task sent later has run: the dropped one would have run before it.
    assert dbapp.count.delay(name).get(timeout=30) == 1
    assert dropped.state == "PENDING"


def test_instances_are_loaded_one_query_per_model(
    solo_worker: Worker, solo_client: Flask
) -> None:
    with solo_client.app_context():
        session = dbapp.ext.session
        notes = [dbapp.Note(name=f"n{i}") for i in range(3)]
        tags = [dbapp.Tag(name=f"t{i}") for i in range(2)]
        session.add_all([*notes, *tags])
        session.commit()
        result = dbapp.describe.delay(notes, tags=tags)
    seen = result.get(timeout=30)
    assert seen["args"] == [
        [{"model": "Note", "name": f"n{i}", "attached": True} for i in range(3)]
    ]
    assert seen["kwargs"] == {
        "tags": [{"model": "Tag", "name": f"t{i}", "attached": True} for i in range(2)]
    }
    assert len(seen["statements"]) == 2, seen["statements"]


def test_interrupted_query_is_not_reused(
    workers: WorkerFactory, integration: str, pg_admin: Engine
) -> None:
    """A soft time limit interrupts the driver mid-query and the task
    returns: the connection, busy on the server, is closed."""
    worker = start(workers, integration, "prefork")
    for _ in make_client(worker):
        assert dbapp.sleep_query.delay(3).get(timeout=30) == "swallowed"
        assert all(dbapp.backend.delay().get(timeout=30) for _ in range(4))
    time.sleep(3)  # until the server is done with the interrupted query
    assert idle_in_transaction(pg_admin, worker.application_name) == 0
    # The connection was closed, not rolled back while busy.
    assert "another command is already in progress" not in worker.log


def test_session_closed_when_any_context_ends(
    solo_worker: Worker, solo_client: Flask
) -> None:
    """A view's context, not only a task's, gets ``ext.session`` and loses
    it when it ends."""
    found = database(solo_client)
    assert found is not None
    engine = found.engines(solo_client)[0].engine
    with solo_client.test_request_context():
        session = dbapp.ext.session
        assert session is dbapp.ext.session
        session.execute(text("select 1"))
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with solo_client.app_context():
        assert dbapp.ext.session is not session


SENDER_WITHOUT_FLASK_SQLALCHEMY = """
import json, sys

class Block:
    def find_spec(self, name, *args):
        if name.split(".")[0] == "flask_sqlalchemy":
            raise ImportError(f"{name} is not installed")

sys.meta_path.insert(0, Block())
import dbapp

integration, url, name = sys.argv[1:]
app = dbapp.create_app({
    "FCC_DATABASE": integration,
    "SQLALCHEMY_DATABASE_URI": url,
    "CELERY_TASK_ALWAYS_EAGER": True,
    "CELERY_TASK_EAGER_PROPAGATES": True,
    "CELERY_TASK_STORE_EAGER_RESULT": True,
    "CELERY_RESULT_BACKEND": "cache+memory://",
    "SECRET_KEY": "sender",
})
ext = dbapp.ext
with app.app_context():
    ext.session.add(dbapp.Note(name=name))
    dbapp.write.delay_on_commit(name + "-dropped", "commit")
    ext.session.rollback()
    note = dbapp.Note(name=name)
    ext.session.add(note)
    sent = dbapp.describe.delay_on_commit(note)
    ext.session.commit()
    print(json.dumps([
        sent.get()["args"],
        dbapp.count.delay(name).get(),
        dbapp.count.delay(name + "-dropped").get(),
    ]))
print("flask_sqlalchemy" in sys.modules)
"""


@pytest.mark.parametrize("integration", ["lite", "sessionmaker", "scoped"])
def test_sender_without_flask_sqlalchemy(
    integration: str, postgres_url: str, dbapp_tables: None
) -> None:
    """delay_on_commit and instances as arguments, tasks run inline, where
    Flask-SQLAlchemy cannot be imported."""
    name = f"sender-{uuid.uuid4().hex[:6]}"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SENDER_WITHOUT_FLASK_SQLALCHEMY,
            integration,
            postgres_url,
            name,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=TESTS,
    )
    assert result.returncode == 0, result.stderr
    sent, imported = result.stdout.splitlines()
    assert json.loads(sent) == [
        [{"model": "Note", "name": name, "attached": True}],
        1,
        0,
    ]
    assert imported == "False"


MEMORY = {"CELERY_BROKER_URL": "memory://", "CELERY_RESULT_BACKEND": "cache+memory://"}


@pytest.mark.parametrize("integration", ["lite", "sessionmaker", "scoped"])
@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused(integration: str, url: str) -> None:
    app = make_app(
        {"FCC_DATABASE": integration, "SQLALCHEMY_DATABASE_URI": url, **MEMORY}
    )
    with (
        pytest.raises(RuntimeError, match="is an in-memory SQLite database") as info,
        start_worker(app),
    ):
        pass  # pragma: no cover
    assert "Use a file database" in str(info.value)
    if integration == "lite":
        assert "single connection, shared by every thread" in str(info.value)
    else:
        assert "a database, of its own" in str(info.value)


ISOLATED = """
import sys
import uuid

import dbapp
from flask_celery_ctx.testing import start_worker

app = dbapp.create_app({
    "FCC_DATABASE": "lite",
    "SQLALCHEMY_DATABASE_URI": sys.argv[1],
    "CELERY_BROKER_URL": "memory://",
    "CELERY_RESULT_BACKEND": "cache+memory://",
})
db = app.extensions["sqlalchemy"]
name = f"isolated-{uuid.uuid4().hex[:6]}"
with db.test_isolation(), start_worker(app):
    with app.app_context():
        dbapp.ext.session.add(dbapp.Note(name=name))
        dbapp.ext.session.commit()
    assert dbapp.count.delay(name).get(timeout=10) == 1
    assert dbapp.write.delay(name, "commit").get(timeout=10) == "commit"
    dbapp.write.delay(name, "raise").get(timeout=10, propagate=False)
    assert dbapp.count.delay(name).get(timeout=10) == 2
with app.app_context():
    assert dbapp.count(name) == 0
"""


def _version(distribution: str) -> tuple[int, ...]:
    return tuple(int(part) for part in metadata.version(distribution).split(".")[:3])


@pytest.mark.xfail(
    _version("flask-sqlalchemy-lite") < (0, 2, 1),
    strict=True,
    reason="Flask-SQLAlchemy-Lite 0.2.0's test_isolation() needs an active"
    " application context",
)
@pytest.mark.xfail(
    _version("sqlalchemy") >= (2, 1),
    strict=True,
    reason="Flask-SQLAlchemy-Lite 0.2.1's test_isolation() recurses in"
    " Connection.begin_nested on SQLAlchemy 2.1 once a second session begins"
    " after a commit, with or without Celery; it works on SQLAlchemy 2.0",
)
def test_lite_test_isolation_with_a_worker_thread(
    postgres_url: str, dbapp_tables: None
) -> None:
    """Flask-SQLAlchemy-Lite's ``test_isolation()`` hands every session the
    test's one connection: a solo worker thread sees the test's rows, its
    commits are savepoints, and all is rolled back after the test. In a
    process of its own: the failure leaves a connection open."""
    result = subprocess.run(
        [sys.executable, "-c", ISOLATED, postgres_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=TESTS,
    )
    assert result.returncode == 0, result.stderr


def test_session_must_be_a_session_factory(postgres_url: str) -> None:
    from sqlalchemy.orm import Session

    from flask_celery_ctx import FlaskCelery

    with pytest.raises(TypeError, match=r"takes a sqlalchemy\.orm\.sessionmaker or"):
        FlaskCelery(Flask("bad"), session=Session())  # type: ignore[arg-type]


def test_session_without_a_database() -> None:
    from flask_celery_ctx import FlaskCelery

    app = Flask("nodb")
    ext = FlaskCelery(app)
    with app.app_context(), pytest.raises(RuntimeError, match="session="):
        ext.session  # noqa: B018


@pytest.mark.parametrize(
    ("integration", "setting"),
    [
        ("lite", "SQLALCHEMY_ENGINES['default'] (as a dict with 'url')"),
        ("sessionmaker", "its create_engine() call"),
    ],
)
def test_warns_when_concurrency_exceeds_the_engine_pool(
    workers: WorkerFactory, integration: str, setting: str, dbapp_tables: None
) -> None:
    worker = workers(
        pool="threads",
        concurrency=20,
        command=command(integration),
        FCC_DATABASE=integration,
    )
    workers.stop(worker)
    assert "The threads pool runs up to 20 tasks at once, but the" in worker.log
    assert "pool_size 5 + max_overflow 10 = 15 connections" in worker.log
    assert f"{setting} to at least 20" in worker.log


@pytest.mark.parametrize("integration", INTEGRATIONS)
def test_rollback_opens_no_session_and_drops_sends(
    integration: str, postgres_url: str, dbapp_tables: None
) -> None:
    """``Database.rollback()`` undoes what the context's sessions flushed and
    drops their sends waiting for the commit; it opens no session."""
    app = make_app(
        {
            "FCC_DATABASE": integration,
            "SQLALCHEMY_DATABASE_URI": postgres_url,
            "CELERY_TASK_ALWAYS_EAGER": True,
        }
    )
    found = database(app)
    assert found is not None
    name = f"rollback-{uuid.uuid4().hex[:6]}"
    with app.app_context() as ctx:
        found.rollback()
        assert found.sessions(ctx) == []
        dbapp.ext.session.add(dbapp.Note(name=name))
        dbapp.ext.session.flush()
        dbapp.write.delay_on_commit(name, "commit")
        found.rollback()
        dbapp.ext.session.commit()
        assert dbapp.count(name) == 0


def test_async_task_uses_the_context_session(
    solo_client: Flask, integration: str
) -> None:
    """An ``async def`` task runs in another thread than its hooks, and sees
    the same session, a ``scoped_session`` scoped by thread included."""
    name = f"async-{uuid.uuid4().hex[:8]}"
    seen = dbapp.async_session.delay(name).get(timeout=30)
    assert seen == {
        "integration": NAMES[integration],
        "hook_session": True,
    }
    assert dbapp.count(name) == 1
