"""Inline execution (eager mode, ``apply()``, a direct call) shares the
caller's context of the same app, or pushes one of its own."""

from __future__ import annotations

import typing as t

import pytest
from celery import signals
from flask import Flask
from flask import g
from sqlalchemy import func
from sqlalchemy import select

import taskapp
from conftest import make_app
from taskapp import db
from taskapp import ext
from taskapp import Item

CALLS: dict[str, t.Callable[[t.Any, str], t.Any]] = {
    "delay": lambda task, arg: task.delay(arg).get(),
    "apply": lambda task, arg: task.apply((arg,)).get(),
    "direct": lambda task, arg: task(arg),
}


@ext.celery.task
def inline_probe(name: str) -> dict[str, t.Any]:
    """What an inline task sees of its caller's context."""
    return probe(name)


@ext.celery.task(base=taskapp.LibraryTask)
def foreign_probe(name: str) -> dict[str, t.Any]:
    """:func:`inline_probe`, for a task of a library's base class."""
    return probe(name)


def probe(name: str) -> dict[str, t.Any]:
    return {
        "g": g.get("caller"),
        "session": db.session.info.get("caller"),
        "rows": db.session.scalar(select(func.count()).where(Item.name == name)),
    }


@pytest.fixture(params=["sqlite", "postgres"])
def inline_app(request: pytest.FixtureRequest) -> Flask:
    return make_app(
        {
            "SQLALCHEMY_DATABASE_URI": request.getfixturevalue(f"{request.param}_url"),
            "CELERY_TASK_ALWAYS_EAGER": True,
            "CELERY_TASK_EAGER_PROPAGATES": True,
        }
    )


@pytest.mark.parametrize("call", CALLS)
def test_inline_shares_the_callers_context(inline_app: Flask, call: str) -> None:
    with inline_app.app_context():
        g.caller = "view"
        db.session.info["caller"] = "view"
        item = Item(name=f"inline-{call}")
        db.session.add(item)
        db.session.flush()
        seen = CALLS[call](inline_probe, item.name)
        # The caller's instance is still attached and usable.
        assert item in db.session
        assert item.name == f"inline-{call}"
        db.session.rollback()
    assert seen == {"g": "view", "session": "view", "rows": 1}


@pytest.mark.parametrize("call", CALLS)
def test_inline_without_a_context_pushes_one(inline_app: Flask, call: str) -> None:
    seen = CALLS[call](inline_probe, "nothing")
    assert seen == {"g": None, "session": None, "rows": 0}
    with inline_app.app_context():
        # The context and its session are gone: no connection checked out.
        assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("call", CALLS)
def test_inline_without_a_context_under_testing(inline_app: Flask, call: str) -> None:
    inline_app.testing = True
    assert CALLS[call](taskapp.context_state, "m")["request"] is True


@pytest.mark.parametrize("call", ["delay", "apply"])
def test_inline_task_of_a_library_base_class(inline_app: Flask, call: str) -> None:
    assert CALLS[call](foreign_probe, "x") == {"g": None, "session": None, "rows": 0}
    with inline_app.app_context():
        g.caller = "view"
        assert CALLS[call](foreign_probe, "x")["g"] == "view"
    with inline_app.app_context():
        assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_inline_in_another_apps_context_uses_the_bound_app(inline_app: Flask) -> None:
    other = Flask("other")
    with other.app_context():
        g.caller = "other"
        seen = inline_probe.apply(("x",)).get()
    assert seen["g"] is None


def test_eager_failure_still_tears_down(
    inline_app: Flask, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="failed after a flush"):
        taskapp.write_then.delay("raise", "eager-fail")
    # The teardown functions got the task's exception, raised or stored.
    got = "teardown got ValueError('failed after a flush')"
    assert got in capsys.readouterr().err
    assert taskapp.write_then.apply(("raise", "eager-fail"), throw=False).failed()
    assert got in capsys.readouterr().err
    with inline_app.app_context():
        assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert (
            db.session.scalar(select(func.count()).where(Item.name == "eager-fail"))
            == 0
        )


def test_signal_receivers_run_in_the_task_context(inline_app: Flask) -> None:
    """Celery sends ``task_prerun`` and ``task_postrun`` inside the context."""
    seen: list[str] = []

    def prerun(**kwargs: t.Any) -> None:
        g.caller = "task_prerun"

    def postrun(**kwargs: t.Any) -> None:
        seen.append(g.caller)

    signals.task_prerun.connect(prerun, weak=False)
    signals.task_postrun.connect(postrun, weak=False)
    try:
        assert inline_probe.apply(("x",)).get()["g"] == "task_prerun"
    finally:
        signals.task_prerun.disconnect(prerun)
        signals.task_postrun.disconnect(postrun)
    assert seen == ["task_prerun"]


@ext.celery.task(bind=True)
def own_id(self: t.Any) -> str:
    return str(self.request.id)


def test_apply_takes_celerys_arguments_by_position(app: Flask) -> None:
    """``apply()`` has Celery's signature: a task id given by position is
    the id the task runs with."""
    result = own_id.apply((), {}, None, None, "given-id", 0, True)
    assert result.id == "given-id"
    assert result.get() == "given-id"
