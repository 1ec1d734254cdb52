"""What a view pays to send on commit: a request that commits one row and
sends K tasks, with ``delay_on_commit`` (through the outbox) against the
same K tasks sent with ``delay()`` after the commit; K = 1, 10 and 100, in
one run, PostgreSQL and Redis.

Each request goes through Flask's test client to a view of a
Flask-SQLAlchemy app that adds an order, and sends K tasks whose arguments
are the order (a model instance, sent as a signed reference) and a number,
with a value of ``g`` carried (``carry_g``). The tasks go to a Redis queue
no worker reads, emptied between samples. A round measures, for each K,
both variants in turn, the first alternating from one round to the next;
a sample is the median of N requests. The ratio is taken between the two
samples of the same round, and its median over the rounds reported.

The statements each request sends are counted on the request's thread (the
request path), and apart those that other threads of the process send
meanwhile (off the request path), by SQLAlchemy's ``before_cursor_execute``
and ``commit`` events: a ``COMMIT`` counts as a statement.

With ``--instructions``, it counts instead, with valgrind's callgrind, the
instructions the process spends per request, which the load of a shared
machine does not move: the process runs under ``valgrind --tool=callgrind
--dump-before=getloadavg``, and each call of ``os.getloadavg()`` ends a
count. The rows of the published sends, which a thread deletes in the
background, are deleted apart after each cell's requests, and counted
apart (off the request path). Waits for the database and Redis count
nothing.

Nothing here asserts a time; the table goes to ``results/send-on-commit.md``
and ``.json`` (``send-on-commit-LABEL.*`` with ``--label``).

    python bench/send_on_commit.py [--rounds N] [--instructions]
        [--postgres-url URL] [--redis-url URL] [--label NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
import uuid
from pathlib import Path

import redis
import sqlalchemy as sa
from flask import Flask
from flask import g
from flask import request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy import orm

from flask_celery_ctx import FlaskCelery

ROOT = Path(__file__).resolve().parent.parent
COUNTS = (1, 10, 100)
#: Requests per sample, for each K: about a third of a second each.
REQUESTS = {1: 100, 10: 40, 100: 8}
#: Requests per count of instructions, for each K.
COUNTED = {1: 20, 10: 6, 100: 2}
VARIANTS = ("delay", "on_commit")
RUN = uuid.uuid4().hex[:8]


class Base(orm.DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "fccb_send_order"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]


ext = FlaskCelery(carry_g=["request_id"])


@ext.celery.task
def process(order: Order, number: int) -> None:
    """Never run: no worker reads the queue."""


class Statements:
    """Counts the statements of the request's thread, and of the others."""

    def __init__(self) -> None:
        self.request_thread = threading.get_ident()
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def listen(self, engine: sa.Engine) -> None:
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._commit)

    def _statement(self, conn: t.Any, cursor: t.Any, statement: str, *_: t.Any) -> None:
        self._count(statement.split(None, 1)[0].upper())

    def _commit(self, conn: t.Any) -> None:
        self._count("COMMIT")

    def _count(self, kind: str) -> None:
        where = "request" if threading.get_ident() == self.request_thread else "off"
        with self.lock:
            self.counts[f"{where} {kind}"] += 1

    def take(self) -> collections.Counter[str]:
        with self.lock:
            found, self.counts = self.counts, collections.Counter()
        return found


def create_app(postgres_url: str, redis_url: str, queue: str) -> Flask:
    app = Flask("send_on_commit")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=postgres_url,
        SECRET_KEY="bench",
        CELERY_BROKER_URL=redis_url,
        CELERY_TASK_DEFAULT_QUEUE=queue,
        CELERY_TASK_IGNORE_RESULT=True,
        # No relay here: nothing publishes a row but the view's process.
        CELERY_OUTBOX_RELAY_INTERVAL=0,
    )
    ext.init_app(app)
    db = SQLAlchemy(app, model_class=Base)

    @app.post("/<variant>")
    def send(variant: str) -> str:
        count = int(request.args["k"])
        g.request_id = "r-1"
        order = Order(name="order")
        db.session.add(order)
        if variant == "on_commit":
            for number in range(count):
                process.delay_on_commit(order, number)
            db.session.commit()
        else:
            db.session.commit()
            for number in range(count):
                process.delay(order, number)
        return "ok"

    with app.app_context():
        Base.metadata.drop_all(db.engine)
        Base.metadata.create_all(db.engine)
    return app


def sample(client: t.Any, variant: str, count: int) -> list[float]:
    times = []
    for _ in range(REQUESTS[count]):
        started = time.perf_counter()
        response = client.post(f"/{variant}?k={count}")
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "FCC_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1/test"
        ),
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("FCC_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )
    parser.add_argument("--label", default="", help="a name for this run")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions with callgrind instead of timing",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    logging.getLogger("flask_celery_ctx").setLevel(logging.ERROR)
    if args.instructions:
        instructions(args)
        return
    queue = f"fccb-{RUN}-send"
    app = create_app(args.postgres_url, args.redis_url, queue)
    if args.child:
        child(app, args.redis_url, queue)
        return
    broker = redis.Redis.from_url(args.redis_url)
    statements = Statements()
    with app.app_context():
        statements.listen(ext.session.get_bind())  # type: ignore[attr-defined]
    client = app.test_client()
    for variant in VARIANTS:  # imports, connections, the outbox table
        sample(client, variant, 1)
    time.sleep(0.5)
    broker.delete(queue)
    statements.take()

    times: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    ratios: dict[int, list[float]] = collections.defaultdict(list)
    counted: dict[tuple[str, int], collections.Counter[str]] = {}
    try:
        for round_ in range(args.rounds):
            for count in COUNTS:
                order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
                medians = {}
                for variant in order:
                    found = sample(client, variant, count)
                    medians[variant] = statistics.median(found)
                    times[variant, count].append(medians[variant])
                    # Off the request path too: what the process sent before
                    # the next sample (a batch deleted in the background).
                    time.sleep(0.3)
                    taken = statements.take()
                    if round_ == 0:
                        counted[variant, count] = collections.Counter(
                            {k: v / REQUESTS[count] for k, v in taken.items()}
                        )
                    broker.delete(queue)
                ratios[count].append(medians["on_commit"] / medians["delay"])
            print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
    finally:
        broker.delete(queue)

    rows = []
    for count in COUNTS:
        row: dict[str, t.Any] = {"k": count}
        for variant in VARIANTS:
            found = sorted(times[variant, count])
            row[f"{variant}_ms"] = round(statistics.median(found) * 1000, 2)
            quartiles = statistics.quantiles(found, n=4)
            row[f"{variant}_iqr_ms"] = [round(q * 1000, 2) for q in quartiles[::2]]
            row[f"{variant}_statements"] = dict(sorted(counted[variant, count].items()))
        row["ratio"] = round(statistics.median(ratios[count]), 3)
        quartiles = statistics.quantiles(ratios[count], n=4)
        row["ratio_iqr"] = [round(q, 3) for q in quartiles[::2]]
        rows.append(row)
    result = {
        "label": args.label,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": args.rounds,
        "requests": REQUESTS,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores,"
        f" load {os.getloadavg()[0]:.2f}",
        "python": platform.python_version(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "send-on-commit" + (f"-{args.label}" if args.label else "")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = table(result)
    (args.out / f"{name}.md").write_text(markdown)
    print(markdown)


def child(app: Flask, redis_url: str, queue: str) -> None:
    """Under callgrind: for each K and variant, ``COUNTED[K]`` requests
    between two marks, then the deletion of their rows, off the request
    path, between two more."""
    try:
        from flask_celery_ctx.outbox import cleanup
    except ImportError:
        cleanup = None  # a version that deletes the rows in the request
    else:
        # Never during the requests: deleted apart, below, all at once.
        cleanup.GATHER = 3600
    client = app.test_client()
    broker = redis.Redis.from_url(redis_url)
    for variant in VARIANTS:  # imports, connections, the outbox table
        for count in COUNTS:
            client.post(f"/{variant}?k={count}")
    if cleanup is not None:
        cleanup.flush()
    broker.delete(queue)
    os.getloadavg()  # a dump: the start-up
    for count in COUNTS:
        for variant in VARIANTS:
            for _ in range(COUNTED[count]):
                assert client.post(f"/{variant}?k={count}").status_code == 200
            os.getloadavg()  # a dump: the requests
            if cleanup is not None:
                cleanup.flush()
            os.getloadavg()  # a dump: their rows deleted
            broker.delete(queue)
            os.getloadavg()  # a dump: the queue emptied


def instructions(args: argparse.Namespace) -> None:
    """Run :func:`child` under callgrind; write the instructions per request."""
    with tempfile.TemporaryDirectory(prefix="fccb-send-") as tmp:
        out = Path(tmp) / "cg"
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "--dump-before=getloadavg",
            sys.executable,
            __file__,
            "--child",
            "--postgres-url",
            args.postgres_url,
            "--redis-url",
            args.redis_url,
        ]
        subprocess.run(command, check=True, capture_output=True)
        files = sorted(out.parent.glob("cg.*"), key=lambda p: int(p.suffix.lstrip(".")))
        counts = []
        for path in files:
            for line in path.read_text().splitlines():
                if line.startswith("totals:"):
                    counts.append(int(line.split()[1]))
                    break
    # Dump 1 is the start-up; then, per cell, its requests, the deletion of
    # their rows, and the queue emptied.
    cells = [(count, variant) for count in COUNTS for variant in VARIANTS]
    per_request = {
        cell: (
            counts[1 + 3 * i] / COUNTED[cell[0]],
            counts[2 + 3 * i] / COUNTED[cell[0]],
        )
        for i, cell in enumerate(cells)
    }
    lines = [
        "Instructions per request (callgrind): on the request's path, and off"
        " it (the rows of the published sends deleted apart, those of a cell's"
        " requests in one go).",
        "",
        "| K | delay() after the commit | delay_on_commit, request path |"
        " ratio | extra per send | delay_on_commit, off the path |",
        "|---|---|---|---|---|---|",
    ]
    rows = []
    for count in COUNTS:
        delay = per_request[count, "delay"][0]
        on_commit, off = per_request[count, "on_commit"]
        rows.append(
            {"k": count, "delay": delay, "on_commit": on_commit, "off_path": off}
        )
        lines.append(
            f"| {count} | {delay:,.0f} | {on_commit:,.0f} | {on_commit / delay:.3f}"
            f" | {(on_commit - delay) / count:,.0f} | {off:,.0f} |"
        )
    name = "send-on-commit-instructions" + (f"-{args.label}" if args.label else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def statements_text(counts: dict[str, float], where: str) -> str:
    found = {k.split(" ", 1)[1]: v for k, v in counts.items() if k.startswith(where)}
    total = sum(found.values())
    parts = ", ".join(f"{v:g} {k}" for k, v in found.items())
    return f"{total:g} ({parts})" if found else "0"


def table(result: dict[str, t.Any]) -> str:
    lines = [
        f"{result['date']}, {result['rounds']} rounds, {result['machine']},"
        f" Python {result['python']}. Median per request of the per-round"
        " medians, [q1-q3].",
        "",
        "| K | delay() after the commit (ms) | delay_on_commit (ms) | ratio |"
        " statements per request: delay() | delay_on_commit, request path |"
        " delay_on_commit, off it |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        d, o = row["delay_statements"], row["on_commit_statements"]
        lines.append(
            f"| {row['k']} | {row['delay_ms']} [{'-'.join(map(str, row['delay_iqr_ms']))}]"
            f" | {row['on_commit_ms']} [{'-'.join(map(str, row['on_commit_iqr_ms']))}]"
            f" | {row['ratio']:.2f} [{'-'.join(f'{r:.2f}' for r in row['ratio_iqr'])}]"
            f" | {statements_text(d, 'request')}"
            f" | {statements_text(o, 'request')}"
            f" | {statements_text(o, 'off')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
