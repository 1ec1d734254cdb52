"""``unique_for``: a send with equal arguments is not published again while
the first has not finished, whatever the process that sends it.

Messages are counted in Redis (a queue no worker reads), runs as rows the
tasks write, and keys as rows of ``flask_celery_unique``: no log is read.
Workers of ``uniqueapp`` are started as users start them.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import typing as t
import uuid

import pytest
import redis
from celery import chord
from celery import group
from flask import Flask
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy.engine import Engine

import uniqueapp
from flask_celery_ctx.db import database
from flask_celery_ctx.testing import OnCommitRecorder
from flask_celery_ctx.unique import table as unique_table
from uniqueapp import Document
from uniqueapp import Gate
from uniqueapp import Run

from conftest import emptied
from conftest import FLASK
from conftest import new_database
from conftest import REDIS_URL
from conftest import require
from conftest import RUN
from conftest import Worker
from conftest import WorkerFactory

APP = (FLASK, "--app", "uniqueapp:create_app", "celery")
SENDERS = 20


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[str]:
    """A database with ``uniqueapp``'s tables, without the table of keys."""
    metadata = uniqueapp.Base.metadata
    with new_database(request.param, "unique", metadata, tmp_path_factory) as found:
        yield found


@pytest.fixture(scope="module")
def postgres(url: str) -> str:
    """The database, PostgreSQL only: what workers and processes share."""
    if not url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    return url


@pytest.fixture
def engine(url: str) -> t.Iterator[Engine]:
    """An engine for looking at the database, emptied first."""
    with emptied(url, Run, Gate, Document, unique_table.table) as found:
        yield found


_apps: list[Flask] = []


@pytest.fixture(autouse=True)
def _dispose() -> t.Iterator[None]:
    yield
    while _apps:
        app = _apps.pop()
        found = database(app)
        assert found is not None
        for named in found.engines(app):
            named.engine.dispose()


def config(url: str, **extra: t.Any) -> dict[str, t.Any]:
    require("Redis", REDIS_URL, 6379)
    return {
        "SQLALCHEMY_DATABASE_URI": url,
        "SECRET_KEY": "unique",
        "CELERY_BROKER_URL": REDIS_URL,
        "CELERY_RESULT_BACKEND": REDIS_URL,
        "CELERY_TASK_DEFAULT_QUEUE": f"fcc-{RUN}-{uuid.uuid4().hex[:6]}",
        **extra,
    }


def make_app(config: dict[str, t.Any]) -> Flask:
    app = uniqueapp.create_app(config)
    _apps.append(app)
    return app


def messages(app: Flask) -> int:
    """How many messages wait in the app's queue."""
    queue = app.config["CELERY_TASK_DEFAULT_QUEUE"]
    return int(redis.Redis.from_url(REDIS_URL).llen(queue))


def keys(engine: Engine) -> list[t.Any]:
    with engine.connect() as conn:
        if not engine.dialect.has_table(conn, unique_table.TABLE_NAME):
            return []
        return list(conn.execute(select(unique_table.table)))


def runs(engine: Engine, name: str) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(Run.task_id).where(Run.name == name)))


def open_gate(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Gate).values(name=name))


def wait_until(condition: t.Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"{what}: not after {timeout}s")


def at_once(send: t.Callable[[], str]) -> list[str]:
    """Call ``send`` from :data:`SENDERS` threads released together."""
    barrier = threading.Barrier(SENDERS)
    ids: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            ids.append(send())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return ids


def test_threads_sending_at_once_publish_one_message(url: str, engine: Engine) -> None:
    app = make_app(config(url))
    with app.app_context():
        ids = at_once(lambda: uniqueapp.note.apply_async((7,), unique_for=30).id)
        other = uniqueapp.note.apply_async((8,), unique_for=30).id
    assert len(ids) == SENDERS
    assert len(set(ids)) == 1
    assert messages(app) == 2
    assert sorted(row.task_id for row in keys(engine)) == sorted([ids[0], other])


def _send_from_process(
    settings: dict[str, t.Any],
    barrier: t.Any,
    found: t.Any,
) -> None:
    app = uniqueapp.create_app(settings)
    with app.app_context():
        uniqueapp.ext.session.connection()  # connected before the race
        barrier.wait()
        found.put(uniqueapp.note.apply_async((7,), unique_for=30).id)


# Forked, for speed: eventlet, imported by other tests, warns at every fork.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_processes_sending_at_once_publish_one_message(
    postgres: str, engine: Engine
) -> None:
    settings = config(postgres)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(SENDERS)
    found = context.Queue()
    processes = [
        context.Process(target=_send_from_process, args=(settings, barrier, found))
        for _ in range(SENDERS)
    ]
    for process in processes:
        process.start()
    ids = [found.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    app = make_app(settings)
    assert len(set(ids)) == 1
    assert messages(app) == 1
    assert [row.task_id for row in keys(engine)] == ids[:1]


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_worker_runs_it_once_and_again_after_it_finished(
    postgres: str, engine: Engine, workers: WorkerFactory, pool: str
) -> None:
    settings = config(postgres)
    worker = Worker(settings, pool=pool, concurrency=4, command=APP)
    try:
        worker.wait_ready()
        app = make_app(settings)
        name = f"gated-{pool}"
        with app.app_context():
            first = uniqueapp.gated.delay(name)
            wait_until(lambda: runs(engine, name) == [first.id], "the task started")
            # It runs, and waits: every send now returns it.
            ids = at_once(lambda: uniqueapp.gated.delay(name).id)
            assert set(ids) == {first.id}
            open_gate(engine, name)
            assert first.get(timeout=30) == name
            wait_until(lambda: keys(engine) == [], "the key was released")
            second = uniqueapp.gated.delay(name)
            assert second.id != first.id
            assert second.get(timeout=30) == name
            wait_until(lambda: keys(engine) == [], "the key was released")
        assert runs(engine, name) == [first.id, second.id]
        assert messages(app) == 0
    finally:
        worker.stop()


def test_a_failure_releases_the_key_and_a_retry_keeps_it(
    postgres: str, engine: Engine
) -> None:
    settings = config(postgres)
    worker = Worker(settings, pool="threads", concurrency=2, command=APP)
    try:
        worker.wait_ready()
        app = make_app(settings)
        with app.app_context():
            failed = uniqueapp.failing.delay("f")
            with pytest.raises(RuntimeError):
                failed.get(timeout=30)
            wait_until(lambda: keys(engine) == [], "the key was released")
            assert uniqueapp.failing.delay("f").id != failed.id

            retried = uniqueapp.retried.delay("r")
            wait_until(lambda: runs(engine, "r") == [retried.id], "the task started")
            open_gate(engine, "r")
            # Between the attempts, 2 s apart, the retry holds the key.
            wait_until(lambda: retried.state == "RETRY", "the first attempt retried")
            assert uniqueapp.retried.delay("r").id == retried.id
            assert retried.get(timeout=30) == 1
            assert runs(engine, "r") == [retried.id, retried.id]
            wait_until(
                lambda: all(row.name != "uniqueapp.retried" for row in keys(engine)),
                "the key was released after the last attempt",
            )
    finally:
        worker.stop()


def test_the_window_expires(url: str, engine: Engine) -> None:
    app = make_app(config(url))
    with app.app_context():
        first = uniqueapp.note.apply_async((3,), unique_for=1)
        assert uniqueapp.note.apply_async((3,), unique_for=1).id == first.id
        time.sleep(1.1)
        second = uniqueapp.note.apply_async((3,), unique_for=1)
    assert second.id != first.id
    assert messages(app) == 2
    assert [row.task_id for row in keys(engine)] == [second.id]


@pytest.mark.parametrize("integration", ["flask-sqlalchemy", "lite", "sessionmaker"])
def test_delay_on_commit_claims_in_the_transaction(
    url: str, engine: Engine, integration: str
) -> None:
    app = make_app(config(url, FCC_DATABASE=integration))
    with app.app_context():
        session = uniqueapp.ext.session
        document = Document(title="doc")
        session.add(document)
        first = uniqueapp.index.delay_on_commit(document)
        # The same document, in the same transaction: not queued twice.
        assert uniqueapp.index.delay_on_commit(document).id == first.id
        session.commit()
        assert uniqueapp.index.delay(document).id == first.id

        other = Document(title="other")
        session.add(other)
        dropped = uniqueapp.index.delay_on_commit(other)
        session.rollback()  # the claim goes with it
        session.add(other)
        session.commit()
        again = uniqueapp.index.delay_on_commit(other)
    assert again.id != dropped.id
    assert messages(app) == 2
    assert sorted(row.task_id for row in keys(engine)) == sorted([first.id, again.id])


def test_transactions_sending_on_commit_at_once_publish_one_message(
    postgres: str, engine: Engine
) -> None:
    app = make_app(config(postgres, SQLALCHEMY_ENGINE_OPTIONS={"pool_size": SENDERS}))
    with app.app_context():
        document = Document(title="at once")
        uniqueapp.ext.session.add(document)
        uniqueapp.ext.session.commit()
        key = document.id

    def send() -> str:
        with app.app_context():
            session = uniqueapp.ext.session
            found = session.get(Document, key)
            assert found is not None
            sent = uniqueapp.index.delay_on_commit(found).id
            session.commit()
            return sent

    ids = at_once(send)
    assert len(set(ids)) == 1
    assert messages(app) == 1
    assert [row.task_id for row in keys(engine)] == ids[:1]


def test_a_second_transaction_waits_for_the_first(
    postgres: str, engine: Engine
) -> None:
    app = make_app(config(postgres))
    found: list[str] = []
    with app.app_context():
        session = uniqueapp.ext.session
        document = Document(title="waits")
        session.add(document)
        session.commit()
        key = document.id
        first = uniqueapp.index.delay_on_commit(document)

        def other_transaction() -> None:
            with app.app_context():
                other = uniqueapp.ext.session.get(Document, key)
                assert other is not None
                found.append(uniqueapp.index.delay_on_commit(other).id)
                uniqueapp.ext.session.commit()

        thread = threading.Thread(target=other_transaction)
        thread.start()
        thread.join(1)
        assert thread.is_alive()  # waiting for the first transaction
        session.commit()
        thread.join(10)
    assert found == [first.id]
    assert messages(app) == 1


def test_groups_and_chains_are_always_published(url: str, engine: Engine) -> None:
    app = make_app(config(url))
    members = [uniqueapp.note.s(5), uniqueapp.note.s(5), uniqueapp.note.si(6)]
    for member in members:
        member.options["unique_for"] = 30  # as .set(unique_for=30) does
    with app.app_context():
        group(members[:2]).apply_async()
        (members[2] | uniqueapp.note.si(6)).apply_async()
    assert messages(app) == 3
    assert keys(engine) == []


def test_a_chord_of_unique_members_completes(postgres: str, engine: Engine) -> None:
    """Equal members of a chord's header, and its body, are all sent: the
    chord's result is complete."""
    settings = config(postgres)
    worker = Worker(settings, pool="threads", concurrency=2, command=APP)
    try:
        worker.wait_ready()
        app = make_app(settings)
        header = [uniqueapp.note.s(5), uniqueapp.note.s(5)]
        body = uniqueapp.note.s()
        for signature in [*header, body]:
            signature.options["unique_for"] = 30
        with app.app_context():
            result = chord(header)(body)
            assert result.get(timeout=30) == [5, 5]
        assert keys(engine) == []
    finally:
        worker.stop()


def test_options_from_task_annotations(url: str, engine: Engine) -> None:
    annotations = {"uniqueapp.note": {"unique_for": 30, "unique_key": lambda n: "one"}}
    app = make_app(config(url, CELERY_TASK_ANNOTATIONS=annotations))
    with app.app_context():
        first = uniqueapp.note.delay(1)
        assert uniqueapp.note.delay(2).id == first.id
    assert messages(app) == 1
    make_app(config(url))  # bound to a config without them: undone
    assert uniqueapp.note.unique_for is None


def test_bad_options() -> None:
    # Not shared: a shared task is made again in every app finalized later.
    # A finalized app makes a task at once: else at its finalization.
    uniqueapp.ext.celery.finalize()
    # The task's name, not its function's, names it.
    with pytest.raises(ValueError, match=r"of task 'probe\.seconds' must be a numb"):

        @uniqueapp.ext.celery.task(name="probe.seconds", unique_for="30", shared=False)
        def wrong_seconds() -> None: ...

    with pytest.raises(ValueError, match=r"'probe\.key' has unique_key but no uniq"):

        @uniqueapp.ext.celery.task(name="probe.key", unique_key="k", shared=False)
        def no_seconds() -> None: ...


def test_a_key_that_is_not_json(url: str, engine: Engine) -> None:
    app = make_app(config(url))
    with app.app_context(), pytest.raises(TypeError, match="cannot be made into JSON"):
        uniqueapp.note.apply_async((1,), unique_for=5, unique_key=object())
    with app.app_context(), pytest.raises(TypeError, match="cannot take the task's"):
        uniqueapp.note.apply_async((1,), unique_for=5, unique_key=lambda a, b: a)
    with app.app_context(), pytest.raises(ValueError, match="but no unique_for"):
        uniqueapp.note.apply_async((1,), unique_key="k")
    assert messages(app) == 0


@pytest.fixture
def app(url: str, engine: Engine) -> Flask:
    """The app of the pytest plugin's fixtures."""
    return make_app(config(url))


def test_eager_runs_one_per_transaction_and_again_once_finished(
    app: Flask, engine: Engine, celery_eager: t.Any
) -> None:
    with app.app_context():
        session = uniqueapp.ext.session
        document = Document(title="eager")
        session.add(document)
        first = uniqueapp.index.delay_on_commit(document)
        assert uniqueapp.index.delay_on_commit(document).id == first.id
        session.commit()
        assert runs(engine, "eager") == [first.id]
        # It finished within the send: the next send runs it again.
        second = uniqueapp.index.delay(document)
        assert runs(engine, "eager") == [first.id, second.id]
    assert keys(engine) == []


def test_an_eager_task_that_sends_itself_gets_its_own_result(
    app: Flask, engine: Engine, celery_eager: t.Any
) -> None:
    with app.app_context():
        assert uniqueapp.resend.delay("self").get() is True
    assert keys(engine) == []


def test_recorded_sends_hold_their_keys_until_run(
    app: Flask, engine: Engine, celery_on_commit: OnCommitRecorder
) -> None:
    with app.app_context():
        session = uniqueapp.ext.session
        document = Document(title="recorded")
        session.add(document)
        session.commit()
        first = uniqueapp.index.delay_on_commit(document)
        session.commit()
        assert uniqueapp.index.delay_on_commit(document).id == first.id
        session.commit()
        assert [sent.id for sent in celery_on_commit.sent] == [first.id]
        celery_on_commit.run()
    assert runs(engine, "recorded") == [first.id]
    assert keys(engine) == []
