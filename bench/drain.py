"""Draining a backlog: how fast the outbox relay publishes the rows an
outage left behind, against a plain loop of ``apply_async`` publishing as
many tasks to the same broker, the most this machine publishes.

The outbox is filled as ``delay_on_commit`` fills it while the broker is
down: ``tests/outboxapp.py``'s ``note`` task, sent on commit in
transactions of 1,000 sends on PostgreSQL, with the broker refusing
connections; the rows are then made available at once, as after their
lease. Then, in processes of their own, started together:

- ``relay 1`` and ``relay 2``: one or two relays (what a worker's relay
  thread and ``flask celery outbox relay`` run,
  :func:`flask_celery_ctx.outbox.relay.relay`), until the outbox is empty;
  two relays pass each other's rows by with ``FOR UPDATE SKIP LOCKED``;
- ``plain 1`` and ``plain 2``: one or two processes of a plain Celery app
  (no Flask) calling ``apply_async`` for as many tasks, split between them.

The rate is the number of tasks over the time from the first process's
start to the last one's end. The broker is a private ``redis-server`` on a
free port (``--broker amqp://...`` for another one; its queue is deleted at
the end), emptied after each sample; nothing consumes the tasks. The cases
take turns in each round, and the median over the rounds is reported. The
result is ``results/drain.md``, ``.json``, ``.rst`` and ``.png``.

    python bench/drain.py [--rows N] [--rounds R] [--postgres-url URL]
                          [--broker URL]

It needs ``redis-server`` (or the broker given) and PostgreSQL; it creates
a database of its own and drops it at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import typing as t
import uuid
from datetime import datetime
from datetime import timezone
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCH))

from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy import func  # noqa: E402
from sqlalchemy import select  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy import update  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

CASES = ("plain 1", "relay 1", "plain 2", "relay 2")
#: The sends of one filling transaction.
PER_COMMIT = 1000
DOWN = {
    "CELERY_BROKER_URL": "redis://127.0.0.1:9/0",
    "CELERY_TASK_PUBLISH_RETRY": False,
    "CELERY_BROKER_TRANSPORT_OPTIONS": {"max_retries": 0},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def app_config(database_url: str, broker_url: str, queue: str) -> dict[str, t.Any]:
    return {
        "SQLALCHEMY_DATABASE_URI": database_url,
        "SECRET_KEY": "bench",
        "CELERY_BROKER_URL": broker_url,
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "CELERY_TASK_IGNORE_RESULT": True,
        # No relay thread: the relays here are the processes measured.
        "CELERY_OUTBOX_RELAY_INTERVAL": 0,
    }


def fill(settings: dict[str, t.Any]) -> dict[str, t.Any]:
    """Write ``rows`` sends of ``note`` to the outbox, as ``delay_on_commit``
    does with the broker down, and make them available at once."""
    import outboxapp
    from flask_celery_ctx.outbox import table as outbox

    logging.getLogger("flask_celery_ctx").setLevel(logging.ERROR)
    database_url, rows = settings["database_url"], settings["rows"]
    app = outboxapp.create_app(app_config(database_url, "", settings["queue"]) | DOWN)
    with app.app_context():
        session = outboxapp.ext.session
        for start in range(0, rows, PER_COMMIT):
            session.execute(text("SELECT 1"))  # in a transaction
            for i in range(start, min(rows, start + PER_COMMIT)):
                outboxapp.note.delay_on_commit(i)
            session.commit()
    engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(update(outbox.table).values(available=0))
        found = conn.scalar(select(func.count()).select_from(outbox.table))
        conn.execute(text(f"VACUUM ANALYZE {outbox.TABLE_NAME}"))
    engine.dispose()
    if found != rows:
        raise RuntimeError(f"the outbox holds {found} rows, not {rows}")
    return {"rows": found}


# In the processes measured -------------------------------------------------


def child_relay(settings: dict[str, t.Any]) -> dict[str, t.Any]:
    """One relay, run until the outbox is empty."""
    import outboxapp
    from flask_celery_ctx.outbox.relay import relay
    from flask_celery_ctx.outbox.relay import write_engines

    logging.getLogger("flask_celery_ctx").setLevel(logging.ERROR)
    outboxapp.create_app(
        app_config(settings["database_url"], settings["broker_url"], settings["queue"])
    )
    ext = outboxapp.ext
    (engine,) = write_engines(ext)
    with engine.connect():
        pass  # the pool's first connection, made before the start
    started, cpu = wait_for_start(settings), time.process_time()
    sent = relay(engine, ext.celery)
    cpu = time.process_time() - cpu
    return {"started": started, "ended": time.time(), "sent": sent, "cpu": cpu}


def child_plain(settings: dict[str, t.Any]) -> dict[str, t.Any]:
    """A plain Celery app publishing ``count`` tasks of the same name and
    arguments with ``apply_async``."""
    from celery import Celery

    celery = Celery("plain", broker=settings["broker_url"])
    celery.conf.update(task_default_queue=settings["queue"], task_ignore_result=True)

    @celery.task(name="outboxapp.note")
    def note(number: int) -> int:
        return number

    with celery.connection_for_write() as conn:
        conn.ensure_connection()  # connected before the start
    note.apply_async((-1,))
    started, cpu = wait_for_start(settings), time.process_time()
    first = settings["first"]
    for i in range(first, first + settings["count"]):
        note.apply_async((i,))
    cpu = time.process_time() - cpu
    return {
        "started": started,
        "ended": time.time(),
        "sent": settings["count"] + 1,
        "cpu": cpu,
    }


def wait_for_start(settings: dict[str, t.Any]) -> float:
    """Say ready, wait for the parent's go, return the time."""
    print("ready", flush=True)
    sys.stdin.readline()
    return time.time()


# The parent --------------------------------------------------------------


def run_case(
    case: str, processes: int, rows: int, settings: dict[str, t.Any]
) -> dict[str, t.Any]:
    """Start ``processes`` children of ``case`` together; the rate."""
    kind = case.split()[0]
    children = []
    share = rows // processes
    for n in range(processes):
        own = {**settings, "first": n * share, "count": share}
        children.append(
            subprocess.Popen(
                [sys.executable, __file__, "--child", kind, json.dumps(own)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for child in children:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{case}: a child did not start")
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    results = []
    for child in children:
        out, _ = child.communicate(timeout=3600)
        if child.returncode != 0:
            raise RuntimeError(f"{case}: a child failed")
        results.append(json.loads(out.strip().splitlines()[-1]))
    sent = sum(r["sent"] for r in results)
    if kind == "plain":
        sent -= processes  # the warm-up sends
    seconds = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return {
        "case": case,
        "sent": sent,
        "seconds": seconds,
        "rate": sent / seconds,
        "per_process": [r["sent"] for r in results],
        # CPU seconds of the processes measured, per thousand tasks.
        "cpu_ms_per_task": sum(r["cpu"] for r in results) / sent * 1000,
    }


def queue_length(broker_url: str, queue: str) -> int:
    from kombu import Connection

    with Connection(broker_url) as conn:
        channel = conn.channel()
        _, count, _ = channel.queue_declare(queue, passive=True)
        return int(count)


def purge(broker_url: str, queue: str, delete: bool = False) -> None:
    from kombu import Connection

    with Connection(broker_url) as conn:
        channel = conn.channel()
        try:
            channel.queue_purge(queue)
            if delete:
                channel.queue_delete(queue)
        except Exception:
            if not delete:
                raise


def measure(
    args: argparse.Namespace, database_url: str, broker_url: str
) -> list[dict[str, t.Any]]:
    queue = f"fccb-drain-{uuid.uuid4().hex[:8]}"
    settings = {"database_url": database_url, "broker_url": broker_url, "queue": queue}
    samples: list[dict[str, t.Any]] = []
    try:
        for round_ in range(args.rounds):
            # A different case first in each round.
            order = CASES[round_ % len(CASES) :] + CASES[: round_ % len(CASES)]
            for case in order:
                if case.startswith("relay"):
                    log(f"round {round_ + 1}: filling the outbox with {args.rows} rows")
                    own = {**settings, "rows": args.rows}
                    subprocess.run(
                        [sys.executable, __file__, "--child", "fill", json.dumps(own)],
                        check=True,
                        stdout=subprocess.DEVNULL,
                    )
                processes = int(case.split()[1])
                sample = run_case(case, processes, args.rows, settings)
                queued = queue_length(broker_url, queue)
                expected = args.rows + (processes if case.startswith("plain") else 0)
                if queued != expected:
                    raise RuntimeError(
                        f"{case}: {queued} messages queued, not {expected}"
                    )
                purge(broker_url, queue)
                sample["round"] = round_
                samples.append(sample)
                log(
                    f"round {round_ + 1}, {case}: {sample['rate']:.0f} tasks/s"
                    f" ({sample['seconds']:.1f} s, {sample['per_process']},"
                    f" {sample['cpu_ms_per_task']:.3f} ms CPU per task)"
                )
    finally:
        purge(broker_url, queue, delete=True)
    return samples


def summarize(samples: list[dict[str, t.Any]]) -> dict[str, t.Any]:
    rates = {c: [s["rate"] for s in samples if s["case"] == c] for c in CASES}
    by_round: dict[int, dict[str, float]] = {}
    for s in samples:
        by_round.setdefault(s["round"], {})[s["case"]] = s["rate"]
    ratios = {
        "relay 1 / plain 1": [r["relay 1"] / r["plain 1"] for r in by_round.values()],
        "relay 2 / plain 2": [r["relay 2"] / r["plain 2"] for r in by_round.values()],
        "relay 2 / relay 1": [r["relay 2"] / r["relay 1"] for r in by_round.values()],
        "plain 2 / plain 1": [r["plain 2"] / r["plain 1"] for r in by_round.values()],
    }
    cpu = {c: [s["cpu_ms_per_task"] for s in samples if s["case"] == c] for c in CASES}
    return {
        "rates": {c: spread(v) for c, v in rates.items()},
        "ratios": {k: spread(v) for k, v in ratios.items()},
        "cpu_ms_per_task": {c: spread(v) for c, v in cpu.items()},
    }


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


NAMES = {
    "plain 1": "plain `apply_async` loop, 1 process",
    "relay 1": "outbox relay, 1 process",
    "plain 2": "plain `apply_async` loop, 2 processes",
    "relay 2": "outbox relay, 2 processes",
}


def table_lines(results: dict[str, t.Any], rst: bool) -> list[str]:
    lines = []
    for broker in results["brokers"]:
        summary = broker["summary"]
        cpu = summary["cpu_ms_per_task"]
        rows = [
            (
                NAMES[c],
                f"{r['median']:,.0f} [{r['min']:,.0f}-{r['max']:,.0f}]",
                f"{cpu[c]['median']:.3f}",
            )
            for c, r in summary["rates"].items()
        ]
        rows += [
            (k, f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]", "")
            for k, r in summary["ratios"].items()
        ]
        head = (
            f"{broker['name']}, {results['meta']['rows']:,} tasks",
            "tasks per second",
            "CPU ms per task",
        )
        if rst:
            lines += [".. list-table::", "   :header-rows: 1", ""]
            for row in [head, *rows]:
                cells = [c.replace("`", "``") for c in row]
                lines += [f"   * - {cells[0]}", *(f"     - {c}" for c in cells[1:])]
            lines.append("")
        else:
            lines += ["| " + " | ".join(head) + " |", "|---|---:|---:|"]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
    return lines


def goal(results: dict[str, t.Any]) -> str:
    parts = []
    for broker in results["brokers"]:
        ratios = broker["summary"]["ratios"]
        one = ratios["relay 1 / plain 1"]["median"]
        two = ratios["relay 2 / relay 1"]["median"]
        met = "met" if one >= 0.8 else "not met"
        parts.append(
            f"{broker['name']}: one relay drains at {one:.2f} of the plain publish"
            f" rate (goal 0.8: {met}); two relays at {two:.2f} times one relay's rate."
        )
    return " ".join(parts)


def footer(results: dict[str, t.Any], rst: bool = False) -> str:
    meta = results["meta"]
    quote = "``" if rst else "`"
    return (
        f"Median over {meta['rounds']} rounds [min-max]; each ratio taken within a"
        " round; CPU: the median of the publishing processes' CPU time per task."
        f" Commit {meta['commit']}, {meta['date']},"
        f" {quote}{meta['command']}{quote}."
        f" {meta['cpu']}, {meta['cores']} cores, load {meta['load_before']} before,"
        f" {meta['load_after']} after. Python {meta['python']}, "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f", PostgreSQL {meta['postgres']}."
    )


def plot(results: dict[str, t.Any], path: Path) -> None:
    from report import _figure
    from report import _save

    fig, ax = _figure()
    brokers = results["brokers"]
    width = 0.8 / len(CASES)
    colors = {
        "plain 1": "#bbbbbb",
        "relay 1": "#1f77b4",
        "plain 2": "#777777",
        "relay 2": "#0b3d6b",
    }
    for j, case in enumerate(CASES):
        rates = [b["summary"]["rates"][case] for b in brokers]
        ax.bar(
            [i + (j - 1.5) * width for i in range(len(brokers))],
            [r["median"] for r in rates],
            width,
            yerr=[
                [r["median"] - r["min"] for r in rates],
                [r["max"] - r["median"] for r in rates],
            ],
            capsize=3,
            color=colors[case],
            label=NAMES[case].replace("`", ""),
        )
    ax.set_xticks(range(len(brokers)), [b["name"] for b in brokers])
    ax.set_ylabel("tasks published per second")
    ax.set_title(f"Draining {results['meta']['rows']:,} outbox rows (higher is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    highest = max(r["max"] for b in brokers for r in b["summary"]["rates"].values())
    ax.set_ylim(0, highest * 1.45)  # room for the legend
    ax.legend(loc="upper left", fontsize=9, ncol=2)
    meta = results["meta"]
    _save(
        fig,
        path,
        f"Median over {meta['rounds']} rounds, bars: min to max."
        f" Commit {meta['commit']}, {meta['date']}.",
    )


def write(results: dict[str, t.Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "drain.json").write_text(json.dumps(results, indent=2) + "\n")
    md = "\n".join(
        ["# Draining the outbox", "", *table_lines(results, False), goal(results),
         "", footer(results), ""]
    )  # fmt: skip
    (out / "drain.md").write_text(md)
    rst = "\n".join(
        [*table_lines(results, True), goal(results), "", footer(results, True), ""]
    )
    (out / "drain.rst").write_text(rst)
    plot(results, out / "drain.png")
    return md


def meta(args: argparse.Namespace, database_url: str, load: str) -> dict[str, t.Any]:
    from run import git

    engine = create_engine(database_url)
    with engine.connect() as conn:
        postgres = conn.scalar(text("SHOW server_version"))
    engine.dispose()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "commit": git("describe", "--always", "--dirty"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python bench/drain.py", *sys.argv[1:]]),
        "rows": args.rows,
        "rounds": args.rounds,
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_before": load,
        "load_after": "",
        "postgres": postgres,
        "versions": {
            name: version(name)
            for name in ("celery", "kombu", "redis", "SQLAlchemy", "psycopg")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "FCC_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1/test"
        ),
    )
    parser.add_argument(
        "--broker",
        action="append",
        help="a broker URL to measure (repeatable); a private redis-server if none",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--report", action="store_true", help="write the results again from drain.json"
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        results = json.loads((args.out / "drain.json").read_text())
        for broker in results["brokers"]:
            broker["summary"] = summarize(broker["samples"])
        print(write(results, args.out))
        return
    if args.child:
        kind, settings = args.child
        run = {"relay": child_relay, "plain": child_plain, "fill": fill}[kind]
        print(json.dumps(run(json.loads(settings))), flush=True)
        return
    from outage import free_port
    from outage import redis_server

    import outboxapp

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    server = None
    brokers = args.broker or []
    if not brokers:
        port = free_port()
        server = redis_server(port)
        brokers = [f"redis://127.0.0.1:{port}/0"]
    name = f"fccb_drain_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    database_url = make_url(args.postgres_url).set(database=name)
    database_url = database_url.render_as_string(hide_password=False)
    try:
        engine = create_engine(database_url)
        outboxapp.Base.metadata.create_all(engine)
        with engine.begin() as conn:
            # As run.py's database: commits wait for no disk.
            conn.execute(text(f"ALTER DATABASE {name} SET synchronous_commit TO off"))
        engine.dispose()
        results: dict[str, t.Any] = {
            "meta": meta(args, database_url, load),
            "brokers": [],
        }
        for broker_url in brokers:
            label = "Redis" if broker_url.startswith("redis") else "RabbitMQ"
            log(f"{label}: {args.rounds} rounds of {', '.join(CASES)}")
            samples = measure(args, database_url, broker_url)
            results["brokers"].append(
                {"name": label, "samples": samples, "summary": summarize(samples)}
            )
    finally:
        if server is not None:
            server.terminate()
            server.wait(20)
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
    results["meta"]["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(write(results, args.out))


if __name__ == "__main__":
    main()
