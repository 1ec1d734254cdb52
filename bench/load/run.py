"""Load: 20,000 tasks that each write a row, on the prefork pool.

Reports tasks per second, the peak RSS of each pool process after warm-up and
at the end, and the PostgreSQL connections the worker holds at the end (and
how many are idle in a transaction). Run from the repository root::

    python bench/load/run.py [--tasks 20000] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from datetime import timezone
from importlib.metadata import version
from pathlib import Path

import sqlalchemy as sa

HERE = Path(__file__).parent
FLASK = str(Path(sys.executable).with_name("flask"))


def rss_kib(pid: int) -> tuple[int, int]:
    """The current and peak resident set size of a process, in KiB."""
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return sorted(int(p) for p in path.read_text().split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "FCC_BENCH_POSTGRES_URL",
            "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        ),
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("FCC_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )
    parser.add_argument(
        "--output", type=Path, default=HERE.parent / "results" / "load.md"
    )
    args = parser.parse_args()

    run = uuid.uuid4().hex[:8]
    database = f"fcc_load_{run}"
    admin = sa.create_engine(args.postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {database}"))
    db_url = admin.url.set(database=database)
    application_name = f"fcc-load-{run}"
    config = {
        "CELERY_BROKER_URL": args.redis_url,
        "CELERY_TASK_DEFAULT_QUEUE": f"fcc-load-{run}",
        "CELERY_WORKER_PREFETCH_MULTIPLIER": 16,
        "SQLALCHEMY_DATABASE_URI": db_url.render_as_string(hide_password=False),
        "SQLALCHEMY_ENGINE_OPTIONS": {
            "connect_args": {"application_name": application_name}
        },
    }
    env = {**os.environ, "FCC_LOAD_CONFIG": json.dumps(config)}
    log = Path(f"/tmp/fcc-load-{run}.log")
    worker = subprocess.Popen(
        [FLASK, "--app", "loadapp:create_app", "celery", "worker", "--pool", "prefork",
         "--concurrency", str(args.concurrency), "--loglevel", "WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=HERE, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    sys.path.insert(0, str(HERE))
    # This process sends the tasks; its connections are not the worker's.
    client = {**config, "SQLALCHEMY_ENGINE_OPTIONS": {}}
    os.environ["FCC_LOAD_CONFIG"] = json.dumps(client)
    import loadapp

    app = loadapp.create_app()
    engine = sa.create_engine(db_url)

    def rows() -> int:
        with engine.connect() as conn:
            return conn.scalar(sa.text("SELECT count(*) FROM row")) or 0

    def wait_rows(n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while rows() < n:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker stopped or stalled:\n{log.read_text()}")
            time.sleep(0.2)

    try:
        warmup = 500
        for n in range(warmup):
            loadapp.write_row.delay(n)
        wait_rows(warmup, 120)
        pool = children(worker.pid)
        start_rss = {pid: rss_kib(pid) for pid in pool}

        started = time.monotonic()
        for n in range(args.tasks):
            loadapp.write_row.delay(n)
        wait_rows(warmup + args.tasks, 1800)
        elapsed = time.monotonic() - started
        end_rss = {pid: rss_kib(pid) for pid in children(worker.pid)}

        with admin.connect() as conn:
            states = conn.execute(
                sa.text(
                    "SELECT state, count(*) FROM pg_stat_activity WHERE datname = :db"
                    " AND application_name = :name GROUP BY state"
                ),
                {"db": database, "name": application_name},
            ).all()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        engine.dispose()
        with app.app_context():
            loadapp.db.engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        admin.dispose()

    connections = sum(count for _, count in states)
    idle_in_tx = sum(count for state, count in states if "transaction" in (state or ""))
    lines = [
        "# Load: prefork pool, one row written per task",
        "",
        f"`python bench/load/run.py --tasks {args.tasks} --concurrency {args.concurrency}`,"
        f" {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()},"
        f" {os.cpu_count()} cores, Python {platform.python_version()},"
        f" Celery {version('celery')}, Flask {version('flask')},"
        f" SQLAlchemy {version('sqlalchemy')}, Redis broker, PostgreSQL.",
        "",
        f"- Tasks: {args.tasks} in {elapsed:.1f} s: **{args.tasks / elapsed:.0f} tasks/s**"
        f" (after {warmup} warm-up tasks).",
        f"- PostgreSQL connections of the worker at the end: **{connections}**"
        f" (pool processes: {args.concurrency}, plus the parent's from the factory),"
        f" idle in transaction: **{idle_in_tx}**.",
        "",
        "| pool process | RSS after warm-up | RSS at the end | peak RSS after warm-up"
        " | peak RSS at the end |",
        "|---|---|---|---|---|",
    ]
    for pid in sorted(set(start_rss) | set(end_rss)):
        before = start_rss.get(pid, (0, 0))
        after = end_rss.get(pid, (0, 0))
        lines.append(
            f"| {pid} | {before[0] / 1024:.1f} MiB | {after[0] / 1024:.1f} MiB"
            f" | {before[1] / 1024:.1f} MiB | {after[1] / 1024:.1f} MiB |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
