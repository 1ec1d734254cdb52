"""Parts 3 and 4 of the benchmark, in a Flask-Celery-Ctx process of their own.

``python model_args.py on_commit|instances ROUNDS CALLS`` prints JSON for
``report.py``: ``{"available": false, "reason": ...}`` when the installed
Flask-Celery-Ctx lacks the feature, else the note, the columns and the rows
of a table, each cell the samples of a round-robin.

3. ``on_commit``: the cost of sending a task on commit. Each call adds a row
   and commits in the app context's ``db.session``, and sends a task to Redis
   (a queue no worker reads): with ``delay_on_commit()`` before the commit
   (through the outbox, and with ``CELERY_OUTBOX = False``), or with
   ``delay()`` after it; another row commits without sending.
4. ``instances``: a task receiving 100 model instances, against receiving
   their ids and loading them in the task, with one ``IN`` query or with
   ``session.get()`` each. The task runs with ``apply()`` and no context
   active, as in a worker: a fresh context and session per call. Its
   arguments come from a message the task sent to Redis.
"""

from __future__ import annotations

import base64
import gc
import json
import sys
import time
import typing as t
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).with_name("variants")))

import redis
from _common import settings
from _common import TRIVIAL
from _fsqla import db
from _fsqla import Row
from flask import Flask
from sqlalchemy import event
from sqlalchemy import select

INSTANCES = 100


def unavailable(part: str) -> str | None:
    """Why a part cannot run with this Flask-Celery-Ctx, or ``None``."""
    from flask_celery_ctx import ContextTask

    if part == "on_commit" and not hasattr(ContextTask, "delay_on_commit"):
        return "this version of Flask-Celery-Ctx has no delay_on_commit()"
    if part == "instances" and not hasattr(ContextTask, "load_instances"):
        return "this version of Flask-Celery-Ctx does not take model instances as arguments"
    return None


def timed(fn: Callable[[], object], calls: int) -> float:
    """Microseconds per call of ``fn``."""
    gc.collect()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def round_robin(
    cases: dict[str, Callable[[], float]], rounds: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            samples[name].append(cases[name]())
    return samples


def on_commit(app: Flask, rounds: int, calls: int) -> dict[str, t.Any]:
    import ctx

    task = ctx.celery_app.tasks[TRIVIAL]
    queue = settings()["queue"]
    client = redis.Redis.from_url(settings()["redis_url"])

    def add() -> None:
        db.session.add(Row(name="on-commit"))

    def commit_only() -> None:
        add()
        db.session.commit()

    def delay_after_commit() -> None:
        add()
        db.session.commit()
        task.delay("unused", 0)

    def delay_on_commit() -> None:
        add()
        task.delay_on_commit("unused", 0)
        db.session.commit()

    def without_outbox(fn: Callable[[], None]) -> Callable[[], None]:
        """``fn`` with ``CELERY_OUTBOX = False``: sent after the commit, as
        before the outbox, without its INSERT and DELETE."""

        def run() -> None:
            conf.outbox = False
            reread()
            try:
                fn()
            finally:
                conf.outbox = True
                reread()

        return run

    conf = ctx.celery_app.conf
    has_outbox = _has_outbox()

    def reread() -> None:
        # The outbox settings are read once; a version without that has no
        # forget().
        from flask_celery_ctx import outbox

        getattr(outbox, "forget", lambda celery: None)(ctx.celery_app)

    def case(fn: Callable[[], None]) -> Callable[[], float]:
        def run() -> float:
            try:
                return timed(fn, calls)
            finally:
                client.delete(queue)

        return run

    cases = {
        "commit": commit_only,
        "delay": delay_after_commit,
        "on_commit": delay_on_commit,
    }
    if has_outbox:
        cases["no_outbox"] = without_outbox(delay_on_commit)
    with app.app_context():
        for fn in cases.values():
            fn()  # warm up: connections, the producer pool, the outbox table
        samples = round_robin({k: case(fn) for k, fn in cases.items()}, rounds)
        sent = client.llen(queue)
    client.delete(queue)
    base = samples["delay"]
    labels = {
        "commit": "add a row, commit (no task sent)",
        "delay": "add a row, commit, then task.delay()",
        "on_commit": "add a row, task.delay_on_commit(), commit"
        + (" (outbox: INSERT, publish, DELETE)" if has_outbox else ""),
        "no_outbox": "the same with CELERY_OUTBOX = False (publish only)",
    }
    return {
        "note": (
            "Microseconds per call in an app context (lower is better): add a"
            " row and commit in PostgreSQL, and send a task to Redis."
            f" {calls} calls per sample, {rounds} samples per row, round-robin."
            " Median [interquartile range]; the ratio is to ``delay()`` after"
            f" the commit in the same round. ({sent} messages left unread.)"
        ),
        "columns": [
            {"key": "us", "title": "µs per call", "digits": 0},
            {"key": "ratio", "title": "ratio to delay() after commit", "digits": 3},
        ],
        "rows": [
            {
                "label": labels[name],
                "us": samples[name],
                "ratio": [a / b for a, b in zip(samples[name], base, strict=True)],
            }
            for name in samples
        ],
    }


def _has_outbox() -> bool:
    try:
        import flask_celery_ctx.outbox  # noqa: F401
    except ImportError:
        return False
    return True


def message_body(client: redis.Redis, queue: str) -> bytes:
    """The body of the message waiting in ``queue``: the JSON of its
    arguments."""
    raw = client.rpop(queue)
    assert isinstance(raw, bytes), "no message in the queue"
    return base64.b64decode(json.loads(raw)["body"])


def decoded_args(body: bytes) -> list[t.Any]:
    """The positional arguments in a message body, decoded afresh for each
    run as a worker does: loading replaces references in place."""
    args: list[t.Any] = json.loads(body)[0]
    return args


def instances(app: Flask, rounds: int, calls: int) -> dict[str, t.Any]:
    import ctx

    client = redis.Redis.from_url(settings()["redis_url"])
    queue = f"{settings()['queue']}-{uuid.uuid4().hex[:6]}"
    tasks = {
        "rows": ctx.celery_app.tasks["bench.rows"],
        "in": ctx.celery_app.tasks["bench.row_ids_in"],
        "get": ctx.celery_app.tasks["bench.row_ids_get"],
    }
    with app.app_context():
        db.session.add_all(Row(name=f"instance {i}") for i in range(INSTANCES))
        db.session.commit()
        loaded = db.session.scalars(
            select(Row).order_by(Row.id.desc()).limit(INSTANCES)
        ).all()
        ids = [row.id for row in loaded]
        engine = db.engine
        # What the worker gets: the arguments as the messages carry them.
        tasks["rows"].apply_async(args=[loaded], queue=queue)
        references = message_body(client, queue)
        tasks["in"].apply_async(args=[ids], queue=queue)
        sent_ids = message_body(client, queue)

        def send(name: str, value: t.Any) -> Callable[[], float]:
            def run() -> float:
                try:
                    return timed(
                        lambda: tasks[name].apply_async(args=[value], queue=queue),
                        calls,
                    )
                finally:
                    client.delete(queue)

            return run

        sending = round_robin(
            {"rows": send("rows", loaded), "in": send("in", ids)}, rounds
        )
        db.session.remove()

    queries = 0

    def count(*args: t.Any) -> None:
        nonlocal queries
        queries += 1

    arguments = {"rows": references, "in": sent_ids, "get": sent_ids}
    counts: dict[str, int] = {}
    event.listen(engine, "before_cursor_execute", count)
    for name, task in tasks.items():
        queries = 0
        result = task.apply(args=decoded_args(arguments[name]))
        if result.state != "SUCCESS":
            raise RuntimeError(f"{name}: {result.state} {result.result!r}")
        counts[name] = queries
    event.remove(engine, "before_cursor_execute", count)

    def run(name: str) -> Callable[[], float]:
        return lambda: timed(
            lambda: tasks[name].apply(args=decoded_args(arguments[name])),
            max(1, calls // 10),
        )

    running = round_robin({name: run(name) for name in tasks}, rounds)
    goal_met = counts["rows"] == 1
    return {
        "note": (
            f"A task receiving {INSTANCES} rows of one model, from PostgreSQL:"
            " microseconds per call (lower is better) to send it to Redis"
            " (``apply_async()``, instances made into references, or ids), and"
            " to run it with ``apply()`` in a fresh context and session per"
            " call, as a worker does, with the arguments decoded from the"
            " message's JSON;"
            " and the queries one run issues."
            f" {rounds} samples per row, round-robin; median [interquartile"
            " range]."
        ),
        "columns": [
            {"key": "send", "title": "send, µs", "digits": 0},
            {"key": "run", "title": "run, µs", "digits": 0},
            {"key": "queries", "title": "queries per run"},
        ],
        "rows": [
            {
                "label": f"{INSTANCES} instances, loaded by Flask-Celery-Ctx",
                "send": sending["rows"],
                "run": running["rows"],
                "queries": counts["rows"],
            },
            {
                "label": f"{INSTANCES} ids, one IN query in the task",
                "send": sending["in"],
                "run": running["in"],
                "queries": counts["in"],
            },
            {
                "label": f"{INSTANCES} ids, session.get() each in the task",
                "send": sending["in"],
                "run": running["get"],
                "queries": counts["get"],
            },
        ],
        "goal": (
            f"{INSTANCES} model instances load in {counts['rows']} query"
            f"{'' if counts['rows'] == 1 else 'ies'} (goal: one per model):"
            f" {'met' if goal_met else 'NOT met'}."
        ),
    }


def main() -> None:
    part, rounds, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    reason = unavailable(part)
    if reason is not None:
        print(json.dumps({"available": False, "reason": reason}))
        return
    import ctx

    app = ctx.create_app()
    measure = {"on_commit": on_commit, "instances": instances}[part]
    print(json.dumps({"available": True, **measure(app, rounds, calls)}))


if __name__ == "__main__":
    main()
