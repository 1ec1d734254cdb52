"""``delay_on_commit`` and ``apply_async_on_commit`` send after the commit of
the outermost transaction of the app context's ``db.session``, and never for
a transaction that did not commit.

The worker runs one task at a time, in the order sent: once a task sent later
(:func:`barrier`) has run, any message sent before it has run too. So a task
still ``PENDING`` after the barrier was not sent.
"""

from __future__ import annotations

import logging
import time
import typing as t
import uuid

import pytest
from celery import signals
from celery import signature
from celery.result import AsyncResult
from flask import Flask
from kombu.exceptions import OperationalError
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import orm
from sqlalchemy import select
from sqlalchemy.engine import Engine

from flask_celery_ctx import MissingInstanceError
from flask_celery_ctx.outbox import table as outbox

import ormtasks
import taskapp
from conftest import make_app
from conftest import new_postgres_database
from conftest import Worker
from conftest import WorkerFactory
from ormtasks import Job
from ormtasks import Remote
from taskapp import db
from taskapp import Item


def barrier() -> None:
    """Wait until the worker ran everything sent so far."""
    assert taskapp.add.delay(1, 1).get(timeout=20) == 2


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def count(engine: Engine, name: str) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).where(Item.name == name)) or 0


def test_worker_runs_after_the_commit(orm_client: Flask) -> None:
    name = unique("after")
    with orm_client.app_context():
        item = Item(name=name)
        db.session.add(item)
        db.session.flush()
        result = ormtasks.seen_item.delay_on_commit(item.id)
        # What delay() does instead: the worker runs before the commit.
        assert ormtasks.seen_item.delay(item.id).get(timeout=20)["name"] is None
        barrier()
        assert result.state == "PENDING"
        committed_at = time.time()
        db.session.commit()
    seen = result.get(timeout=20)
    assert seen["name"] == name
    assert seen["at"] >= committed_at


def test_id_is_known_before_sending_and_stored_with_the_row(orm_client: Flask) -> None:
    with orm_client.app_context():
        job = Job(name=unique("job"))
        db.session.add(job)
        db.session.flush()
        result = ormtasks.job_task.apply_async_on_commit([job], countdown=0)
        job.task_id = result.id
        db.session.commit()
        assert isinstance(result, AsyncResult)
        assert result.get(timeout=20) == {"name": job.name, "mine": True}
        chosen = unique("chosen-id")
        db.session.add(Item(name="x"))
        given = ormtasks.job_task.apply_async_on_commit([job], task_id=chosen)
        assert given.id == chosen
        db.session.commit()
        assert given.get(timeout=20)["name"] == job.name


def test_savepoint_release_is_no_commit(orm_client: Flask) -> None:
    name = unique("savepoint")
    with orm_client.app_context():
        db.session.add(Item(name="outer"))
        with db.session.begin_nested():
            result = ormtasks.add_item.delay_on_commit(name)
        barrier()
        assert result.state == "PENDING"
        db.session.commit()
    assert isinstance(result.get(timeout=20), int)


def test_rollback_to_savepoint_drops_what_it_queued(
    orm_client: Flask, pg_admin: Engine
) -> None:
    names = {k: unique(k) for k in ("outer", "middle", "inner", "after")}
    with orm_client.app_context():
        db.session.add(Item(name="outer"))
        outer = ormtasks.add_item.delay_on_commit(names["outer"])
        middle = db.session.begin_nested()
        dropped = ormtasks.add_item.delay_on_commit(names["middle"])
        with db.session.begin_nested():
            released = ormtasks.add_item.delay_on_commit(names["inner"])
        middle.rollback()
        after = ormtasks.add_item.delay_on_commit(names["after"])
        db.session.commit()
    outer.get(timeout=20)
    after.get(timeout=20)
    barrier()
    assert dropped.state == released.state == "PENDING"
    assert [count(pg_admin, names[k]) for k in names] == [1, 0, 0, 1]


def test_rollback_drops_and_a_later_commit_does_not_send(
    orm_client: Flask, pg_admin: Engine
) -> None:
    first, second = unique("rolled-back"), unique("later")
    with orm_client.app_context():
        db.session.add(Item(name="x"))
        dropped = ormtasks.add_item.delay_on_commit(first)
        db.session.rollback()
        db.session.add(Item(name="y"))
        sent = ormtasks.add_item.delay_on_commit(second)
        db.session.commit()
    sent.get(timeout=20)
    barrier()
    assert dropped.state == "PENDING"
    assert count(pg_admin, first) == 0


def test_context_torn_down_without_commit_drops(
    orm_client: Flask, pg_admin: Engine
) -> None:
    name = unique("torn-down")
    with orm_client.app_context():
        db.session.add(Item(name="x"))
        dropped = ormtasks.add_item.delay_on_commit(name)
    with orm_client.app_context():
        db.session.add(Item(name="y"))
        db.session.commit()
    barrier()
    assert dropped.state == "PENDING"
    assert count(pg_admin, name) == 0


def test_without_a_transaction_sends_at_once(orm_client: Flask) -> None:
    outside = ormtasks.add_item.delay_on_commit(unique("no-context"))
    assert isinstance(outside.get(timeout=20), int)
    with orm_client.app_context():
        db.session.commit()  # nothing in progress
        inside = ormtasks.add_item.delay_on_commit(unique("no-transaction"))
        assert isinstance(inside.get(timeout=20), int)


def test_binds_wait_for_the_session_commit(orm_client: Flask) -> None:
    # One session, one transaction over both databases: the messages wait for
    # its commit, whichever database was written to. A connection of your own
    # is another transaction, not watched.
    with orm_client.app_context():
        remote = Remote(name=unique("remote"))
        db.session.add(remote)
        db.session.flush()
        result = ormtasks.seen_remote.delay_on_commit(remote.id)
        with db.engines["other"].begin() as conn:
            conn.execute(insert(Remote).values(name="own connection"))
        barrier()
        assert result.state == "PENDING"
        db.session.commit()
        assert result.get(timeout=20) == remote.name


def test_pending_instance_is_sent_with_its_key(orm_client: Flask) -> None:
    with orm_client.app_context():
        item = Item(name=unique("pending"))
        db.session.add(item)
        result = ormtasks.describe.delay_on_commit(item)
        db.session.commit()
        described = result.get(timeout=20)
        assert described["args"] == {
            "list": [{"model": "Item", "name": item.name, "attached": True}]
        }
        assert described["argsrepr"] == f"(Item({item.id}),)"


def test_errors_are_raised_when_queued(orm_client: Flask) -> None:
    with orm_client.app_context():
        db.session.add(Item(name="x"))
        with pytest.raises(ValueError, match=r"not pending in db\.session"):
            ormtasks.describe.delay_on_commit(Item(name="transient"))
        with pytest.raises(TypeError):
            ormtasks.seen_item.delay_on_commit(1, 2)  # type: ignore[call-arg]
        with pytest.raises(Exception, match="cannot be serialized with 'json'"):
            ormtasks.seen_item.delay_on_commit(object())  # type: ignore[arg-type]
        db.session.rollback()


def test_without_the_outbox_a_send_failure_is_raised_after_the_commit(
    orm_worker: Worker, pg_admin: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(
        {
            **orm_worker.config,
            "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
            "CELERY_TASK_PUBLISH_RETRY": False,
            "CELERY_BROKER_TRANSPORT_OPTIONS": {"max_retries": 0},
            "CELERY_OUTBOX": False,
        }
    )
    name = unique("kept")
    with app.app_context():
        db.session.add(Item(name=name))
        first = ormtasks.add_item.delay_on_commit("a")
        second = ormtasks.add_item.delay_on_commit("b")
        with (
            caplog.at_level(logging.ERROR, "flask_celery_ctx"),
            pytest.raises(OperationalError) as info,
        ):
            db.session.commit()
        notes = getattr(info.value, "__notes__", ["the transaction is committed"])
        assert "the transaction is committed" in "".join(notes)
        # The session goes on.
        assert db.session.scalar(select(func.count()).where(Item.name == name)) == 1
    assert count(pg_admin, name) == 1
    messages = [r.getMessage() for r in caplog.records]
    for result in (first, second):
        assert any(
            f"ormtasks.add_item[{result.id}] could not be sent" in m for m in messages
        )


def test_a_failed_send_does_not_stop_the_others(
    orm_client: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    with orm_client.app_context():
        lost = Item(name="expunged")
        db.session.add(lost)
        failing = ormtasks.describe.delay_on_commit(lost)
        sent = ormtasks.add_item.delay_on_commit(unique("sent"))
        db.session.expunge(lost)
        with pytest.raises(ValueError, match="no primary key"):
            db.session.commit()
    assert isinstance(sent.get(timeout=20), int)
    assert f"[{failing.id}] could not be sent" in caplog.text


def test_rabbitmq(workers: WorkerFactory, other_postgres_url: str) -> None:
    orm_worker = workers("rabbitmq", **ormtasks.config(other_postgres_url))
    orm_client = orm_worker.client()
    with orm_client.app_context():
        item = Item(name=unique("rabbit"))
        db.session.add(item)
        result = ormtasks.describe.delay_on_commit(item)
        barrier()
        assert result.state == "PENDING"
        db.session.commit()
        assert result.get(timeout=20)["args"]["list"][0]["name"] == item.name


# Eager mode: the task runs inline, after the commit.


@pytest.fixture
def returned(app: Flask) -> t.Iterator[list[t.Any]]:
    """What the eager tasks returned, in the order they ran."""
    values: list[t.Any] = []

    def on_success(result: t.Any, **kwargs: t.Any) -> None:
        values.append(result)

    signals.task_success.connect(on_success, weak=False)
    yield values
    signals.task_success.disconnect(on_success)


def names(*wanted: str) -> list[str]:
    return sorted(db.session.scalars(select(Item.name).where(Item.name.in_(wanted))))


def test_eager_runs_after_the_commit(app: Flask, returned: list[t.Any]) -> None:
    name, inner = unique("eager"), unique("inner")
    with app.app_context():
        item = Item(name=name)
        db.session.add(item)
        db.session.flush()
        assert ormtasks.seen_item.delay(item.id).get()["name"] is None
        result = ormtasks.seen_item.delay_on_commit(item.id)
        ormtasks.add_item.delay_on_commit(inner)
        assert len(returned) == 1
        committed_at = time.time()
        db.session.commit()
        # Both ran after the commit; the second one committed a row itself,
        # in the caller's session, which goes on.
        assert returned[1]["name"] == name
        assert returned[1]["at"] >= committed_at
        assert names(name, inner) == sorted([name, inner])
        assert db.session.get(Item, item.id) is item
    assert isinstance(result, AsyncResult)


def test_eager_follows_the_same_rules(app: Flask) -> None:
    n = {k: unique(k) for k in ("released", "rolled-back", "dropped", "torn-down")}
    with app.app_context():
        with db.session.begin_nested():
            ormtasks.add_item.delay_on_commit(n["released"])
        savepoint = db.session.begin_nested()
        ormtasks.add_item.delay_on_commit(n["rolled-back"])
        savepoint.rollback()
        assert names(*n.values()) == []
        db.session.commit()
        assert names(*n.values()) == [n["released"]]
        ormtasks.add_item.delay_on_commit(n["dropped"])
        db.session.rollback()
    with app.app_context():
        db.session.add(Item(name="x"))
        ormtasks.add_item.delay_on_commit(n["torn-down"])
    with app.app_context():
        db.session.commit()
        assert names(*n.values()) == [n["released"]]


# Signatures with instances, as apply_async takes them.


def seen(name: str) -> dict[str, t.Any]:
    return {"model": "Item", "name": name, "attached": True}


def test_a_linked_signature_gets_its_instances_after_the_commit(
    orm_client: Flask,
) -> None:
    with orm_client.app_context():
        item, later = Item(name=unique("linked")), Item(name=unique("pending"))
        db.session.add(item)
        db.session.flush()
        db.session.add(later)  # pending until the commit flushes it
        callback = ormtasks.describe.si(item, kept=later)
        linked = callback.freeze()
        first = ormtasks.describe.apply_async_on_commit([item], link=callback)
        names = item.name, later.name
        db.session.commit()
        assert first.get(timeout=20)["args"] == {"list": [seen(names[0])]}
        described = linked.get(timeout=20)
    assert described["args"] == {"list": [seen(names[0])]}
    assert described["kwargs"] == {"kept": seen(names[1])}


def test_signatures_are_refused_when_queued_as_apply_async_refuses_them(
    orm_client: Flask,
) -> None:
    with orm_client.app_context():
        item = Item(name=unique("refused"))
        db.session.add(item)
        db.session.flush()
        with pytest.raises(ValueError, match=r"The error callback .* pass ids"):
            ormtasks.same.apply_async_on_commit(
                [1], link_error=ormtasks.describe.si(item)
            )
        with pytest.raises(ValueError, match=r"not a ContextTask"):
            ormtasks.same.apply_async_on_commit(
                [1], link=signature("billing.charge", args=(item,))
            )
        with pytest.raises(ValueError, match=r"not pending in db\.session"):
            ormtasks.same.apply_async_on_commit(
                [1], link=ormtasks.describe.si(Item(name="transient"))
            )
        db.session.rollback()


@pytest.fixture
def own_url() -> t.Iterator[str]:
    """A database of the test's own, with the outbox table: the relays of
    the session's other workers look at the run's database too, and one
    whose app lacks the row's task would count a failed attempt and hold the
    row back."""
    with new_postgres_database("linked", outbox.metadata) as url:
        yield url


def test_a_linked_signature_gets_its_instances_after_the_relay(
    workers: WorkerFactory, other_postgres_url: str, own_url: str
) -> None:
    """The broker is down at the commit: the row holds the signature, its
    instances as references, and a worker's relay publishes it."""
    relaying = workers(
        **ormtasks.config(other_postgres_url),
        SQLALCHEMY_DATABASE_URI=own_url,
        FCC_CREATE_ALL=True,
        CELERY_OUTBOX_LEASE=1,
        CELERY_OUTBOX_RELAY_INTERVAL=0.2,
    )
    down = relaying.client(
        CELERY_BROKER_URL="redis://127.0.0.1:9/0",
        CELERY_TASK_PUBLISH_RETRY=False,
        CELERY_BROKER_TRANSPORT_OPTIONS={"max_retries": 0},
    )
    with down.app_context():
        item = Item(name=unique("relayed"))
        db.session.add(item)
        callback = ormtasks.describe.si(kept=[item])
        linked = callback.freeze()
        ormtasks.same.apply_async_on_commit([1], link=callback)
        name = item.name
        db.session.commit()
    with relaying.client().app_context():
        described: dict[str, t.Any] = AsyncResult(linked.id).get(timeout=30)
    assert described["kwargs"] == {"kept": {"list": [seen(name)]}}
    workers.stop(relaying)  # before its database is dropped


# The session that holds the instances.


def test_a_send_waits_for_the_session_that_holds_its_instances(
    orm_client: Flask,
) -> None:
    """A view that keeps a session of its own, while ``db.session`` is in a
    transaction too or not."""
    own = orm.sessionmaker()
    with orm_client.app_context():
        for reading in (False, True):
            if reading:
                db.session.scalar(select(func.count()).select_from(Item))
            session = own(bind=db.engine)
            item = Item(name=unique("own"))
            session.add(item)
            session.flush()
            result = ormtasks.describe.delay_on_commit(item)
            name = item.name
            barrier()
            assert result.state == "PENDING"
            session.commit()
            assert result.get(timeout=20)["args"] == {"list": [seen(name)]}
            session.close()
            db.session.rollback()


def test_instances_of_two_sessions_in_transactions_are_refused(
    orm_client: Flask,
) -> None:
    with orm_client.app_context():
        session = orm.Session(db.engine)
        mine, theirs = Item(name=unique("mine")), Item(name=unique("theirs"))
        session.add(mine)
        db.session.add(theirs)
        session.flush()
        db.session.flush()
        with pytest.raises(ValueError, match=r"belong to 2 sessions, each in a"):
            ormtasks.describe.delay_on_commit(mine, theirs)
        session.rollback()
        session.close()
        db.session.rollback()


# Tasks of a third-party base class.


def test_a_task_of_a_third_party_base_class_sends_on_commit(
    orm_client: Flask,
) -> None:
    with orm_client.app_context():
        item = Item(name=unique("based"))
        db.session.add(item)
        # Typed as its base class, which type checkers see without it.
        result = ormtasks.rename.delay_on_commit(item, "renamed")  # type: ignore[attr-defined]
        barrier()
        assert result.state == "PENDING"
        name = item.name
        db.session.commit()
        assert result.get(timeout=20) == {"item": seen(name), "renamed": "renamed"}
        db.session.refresh(item)
        assert item.name == "renamed"


def test_a_base_class_that_calls_run_itself(
    orm_client: Flask, pg_admin: Engine
) -> None:
    """Its ``__call__`` runs, in the task's context, after the instances are
    loaded; a missing row fails the task before it."""
    with orm_client.app_context():
        kept, gone = Item(name=unique("kept")), Item(name=unique("gone"))
        db.session.add_all([kept, gone])
        db.session.commit()
        name = kept.name
        assert ormtasks.called.delay(kept).get(timeout=20) == {
            "item": seen(name),
            "base": True,
        }
        with pg_admin.begin() as conn:
            conn.execute(delete(Item).where(Item.id == gone.id))
        with pytest.raises(MissingInstanceError, match="do not exist"):
            ormtasks.called.delay(gone).get(timeout=20)


def test_a_send_dropped_by_a_close_is_logged(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    """A send queued in a transaction that the session's close ends, with no
    commit (a view that committed through a service, then read an expired
    attribute, which began a new transaction), is dropped with a warning; a
    rollback drops it quietly, as asked."""
    name = unique("closed")
    with caplog.at_level(logging.DEBUG, "flask_celery_ctx"):
        with app.app_context():
            item = Item(name=name)
            db.session.add(item)
            db.session.commit()
            assert item.name == name  # a new transaction, to read it again
            closed = ormtasks.describe.delay_on_commit(item)
        with app.app_context():
            db.session.add(Item(name=unique("rolled-back")))
            rolled_back = ormtasks.add_item.delay_on_commit(name)
            db.session.rollback()
    [warned] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"[{closed.id}] dropped" in warned.getMessage()
    assert "ended without a commit when its session was closed" in warned.getMessage()
    assert f"[{rolled_back.id}] dropped" in caplog.text
    with app.app_context():
        assert names(name) == [name]
