"""A task's application context is pushed and popped as Flask does it, for
less: the teardown functions run in Flask's order with the task's exception,
async ones and those registered late too, the signals are sent, and a Flask
subclass keeps its own methods. The database integrations' own teardown
functions are done without what costs most in them."""

from __future__ import annotations

import gc
import sys
import threading
import typing as t
import weakref
from types import CodeType
from types import FrameType

import pytest
from flask import appcontext_popped
from flask import appcontext_pushed
from flask import appcontext_tearing_down
from flask import Flask
from sqlalchemy import select
from sqlalchemy import text

from flask_celery_ctx import FlaskCelery
from test_databases import make_app as make_dbapp

import dbapp
from taskapp import db
from taskapp import ext


@ext.celery.task
def succeed_or_fail(fail: bool) -> str:
    if fail:
        raise ValueError("the task failed")
    return "done"


@ext.celery.task
def select_one() -> int | None:
    return db.session.scalar(select(1))


def failure(app: Flask) -> ValueError:
    exc = succeed_or_fail.apply((True,), throw=False).result
    assert isinstance(exc, ValueError)
    return exc


def test_teardown_functions_in_flasks_order_with_the_exception(app: Flask) -> None:
    seen: list[tuple[str, BaseException | None]] = []
    app.teardown_appcontext(lambda exc: seen.append(("registered first", exc)))
    app.teardown_appcontext(lambda exc: seen.append(("registered second", exc)))
    assert succeed_or_fail.apply((False,)).get() == "done"
    exc = failure(app)
    assert seen == [
        ("registered second", None),
        ("registered first", None),
        ("registered second", exc),
        ("registered first", exc),
    ]


def test_teardown_function_registered_after_a_task(app: Flask) -> None:
    succeed_or_fail.apply((False,))
    seen: list[BaseException | None] = []
    app.teardown_appcontext(seen.append)
    succeed_or_fail.apply((False,))
    assert seen == [None]


def test_async_teardown_function(app: Flask) -> None:
    seen: list[BaseException | None] = []

    async def teardown(exc: BaseException | None) -> None:
        seen.append(exc)

    app.teardown_appcontext(teardown)
    succeed_or_fail.apply((False,))
    exc = failure(app)
    assert seen == [None, exc]


def test_signals(app: Flask) -> None:
    seen: list[tuple[t.Any, ...]] = []

    def pushed(sender: Flask, **kwargs: t.Any) -> None:
        seen.append(("pushed", sender))

    def tearing_down(sender: Flask, exc: BaseException | None) -> None:
        seen.append(("tearing down", sender, exc))

    def popped(sender: Flask, **kwargs: t.Any) -> None:
        seen.append(("popped", sender))

    with (
        appcontext_pushed.connected_to(pushed, app),
        appcontext_tearing_down.connected_to(tearing_down, app),
        appcontext_popped.connected_to(popped, app),
    ):
        exc = failure(app)
    assert seen == [("pushed", app), ("tearing down", app, exc), ("popped", app)]


class CountingFlask(Flask):
    """A Flask subclass with a ``do_teardown_appcontext`` of its own."""

    torn_down = 0

    def do_teardown_appcontext(self, exc: t.Any = None) -> None:
        self.torn_down += 1
        super().do_teardown_appcontext(exc)


own = FlaskCelery()


@own.celery.task
def noop() -> None:
    pass


def test_flask_subclass_keeps_its_methods() -> None:
    app = CountingFlask(__name__)
    app.config["CELERY_TASK_ALWAYS_EAGER"] = True
    own.init_app(app)
    noop.apply()
    noop.apply()
    assert app.torn_down == 2


def calls_of(code: CodeType, run: t.Callable[[], t.Any]) -> int:
    """How many times ``run()`` enters a frame of ``code``, in any thread it
    starts too."""
    calls = 0

    def profile(frame: FrameType, event: str, arg: t.Any) -> None:
        nonlocal calls
        if event == "call" and frame.f_code is code:
            calls += 1

    # Flask runs an async function in an event loop in a thread of its own.
    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return calls


def test_flask_sqlalchemy_session_removed_without_the_proxy(app: Flask) -> None:
    """Flask-SQLAlchemy's own teardown function looks up the context three
    times through the ``app_ctx`` proxy; the task's session is removed all
    the same."""
    from flask_sqlalchemy.session import _app_ctx_id

    select_one.apply()
    # The task's own db.session.scalar().
    assert calls_of(_app_ctx_id.__code__, select_one.apply) == 1
    assert db.session.registry.registry == {}


@dbapp.ext.celery.task
def lite_sessions(async_session: bool) -> None:
    dbapp.ext.session.execute(text("select 1"))
    if async_session:
        assert dbapp.ext.app.extensions["sqlalchemy"].async_session is not None


@pytest.mark.parametrize("opened", [False, True])
def test_lite_async_teardown_only_when_an_async_session_was_opened(
    postgres_url: str, opened: bool
) -> None:
    """Flask runs Flask-SQLAlchemy-Lite's async teardown function in an event
    loop of its own; it is not run for a task that opened no async
    session."""
    from flask_sqlalchemy_lite import _extension

    make_dbapp({"FCC_DATABASE": "lite", "SQLALCHEMY_DATABASE_URI": postgres_url})
    code = _extension._close_async_sessions.__code__
    assert calls_of(code, lambda: lite_sessions.apply((opened,))) == int(opened)


def run_a_task_in_a_new_app() -> weakref.ref[Flask]:
    app = Flask(__name__)
    app.config["CELERY_TASK_ALWAYS_EAGER"] = True
    own.init_app(app)

    @app.teardown_appcontext
    def log_name(exc: BaseException | None) -> None:
        app.logger.debug("%s torn down", app.name)

    async def log_exception(exc: BaseException | None) -> None:
        app.logger.debug("torn down with %r", exc)

    app.teardown_appcontext(log_exception)
    noop.apply()
    return weakref.ref(app)


def test_app_freed_once_unbound() -> None:
    """What is worked out for an app's contexts lives as long as the app."""
    freed = run_a_task_in_a_new_app()
    other = Flask(__name__)
    other.config["CELERY_TASK_ALWAYS_EAGER"] = True
    own.init_app(other)
    gc.collect()
    assert freed() is None
