"""Which databases the outbox uses, and what it costs them: a role that may
not create tables, a primary with a read-only replica, and an idle worker's
relay.

Each test runs on PostgreSQL databases of its own, with workers of
``outboxapp`` started as users start them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
import redis
from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import Engine

import outboxapp
from flask_celery_ctx.outbox import relay as relay_module
from flask_celery_ctx.outbox import table as outbox
from flask_celery_ctx.outbox.table import OutboxTableError
from outboxapp import Order
from test_outbox import _cleanup  # noqa: F401
from test_outbox import _workers
from test_outbox import APP
from test_outbox import config
from test_outbox import DOWN
from test_outbox import make_app
from test_outbox import outbox_cli
from test_outbox import rows
from test_outbox import runs
from test_outbox import start_worker
from test_outbox import wait_until

from conftest import POSTGRES_URL
from conftest import REDIS_URL
from conftest import require
from conftest import RUN
from conftest import TESTS
from conftest import Worker

#: What an error about the outbox table must name.
RECIPE = (
    "flask_celery_outbox",
    "Creating the table by a migration",
    "CELERY_OUTBOX = False",
)


@pytest.fixture
def admin() -> t.Iterator[Engine]:
    require("PostgreSQL", POSTGRES_URL, 5432)
    engine = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def new_database(admin: Engine, suffix: str) -> str:
    """A fresh database with ``outboxapp``'s tables, owned by postgres."""
    name = f"fcc_{RUN}_{suffix}"
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    outboxapp.Base.metadata.create_all(engine)
    engine.dispose()
    return url


def drop_database(admin: Engine, url: str) -> None:
    name = create_engine(url).url.database
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def restricted(admin: Engine) -> t.Iterator[tuple[str, str]]:
    """A database whose app role may not create tables, and the URLs of its
    owner and of that role."""
    owner_url = new_database(admin, "roles")
    role = f"fcc_{RUN}_app"
    with admin.connect() as conn:
        conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
    owner = create_engine(owner_url, isolation_level="AUTOCOMMIT")
    with owner.connect() as conn:
        conn.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
        tables = ", ".join(outboxapp.Base.metadata.tables)
        conn.execute(
            text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {role}")
        )
        conn.execute(text(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"))
    owner.dispose()
    yield owner_url, create_engine(owner_url).url.set(username=role).render_as_string()
    drop_database(admin, owner_url)
    with admin.connect() as conn:
        conn.execute(text(f"DROP ROLE IF EXISTS {role}"))


def commit_one(app: Flask) -> None:
    """Commit an order and the task that goes with it."""
    with app.app_context():
        session = outboxapp.ext.session
        order = Order(name="refused")
        session.add(order)
        outboxapp.process.delay_on_commit(order)
        try:
            session.commit()
        finally:
            session.rollback()


def test_a_role_that_may_not_create_tables(restricted: tuple[str, str]) -> None:
    owner_url, role_url = restricted
    owner = create_engine(owner_url)
    settings = config(role_url)

    # Without the table: found when the commands and the worker start, and at
    # the first commit, which rolls back with a message saying what to do.
    listed = outbox_cli(settings, "list")
    assert all(part in listed.stderr for part in RECIPE), listed.stderr
    worker = start_worker(settings)
    assert all(part in worker.log for part in RECIPE), worker.log
    worker.stop()
    app = make_app(settings)
    with pytest.raises(OutboxTableError) as raised:
        commit_one(app)
    assert all(part in str(raised.value) for part in RECIPE), raised.value
    assert "permission denied for schema public" in str(raised.value)
    with owner.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Order)) == 0

    # Created by the owner, as a migration does; refused until granted.
    outbox.table.create(owner)
    listed = outbox_cli(settings, "list")
    assert all(part in listed.stderr for part in RECIPE), listed.stderr
    with pytest.raises(OutboxTableError, match="permission denied for table"):
        commit_one(app)
    # With DML alone granted.
    with owner.begin() as conn:
        conn.execute(
            text(
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON {outbox.TABLE_NAME}"
                f" TO {create_engine(role_url).url.username}"
            )
        )
    listed = outbox_cli(settings, "list")
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    worker = start_worker(settings)
    sent = app.test_client().post("/orders/sent").get_json()
    left = make_app(settings | DOWN).test_client().post("/orders/left").get_json()
    assert len(rows(owner)) == 1  # the broker was down
    ids = {sent["order_id"], left["order_id"]}
    wait_until(lambda: set(runs(owner)) == ids, "both tasks ran", 60)
    wait_until(lambda: rows(owner) == [], "the relay emptied the outbox", 60)
    assert "Error" not in worker.log and "Traceback" not in worker.log, worker.log
    owner.dispose()


@pytest.fixture
def primary_and_replica(admin: Engine) -> t.Iterator[tuple[str, str]]:
    """A primary, and a read-only database standing for its replica, whose
    outbox holds a row as it would once replicated."""
    primary = new_database(admin, "primary")
    replica = new_database(admin, "replica")
    engine = create_engine(replica)
    outbox.table.create(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(outbox.table).values(
                id="replicated", task_id="replicated", name="outboxapp.process",
                message="{}", created=0, position=0, available=0, attempts=0,
            )
        )  # fmt: skip
    name = engine.url.database
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(
            text(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
        )
    yield primary, replica
    drop_database(admin, primary)
    drop_database(admin, replica)


def test_a_session_that_writes_to_the_primary_and_reads_a_replica(
    primary_and_replica: tuple[str, str],
) -> None:
    primary_url, replica_url = primary_and_replica
    settings = config(primary_url, FCC_DATABASE="routing", FCC_REPLICA_URL=replica_url)
    primary = create_engine(primary_url)

    # The row goes to the primary, in the transaction of the view's writes.
    app = make_app(settings)
    answer = app.test_client().post("/orders/routed")
    assert answer.status_code == 200, answer.text
    # Left behind by a broker down: the worker's relay watches the primary.
    left = make_app(settings | DOWN).test_client().post("/orders/left")
    assert left.status_code == 200, left.text
    assert [row.task_id for row in rows(primary)] == [left.get_json()["task_id"]]
    worker = start_worker(settings)
    ids = {answer.get_json()["order_id"], left.get_json()["order_id"]}
    wait_until(lambda: set(runs(primary)) == ids, "both tasks ran", 60)
    wait_until(lambda: rows(primary) == [], "the relay emptied the outbox", 60)
    time.sleep(2)  # rounds of the relay on the read-only replica
    # The replica's refusal is told once, and fails nothing.
    assert worker.log.count("read-only") == 1, worker.log
    assert "failed" not in worker.log and "Traceback" not in worker.log, worker.log
    relayed = outbox_cli(settings, "relay")
    assert relayed.returncode == 0, relayed.stderr
    assert "Sent 0 tasks" in relayed.stdout
    primary.dispose()


def test_an_idle_workers_relay_costs_one_query_per_lease(
    admin: Engine, tmp_path: Path
) -> None:
    """Counted in the worker process, over a minute of two idle workers
    with the default settings: one with an empty outbox, one whose database
    has no outbox table."""
    with_table = new_database(admin, "idle_table")
    without_table = new_database(admin, "idle_none")
    try:
        engine = create_engine(with_table)
        outbox.table.create(engine)
        engine.dispose()
        defaults = {"CELERY_OUTBOX_LEASE": None, "CELERY_OUTBOX_RELAY_INTERVAL": None}
        logs = {
            url: tmp_path / f"{n}.log"
            for n, url in enumerate([with_table, without_table])
        }
        for url, log in logs.items():
            worker = Worker(
                {**config(url), **defaults},
                command=APP,
                env={"FCC_QUERY_LOG": str(log)},
            )
            _workers.append(worker)
            worker.wait_ready()
        time.sleep(5)  # the workers' start
        start = time.time()
        minute = 60
        time.sleep(minute)
        end = time.time()
        used = {
            url: sum(
                1
                for line in log.read_text().splitlines()
                if start <= float(line.split()[0]) < end
            )
            for url, log in logs.items()
        }
        print(f"an idle minute: {used[with_table]} queries with the table,"
              f" {used[without_table]} without")  # fmt: skip
        # One a lease (30 s), and one for the window's edge.
        assert used[with_table] <= minute / 30 + 1
        assert used[without_table] == 0
    finally:
        drop_database(admin, with_table)
        drop_database(admin, without_table)


def test_a_table_created_later_is_found_within_the_lookup(
    admin: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay that found no table finds the one a first commit in another
    process created, within :data:`~flask_celery_ctx.outbox.relay.TABLE_LOOKUP`
    (shortened here), and sends the row that commit left behind."""
    url = new_database(admin, "later")
    monkeypatch.setattr(relay_module, "TABLE_LOOKUP", 2.0)
    try:
        # A lease long enough that the row is still there when the writer
        # has exited, however long that takes.
        settings = config(url, CELERY_OUTBOX_LEASE=8)
        app = make_app(settings)
        engine = create_engine(url)
        thread = relay_module.RelayThread(outboxapp.ext, 0.2)
        thread.start()
        try:
            time.sleep(0.5)  # its first look: no table
            assert not outbox.has_table(engine)
            writer = subprocess.run(
                [sys.executable, "-c", "import outboxapp;"
                 " outboxapp.create_app().test_client().post('/orders/later')"],
                cwd=TESTS, env={**os.environ, "FCC_CONFIG": json.dumps(settings | DOWN)},
                capture_output=True, text=True,
            )  # fmt: skip
            assert writer.returncode == 0, writer.stderr
            [row] = rows(engine)
            # The lookup (2 s), the writer's lease (8 s), a round.
            wait_until(lambda: rows(engine) == [], "the row was relayed", 12)
        finally:
            thread.stop()
        queue = app.config["CELERY_TASK_DEFAULT_QUEUE"]
        messages = redis.Redis.from_url(REDIS_URL).lrange(queue, 0, -1)
        assert [json.loads(m)["headers"]["id"] for m in messages] == [row.task_id]
        engine.dispose()
    finally:
        drop_database(admin, url)


def test_a_claim_reads_the_head_of_a_long_backlog(admin: Engine) -> None:
    """With thousands of rows waiting, a relay's claim reads the first
    entries of the index on the rows' order: it neither scans nor sorts the
    table, which made draining a backlog quadratic. A relay that publishes
    fast claims up to 1,000 rows at once, not 100."""
    url = new_database(admin, "backlog")
    try:
        app = make_app(config(url) | DOWN)
        with app.app_context():
            session = outboxapp.ext.session
            session.add(Order(name="backlog"))
            for n in range(5000):
                outboxapp.note.delay_on_commit(n)
            session.commit()
        engine = create_engine(url)
        with engine.connect() as conn:
            conn.execute(text(f"ANALYZE {outbox.TABLE_NAME}"))
            statement = outbox.claimable(100, time.time() + 60).compile(
                dialect=engine.dialect, compile_kwargs={"literal_binds": True}
            )
            plan = "\n".join(conn.scalars(text(f"EXPLAIN {statement}")))
            conn.execute(outbox.table.update().values(available=0))
            conn.commit()
        engine.dispose()
        print(plan)
        assert f"Index Scan using {outbox.TABLE_NAME}_order" in plan
        assert "Sort" not in plan
        # A relay publishing fast claims more rows at once: fewer claims.
        app = make_app(config(url, CELERY_OUTBOX_LEASE=30))
        (engine,) = relay_module.write_engines(outboxapp.ext)
        claims: list[str] = []

        @event.listens_for(engine, "before_cursor_execute")
        def count(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
            if statement.endswith("FOR UPDATE SKIP LOCKED"):
                claims.append(statement)

        assert relay_module.relay(engine, outboxapp.ext.celery) == 5000
        print(f"5000 rows relayed in {len(claims)} claims")
        assert len(claims) <= 10
        queue = app.config["CELERY_TASK_DEFAULT_QUEUE"]
        broker = redis.Redis.from_url(REDIS_URL)
        try:
            assert broker.llen(queue) == 5000
        finally:
            broker.delete(queue)
    finally:
        drop_database(admin, url)


def test_the_relay_creates_no_trace(admin: Engine) -> None:
    """With OpenTelemetry's SQLAlchemy instrumentation and Sentry's tracing
    on, in a process of its own, the idle relay's rounds record nothing,
    while a query of the app is traced by both."""
    pytest.importorskip("opentelemetry.instrumentation.sqlalchemy")
    pytest.importorskip("sentry_sdk")
    url = new_database(admin, "traced")
    try:
        done = subprocess.run(
            [sys.executable, str(TESTS / "tracedrelay.py")],
            cwd=TESTS,
            env={**os.environ, "FCC_CONFIG": json.dumps(config(url))},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        found = json.loads(done.stdout.splitlines()[-1])
        print(found)
        assert found["app"]["opentelemetry"] > 0 and found["app"]["sentry"] > 0
        without, empty = found["without the table"], found["with an empty outbox"]
        assert without == {"opentelemetry": 0, "sentry": 0, "looks": 1}
        assert empty["looks"] >= 2  # one a lease of 1 s
        assert empty == {"opentelemetry": 0, "sentry": 0, "looks": empty["looks"]}
        assert found["outbox commands"] == {"opentelemetry": 0, "sentry": 0}
        assert found["broker down"] == {"opentelemetry": 0, "sentry": 0}
    finally:
        drop_database(admin, url)
