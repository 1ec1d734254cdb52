"""A failed task's uncommitted work is rolled back before anything else runs
in its context: the errbacks, ``on_failure`` and ``on_retry`` commit only
their own work, and an eager retry runs in a context of its own."""

from __future__ import annotations

import typing as t
import uuid

import pytest
from celery import signals
from flask import Flask
from sqlalchemy import select

import taskapp
from conftest import make_app
from conftest import WorkerFactory
from taskapp import db
from taskapp import Item
from taskapp import Record


def items(app: Flask, name: str) -> set[str]:
    """The names of the items whose name starts with ``name``."""
    with app.app_context():
        return set(
            db.session.scalars(select(Item.name).where(Item.name.like(f"{name}%")))
        )


def run(how: str, name: str) -> t.Any:
    return taskapp.work_then.apply_async(
        (how, name), link_error=taskapp.write_error.s()
    )


def expected(how: str, name: str) -> set[str]:
    """What survives: the hooks' own records and the last attempt's work."""
    if how == "raise":
        return {f"{name}-errback", f"{name}-on_failure"}
    return {f"{name}-on_retry", f"{name}-1", f"{name}-1-sent"}


@pytest.mark.parametrize("how", ["raise", "retry"])
def test_worker_hooks_commit_only_their_own_work(
    workers: WorkerFactory, how: str
) -> None:
    client = workers().client()
    name = f"{how}-{uuid.uuid4().hex[:8]}"
    run(how, name).get(timeout=20, propagate=False)
    # The worker runs one task at a time: a send the hooks' commits let out
    # would have run before this one.
    assert taskapp.add.delay(1, 1).get(timeout=20) == 2
    assert items(client, name) == expected(how, name)


@pytest.fixture(params=["sqlite", "postgres"])
def eager_app(request: pytest.FixtureRequest) -> Flask:
    """An app whose tasks run inline, failures stored in the result as a
    worker would, so that the errbacks run."""
    return make_app(
        {"SQLALCHEMY_DATABASE_URI": request.getfixturevalue(f"{request.param}_url"),
         "CELERY_TASK_ALWAYS_EAGER": True}
    )  # fmt: skip


@pytest.mark.parametrize("how", ["raise", "retry"])
def test_eager_hooks_commit_only_their_own_work(eager_app: Flask, how: str) -> None:
    name = f"eager-{how}-{uuid.uuid4().hex[:8]}"
    run(how, name)
    assert items(eager_app, name) == expected(how, name)


def test_eager_retries_run_in_contexts_of_their_own(eager_app: Flask) -> None:
    name = f"retry-{uuid.uuid4().hex[:8]}"
    result = taskapp.retry_twice.delay(name)
    assert result.get() == 2
    assert items(eager_app, name) == {f"{name}-2"}
    with eager_app.app_context():
        seen = db.session.execute(
            select(Record.hook, Record.g_token, Record.session_token)
            .where(Record.task_id == result.id)
            .order_by(Record.id)
        ).all()
    # Each attempt started with a fresh ``g`` and a fresh session.
    assert [tuple(row) for row in seen] == [
        (f"attempt-{n}", None, None) for n in range(3)
    ]


@pytest.mark.parametrize("how", ["ignore", "reject"])
def test_ignored_and_rejected_work_is_rolled_back_before_task_postrun(
    eager_app: Flask, how: str
) -> None:
    """What ``task_postrun`` receivers commit, in the task's context, is
    their own work only."""
    name = f"eager-{how}-{uuid.uuid4().hex[:8]}"

    def write_postrun(sender: t.Any, args: t.Any, **kwargs: t.Any) -> None:
        taskapp.write_item(f"{args[1]}-postrun")

    signals.task_postrun.connect(write_postrun, sender=taskapp.work_then)
    try:
        taskapp.work_then.delay(how, name)
    finally:
        signals.task_postrun.disconnect(write_postrun, sender=taskapp.work_then)
    assert items(eager_app, name) == {f"{name}-postrun"}


def test_eager_task_in_the_callers_context_shares_its_transaction(
    eager_app: Flask,
) -> None:
    """Run in the caller's context, a task is part of the caller's
    transaction: its failure leaves the caller's work to the caller."""
    name = f"shared-{uuid.uuid4().hex[:8]}"
    with eager_app.app_context():
        db.session.add(Item(name=f"{name}-caller"))
        db.session.flush()
        taskapp.work_then.apply(("raise", name))
        db.session.commit()
    assert f"{name}-caller" in items(eager_app, name)
