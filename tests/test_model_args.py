"""Model instances as task arguments travel as references and arrive loaded
in the task's own session, fresh and attached; inline, the caller's very
instances pass."""

from __future__ import annotations

import contextlib
import socket
import time
import typing as t
import uuid

import pytest
from celery import chain
from celery import chord
from celery import signature
from flask import Flask
from flask import request
from sqlalchemy import delete
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy import update
from sqlalchemy.engine import Engine

from flask_celery_ctx import InvalidReferenceError
from flask_celery_ctx import MissingInstanceError
from flask_celery_ctx import models

import ormtasks
from conftest import Worker
from conftest import WorkerFactory
from ormtasks import Pair
from ormtasks import Plain
from ormtasks import PlainBase
from ormtasks import Remote
from taskapp import db
from taskapp import Item


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def saved(*instances: db.Model) -> None:  # type: ignore[name-defined]
    db.session.add_all(instances)
    db.session.commit()


def seen(name: str) -> dict[str, object]:
    return {"model": "Item", "name": name, "attached": True}


def test_instance_arrives_fresh_and_attached(
    orm_client: Flask, pg_admin: Engine
) -> None:
    with orm_client.app_context():
        item = Item(name="before")
        saved(item)
        assert item.name == "before"
        with pg_admin.connect() as conn:
            conn.execute(update(Item).where(Item.id == item.id).values(name="after"))
        # The caller's copy is stale; the task loads the row as it is now.
        described = ormtasks.describe.delay(item).get(timeout=20)
        assert item.name == "before"
    assert described["args"] == {"list": [seen("after")]}
    # The request keeps the references, as sent.
    (reference,) = described["request_args"]
    assert reference.keys() == {"__model__", "__key__", "__sig__"}
    assert reference["__model__"] == "taskapp.Item"
    assert reference["__key__"] == [item.id]


def test_containers_composite_keys_binds_one_query_per_model(orm_client: Flask) -> None:
    with orm_client.app_context():
        items = [Item(name=unique("item")) for _ in range(3)]
        a = int(time.time() * 1000) % 1_000_000_000
        pairs = [Pair(a=a, b="x", name="px"), Pair(a=a, b="y", name="py")]
        remotes = [Remote(name="r1"), Remote(name="r2")]
        saved(*items, *pairs, *remotes)
        i1, i2, i3 = items
        p1, p2 = pairs
        r1, r2 = remotes
        result = ormtasks.describe.apply_async(
            args=[i1, [i2, i3, i1], (p1,)],
            kwargs={"k": {"x": p2, "r": [r1, r2]}, "n": 5},
        )
        described = result.get(timeout=20)
        check_described(described, items, a, remotes)


def check_described(
    described: dict[str, t.Any], items: list[Item], a: int, remotes: list[Remote]
) -> None:
    i1, i2, i3 = items
    r1, r2 = remotes
    assert described["args"] == {
        "list": [
            seen(i1.name),
            {"list": [seen(i2.name), seen(i3.name), seen(i1.name)]},
            {"list": [{"model": "Pair", "name": "px", "attached": True}]},
        ]
    }
    assert described["kwargs"] == {
        "k": {
            "x": {"model": "Pair", "name": "py", "attached": True},
            "r": {
                "list": [
                    {"model": "Remote", "name": "r1", "attached": True},
                    {"model": "Remote", "name": "r2", "attached": True},
                ]
            },
        },
        "n": 5,
    }
    statements = described["statements"]
    assert len(statements) == 3, statements
    assert sorted(s.split("FROM ")[1].split()[0] for s in statements) == [
        "item",
        "pair",
        "remote",
    ]
    assert described["argsrepr"] == (
        f"[Item({i1.id}), [Item({i2.id}), Item({i3.id}), Item({i1.id})],"
        f" (Pair({a}, 'x'),)]"
    )
    assert described["kwargsrepr"] == (
        f"{{'k': {{'x': Pair({a}, 'y'), 'r': [Remote({r1.id}), Remote({r2.id})]}},"
        " 'n': 5}"
    )


def test_a_retry_sends_the_references_again(orm_client: Flask) -> None:
    with orm_client.app_context():
        item = Item(name=unique("retried"))
        saved(item)
        assert ormtasks.retried.delay(item).get(timeout=20) == {
            "retries": 1,
            **seen(item.name),
        }


def test_a_deleted_row_fails_the_task(
    orm_client: Flask, orm_worker: Worker, pg_admin: Engine
) -> None:
    with orm_client.app_context():
        gone, kept = Item(name="gone"), Item(name="kept")
        saved(gone, kept)
        with pg_admin.connect() as conn:
            conn.execute(delete(Item).where(Item.id == gone.id))
        result = ormtasks.describe.delay(kept, gone)
        with pytest.raises(MissingInstanceError, match=rf"Item\({gone.id}\)") as info:
            result.get(timeout=20)
        assert "allow_missing_instances=True" in str(info.value)
        failed = f"ormtasks.describe[{result.id}] raised unexpected"
        orm_worker.wait_for(failed)
        (line,) = [line for line in orm_worker.log.splitlines() if failed in line]
        assert "MissingInstanceError" in line
        assert f"Item({gone.id})" in line
        assert ormtasks.describe_or_none.delay(kept, gone).get(timeout=20)["args"] == {
            "list": [seen("kept"), None]
        }


def test_unsaved_instances_are_refused_when_sent(orm_client: Flask) -> None:
    with orm_client.app_context():
        with pytest.raises(ValueError, match="not saved, so it has no primary key"):
            ormtasks.describe.delay(Item(name="transient"))
        pending = Item(name="pending")
        db.session.add(pending)
        with pytest.raises(ValueError, match=r"pending \(added, not flushed\)"):
            ormtasks.describe.delay([pending])
        db.session.rollback()


def test_rows_not_committed_yet_are_refused_when_sent(orm_client: Flask) -> None:
    """A row flushed in a transaction still in progress is invisible to the
    worker: sent now, the task would not find it. ``delay_on_commit`` takes
    it, and sends once the row is committed."""
    with orm_client.app_context():
        flushed = Item(name=unique("flushed"))
        db.session.add(flushed)
        db.session.flush()
        not_committed = (
            r"inserted in a transaction not committed yet: .*delay_on_commit"
        )
        with pytest.raises(ValueError, match=not_committed):
            ormtasks.describe.delay(flushed)
        with pytest.raises(ValueError, match=not_committed):
            ormtasks.describe.apply_async([], link=ormtasks.describe.si(flushed))
        with db.session.begin_nested():
            in_savepoint = Item(name=unique("savepoint"))
            db.session.add(in_savepoint)
            db.session.flush()
            with pytest.raises(ValueError, match=not_committed):
                ormtasks.describe.delay({"item": in_savepoint})
        with pytest.raises(ValueError, match=not_committed):
            ormtasks.describe.delay(in_savepoint)  # the savepoint was released
        later = ormtasks.describe.delay_on_commit(flushed)
        db.session.commit()
        assert later.get(timeout=20)["args"] == {"list": [seen(flushed.name)]}
        # Committed: sent at once.
        now = ormtasks.describe.delay(in_savepoint)
        assert now.get(timeout=20)["args"] == {"list": [seen(in_savepoint.name)]}


def test_argsrepr_shows_references_to_monitoring(
    workers: WorkerFactory, other_postgres_url: str
) -> None:
    # What Flower shows: the task-received event of a worker that sends them.
    config = ormtasks.config(other_postgres_url)
    orm_client = workers(**config, CELERY_WORKER_SEND_TASK_EVENTS=True).client()
    celery = orm_client.extensions["celery"].celery
    events: list[dict[str, t.Any]] = []
    with orm_client.app_context(), celery.connection_for_read() as conn:
        item = Item(name="monitored")
        saved(item)
        receiver = celery.events.Receiver(
            conn, handlers={"task-received": events.append}
        )
        with receiver.consumer_context(wakeup=False) as (consuming, _, _):
            result = ormtasks.describe.apply_async([item], {"also": item})
            deadline = time.monotonic() + 20
            while not [e for e in events if e["uuid"] == result.id]:
                assert time.monotonic() < deadline, events
                with contextlib.suppress(socket.timeout):
                    consuming.drain_events(timeout=1)
        (event,) = [e for e in events if e["uuid"] == result.id]
        assert event["args"] == f"[Item({item.id})]"
        assert event["kwargs"] == f"{{'also': Item({item.id})}}"
        result.get(timeout=20)


# Inline execution.


def test_inline_passes_the_callers_very_instances(app: Flask) -> None:
    with app.app_context():
        item = Item(name=unique("inline"))
        saved(item)
        assert ormtasks.same.delay(item, [item]).get() == [item, [item]]
        assert ormtasks.same.delay(item).get()[0] is item
        assert ormtasks.same.apply((item,)).get()[0] is item
        assert ormtasks.same(item)[0] is item
        transient = Item(name="transient")
        assert ormtasks.same.apply((transient,)).get()[0] is transient
        db.session.rollback()


def test_apply_with_references_leaves_the_callers_arguments(app: Flask) -> None:
    """References given to ``apply()``, as a list or a tuple, are loaded into
    copies: the caller's arguments are left as they were."""
    with app.app_context():
        item = Item(name=unique("refs"))
        saved(item)
        reference = models.dump("same", item, app)[0]
        args = [reference, [reference]]
        assert ormtasks.same.apply(args).get() == [item, [item]]
        assert args == [reference, [reference]]
        assert ormtasks.same.apply((reference,)).get() == [item]


def test_a_reference_to_an_app_without_secret_key_fails(app: Flask) -> None:
    with app.app_context():
        item = Item(name=unique("keyless"))
        saved(item)
        reference = models.dump("same", item, app)[0]
        app.config["SECRET_KEY"] = None
        with pytest.raises(InvalidReferenceError, match="SECRET_KEY is not set here"):
            ormtasks.same.apply([reference])


def test_eager_without_a_context_loads_in_the_tasks_session(app: Flask) -> None:
    with app.app_context():
        name = unique("eager")
        item = Item(name=name)
        saved(item)
    # Detached and expired: it is loaded again, in the task's session.
    described = ormtasks.describe.delay(item).get()
    assert described["args"] == {"list": [seen(name)]}


def test_hooks_see_the_instances(app: Flask) -> None:
    ormtasks.SEEN_BY_HOOKS.clear()
    with app.app_context():
        item = Item(name=unique("hooks"))
        saved(item)
        ormtasks.seen_by_hooks.delay(item, other=[item])
        assert [([item], {"other": [item]})] == ormtasks.SEEN_BY_HOOKS


# Signed references.


def test_request_json_shaped_like_a_reference_arrives_as_a_dict(
    orm_client: Flask,
) -> None:
    """A view that forwards a request's JSON to a task cannot be made to load
    a row: only references the app signed are loaded."""

    @orm_client.post("/notify")
    def notify() -> dict[str, str]:
        return {"id": ormtasks.describe.delay(request.get_json()).id}

    with orm_client.app_context():
        item = Item(name=unique("admin"))
        saved(item)
        crafted = {"__model__": "taskapp.Item", "__key__": [item.id]}
    response = orm_client.test_client().post("/notify", json=crafted)
    described = (
        orm_client.extensions["celery"]
        .celery.AsyncResult(
            response.json["id"]  # type: ignore[index]
        )
        .get(timeout=20)
    )
    assert described["args"] == {
        "list": [{"__model__": "taskapp.Item", "__key__": {"list": crafted["__key__"]}}]
    }


def test_a_reference_that_does_not_verify_fails_the_task(
    orm_client: Flask, orm_worker: Worker
) -> None:
    with orm_client.app_context():
        item = Item(name=unique("forged"))
        saved(item)
        forged = {"__model__": "taskapp.Item", "__key__": [item.id], "__sig__": "x"}
        with pytest.raises(InvalidReferenceError) as info:
            ormtasks.describe.delay(forged).get(timeout=20)
        message = str(info.value)
        assert "'taskapp.Item' with the key [" in message
        assert "not made by a sender of this app" in message
        assert "different SECRET_KEYs" in message
        assert "the same SECRET_KEY" in message
    other = orm_worker.client(SECRET_KEY="another key")
    with other.app_context(), pytest.raises(InvalidReferenceError, match="SECRET_KEYs"):
        ormtasks.describe.delay(db.session.get(Item, item.id)).get(timeout=20)


def test_sending_an_instance_needs_a_secret_key(orm_client: Flask) -> None:
    orm_client.config["SECRET_KEY"] = None
    with orm_client.app_context():
        item = Item(name=unique("unsigned"))
        saved(item)
        with pytest.raises(RuntimeError, match="Set SECRET_KEY in the config"):
            ormtasks.describe.delay(item)
        # Refused when queued, not after the commit.
        item.name = unique("changed")
        with pytest.raises(RuntimeError, match="SECRET_KEY is not set"):
            ormtasks.describe.delay_on_commit(item)
        db.session.rollback()


def test_references_verify_with_secret_key_fallbacks(
    workers: WorkerFactory, other_postgres_url: str
) -> None:
    """A worker whose key was changed still loads what was sent with the old
    one, kept in ``SECRET_KEY_FALLBACKS``."""
    config = {
        **ormtasks.config(other_postgres_url),
        "SECRET_KEY": "the new key",
        "SECRET_KEY_FALLBACKS": ["do-not-leak"],
    }
    rotated = workers.start("redis", "postgres", config)
    try:
        rotated.wait_ready()
        sender = rotated.client(SECRET_KEY="do-not-leak", SECRET_KEY_FALLBACKS=[])
        with sender.app_context():
            item = Item(name=unique("rotated"))
            saved(item)
            assert ormtasks.describe.delay(item).get(timeout=20)["args"] == {
                "list": [seen(item.name)]
            }
    finally:
        rotated.stop()  # used by this test only: its connections go with it


def test_instances_of_any_mapped_class(orm_client: Flask, pg_admin: Engine) -> None:
    """Models of a plain ``DeclarativeBase``, not of ``db.Model``."""
    PlainBase.metadata.create_all(pg_admin)
    with orm_client.app_context():
        plain = Plain(name=unique("plain"))
        saved(plain)
        described = ormtasks.describe.delay(plain).get(timeout=20)
        assert described["args"] == {
            "list": [{"model": "Plain", "name": plain.name, "attached": True}]
        }
        assert described["argsrepr"] == f"(Plain({plain.id}),)"


def test_more_instances_than_a_statement_takes_parameters(
    orm_client: Flask, pg_admin: Engine
) -> None:
    """PostgreSQL takes 65,535 parameters at most: keys are loaded in chunks,
    and a hundred instances still in one query."""
    name = unique("bulk")
    with pg_admin.connect() as conn:
        conn.execute(
            text("INSERT INTO item (name) SELECT :name FROM generate_series(1, 70000)"),
            {"name": name},
        )
    with orm_client.app_context():
        items = db.session.scalars(select(Item).where(Item.name == name)).all()
        assert len(items) == 70_000
        many = ormtasks.count_loaded.delay(items).get(timeout=120)
        hundred = ormtasks.count_loaded.delay(items[:100]).get(timeout=120)
    assert many == {"ids": 70_000, "names": [name], "attached": True, "queries": 140}
    assert hundred == {"ids": 100, "names": [name], "attached": True, "queries": 1}


# Chains and callbacks.


def test_chained_and_linked_tasks_get_their_instances(orm_client: Flask) -> None:
    with orm_client.app_context():
        first, second, third = (Item(name=unique(n)) for n in ("a", "b", "c"))
        saved(first, second, third)
        result = chain(
            ormtasks.describe.si(first), ormtasks.describe.si(kept=[second])
        ).apply_async()
        assert result.get(timeout=20)["kwargs"] == {
            "kept": {"list": [seen(second.name)]}
        }
        callback = ormtasks.describe.si(third)
        linked = callback.freeze()
        ormtasks.describe.apply_async([first], link=callback).get(timeout=20)
        assert linked.get(timeout=20)["args"] == {"list": [seen(third.name)]}


def test_instances_that_callbacks_would_not_load_are_refused(
    orm_client: Flask,
) -> None:
    with orm_client.app_context():
        item = Item(name=unique("errback"))
        saved(item)
        # A task of another service, which this process does not know.
        foreign = signature("billing.charge", args=(item,), immutable=True)
        with pytest.raises(
            ValueError,
            match=r"Task 'billing\.charge', in the chain of task"
            r" 'ormtasks\.same', .* not a ContextTask",
        ):
            chain(ormtasks.same.si(1), foreign).apply_async()
        errback = ormtasks.describe.si(item)
        with pytest.raises(
            ValueError,
            match=r"The error callback 'ormtasks\.describe' of task 'ormtasks\.same'"
            r".* pass ids",
        ):
            ormtasks.same.apply_async([1], link_error=errback)


def test_the_body_of_a_chord_gets_its_instances(orm_client: Flask) -> None:
    with orm_client.app_context():
        first, second, third = (Item(name=unique(n)) for n in ("a", "b", "c"))
        saved(first, second, third)
        header = [ormtasks.describe.si(first), ormtasks.describe.si(second)]
        result = chord(header)(ormtasks.describe.s(kept=third))
        described = result.get(timeout=20)
        assert described["kwargs"] == {"kept": seen(third.name)}


# The mappings of real applications.


def eager_graph() -> list[t.Any]:
    """Saved instances of the mappings a worker must load, each with a related
    row in each of its eagerly loaded collections."""
    forum = ormtasks.Forum(
        name=unique("forum"),
        moderators=[ormtasks.Moderator(name="m1"), ormtasks.Moderator(name="m2")],
        topics=[ormtasks.Topic(name="t1")],
        tags=[ormtasks.Tag(name="g1")],
    )
    order = ormtasks.Order(
        region="eu",
        number=int(time.time() * 1000) % 1_000_000_000,
        name=unique("order"),
        lines=[ormtasks.OrderLine(name="l1"), ormtasks.OrderLine(name="l2")],
    )
    report = ormtasks.Report(
        name=unique("report"), pages=3, notes=[ormtasks.Note(name="n1")]
    )
    dog = ormtasks.Dog(name=unique("dog"), toys=[ormtasks.Toy(name="ball")])
    saved(forum, order, report, dog)
    return [forum, order, report, dog]


def related_seen(forum: t.Any, order: t.Any, report: t.Any, dog: t.Any) -> list[t.Any]:
    def one(model: str, name: str, **related: list[str]) -> dict[str, t.Any]:
        return {"model": model, "name": name, "attached": True, "related": related}

    return [
        one("Forum", forum.name, moderators=["m1", "m2"], topics=["t1"], tags=["g1"]),
        one("Order", order.name, lines=["l1", "l2"]),
        one("Report", report.name, notes=["n1"]),
        one("Dog", dog.name, toys=["ball"]),
    ]


def test_eager_loaded_collections_inheritance_and_keys(orm_client: Flask) -> None:
    """Joined, selectin and subquery collections, joined-table and
    single-table subclasses, composite and UUID keys: a worker loads each
    instance as its own class, with its collections."""
    with orm_client.app_context():
        graph = eager_graph()
        result = ormtasks.related.delay(*graph)
        assert result.get(timeout=20) == related_seen(*graph)
        report, dog = graph[2:]
        sent = ormtasks.describe.delay(report, dog).get(timeout=20)
    assert sent["argsrepr"] == f"(Report({report.id!r}), Dog({dog.id}))"


def test_a_relationships_collection_is_an_argument(orm_client: Flask) -> None:
    """A collection of a relationship (SQLAlchemy's ``InstrumentedList``, a
    subclass of ``list``) travels as a list of references, sent at once or on
    commit; so do the instances in a ``namedtuple``."""
    with orm_client.app_context():
        forum, order, _, dog = eager_graph()
        moderators = forum.moderators
        assert type(moderators) is not list
        described = ormtasks.describe.delay(moderators, lines=order.lines).get(
            timeout=20
        )
        assert described["args"] == {
            "list": [{"list": [moderator("m1"), moderator("m2")]}]
        }
        assert described["kwargs"] == {"lines": {"list": [line("l1"), line("l2")]}}
        assert described["argsrepr"].startswith("([Moderator(")

        dog.name = unique("renamed")
        result = ormtasks.related.delay_on_commit(*dog.toys, Named(dog, 1))
        db.session.commit()
        toys, named = result.get(timeout=20)
        assert toys["name"] == "ball"
        assert named["list"][0]["name"] == dog.name


class Named(t.NamedTuple):
    animal: t.Any
    rank: int


def moderator(name: str) -> dict[str, t.Any]:
    return {"model": "Moderator", "name": name, "attached": True}


def line(name: str) -> dict[str, t.Any]:
    return {"model": "OrderLine", "name": name, "attached": True}
