"""Shared fixtures: the services, an isolated database, and real workers.

Services are found at the URLs below, which environment variables override.
A test that needs a missing service is skipped, naming it; under ``CI=true``
it fails instead.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import typing as t
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from flask import Flask
from kombu import pools
from sqlalchemy import create_engine
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import text
from sqlalchemy.engine import Engine

from flask_celery_ctx.outbox import cleanup

import taskapp

# The plugin for users' tests, flask_celery_ctx.testing, is loaded by its
# entry point, as in users' projects.
pytest_plugins = ["pytester"]

TESTS = Path(__file__).parent
FLASK = str(Path(sys.executable).with_name("flask"))
CI = os.environ.get("CI", "").lower() == "true"
RUN = uuid.uuid4().hex[:8]

POSTGRES_URL = os.environ.get(
    "FCC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("FCC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get(
    "FCC_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//"
)


_apps: list[Flask] = []


def make_app(config: dict[str, t.Any]) -> Flask:
    """A ``taskapp`` app whose engines are disposed after the test."""
    app = taskapp.create_app(config)
    _apps.append(app)
    return app


@pytest.fixture(autouse=True)
def _dispose_engines() -> t.Iterator[None]:
    yield
    while _apps:
        with _apps.pop().app_context():
            for engine in taskapp.db.engines.values():
                engine.dispose()


def reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2
        ):
            return True
    except OSError:
        return False


def require(name: str, url: str, default_port: int) -> None:
    """Skip, or under ``CI=true`` fail, when a service is not reachable."""
    if reachable(url, default_port):
        return
    message = f"{name} is not reachable at {url}"
    if CI:
        pytest.fail(f"{message} (CI=true: every service must run)")
    pytest.skip(f"needs {name}: {message}")


@pytest.fixture(scope="session")
def postgres_url() -> t.Iterator[str]:
    """A PostgreSQL database of this run's own, dropped at the end."""
    require("PostgreSQL", POSTGRES_URL, 5432)
    name = f"fcc_{RUN}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = str(admin.url.set(database=name).render_as_string(hide_password=False))
    engine = create_engine(url)
    with Flask(__name__).app_context():
        taskapp.db.metadata.create_all(engine)
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


@contextlib.contextmanager
def new_postgres_database(suffix: str, *metadatas: MetaData) -> t.Iterator[str]:
    """A PostgreSQL database of this run's own, ``fcc_<run>_<suffix>``, with
    the tables of ``metadatas``: its URL. Dropped at the end.

    :param suffix: What the database is for, in its name.
    :param metadatas: The tables to create in it.
    """
    require("PostgreSQL", POSTGRES_URL, 5432)
    name = f"fcc_{RUN}_{suffix}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            conn.execute(text(f"CREATE DATABASE {name}"))
        url = admin.url.set(database=name).render_as_string(hide_password=False)
        engine = create_engine(url)
        for metadata in metadatas:
            metadata.create_all(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@contextlib.contextmanager
def new_database(
    kind: str, suffix: str, metadata: MetaData, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[str]:
    """A database of this run's own with the tables of ``metadata``: its URL.

    :param kind: ``"postgres"`` (:func:`new_postgres_database`) or
        ``"sqlite"``, a file in a temporary directory.
    :param suffix: What the database is for, in its name.
    """
    if kind == "postgres":
        with new_postgres_database(suffix, metadata) as found:
            yield found
        return
    url = f"sqlite:///{tmp_path_factory.mktemp(suffix) / 'app.sqlite'}"
    engine = create_engine(url)
    metadata.create_all(engine)
    engine.dispose()
    yield url


@contextlib.contextmanager
def emptied(url: str, *tables: Table | type[t.Any]) -> t.Iterator[Engine]:
    """An engine of ``url``, for looking at the database, once the rows of
    ``tables`` (tables or mapped classes) that exist in it are deleted;
    disposed at the end."""
    engine = create_engine(url)
    with engine.begin() as conn:
        for found in tables:
            table = found if isinstance(found, Table) else found.__table__
            if engine.dialect.has_table(conn, table.name):
                conn.execute(table.delete())
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def pg_admin(postgres_url: str) -> t.Iterator[Engine]:
    """An autocommit engine on this run's database, for looking at it."""
    engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def idle_in_transaction(engine: Engine, application_name: str) -> int:
    """Connections of the workers that are idle inside a transaction, once
    they settle: a worker stores a task's result before it tears down the
    task's context, so a test that has the result may look too early."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname ="
        " current_database() AND application_name = :name"
        " AND state LIKE 'idle in transaction%'"
    )
    deadline = time.monotonic() + 5
    while True:
        with engine.connect() as conn:
            count: int = conn.scalar(query, {"name": application_name})
        if not count or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


def backends(engine: Engine, worker: Worker) -> set[int]:
    """Backend pids of the worker's connections to this run's database."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = :name"
            ),
            {"name": worker.application_name},
        )
        return {row.pid for row in rows}


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("sqlite") / "app.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    taskapp.db.metadata.create_all(engine)
    engine.dispose()
    return f"sqlite:///{path}"


class Worker:
    """A worker process started as users start it: ``flask celery worker``."""

    def __init__(
        self,
        config: dict[str, t.Any],
        pool: str | None = "solo",
        concurrency: int = 1,
        command: t.Sequence[str] = (FLASK, "--app", "taskapp:create_app", "celery"),
        env: t.Mapping[str, str] = {},
    ) -> None:
        """:param pool: The ``--pool`` option; ``None`` leaves it out, so that
        the config's ``worker_pool`` decides.
        :param env: More environment variables of the worker."""
        self.config = config
        self.name = f"w{uuid.uuid4().hex[:8]}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fcc-{self.name}.log"
        self.application_name = f"fcc-{self.name}"
        worker_config = {**config, "SQLALCHEMY_ENGINE_OPTIONS": self._engine_options()}
        pool_options = (
            [] if pool is None else ["--pool", pool, "--concurrency", str(concurrency)]
        )
        self.args = [
            *command, "worker", *pool_options,
            "--hostname", f"{self.name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        env = {**os.environ, **env, "FCC_CONFIG": json.dumps(worker_config)}
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.args, cwd=TESTS, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def _engine_options(self) -> dict[str, t.Any]:
        """The engine options, with the connections of this worker named."""
        options = dict(self.config.get("SQLALCHEMY_ENGINE_OPTIONS", {}))
        if self.config.get("SQLALCHEMY_DATABASE_URI", "").startswith("postgresql"):
            options["connect_args"] = {
                **options.get("connect_args", {}),
                "application_name": self.application_name,
            }
        return options

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60) -> None:
        """Wait until the worker's log says ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return
            if self.process.poll() is not None:
                pytest.fail(
                    f"the worker exited with {self.process.returncode}:\n{self.log}"
                )
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"the worker did not log {text!r} in {timeout}s:\n{self.log}")

    def wait_ready(self) -> None:
        self.wait_for(" ready.")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def client(self, **config: t.Any) -> Flask:
        """An app in this process bound to the same broker and backend."""
        return make_app({**self.config, **config})


def create_result_tables(url: str) -> None:
    """Create the tables of Celery's database result backend, which Celery
    5.4 creates only for the first database that a process uses."""
    models = importlib.import_module("celery.backends.database.models")
    engine = create_engine(url)
    models.ResultModelBase.metadata.create_all(engine)
    engine.dispose()


def broker_config(broker: str, tmp: Path) -> dict[str, t.Any]:
    """The broker and result backend settings for one kind of broker."""
    queue = {"CELERY_TASK_DEFAULT_QUEUE": f"fcc-{RUN}-{uuid.uuid4().hex[:6]}"}
    if broker == "redis":
        require("Redis", REDIS_URL, 6379)
        return {
            **queue,
            "CELERY_BROKER_URL": REDIS_URL,
            "CELERY_RESULT_BACKEND": REDIS_URL,
        }
    if broker == "rabbitmq":
        require("RabbitMQ", RABBITMQ_URL, 5672)
        return {
            **queue,
            "CELERY_BROKER_URL": RABBITMQ_URL,
            "CELERY_RESULT_BACKEND": "rpc://",
        }
    if broker in ("sqlite", "sqlbroker"):
        # kombu's SQLAlchemy transport, or the package's, which redelivers.
        scheme = "sqla" if broker == "sqlite" else "sqlbroker"
        create_result_tables(f"sqlite:///{tmp / 'results.sqlite'}")
        return {
            **queue,
            "CELERY_BROKER_URL": f"{scheme}+sqlite:///{tmp / 'broker.sqlite'}",
            "CELERY_RESULT_BACKEND": f"db+sqlite:///{tmp / 'results.sqlite'}",
        }
    raise ValueError(broker)


class WorkerFactory:
    """Starts workers on demand and keeps them for the session: starting one
    takes seconds, and many tests can share it."""

    def __init__(
        self, tmp: pytest.TempPathFactory, request: pytest.FixtureRequest
    ) -> None:
        self._tmp = tmp
        self._request = request
        self._workers: dict[str, Worker] = {}

    def __call__(
        self,
        broker: str = "redis",
        pool: str = "solo",
        concurrency: int = 1,
        database: str = "postgres",
        command: t.Sequence[str] | None = None,
        **config: t.Any,
    ) -> Worker:
        """A ready worker of ``taskapp`` with these settings, started once;
        ``command`` starts another app's worker (see :class:`Worker`)."""
        key = json.dumps(
            [broker, pool, concurrency, database, command, config], sort_keys=True
        )
        if key not in self._workers:
            options: dict[str, t.Any] = {"pool": pool, "concurrency": concurrency}
            if command is not None:
                options["command"] = command
            worker = self.start(broker, database, config, **options)
            worker.wait_ready()
            self._workers[key] = worker
        return self._workers[key]

    def config(
        self, broker: str = "redis", database: str = "postgres"
    ) -> dict[str, t.Any]:
        """The config of an app on this broker and database."""
        return {
            **broker_config(broker, self._tmp.mktemp("broker")),
            "SQLALCHEMY_DATABASE_URI": self._request.getfixturevalue(f"{database}_url"),
            "SECRET_KEY": "do-not-leak",
        }

    def start(
        self, broker: str, database: str, config: dict[str, t.Any], **options: t.Any
    ) -> Worker:
        """Start a worker that the caller waits for; it is stopped with the
        session, or earlier by the caller."""
        worker = Worker({**self.config(broker, database), **config}, **options)
        self._workers[worker.name] = worker
        return worker

    def another(self, worker: Worker, **options: t.Any) -> Worker:
        """Start a worker with the settings of ``worker``: the same broker,
        queue and database; the caller waits for it."""
        started = Worker(worker.config, **options)
        self._workers[started.name] = started
        return started

    def stop_all(self) -> None:
        for worker in self._workers.values():
            worker.stop()

    def stop(self, worker: Worker) -> None:
        """Stop a worker before the session ends, freeing its connections; a
        later call with its settings starts another."""
        worker.stop()
        for key in [key for key, found in self._workers.items() if found is worker]:
            del self._workers[key]


@pytest.fixture(scope="session")
def workers(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> t.Iterator[WorkerFactory]:
    factory = WorkerFactory(tmp_path_factory, request)
    yield factory
    factory.stop_all()
    pools.reset()  # close this process's broker connections


@pytest.fixture
def app(sqlite_url: str) -> Flask:
    """An app with no broker, whose tasks run inline."""
    return make_app(
        {"SQLALCHEMY_DATABASE_URI": sqlite_url, "CELERY_TASK_ALWAYS_EAGER": True,
         "CELERY_TASK_EAGER_PROPAGATES": True, "SECRET_KEY": "inline"}
    )  # fmt: skip


@pytest.fixture(scope="session")
def other_postgres_url(postgres_url: str) -> t.Iterator[str]:
    """A second, empty PostgreSQL database of this run's own, for binds."""
    name = f"fcc_{RUN}_other"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    yield str(admin.url.set(database=name).render_as_string(hide_password=False))
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
def orm_worker(workers: WorkerFactory, other_postgres_url: str) -> Worker:
    """A worker of ``taskapp`` with the models and tasks of ``ormtasks``."""
    import ormtasks

    return workers(**ormtasks.config(other_postgres_url))


@pytest.fixture
def orm_client(orm_worker: Worker) -> Flask:
    """The in-process app that sends tasks to ``orm_worker``."""
    return orm_worker.client()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Delete the outbox rows of the test's sends before its fixtures
    dispose of the engines: a web process deletes them in the background
    (:mod:`flask_celery_ctx.outbox.cleanup`)."""
    cleanup.flush()
