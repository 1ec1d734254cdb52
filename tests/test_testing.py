"""The pytest plugin for users' tests, ``flask_celery_ctx.testing``: the eager
and worker-thread fixtures, bound to the ``app`` fixture, and the errors that
explain its traps."""

from __future__ import annotations

import threading
import time
import typing as t
import uuid

import pytest
from celery.worker import WorkController
from flask import Flask
from flask import g
from sqlalchemy import func
from sqlalchemy import select

from flask_celery_ctx.testing import OnCommitRecorder
from flask_celery_ctx.testing import start_worker

import taskapp
from conftest import make_app
from conftest import REDIS_URL
from conftest import require
from taskapp import db
from taskapp import ext
from taskapp import Item

#: The broker, result backend and database of each kind of ``app``.
SETUPS = {
    "memory-sqlite": ("memory://", "cache+memory://", "sqlite"),
    "redis-postgres": (REDIS_URL, REDIS_URL, "postgres"),
}


@ext.celery.task
def where(marker: str) -> dict[str, t.Any]:
    """Where the task ran, and what its context held."""
    seen = {
        "thread": threading.current_thread().name,
        "g": g.get("marker"),
        "session": db.session.info.get("marker"),
    }
    g.marker = marker
    db.session.info["marker"] = marker
    return seen


@pytest.fixture(params=list(SETUPS))
def app(request: pytest.FixtureRequest) -> Flask:
    """The user's ``app`` fixture: a file database and a broker, no eager."""
    broker, backend, database = SETUPS[request.param]
    if broker.startswith("redis"):
        require("Redis", broker, 6379)
    return make_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": request.getfixturevalue(f"{database}_url"),
            "CELERY_BROKER_URL": broker,
            "CELERY_RESULT_BACKEND": backend,
            "CELERY_TASK_DEFAULT_QUEUE": f"fcc-testing-{uuid.uuid4().hex[:8]}",
        }
    )


def test_worker_runs_each_task_in_a_fresh_context(
    app: Flask, celery_worker: WorkController
) -> None:
    with app.app_context():
        g.marker = "test"
        db.session.info["marker"] = "test"
        seen = [where.delay(f"m{i}").get(timeout=10) for i in range(3)]
    assert seen == [{"thread": "celery-worker", "g": None, "session": None}] * 3
    # TESTING is on: the worker's tasks run in test request contexts.
    assert taskapp.context_state.delay("m").get(timeout=10)["request"] is True


def test_threads_pool_gives_each_task_its_context(app: Flask) -> None:
    with start_worker(app, pool="threads", concurrency=2):
        results = [where.delay(f"m{i}") for i in range(6)]
        seen = [result.get(timeout=10, interval=0.05) for result in results]
    assert [(s["g"], s["session"]) for s in seen] == [(None, None)] * 6


def test_worker_and_test_see_each_others_commits(
    app: Flask, celery_worker: WorkController
) -> None:
    name = f"commits-{uuid.uuid4().hex[:6]}"
    with app.app_context():
        db.session.add(Item(name=name))
        db.session.commit()
        assert taskapp.count_items.delay(name).get(timeout=10) == 1
        assert taskapp.write_then.delay("commit", name).get(timeout=10) == "commit"
        count = select(func.count()).where(Item.name == name)
        assert db.session.scalar(count) == 2


def test_worker_failure_reaches_the_test(
    app: Flask, celery_worker: WorkController
) -> None:
    result = taskapp.write_then.delay("raise", "worker-fail")
    with pytest.raises(ValueError, match="failed after a flush"):
        result.get(timeout=10)


def test_worker_stops_when_the_block_ends(app: Flask) -> None:
    for _ in range(2):
        with start_worker(app):
            assert taskapp.add.delay(1, 2).get(timeout=10, interval=0.05) == 3
            stopping = time.monotonic()
        # Quickly, though the worker's loop waits for messages for seconds:
        # at least two of them on the memory transport, unless woken.
        assert time.monotonic() - stopping < 2
        assert "celery-worker" not in [t.name for t in threading.enumerate()]


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused(url: str) -> None:
    app = make_app(
        {
            "SQLALCHEMY_DATABASE_URI": url,
            "CELERY_BROKER_URL": "memory://",
            "CELERY_RESULT_BACKEND": "cache+memory://",
        }
    )
    with (
        pytest.raises(RuntimeError, match="is an in-memory SQLite database") as info,
        start_worker(app),
    ):
        pass  # pragma: no cover
    assert "Use a file database" in str(info.value)
    assert "celery-worker" not in [t.name for t in threading.enumerate()]


def test_unreachable_broker_is_named() -> None:
    app = make_app(
        {
            "SQLALCHEMY_DATABASE_URI": "sqlite:///unused.db",
            "CELERY_BROKER_URL": "redis://127.0.0.1:9/0",
        }
    )
    started = time.monotonic()
    with (
        pytest.raises(RuntimeError, match="cannot use its broker") as info,
        start_worker(app),
    ):
        pass  # pragma: no cover
    assert "Cannot reach the broker at redis://127.0.0.1:9/0: " in str(info.value)
    assert "set CELERY_BROKER_URL" in str(info.value)
    assert time.monotonic() - started < 10


def test_app_no_longer_bound_is_refused(app: Flask) -> None:
    other = make_app({"SQLALCHEMY_DATABASE_URI": "sqlite:///unused.db"})
    with pytest.raises(RuntimeError, match="bound to another app") as info:
        start_worker(app).__enter__()
    assert repr(other.name) in str(info.value)


def test_eager_runs_inline_in_the_tests_context(
    app: Flask, celery_eager: t.Any
) -> None:
    with app.app_context():
        g.marker = "test"
        db.session.info["marker"] = "test"
        seen = where.delay("eager").get(timeout=5)
        assert seen == {"thread": "MainThread", "g": "test", "session": "test"}
    with pytest.raises(ValueError, match="failed after a flush"):
        taskapp.write_then.delay("raise", "eager-fail")


@ext.celery.task
def countdown(name: str, n: int) -> int:
    """Write a row, then send itself on commit until ``n`` is 0."""
    db.session.add(Item(name=name))
    if n:
        countdown.delay_on_commit(name, n - 1)
    db.session.commit()
    return n


def test_on_commit_records_what_a_commit_sends(
    app: Flask, celery_on_commit: OnCommitRecorder
) -> None:
    with app.app_context():
        db.session.add(Item(name="kept"))
        result = taskapp.count_items.delay_on_commit("kept")
        assert celery_on_commit.sent == []  # not before the commit
        db.session.commit()
        db.session.add(Item(name="dropped"))
        taskapp.count_items.delay_on_commit("dropped")
        db.session.rollback()
    # No transaction: recorded at once.
    taskapp.add.apply_async_on_commit((1, 2), countdown=5)
    assert celery_on_commit.names == ["taskapp.count_items", "taskapp.add"]
    first, second = celery_on_commit.sent
    assert first.id == result.id
    assert (first.args, first.kwargs) == (("kept",), {})
    assert second.options["countdown"] == 5
    assert repr(second) == "taskapp.add(1, 2)"


def test_on_commit_runs_what_was_sent_and_what_that_sends(
    app: Flask, celery_on_commit: OnCommitRecorder
) -> None:
    name = f"countdown-{uuid.uuid4().hex[:6]}"
    with app.app_context():
        countdown.delay_on_commit(name, 2)
    results = celery_on_commit.run()
    assert [r.get(timeout=5) for r in results] == [2, 1, 0]
    assert celery_on_commit.sent == []
    with app.app_context():
        count = select(func.count()).where(Item.name == name)
        assert db.session.scalar(count) == 3


def test_on_commit_run_stops_a_loop(
    app: Flask, celery_on_commit: OnCommitRecorder
) -> None:
    with app.app_context():
        countdown.delay_on_commit("loop", 5)
    with pytest.raises(RuntimeError, match="3 tasks ran and more were sent"):
        celery_on_commit.run(limit=3)


def test_on_commit_failure_propagates(
    app: Flask, celery_on_commit: OnCommitRecorder
) -> None:
    with app.app_context():
        taskapp.write_then.delay_on_commit("raise", "on-commit-fail")
    with pytest.raises(ValueError, match="failed after a flush"):
        celery_on_commit.run()


def test_eager_set_after_init_app_is_refused_before_the_commit(app: Flask) -> None:
    """Not after the commit, when the transaction cannot be undone."""
    app.config["CELERY_TASK_ALWAYS_EAGER"] = True
    with app.app_context():
        db.session.add(Item(name="eager-after-init"))
        db.session.flush()
        with pytest.raises(RuntimeError, match="init_app read the config"):
            taskapp.add.delay_on_commit(1, 2)
        db.session.rollback()


USER_CONFTEST = """
import pytest
from flask import Flask
from flask_celery_ctx import FlaskCelery

ext = FlaskCelery()


@ext.celery.task
def double(x):
    return 2 * x


@pytest.fixture(scope="session")
def app():
    app = Flask("user")
    app.config.update(
        CELERY_BROKER_URL="memory://", CELERY_RESULT_BACKEND="cache+memory://"
    )
    ext.init_app(app)
    return app
"""

USER_TESTS = """
from conftest import double


def test_eager(app, celery_eager):
    assert double.delay(2).get() == 4


def test_eager_is_off_again(app):
    assert not app.extensions["celery"].celery.conf.task_always_eager


def test_worker(app, celery_worker):
    assert double.delay(3).get(timeout=10) == 6
"""


#: What a conftest.py written for earlier versions had.
LISTED = 'pytest_plugins = ["flask_celery_ctx.testing"]\n'


def test_a_users_project(pytester: pytest.Pytester) -> None:
    """The plugin is found by its entry point: nothing to enable."""
    pytester.makeconftest(USER_CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_a_conftest_that_still_lists_the_plugin(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(LISTED + USER_CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    # Without plugin autoloading, the line loads it.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_the_plugin_can_be_turned_off(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(USER_CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:flask_celery_ctx.testing"
    )
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*fixture 'celery_eager' not found*"])


CELERY_PLUGIN_CONFTEST = """
import pytest

pytest_plugins = ["celery.contrib.pytest"]


@pytest.fixture(scope="session")
def celery_config():
    return {"broker_url": "memory://", "result_backend": "cache+memory://"}
"""

CELERY_PLUGIN_TESTS = """
def test_celerys_own_worker(celery_app, celery_worker):
    @celery_app.task
    def triple(x):
        return 3 * x

    celery_worker.reload()
    assert triple.delay(2).get(timeout=10) == 6


def test_nothing():
    pass
"""


def test_the_plugin_is_inert_until_used(pytester: pytest.Pytester) -> None:
    """A project with no Flask app, or that uses Celery's own plugin, whose
    fixtures share names with these, runs as without this one."""
    pytester.makeconftest(CELERY_PLUGIN_CONFTEST)
    pytester.makepyfile(test_other=CELERY_PLUGIN_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=2)


def test_a_missing_broker_client_says_what_to_install(
    pytester: pytest.Pytester,
) -> None:
    blocked = (
        "import sys\n"
        "sys.modules['redis'] = None  # as when the package is not installed\n"
    )
    pytester.makeconftest(
        blocked
        + USER_CONFTEST.replace('"memory://"', '"redis://:s3cret@127.0.0.1:6379/0"')
    )
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "worker")
    result.assert_outcomes(errors=1)
    assert (
        "RuntimeError: The worker fixture cannot use its broker. The broker URL"
        " redis://:**@127.0.0.1:6379/0 needs the client library of the 'redis'"
        " transport, which is not installed or fails to import (AttributeError:"
        " 'NoneType' object has no attribute 'Redis'). Install it: pip install"
        ' "celery[redis]", or set CELERY_BROKER_URL'
    ) in result.stdout.str()
    assert "s3cret" not in result.stdout.str()


EAGER_AFTER_INIT_TESTS = """
import pytest
from conftest import double


def test_eager_set_after_init_app(app):
    # As pytest-flask's 'options' marker and many conftests do.
    app.config["CELERY_TASK_ALWAYS_EAGER"] = True
    with pytest.raises(RuntimeError) as info:
        double.delay(2)
    message = str(info.value)
    assert "Task 'conftest.double' was sent while" in message
    assert "app.config['CELERY_TASK_ALWAYS_EAGER'] is True" in message
    assert "init_app read the config when it was None" in message
    assert "would send it to the broker 'redis://someone:**@" in message
    assert "'celery_eager' fixture" in message
    app.config.pop("CELERY_TASK_ALWAYS_EAGER")


def test_the_fixture_is_the_way(app, celery_eager):
    app.config["CELERY_TASK_ALWAYS_EAGER"] = True
    assert double.delay(2).get() == 4
    app.config.pop("CELERY_TASK_ALWAYS_EAGER")
"""


def test_eager_set_after_init_app_is_refused(pytester: pytest.Pytester) -> None:
    """The config is read once, by init_app: a test that turns eager mode on
    afterwards would send its tasks to the developer's broker."""
    pytester.makeconftest(
        USER_CONFTEST.replace('"memory://"', '"redis://someone:s3cret@127.0.0.1:1/0"')
    )
    pytester.makepyfile(test_user=EAGER_AFTER_INIT_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


MODELS_CONFTEST = """
import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ForeignKey, event, orm

from flask_celery_ctx import FlaskCelery

db = SQLAlchemy()
ext = FlaskCelery()
statements = []


class Forum(db.Model):
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]
    moderators: orm.Mapped[list["Moderator"]] = orm.relationship(lazy="joined")


class Moderator(db.Model):
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    forum_id: orm.Mapped[int] = orm.mapped_column(ForeignKey("forum.id"))
    name: orm.Mapped[str]


@ext.celery.task
def moderators(forum):
    return sorted(m.name for m in forum.moderators)


@pytest.fixture
def app(tmp_path):
    app = Flask("user")
    app.config.update(
        SECRET_KEY="user",
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'user.db'}",
        CELERY_BROKER_URL="memory://",
        CELERY_RESULT_BACKEND="cache+memory://",
    )
    db.init_app(app)
    ext.init_app(app)
    with app.app_context():
        db.create_all()
        event.listen(
            db.engine, "before_cursor_execute", lambda *a: statements.append(a[2])
        )
    yield app
    with app.app_context():
        db.engine.dispose()  # Python 3.13 warns of SQLite connections left open


@pytest.fixture
def forum(app):
    with app.app_context():
        forum = Forum(name="f", moderators=[Moderator(name="ann"), Moderator(name="bob")])
        db.session.add(forum)
        db.session.commit()
        yield forum
"""

MODELS_TESTS = """
import pytest
from sqlalchemy import delete, text
from flask_celery_ctx import MissingInstanceError
from conftest import db, Forum, Moderator, moderators, statements


def loads_forum():
    # A worker's query, not the refresh of an expired instance.
    return [s for s in statements if "FROM forum" in s and "forum.id IN (" in s]


def test_eager(app, forum, celery_eager):
    statements.clear()
    assert moderators.delay(forum).get() == ["ann", "bob"]
    assert len(loads_forum()) == 1


def test_on_commit(app, forum, celery_on_commit):
    moderators.delay_on_commit(forum)
    statements.clear()
    (result,) = celery_on_commit.run()
    assert result.get() == ["ann", "bob"]
    assert len(loads_forum()) == 1


def test_a_row_deleted_meanwhile(app, forum, celery_eager):
    with db.engine.begin() as conn:
        conn.execute(delete(Moderator))
        conn.execute(delete(Forum))
    with pytest.raises(MissingInstanceError, match=r"Forum\\(1\\)"):
        moderators.delay(forum)
"""


def test_eager_fixtures_load_instances_as_a_worker(pytester: pytest.Pytester) -> None:
    """In the test's context too, where the session holds the instance, the
    eager fixtures load it by the worker's query: a mapping the worker
    cannot load, or a row gone since, fails the user's test."""
    pytester.makeconftest(MODELS_CONFTEST)
    pytester.makepyfile(test_user=MODELS_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=3)
