"""Alembic's autogenerate on a PostgreSQL database that is the app's SQL
broker too and holds its outbox: it leaves their tables, and the queued
tasks, alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing as t
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask import Flask
from sqlalchemy import Column
from sqlalchemy import create_engine
from sqlalchemy import inspect
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import text
from sqlalchemy.engine import Engine

from flask_celery_ctx.migrations import include_object
from flask_celery_ctx.outbox.table import metadata as outbox_metadata
from flask_celery_ctx.outbox.table import table as outbox_table
from flask_celery_ctx.unique.table import metadata as unique_metadata
from flask_celery_ctx.unique.table import table as unique_table

import snippets
from conftest import create_result_tables
from conftest import FLASK
from conftest import make_app
from conftest import POSTGRES_URL
from conftest import require
from conftest import RUN
from conftest import TESTS

#: Queues a task on the SQL broker of a database, with transport options.
QUEUE_ONE = """
import json, sys
from kombu import Connection
import flask_celery_ctx  # registers sqlbroker+
options = json.loads(sys.argv[2])
with Connection("sqlbroker+" + sys.argv[1], transport_options=options) as broker:
    broker.SimpleQueue("queued").put({"task": "waits"})
"""

LIBRARY_TABLES = {
    "kombu_queue",
    "kombu_message",
    "flask_celery_outbox",
    "flask_celery_unique",
}


@pytest.fixture
def broker_databases() -> t.Iterator[t.Callable[..., str]]:
    """Makes databases of their own, each a SQL broker with a task queued
    (with these transport options) and with the outbox table."""
    require("PostgreSQL", POSTGRES_URL, 5432)
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    names: list[str] = []

    def make(**options: str) -> str:
        names.append(f"fcc_{RUN}_migrate_{uuid.uuid4().hex[:6]}")
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {names[-1]}"))
        url = admin.url.set(database=names[-1]).render_as_string(hide_password=False)
        # In a process of its own: kombu names its tables once per process.
        subprocess.run(
            [sys.executable, "-c", QUEUE_ONE, url, json.dumps(options)], check=True
        )
        engine = create_engine(url)
        outbox_table.create(engine)
        unique_table.create(engine)
        engine.dispose()
        return url

    yield make
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
def broker_database(broker_databases: t.Callable[..., str]) -> str:
    return broker_databases()


def app_metadata() -> MetaData:
    metadata = MetaData()
    Table("note", metadata, Column("id", Integer, primary_key=True))
    return metadata


def differences(
    engine: Engine, metadata: t.Any, hook: t.Callable[..., bool] | None
) -> list[tuple[str, str]]:
    """What autogenerate proposes, as (operation, table) pairs."""
    opts = {} if hook is None else {"include_object": hook}
    with engine.connect() as conn:
        found = compare_metadata(MigrationContext.configure(conn, opts=opts), metadata)
    return sorted(
        (diff[0], diff[1].name) for diff in found if diff[0].endswith("_table")
    )


def test_autogenerate_proposes_no_drop_of_the_library_tables(
    broker_database: str,
) -> None:
    engine = create_engine(broker_database)
    try:
        # Without the hook, autogenerate would drop them.
        dropped = differences(engine, app_metadata(), None)
        assert {name for op, name in dropped if op == "remove_table"} == LIBRARY_TABLES
        assert differences(engine, app_metadata(), include_object) == [
            ("add_table", "note")
        ]
    finally:
        engine.dispose()


def test_outbox_metadata_given_too_is_created_and_compared(
    broker_database: str,
) -> None:
    """With the outbox's metadata among the compared ones, a database
    without the table gets it created, and one with it is left as it is."""
    engine = create_engine(broker_database)
    metadata = [app_metadata(), outbox_metadata]
    try:
        assert differences(engine, metadata, include_object) == [("add_table", "note")]
        outbox_table.drop(engine)
        assert differences(engine, metadata, include_object) == [
            ("add_table", "flask_celery_outbox"),
            ("add_table", "note"),
        ]
    finally:
        engine.dispose()


def test_unique_metadata_given_too_is_created(broker_database: str) -> None:
    engine = create_engine(broker_database)
    metadata = [app_metadata(), unique_metadata]
    try:
        unique_table.drop(engine)
        assert differences(engine, metadata, include_object) == [
            ("add_table", "flask_celery_unique"),
            ("add_table", "note"),
        ]
    finally:
        engine.dispose()


def test_broker_tables_named_in_transport_options_are_left_alone(
    broker_databases: t.Callable[..., str],
) -> None:
    """The names of the ``queue_tablename`` and ``message_tablename``
    transport options, read from the app of the current context."""
    options = {"queue_tablename": "jobs_queue", "message_tablename": "jobs_message"}
    url = broker_databases(**options)
    engine = create_engine(url)
    try:
        assert {"jobs_queue", "jobs_message"} <= set(inspect(engine).get_table_names())
        with _app(url, options).app_context():
            found = differences(engine, app_metadata(), include_object)
        assert found == [("add_table", "note")]
    finally:
        engine.dispose()


def _app(url: str, options: dict[str, str]) -> Flask:
    return make_app(
        {
            "SQLALCHEMY_DATABASE_URI": url,
            "CELERY_BROKER_URL": "sqlbroker+" + url,
            "CELERY_BROKER_TRANSPORT_OPTIONS": options,
        }
    )


def test_flask_db_migrate_and_upgrade_keep_the_queued_tasks(
    broker_database: str, tmp_path: Path
) -> None:
    """``flask db migrate`` of an app whose ``Migrate`` has the hook writes a
    migration that drops nothing; ``flask db upgrade`` applies it, and the
    queued task is still there."""
    directory = str(tmp_path / "migrations")
    env = {**os.environ, "MIGRATE_DATABASE_URL": broker_database}

    def flask_db(*args: str) -> str:
        done = subprocess.run(
            [FLASK, "--app", "migrateapp:create_app", "db", *args],
            cwd=TESTS, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    flask_db("init", "--directory", directory)
    flask_db("migrate", "--directory", directory, "-m", "notes")
    [script] = (tmp_path / "migrations" / "versions").glob("*.py")
    written = script.read_text()
    assert "op.create_table('note'" in written
    assert "drop_table" not in written.split("def downgrade")[0]
    flask_db("upgrade", "--directory", directory)
    engine = create_engine(broker_database)
    try:
        assert LIBRARY_TABLES | {"note"} <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM kombu_message")) == 1
    finally:
        engine.dispose()


def test_result_backend_tables_are_left_alone(broker_database: str) -> None:
    """Celery's database result backend on the app's database, as the
    example app has it: its tables are left alone, with their default names
    and with those ``database_table_names`` gives."""
    create_result_tables(broker_database)
    engine = create_engine(broker_database)
    names = {"task": "jobs_results", "group": "jobs_groups"}
    try:
        with engine.begin() as conn:
            for name in names.values():
                conn.execute(text(f"CREATE TABLE {name} (id integer primary key)"))
        found = differences(engine, app_metadata(), None)
        assert {"celery_taskmeta", "celery_tasksetmeta", *names.values()} <= {
            name for op, name in found if op == "remove_table"
        }
        app = make_app(
            {
                "SQLALCHEMY_DATABASE_URI": broker_database,
                "CELERY_RESULT_BACKEND": "db+" + broker_database,
                "CELERY_DATABASE_TABLE_NAMES": names,
            }
        )
        with app.app_context():
            found = differences(engine, app_metadata(), include_object)
        assert found == [("add_table", "note")]
    finally:
        engine.dispose()


def test_the_outbox_tables_migration_as_the_docs_show_it(tmp_path: Path) -> None:
    """An app on Flask-Migrate whose tables are made by migrations alone:
    ``flask db revision -m outbox``, the functions of the recipe in
    on-commit.rst pasted in, then ``flask db upgrade`` and ``downgrade``."""
    [recipe] = [
        block.code
        for block in snippets.read(snippets.DOCS / "on-commit.rst")
        if "table.create(op.get_bind()" in block.code
    ]
    database = tmp_path / "app.sqlite"
    env = {**os.environ, "MIGRATE_DATABASE_URL": f"sqlite:///{database}"}
    directory = str(tmp_path / "migrations")

    def flask_db(*args: str) -> None:
        done = subprocess.run(
            [FLASK, "--app", "migrateapp:create_app", "db", *args,
             "--directory", directory],
            cwd=TESTS, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    def tables() -> set[str]:
        engine = create_engine(f"sqlite:///{database}")
        try:
            return set(inspect(engine).get_table_names())
        finally:
            engine.dispose()

    flask_db("init")
    flask_db("revision", "-m", "outbox")
    [script] = (tmp_path / "migrations" / "versions").glob("*.py")
    header = script.read_text().split("\ndef upgrade")[0]
    script.write_text(f"{header}\n{recipe}\n")
    flask_db("upgrade")
    assert "flask_celery_outbox" in tables()
    flask_db("downgrade")
    assert "flask_celery_outbox" not in tables()
