"""The outbox of ``delay_on_commit``: a send is written in the committing
transaction and survives what happens between the COMMIT and the broker, a
broker down or a web process killed; the relay in the workers and
``flask celery outbox relay`` publish what was left behind.

Each test runs on PostgreSQL and SQLite, in databases of this module's own,
with workers of ``outboxapp`` started as users start them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import json
import os
import signal
import socket
import subprocess
import threading
import time
import typing as t
import urllib.error
import urllib.request
import uuid

import pytest
import redis
from flask import Flask
from kombu import Queue
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import Engine
from werkzeug.serving import make_server

import outboxapp
from flask_celery_ctx.db import database
from flask_celery_ctx.outbox import cleanup
from flask_celery_ctx.outbox import table as outbox
from flask_celery_ctx.outbox.relay import relay_all
from outboxapp import Order
from outboxapp import Seen

from conftest import emptied
from conftest import FLASK
from conftest import new_database
from conftest import REDIS_URL
from conftest import require
from conftest import RUN
from conftest import TESTS
from conftest import Worker

APP = (FLASK, "--app", "outboxapp:create_app", "celery")
#: A broker that does not answer, and sends that fail at once.
DOWN = {
    "CELERY_BROKER_URL": "redis://127.0.0.1:9/0",
    "CELERY_TASK_PUBLISH_RETRY": False,
    "CELERY_BROKER_TRANSPORT_OPTIONS": {"max_retries": 0},
}


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[str]:
    """An empty database with ``outboxapp``'s tables, and no outbox table."""
    metadata = outboxapp.Base.metadata
    with new_database(request.param, "outbox", metadata, tmp_path_factory) as found:
        yield found


@pytest.fixture
def engine(url: str) -> t.Iterator[Engine]:
    """An engine for looking at the database, emptied first."""
    with emptied(url, Seen, Order, outbox.table) as found:
        yield found


_apps: list[Flask] = []
_workers: list[Worker] = []


@pytest.fixture(autouse=True)
def _cleanup() -> t.Iterator[None]:
    yield
    while _workers:
        _workers.pop().stop()
    while _apps:
        app = _apps.pop()
        found = database(app)
        assert found is not None
        engines = [named.engine for named in found.engines(app)]
        with app.app_context():
            # The primary of a session that routes writes and reads apart.
            engines.append(outbox.written_to(found.session()) or engines[0])
        for engine in engines:
            engine.dispose()


def config(url: str, **extra: t.Any) -> dict[str, t.Any]:
    require("Redis", REDIS_URL, 6379)
    return {
        "SQLALCHEMY_DATABASE_URI": url,
        "SECRET_KEY": "outbox",
        "CELERY_BROKER_URL": REDIS_URL,
        "CELERY_TASK_DEFAULT_QUEUE": f"fcc-{RUN}-{uuid.uuid4().hex[:6]}",
        "CELERY_OUTBOX_LEASE": 1,
        "CELERY_OUTBOX_RELAY_INTERVAL": 0.2,
        **extra,
    }


def make_app(config: dict[str, t.Any]) -> Flask:
    app = outboxapp.create_app(config)
    _apps.append(app)
    return app


def start_worker(config: dict[str, t.Any]) -> Worker:
    worker = Worker(config, command=APP)
    _workers.append(worker)
    worker.wait_ready()
    return worker


def rows(engine: Engine) -> list[t.Any]:
    cleanup.flush()  # the rows of published sends, deleted in the background
    return outbox.pending(engine) if outbox.has_table(engine) else []


def runs(engine: Engine) -> collections.Counter[int]:
    """How many times the task ran, by order."""
    with engine.connect() as conn:
        return collections.Counter(conn.scalars(select(Seen.order_id)).all())


def orders(engine: Engine, ids: t.Iterable[int]) -> dict[int, str]:
    with engine.connect() as conn:
        found = conn.execute(
            select(Order.id, Order.name).where(Order.id.in_(list(ids)))
        )
        return {row.id: row.name for row in found}


def wait_until(
    condition: t.Callable[[], bool], what: str, timeout: float = 180
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"{what}: not after {timeout}s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=["flask-sqlalchemy", "lite", "sessionmaker", "binds"])
def integration(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_the_row_is_committed_with_the_data_and_deleted_once_sent(
    url: str, engine: Engine, integration: str
) -> None:
    app = make_app(config(url, FCC_DATABASE=integration))
    queue = app.config["CELERY_TASK_DEFAULT_QUEUE"]
    seen_at_commit: list[list[str]] = []

    def look() -> None:
        seen_at_commit.append([row.task_id for row in rows(engine)])

    outboxapp.after_commit = look
    try:
        sent = app.test_client().post("/orders/kept").get_json()
        dropped = app.test_client().post("/orders/dropped?rollback=1").get_json()
    finally:
        outboxapp.after_commit = None
    # Between the COMMIT and the publish, the send is in the outbox.
    assert seen_at_commit == [[sent["task_id"]]]
    assert rows(engine) == []
    messages = redis.Redis.from_url(REDIS_URL).lrange(queue, 0, -1)
    assert [json.loads(m)["headers"]["id"] for m in messages] == [sent["task_id"]]
    assert dropped["task_id"] not in str(seen_at_commit)


@pytest.mark.parametrize("kind", ["sessionmaker", "flask-sqlalchemy"])
def test_a_view_with_a_session_of_its_own(url: str, engine: Engine, kind: str) -> None:
    """The send waits for the commit of the view's session, which holds the
    order, not for the app's session: the worker finds the order."""
    settings = config(url, FCC_DATABASE=kind)
    start_worker(settings)
    app = make_app(settings)
    path = f"/own-session/orders/own-{kind}?pause=1.5"
    sent = app.test_client().post(path).get_json()
    wait_until(lambda: sent["order_id"] in runs(engine), "the task ran", timeout=20)
    assert runs(engine)[sent["order_id"]] == 1
    wait_until(lambda: rows(engine) == [], "the outbox is empty", timeout=20)


def test_a_view_with_the_apps_session_local(url: str, engine: Engine) -> None:
    """The blog posts' pattern: ``FlaskCelery(session=SessionLocal)``, a view
    with a ``SessionLocal()`` of its own, a task of their ``DatabaseTask``:
    the send waits for the commit of the view's session, and the worker
    finds the order."""
    settings = config(url, FCC_DATABASE="sessionmaker")
    start_worker(settings)
    app = make_app(settings)
    sent = app.test_client().post("/session-local/orders/local?pause=1.5").get_json()
    wait_until(lambda: sent["order_id"] in runs(engine), "the task ran", timeout=20)
    assert runs(engine)[sent["order_id"]] == 1
    wait_until(lambda: rows(engine) == [], "the outbox is empty", timeout=20)


def test_savepoints(url: str, engine: Engine) -> None:
    app = make_app(config(url, **DOWN))
    with app.app_context():
        session = outboxapp.ext.session
        kept = Order(name="outer")
        session.add(kept)
        outer = outboxapp.process.delay_on_commit(kept)
        with session.begin_nested():
            released = outboxapp.process.delay_on_commit(kept)
        nested = session.begin_nested()
        dropped = outboxapp.process.delay_on_commit(kept)
        nested.rollback()
        # The rows of the sends queued so far go in with an inner savepoint,
        # and out with the outer one rolled back: written again at the commit.
        late = outboxapp.process.delay_on_commit(kept)
        outer_savepoint = session.begin_nested()
        with session.begin_nested():
            inner = outboxapp.process.delay_on_commit(kept)
        outer_savepoint.rollback()
        session.commit()
    assert [row.task_id for row in rows(engine)] == [outer.id, released.id, late.id]
    assert {dropped.id, inner.id}.isdisjoint(row.task_id for row in rows(engine))


def test_options_and_headers_are_kept_and_delays_count_from_the_commit(
    url: str, engine: Engine
) -> None:
    app = make_app(config(url, **DOWN))
    with app.app_context():
        session = outboxapp.ext.session
        order = Order(name="options")
        session.add(order)
        result = outboxapp.process.apply_async_on_commit(
            [order], headers={"carried": {"user": 7}}, countdown=60, priority=3
        )
        session.commit()
        committed = time.time()
    [row] = rows(engine)
    options = json.loads(row.message)["options"]
    assert options["task_id"] == result.id
    assert options["headers"] == {"carried": {"user": 7}}
    assert options["priority"] == 3
    assert "countdown" not in options
    from datetime import datetime

    eta = datetime.fromisoformat(options["eta"]["__value__"]).timestamp()
    assert committed + 55 < eta < committed + 65


def test_an_option_the_outbox_cannot_hold_is_refused_when_queued(
    url: str, engine: Engine
) -> None:
    app = make_app(config(url))
    with app.app_context():
        outboxapp.ext.session.add(Order(name="queue"))
        with pytest.raises(TypeError, match=r"queue=.*cannot be stored in the outbox"):
            outboxapp.process.apply_async_on_commit([1], queue=Queue("q"))
        outboxapp.ext.session.rollback()


def test_switched_off_nothing_is_written(url: str, engine: Engine) -> None:
    app = make_app(config(url, CELERY_OUTBOX=False))
    response = app.test_client().post("/orders/off")
    assert response.status_code == 200
    assert rows(engine) == []


def test_broker_down_while_100_views_commit(url: str, engine: Engine) -> None:
    """A threaded web server answers 100 views that commit and 20 that roll
    back while the broker is down; once it is up, a worker runs the 100."""
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    app = make_app(config(url, CELERY_BROKER_URL=broker))
    queue = {"CELERY_TASK_DEFAULT_QUEUE": app.config["CELERY_TASK_DEFAULT_QUEUE"]}
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"

    def post(path: str) -> dict[str, t.Any]:
        request = urllib.request.Request(base + path, method="POST")
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
            return t.cast("dict[str, t.Any]", json.loads(response.read()))

    paths = [f"/orders/down-{i}" for i in range(100)]
    paths += [f"/orders/rolled-{i}?rollback=1" for i in range(20)]
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, paths))
    finally:
        server.shutdown()
    committed, rolled_back = answers[:100], answers[100:]
    assert len({row.task_id for row in rows(engine)}) == 100
    assert {row.task_id for row in rows(engine)} == {a["task_id"] for a in committed}

    subprocess.run(
        ["redis-server", "--port", str(port), "--save", "", "--daemonize", "yes"],
        check=True,
    )
    try:
        start_worker(config(url, CELERY_BROKER_URL=broker) | queue)
        ids = [a["order_id"] for a in committed]
        wait_until(lambda: set(runs(engine)) >= set(ids), "the 100 tasks ran")
        wait_until(lambda: rows(engine) == [], "the outbox is empty")
    finally:
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"])
    counts = runs(engine)
    assert set(counts) == set(ids)  # none for a rolled-back view
    assert all(a["order_id"] is None for a in rolled_back)
    duplicates = sum(n - 1 for n in counts.values())
    print(f"broker down, 100 views: {duplicates} duplicates")
    assert duplicates == 0


def test_web_process_killed_between_commit_and_publish(
    url: str, engine: Engine
) -> None:
    settings = config(url)
    port = free_port()
    env = {**os.environ, "FCC_CONFIG": json.dumps(settings)}
    server = subprocess.Popen(
        [FLASK, "--app", "outboxapp:create_app", "run", "--port", str(port)],
        cwd=TESTS,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/orders/killed?kill=1", method="POST"
        )

        def killed() -> bool:
            try:
                urllib.request.urlopen(request, timeout=60)
            except urllib.error.URLError as exc:
                return "refused" not in str(exc)
            except ConnectionError:
                return True
            pytest.fail("the view answered: the process was not killed")

        wait_until(killed, "the web server answered")
        assert server.wait(30) == -signal.SIGKILL
    finally:
        if server.poll() is None:
            server.kill()
    assert len(rows(engine)) == 1
    assert list(runs(engine)) == []
    start_worker(settings)
    wait_until(lambda: len(runs(engine)) == 1, "the task ran")
    [(order_id, count)] = runs(engine).items()
    assert orders(engine, [order_id]) == {order_id: "killed"}
    assert count == 1
    wait_until(lambda: rows(engine) == [], "the outbox is empty")


def serve(settings: dict[str, t.Any]) -> tuple[subprocess.Popen[bytes], int]:
    """A web process of ``outboxapp``, as users run one."""
    port = free_port()
    env = {**os.environ, "FCC_CONFIG": json.dumps(settings)}
    server = subprocess.Popen(
        [FLASK, "--app", "outboxapp:create_app", "run", "--port", str(port)],
        cwd=TESTS,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: _listens(port), "the web server started", 60)
    return server, port


def _listens(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def post(port: int, path: str) -> dict[str, t.Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        found: dict[str, t.Any] = json.loads(response.read())
        return found


def test_a_live_web_process_leaves_the_relay_nothing_it_published(
    url: str, engine: Engine
) -> None:
    """The rows of the sends a web process published are deleted in the
    background, before their lease ends: a relay running all along, with a
    lease of a second, publishes none of them again. (On SQLite they are
    deleted at once, and a commit may wait for the database's lock longer
    than the lease.)"""
    if url.startswith("sqlite"):
        pytest.skip("on SQLite the rows are deleted at once, in the request")
    settings = config(url)
    worker = start_worker(settings)
    server, port = serve(settings)
    try:
        sent = [post(port, f"/orders/live-{i}?count=5") for i in range(100)]
        ids = [order for answer in sent for order in answer["order_ids"]]
        wait_until(lambda: len(runs(engine)) == 500, "the 500 tasks ran")
        # Past the lease and a look of the relay: a row left would run again.
        time.sleep(2)
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(outbox.table)) == 0
    finally:
        server.terminate()
        server.wait(30)
    counts = runs(engine)
    assert sorted(counts) == sorted(ids)
    assert set(counts.values()) == {1}
    assert "The outbox relay sent" not in worker.log


def test_web_process_killed_between_publish_and_delete(
    url: str, engine: Engine
) -> None:
    """A web process killed right after a publish, before the rows of its
    published sends are deleted, leaves them: a relay publishes each once
    more after its lease, under the same task id (at least once)."""
    settings = config(url)
    server, port = serve(settings)
    try:
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            post(port, "/orders/killed?count=3&kill_after_publish=1")
        assert server.wait(30) == -signal.SIGKILL
    finally:
        if server.poll() is None:
            server.kill()
    task_ids = [row.task_id for row in rows(engine)]
    assert len(task_ids) == 3  # the first published, none deleted
    start_worker(settings)
    wait_until(lambda: rows(engine) == [], "the outbox is empty")
    wait_until(lambda: sum(runs(engine).values()) == 4, "the tasks ran")
    with engine.connect() as conn:
        seen = conn.scalars(select(Seen.task_id)).all()
    first = task_ids[0]
    assert sorted(seen) == sorted([first, *task_ids])


def test_two_workers_relay_1000_sends(url: str, engine: Engine) -> None:
    settings = config(url, CELERY_OUTBOX_LEASE=30)
    down = make_app(settings | DOWN)
    with down.app_context():
        session = outboxapp.ext.session
        for i in range(1000):
            order = Order(name=f"many-{i}")
            session.add(order)
            outboxapp.process.delay_on_commit(order)
        session.commit()
    assert len(rows(engine)) == 1000
    # Available at once to the relays.
    with engine.begin() as conn:
        conn.execute(outbox.table.update().values(available=0))
    # The relay runs in a worker's main process, whatever its pool.
    first = Worker(settings, pool="prefork", concurrency=2, command=APP)
    second = Worker(settings, pool="threads", concurrency=4, command=APP)
    _workers.extend([first, second])
    first.wait_ready()
    second.wait_ready()
    wait_until(lambda: len(runs(engine)) == 1000, "the 1000 tasks ran", 600)
    wait_until(lambda: rows(engine) == [], "the outbox is empty")
    time.sleep(1)  # a duplicate would run now
    counts = runs(engine)
    duplicates = sum(n - 1 for n in counts.values())
    relayed = [
        sum(int(line.rsplit("sent ", 1)[1].split()[0]) for line in w.log.splitlines()
            if "The outbox relay sent" in line)
        for w in (first, second)
    ]  # fmt: skip
    print(f"two relays, 1000 sends: {relayed} relayed, {duplicates} duplicates")
    assert sum(relayed) == 1000
    assert duplicates == 0


@pytest.mark.parametrize("kind", ["flask-sqlalchemy", "binds"])
def test_cli_lists_and_relays(url: str, engine: Engine, kind: str) -> None:
    settings = config(url, FCC_DATABASE=kind)
    down = make_app(settings | DOWN)
    sent = down.test_client().post("/orders/cli").get_json()
    ids = [sent["task_id"]]
    with down.app_context():  # more, in the order they are to be sent
        session = outboxapp.ext.session
        for n in range(2):
            order = Order(name=f"cli-{n}")
            session.add(order)
            ids += [outboxapp.process.delay_on_commit(order).id for _ in range(3)]
            session.commit()
    env = {**os.environ, "FCC_CONFIG": json.dumps(settings)}

    def flask(*args: str) -> str:
        done = subprocess.run(
            [*APP, "outbox", *args], cwd=TESTS, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = flask("list")
    assert sent["task_id"] in listed, listed
    assert "outboxapp.process" in listed
    time.sleep(1.1)  # the lease of the process that wrote it
    assert "Sent 7 tasks" in flask("relay")
    assert rows(engine) == []
    queue = settings["CELERY_TASK_DEFAULT_QUEUE"]
    # Pushed on the left, taken from the right.
    messages = redis.Redis.from_url(REDIS_URL).lrange(queue, 0, -1)[::-1]
    assert [json.loads(m)["headers"]["id"] for m in messages] == ids


@pytest.fixture
def app(url: str) -> Flask:
    """The app of the ``celery_on_commit`` fixture: a worker's, not eager."""
    return make_app(config(url, **DOWN))


def test_the_on_commit_fixture_records_without_the_outbox(
    app: Flask, engine: Engine, celery_on_commit: t.Any
) -> None:
    answer = app.test_client().post("/orders/recorded").get_json()
    assert [sent.id for sent in celery_on_commit.sent] == [answer["task_id"]]
    assert rows(engine) == []


def test_every_new_session_factory_is_watched(url: str, engine: Engine) -> None:
    """Each ``sessionmaker`` makes a ``Session`` subclass; a new one may take
    the ``id()`` of a collected one, which SQLAlchemy's event registry would
    take for a class it knows."""
    sent = []
    for i in range(30):
        app = outboxapp.create_app(config(url, FCC_DATABASE="sessionmaker", **DOWN))
        sent.append(
            app.test_client().post(f"/orders/factory-{i}").get_json()["task_id"]
        )
        for named in database(app).engines(app):  # type: ignore[union-attr]
            named.engine.dispose()
        del app, named
        gc.collect()
    assert [row.task_id for row in rows(engine)] == sent


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CELERY_OUTBOX", "no"),
        ("CELERY_OUTBOX_LEASE", "30s"),
        ("CELERY_OUTBOX_RELAY_INTERVAL", -1),
        ("CELERY_OUTBOX_MAX_ATTEMPTS", 0),
        ("CELERY_OUTBOX_MAX_ATTEMPTS", 2.5),
        ("CELERY_OUTBOX_RETRY_BACKOFF", "1m"),
    ],
)
def test_wrong_settings_are_refused_by_init_app(key: str, value: t.Any) -> None:
    with pytest.raises(ValueError, match=f"{key} must be"):
        outboxapp.create_app({"SQLALCHEMY_DATABASE_URI": "sqlite://", key: value})


def test_70000_sends_in_one_transaction(
    url: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """More sends than a PostgreSQL statement takes parameters (65,535):
    each is published once, no row stays, nothing is logged."""
    if not url.startswith("postgresql"):
        pytest.skip("PostgreSQL's limit; 70,000 publishes take 40s")
    app = make_app(config(url))
    queue = app.config["CELERY_TASK_DEFAULT_QUEUE"]
    broker = redis.Redis.from_url(REDIS_URL)
    started = time.monotonic()
    with app.app_context(), caplog.at_level("WARNING", "flask_celery_ctx"):
        outboxapp.ext.session.add(Order(name="bulk"))
        ids = [outboxapp.note.delay_on_commit(n).id for n in range(70_000)]
        outboxapp.ext.session.commit()
    print(f"70000 sends committed and published in {time.monotonic() - started:.1f}s")
    try:
        assert rows(engine) == []
        messages = broker.lrange(queue, 0, -1)
    finally:
        broker.delete(queue)
    sent = collections.Counter(json.loads(m)["headers"]["id"] for m in messages)
    assert set(sent) == set(ids)
    assert set(sent.values()) == {1}
    assert [r.getMessage() for r in caplog.records] == []


def outbox_cli(
    settings: dict[str, t.Any], *args: str
) -> subprocess.CompletedProcess[str]:
    """Run ``flask celery outbox ARGS`` with the app of ``settings``."""
    env = {**os.environ, "FCC_CONFIG": json.dumps(settings)}
    return subprocess.run(
        [*APP, "outbox", *args], cwd=TESTS, env=env, capture_output=True, text=True
    )


def relay_once(settings: dict[str, t.Any]) -> str:
    done = outbox_cli(settings, "relay")
    assert done.returncode == 0, done.stderr
    return done.stdout


def row_of(engine: Engine, task_id: str) -> t.Any:
    [row] = [row for row in rows(engine) if row.task_id == task_id]
    return row


#: Rows whose publish fails, not for the broker, and what their error says.
POISONS = {
    "unknown task": "NotRegistered: The app has no task 'outboxapp.removed'",
    "arguments": "TypeError: process() takes 2 positional arguments but 3",
    "serializer": "SerializerNotInstalled",
    "queue": "QueueNotFound: Queue 'removed-queue' missing from task_queues",
}


def spoil(engine: Engine, task_id: str, poison: str) -> None:
    """Make a row as an older app would have left it: of a task since
    removed, with arguments the task no longer takes, for a queue or a
    serializer the app no longer has; available at once."""
    row = row_of(engine, task_id)
    message, name = json.loads(row.message), row.name
    if poison == "unknown task":
        name = "outboxapp.removed"
    elif poison == "arguments":
        message["args"].append("since removed")
    elif poison == "queue":
        message["options"]["queue"] = "removed-queue"
    else:
        message["options"]["serializer"] = "removed-serializer"
    with engine.begin() as conn:
        conn.execute(
            outbox.table.update()
            .where(outbox.table.c.task_id == task_id)
            .values(name=name, message=json.dumps(message), available=0)
        )


@pytest.mark.parametrize("poison", list(POISONS))
def test_a_row_that_cannot_be_sent_ends_dead_and_is_retried_or_dropped(
    url: str, engine: Engine, poison: str
) -> None:
    settings = config(
        url,
        CELERY_OUTBOX_MAX_ATTEMPTS=3,
        CELERY_OUTBOX_RETRY_BACKOFF=1,
        # A queue that is gone raises QueueNotFound, a KeyError, which
        # kombu's Redis transport counts among its connection errors.
        CELERY_TASK_CREATE_MISSING_QUEUES=False,
    )
    down = make_app(settings | DOWN)
    task_id = down.test_client().post("/orders/poison").get_json()["task_id"]
    spoil(engine, task_id, poison)
    make_app(settings)  # the relay's, in this process: quicker than the CLI's

    assert relay_all(outboxapp.ext) == 0
    row = row_of(engine, task_id)
    assert (row.attempts, row.dead) == (1, None)
    assert POISONS[poison] in row.last_error
    # Not tried again before the backoff: 1s, then 2s.
    relay_all(outboxapp.ext)
    assert row_of(engine, task_id).attempts == 1
    time.sleep(1.05)
    relay_all(outboxapp.ext)
    row = row_of(engine, task_id)
    assert (row.attempts, row.dead) == (2, None)
    assert 1.5 < row.available - time.time() <= 2
    time.sleep(2.05)
    relay_all(outboxapp.ext)
    row = row_of(engine, task_id)
    assert row.attempts == 3
    assert row.dead is not None
    # Kept, and never tried again.
    with engine.begin() as conn:
        conn.execute(outbox.table.update().values(available=0))
    said = relay_once(settings)
    assert (
        said
        == "Sent 0 tasks from the outbox; 1 dead: see `flask celery outbox list`.\n"
    )
    assert row_of(engine, task_id).attempts == 3

    listed = outbox_cli(settings, "list").stdout
    assert "0 waiting, 0 leased, 1 dead" in listed
    assert f"{task_id}  {row.name}  dead  attempts 3" in listed
    assert f"last error: {POISONS[poison]}" in listed

    retried = outbox_cli(settings, "retry", task_id)
    assert retried.stdout == "1 dead row waits again, sent by the next relay.\n"
    row = row_of(engine, task_id)
    assert (row.attempts, row.dead, row.last_error) == (0, None, None)
    again = outbox_cli(settings, "retry", task_id)
    assert again.returncode == 1
    assert f"No dead row has the task id {task_id!r}" in again.stderr

    # Dead at once with one attempt; dropped.
    once = settings | {"CELERY_OUTBOX_MAX_ATTEMPTS": 1}
    assert "1 dead" in relay_once(once)
    dropped = outbox_cli(settings, "drop", task_id)
    assert (
        dropped.stdout
        == f"Dropped the dead row of task {task_id}: it will not be sent.\n"
    )
    assert rows(engine) == []
    assert outbox_cli(settings, "drop", task_id).returncode == 1


def test_retry_all(url: str, engine: Engine) -> None:
    settings = config(url, CELERY_OUTBOX_MAX_ATTEMPTS=1)
    down = make_app(settings | DOWN)
    ids = [
        down.test_client().post(f"/orders/all-{n}").get_json()["task_id"]
        for n in range(3)
    ]
    for task_id, poison in zip(ids, list(POISONS)[:3], strict=True):
        spoil(engine, task_id, poison)
    assert "3 dead" in relay_once(settings)
    assert outbox_cli(settings, "retry").returncode == 2  # an id or --all
    done = outbox_cli(settings, "retry", "--all")
    assert done.stdout == "3 dead rows wait again, sent by the next relay.\n"
    assert [row.dead for row in rows(engine)] == [None] * 3


def test_a_worker_keeps_rows_that_cannot_be_sent_as_dead(
    url: str, engine: Engine
) -> None:
    settings = config(
        url,
        CELERY_OUTBOX_MAX_ATTEMPTS=3,
        CELERY_OUTBOX_RETRY_BACKOFF=0.5,
        CELERY_TASK_CREATE_MISSING_QUEUES=False,
    )
    down = make_app(settings | DOWN)
    answers = [
        down.test_client().post(f"/orders/worker-{n}").get_json()
        for n in range(len(POISONS) + 1)
    ]
    spoiled = {
        a["task_id"]: poison for a, poison in zip(answers, POISONS, strict=False)
    }
    for task_id, poison in spoiled.items():
        spoil(engine, task_id, poison)
    good = answers[-1]
    with engine.begin() as conn:
        conn.execute(outbox.table.update().values(available=0))
    started = time.monotonic()
    worker = start_worker(settings)

    def all_dead() -> bool:
        return [row.dead is not None for row in rows(engine)] == [True] * len(POISONS)

    wait_until(all_dead, "the spoiled rows are dead", 60)
    took = time.monotonic() - started
    assert list(runs(engine)) == [good["order_id"]]
    for task_id, poison in spoiled.items():
        row = row_of(engine, task_id)
        assert row.attempts == 3
        assert POISONS[poison] in row.last_error
    # Three attempts, 0.5s then 1s apart.
    assert took > 1.5
    assert worker.log.count("gave up task") == len(POISONS)


def test_a_broker_outage_counts_no_attempt(url: str, engine: Engine) -> None:
    settings = config(url, CELERY_OUTBOX_MAX_ATTEMPTS=1)
    down = make_app(settings | DOWN)
    task_id = down.test_client().post("/orders/outage").get_json()["task_id"]
    with engine.begin() as conn:
        conn.execute(outbox.table.update().values(available=0))
    for _ in range(3):
        said = relay_once(settings | DOWN)
        assert "Sent 0 tasks from the outbox; 1 wait, the first available in 0s" in said
    row = row_of(engine, task_id)
    assert (row.attempts, row.dead, row.last_error) == (0, None, None)
    assert relay_once(settings) == "Sent 1 task from the outbox.\n"
    assert rows(engine) == []


def test_relay_says_why_nothing_was_sent(url: str, engine: Engine) -> None:
    settings = config(url, CELERY_OUTBOX_LEASE=30)
    down = make_app(settings | DOWN)
    for n in range(3):
        down.test_client().post(f"/orders/leased-{n}")
    said = relay_once(settings)
    assert said.startswith(
        "Sent 0 tasks from the outbox; 3 wait, the first available in"
    )
    assert said.endswith("s (leased).\n")
    # The lease (30 s) less the time the commits and the relay's start took.
    assert 10 <= int(said.rsplit(" in ", 1)[1].split("s")[0]) <= 30


def test_a_table_without_the_new_columns_is_refused_clearly(
    url: str, engine: Engine
) -> None:
    settings = config(url)
    make_app(settings | DOWN).test_client().post("/orders/old-table")
    with engine.begin() as conn:
        for column in ("last_error", "dead"):
            conn.execute(text(f"ALTER TABLE {outbox.TABLE_NAME} DROP COLUMN {column}"))
    try:
        done = outbox_cli(settings, "relay")
        assert done.returncode == 1
        assert done.stderr.startswith(
            f"Error: The table {outbox.TABLE_NAME} of {engine.url} lacks the"
            " column(s) last_error, dead, which this version"
        )
        assert f"ALTER TABLE {outbox.TABLE_NAME} ADD COLUMN last_error" in done.stderr
    finally:
        with engine.begin() as conn:
            outbox.table.drop(conn)


def test_a_failed_delete_logs_a_short_warning(
    url: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The DELETE after the publish fails (here the table is renamed away
    after the COMMIT): the warning says how many rows and why, without the
    statement."""
    app = make_app(config(url))
    away = f"{outbox.TABLE_NAME}_away"

    def rename(old: str, new: str) -> None:
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))

    app.test_client().post("/orders/first")  # the table exists
    cleanup.flush()
    outboxapp.after_commit = lambda: rename(outbox.TABLE_NAME, away)
    try:
        with caplog.at_level("WARNING", "flask_celery_ctx"):
            app.test_client().post("/orders/kept")
            cleanup.flush()  # done in the background otherwise
    finally:
        outboxapp.after_commit = None
        rename(away, outbox.TABLE_NAME)
    [record] = caplog.records
    assert record.getMessage().startswith(
        "The outbox rows of 1 sent tasks could not all be deleted: "
    )
    assert record.exc_info is None
    assert "DELETE" not in caplog.text
    assert len(caplog.text) < 500
    assert len(rows(engine)) == 1  # sent, and to be sent again by a relay


def test_list_json_for_monitoring(url: str, engine: Engine) -> None:
    """``list --json``: each row with its state, age, attempts, last error
    and when it is available; a summary by state with the oldest ages."""
    settings = config(url, CELERY_OUTBOX_LEASE=60)
    down = make_app(settings | DOWN)
    client = down.test_client()
    leased, waiting, dead = (
        client.post(f"/orders/{name}").get_json()["task_id"]
        for name in ("leased", "waiting", "dead")
    )
    now = time.time()
    table = outbox.table
    with engine.begin() as conn:
        conn.execute(
            table.update()
            .where(table.c.task_id == waiting)
            .values(created=now - 50, available=now - 5)
        )
        conn.execute(
            table.update()
            .where(table.c.task_id == dead)
            .values(created=now - 100, dead=now, attempts=5, last_error="Boom")
        )
    done = outbox_cli(settings, "list", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    summary = found["summary"]
    assert (summary["waiting"], summary["leased"], summary["dead"]) == (1, 1, 1)
    assert 50 <= summary["oldest_age"] < 55  # of the rows not dead
    assert 50 <= summary["oldest_waiting_age"] < 55
    [database] = found["databases"]
    assert database["summary"] == summary
    by_id = {row["task_id"]: row for row in database["rows"]}
    assert [row["task_id"] for row in database["rows"]] == [dead, waiting, leased]
    assert by_id[leased]["state"] == "leased"
    assert 55 < by_id[leased]["available_in"] <= 60
    assert by_id[leased]["task"] == "outboxapp.process"
    assert (by_id[waiting]["state"], by_id[waiting]["available_in"]) == ("waiting", 0)
    assert by_id[dead] | {"age": 0, "id": ""} == {
        "id": "",
        "task_id": dead,
        "task": "outboxapp.process",
        "state": "dead",
        "age": 0,
        "attempts": 5,
        "last_error": "Boom",
        "available_in": None,
    }
    assert 100 <= by_id[dead]["age"] < 105
    # The text's header counts by the same states.
    assert ": 1 waiting, 1 leased, 1 dead\n" in outbox_cli(settings, "list").stdout


def test_a_worker_warns_once_of_an_old_waiting_row_and_tells_when_it_clears(
    url: str, engine: Engine
) -> None:
    """A row of a task the worker does not know waits after its failed
    attempt: older than ``CELERY_OUTBOX_ALERT_AGE``, one warning; once it is
    dropped, one line saying so."""
    settings = config(url, CELERY_OUTBOX_ALERT_AGE=2, CELERY_OUTBOX_RETRY_BACKOFF=60)
    down = make_app(settings | DOWN)
    task_id = down.test_client().post("/orders/old").get_json()["task_id"]
    spoil(engine, task_id, "unknown task")
    worker = start_worker(settings)
    wait_until(lambda: row_of(engine, task_id).attempts == 1, "the relay tried")
    warning = "The oldest task waiting in the outbox of"
    worker.wait_for(warning, timeout=10)
    time.sleep(1.5)  # a few more rounds
    assert worker.log.count(warning) == 1
    assert "more than CELERY_OUTBOX_ALERT_AGE (2 s)" in worker.log
    with engine.begin() as conn:
        conn.execute(delete(outbox.table))
    worker.wait_for("has no task waiting for more than 2 s any more", timeout=10)
    assert worker.log.count(warning) == 1


@pytest.mark.parametrize("value", [0, -1, "90s", True])
def test_a_wrong_alert_age_is_refused(value: t.Any) -> None:
    with pytest.raises(
        ValueError, match="CELERY_OUTBOX_ALERT_AGE must be a number of seconds"
    ):
        outboxapp.create_app(
            {"SQLALCHEMY_DATABASE_URI": "sqlite://", "CELERY_OUTBOX_ALERT_AGE": value}
        )
