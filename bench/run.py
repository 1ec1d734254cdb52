"""Benchmark Flask-Celery-Ctx against the alternatives, side by side.

Run from the repository root::

    python bench/run.py            # quick: a few minutes
    python bench/run.py --full     # longer runs, tighter spread

It needs Redis and PostgreSQL (``--redis-url``, ``--postgres-url``), creates a
database of its own and drops it at the end, and writes ``results.json``,
``results.md``, ``results.rst`` and ``results.png`` to ``bench/results``.
See ``bench/README.md`` for what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import typing as t
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from datetime import timezone
from importlib.metadata import version
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VARIANTS_DIR = BENCH / "variants"
sys.path.insert(0, str(VARIANTS_DIR))
sys.path.insert(0, str(BENCH))

import redis  # noqa: E402
from _common import INSERT  # noqa: E402
from _common import TABLE  # noqa: E402
from _common import TRIVIAL  # noqa: E402
from celery import Celery  # noqa: E402
from report import write_report  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy import insert  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

BIN = Path(sys.executable).parent
#: The variants, the floor first.
VARIANTS = ("plain", "flasktask", "celeryext", "ctx")
RUN = uuid.uuid4().hex[:8]
PREFIX = f"fccb-{RUN}"

MODES: dict[str, dict[str, int]] = {
    "smoke": {
        "inprocess_rounds": 2,
        "noop_calls": 200,
        "query_calls": 100,
        "e2e_rounds": 1,
        "trivial_tasks": 50,
        "insert_tasks": 50,
        "startup_rounds": 1,
        "extra_rounds": 2,
        "extra_calls": 20,
    },
    "quick": {
        "inprocess_rounds": 31,
        "noop_calls": 500,
        "query_calls": 200,
        "e2e_rounds": 9,
        "trivial_tasks": 300,
        "insert_tasks": 150,
        "startup_rounds": 3,
        "extra_rounds": 7,
        "extra_calls": 200,
    },
    "full": {
        "inprocess_rounds": 101,
        "noop_calls": 1000,
        "query_calls": 400,
        "e2e_rounds": 25,
        "trivial_tasks": 400,
        "insert_tasks": 200,
        "startup_rounds": 7,
        "extra_rounds": 21,
        "extra_calls": 500,
    },
}
PARTS = ("inprocess", "e2e", "startup", "on_commit", "instances")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rotated(items: t.Sequence[str], i: int) -> list[str]:
    """The items in round-robin order, starting one further each round."""
    i %= len(items)
    return [*items[i:], *items[:i]]


class Bench:
    """The services, the client and what the run has measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = MODES[mode_of(args)]
        self.redis = redis.Redis.from_url(args.redis_url)
        self.admin = create_engine(args.postgres_url, isolation_level="AUTOCOMMIT")
        self.db_name = f"fccb_{RUN}"
        self.database_url = self.admin.url.set(database=self.db_name).render_as_string(
            hide_password=False
        )
        self.engine: Engine = create_engine(self.database_url)
        self.client = Celery("bench-client")
        self.client.config_from_object(
            {
                "broker_url": args.redis_url,
                "task_ignore_result": True,
                "broker_connection_retry_on_startup": True,
            }
        )
        self.workers: list[Worker] = []
        self.package: Path | None = None
        self.commit = "unknown"
        #: Keep the workers' logs: set when the run fails.
        self.keep_logs = False

    def open(self) -> None:
        """Check the services, create the database and the snapshot."""
        self.redis.ping()
        with self.admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {self.db_name}"))
            # Commits do not wait for the disk: on a shared machine its
            # latency would drown the differences measured.
            conn.execute(
                text(f"ALTER DATABASE {self.db_name} SET synchronous_commit TO off")
            )
        self.prepare(self.engine)
        self.package, self.commit = snapshot(self.args.working_tree)

    @staticmethod
    def prepare(engine: Engine) -> None:
        """Create the table with the row the query task reads."""
        TABLE.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(insert(TABLE).values(name="first"))  # id 1
        engine.dispose()

    def env(self, queue: str, database_url: str | None = None) -> dict[str, str]:
        """The environment of a variant's process."""
        config = {
            "broker_url": self.args.redis_url,
            "redis_url": self.args.redis_url,
            "database_url": database_url or self.database_url,
            "queue": queue,
        }
        return {
            **os.environ,
            "FCC_BENCH": json.dumps(config),
            "PYTHONPATH": os.pathsep.join(
                str(p) for p in (VARIANTS_DIR, self.package) if p is not None
            ),
        }

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.engine.dispose()
        with self.admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)"))
        self.admin.dispose()
        for pattern in (f"{PREFIX}*", f"_kombu.binding*.{PREFIX}*"):
            for key in self.redis.scan_iter(pattern):
                self.redis.delete(key)
        self.client.close()
        if self.package is not None:
            shutil.rmtree(self.package, ignore_errors=True)

    # Sending ---------------------------------------------------------------

    def fill(self, queue: str, task: str, key: str, total: int) -> None:
        """Put ``total`` messages of ``task`` in ``queue``, not yet consumed."""
        with self.client.producer_or_acquire() as producer:
            for _ in range(total):
                self.client.send_task(
                    task, args=[key, total], queue=queue, producer=producer
                )

    def forget(self, queue: str) -> None:
        """Delete a queue that is done with, and its bindings."""
        self.redis.delete(
            queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"
        )

    def wait_done(self, key: str, timeout: float) -> tuple[float, float]:
        """Wait for the last task of a batch: the times the first and the
        last task finished, by the worker's clock."""
        deadline = time.monotonic() + timeout
        item = None
        while item is None:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tasks of {key} not done in {timeout}s:"
                    f" {int(self.redis.get(key) or 0)} done"
                )
            item = self.redis.blpop([f"{key}:done"], timeout=1)
        first = float(self.redis.get(f"{key}:first") or 0)
        self.redis.delete(key, f"{key}:first", f"{key}:done")
        return first, float(item[1])

    # 1. In-process ---------------------------------------------------------

    def inprocess(self) -> dict[str, t.Any]:
        """Microseconds per ``apply()``, each variant in a process of its own,
        round-robin."""
        sqlite_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{PREFIX}.sqlite"
        if self.args.inprocess_db == "sqlite":
            url = f"sqlite:///{sqlite_path}"
            self.prepare(create_engine(url))
        else:
            url = self.database_url
        children: dict[str, subprocess.Popen[str]] = {}
        try:
            for variant in VARIANTS:
                children[variant] = subprocess.Popen(
                    [sys.executable, str(BENCH / "inproc_child.py"), variant],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=self.env(f"{PREFIX}-unused", url),
                )
            for variant, child in children.items():
                assert child.stdout is not None
                line = child.stdout.readline().strip()
                if line != "ready":
                    raise RuntimeError(f"in-process {variant} did not start: {line!r}")
            samples: dict[str, dict[str, list[float]]] = {
                kind: {v: [] for v in VARIANTS} for kind in ("noop", "query")
            }
            calls = {
                "noop": self.mode["noop_calls"],
                "query": self.mode["query_calls"],
            }
            rounds = self.mode["inprocess_rounds"]
            for i in range(rounds):
                log(f"in-process round {i + 1}/{rounds}")
                for kind in ("noop", "query"):
                    for variant in rotated(VARIANTS, i):
                        child = children[variant]
                        assert child.stdin is not None and child.stdout is not None
                        child.stdin.write(f"{kind} {calls[kind]}\n")
                        child.stdin.flush()
                        samples[kind][variant].append(float(child.stdout.readline()))
        finally:
            for child in children.values():
                if child.stdin is not None:
                    child.stdin.close()
                child.wait(30)
            sqlite_path.unlink(missing_ok=True)
        return {"database": self.args.inprocess_db, "calls": calls, **samples}

    # 2. End-to-end ---------------------------------------------------------

    def e2e(self) -> dict[str, t.Any]:
        """Tasks per second through Redis with a real worker per variant."""
        results: dict[str, t.Any] = {
            "tasks": {
                "trivial": self.mode["trivial_tasks"],
                "insert": self.mode["insert_tasks"],
            }
        }
        for pool, concurrency in (("solo", 1), ("prefork", 2)):
            workers = {
                v: Worker(self, v, pool, concurrency, f"{PREFIX}-{v}-{pool}-idle")
                for v in VARIANTS
            }
            for worker in workers.values():
                worker.wait_ready()
            samples: dict[str, dict[str, list[float]]] = {
                kind: {v: [] for v in VARIANTS} for kind in ("trivial", "insert")
            }
            rounds = self.mode["e2e_rounds"]
            for i in range(rounds):
                log(f"end-to-end {pool} round {i + 1}/{rounds}")
                for kind, task in (("trivial", TRIVIAL), ("insert", INSERT)):
                    total = results["tasks"][kind]
                    for variant in rotated(VARIANTS, i):
                        log(f"  {variant} {kind}")
                        rate = self.e2e_round(workers[variant], task, total)
                        samples[kind][variant].append(rate)
            for worker in workers.values():
                worker.stop()
            results[pool] = {"concurrency": concurrency, **samples}
        with self.engine.connect() as conn:
            rows = conn.scalar(text("SELECT count(*) FROM bench_row"))
        expected = (
            1 + 2 * len(VARIANTS) * self.mode["e2e_rounds"] * self.mode["insert_tasks"]
        )
        if rows != expected:
            raise RuntimeError(f"{rows} rows in bench_row, expected {expected}")
        return results

    def e2e_round(self, worker: Worker, task: str, total: int) -> float:
        queue = f"{PREFIX}-{uuid.uuid4().hex[:8]}"
        key = f"{PREFIX}:{queue}"
        self.fill(queue, task, key, total)
        control = self.client.control
        control.add_consumer(queue, destination=[worker.hostname], reply=True)
        first, last = self.wait_done(key, timeout=max(30.0, total / 20))
        control.cancel_consumer(queue, destination=[worker.hostname], reply=True)
        self.forget(queue)
        # The first task's own time is not counted: from the end of the first
        # to the end of the last, total - 1 tasks were done.
        return (total - 1) / (last - first)

    # 5. Start-up -----------------------------------------------------------

    def startup(self) -> dict[str, t.Any]:
        """Seconds from starting a worker to its first task done."""
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        rounds = self.mode["startup_rounds"]
        for i in range(rounds):
            log(f"start-up round {i + 1}/{rounds}")
            for variant in rotated(VARIANTS, i):
                queue = f"{PREFIX}-start-{uuid.uuid4().hex[:8]}"
                key = f"{PREFIX}:{queue}"
                self.fill(queue, TRIVIAL, key, 1)
                start = time.time()
                worker = Worker(self, variant, "solo", 1, queue)
                _, last = self.wait_done(key, timeout=120)
                samples[variant].append(last - start)
                worker.stop()
                self.forget(queue)
        return samples

    # 3 and 4. What issue 4 adds --------------------------------------------

    def extra(self, part: str) -> dict[str, t.Any]:
        """Parts 3 and 4, measured by ``model_args.py`` in a Flask-Celery-Ctx
        process; "not available" when that lacks the feature."""
        command = [
            sys.executable,
            str(BENCH / "model_args.py"),
            part,
            str(self.mode["extra_rounds"]),
            str(self.mode["extra_calls"]),
        ]
        env = self.env(f"{PREFIX}-{part}")
        out = subprocess.run(
            command, env=env, check=True, stdout=subprocess.PIPE, text=True
        ).stdout
        result: dict[str, t.Any] = json.loads(out)
        return result

    # Machine and versions --------------------------------------------------

    def meta(self) -> dict[str, t.Any]:
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        packages = (
            "celery",
            "kombu",
            "Flask",
            "Flask-SQLAlchemy",
            "SQLAlchemy",
            "Flask-CeleryExt",
            "Flask-Celery-Ctx",
            "redis",
            "psycopg",
        )
        with self.admin.connect() as conn:
            postgres = conn.scalar(text("SHOW server_version"))
        info = t.cast(dict[str, t.Any], self.redis.info("server"))
        return {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": {name: version(name) for name in packages},
            "services": {
                "PostgreSQL": str(postgres),
                "Redis": str(info.get("redis_version")),
            },
            "commit": self.commit,
        }


def snapshot(working_tree: bool) -> tuple[Path | None, str]:
    """A directory holding ``flask_celery_ctx`` as committed (``HEAD``), for
    the variants' processes to import, and the commit; ``None`` to import it
    as installed, with the working tree's description."""
    if working_tree:
        return None, git("describe", "--always", "--dirty")
    commit = git("rev-parse", "--short", "HEAD")
    directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"{PREFIX}-src"
    directory.mkdir()
    extract(commit, directory)
    return directory, commit


def extract(commit: str, directory: Path) -> None:
    """Write ``flask_celery_ctx`` as of ``commit`` into ``directory``."""
    archive = subprocess.run(
        ["git", "archive", commit, "flask_celery_ctx"],
        cwd=BENCH.parent,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)


def git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=BENCH, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


class Worker:
    """A worker of one variant, started the way that variant's users start
    one, consuming ``queue``."""

    def __init__(
        self, bench: Bench, variant: str, pool: str, concurrency: int, queue: str
    ) -> None:
        self.bench = bench
        self.hostname = f"{variant}-{uuid.uuid4().hex[:6]}@bench"
        if variant == "ctx":
            base = [str(BIN / "flask"), "--app", "ctx:create_app", "celery"]
        else:
            base = [str(BIN / "celery"), "-A", f"{variant}:celery_app"]
        self.args = [
            *base, "worker",
            "--pool", pool, "--concurrency", str(concurrency),
            "--queues", queue, "--hostname", self.hostname,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
        self.log_path = log_dir / f"{PREFIX}-{self.hostname.split('@')[0]}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.args,
            cwd=VARIANTS_DIR,
            env=bench.env(queue),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        bench.workers.append(self)

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until the worker answers a ping."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker {self.args} exited:\n{self.log_path.read_text()}"
                )
            if self.bench.client.control.ping(destination=[self.hostname], timeout=0.5):
                return
        raise RuntimeError(f"worker {self.args} not ready in {timeout}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        if self.process.returncode not in (0, -signal.SIGTERM):
            log(f"worker {self.hostname} exited with {self.process.returncode}")
        elif not self.bench.keep_logs:
            self.log_path.unlink(missing_ok=True)


@contextmanager
def bench_session(args: argparse.Namespace) -> Iterator[Bench]:
    bench = Bench(args)
    try:
        bench.open()
        yield bench
    except BaseException:
        bench.keep_logs = True
        log(
            f"failed: the workers' logs are in {Path(os.environ.get('TMPDIR', '/tmp'))}"
        )
        raise
    finally:
        bench.close()


def mode_of(args: argparse.Namespace) -> str:
    return "full" if args.full else "smoke" if args.smoke else "quick"


def parse_args(argv: t.Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument(
        "--quick", action="store_true", help="short runs (the default): minutes"
    )
    speed.add_argument("--full", action="store_true", help="longer runs")
    speed.add_argument(
        "--smoke", action="store_true", help="seconds: checks the setup, no more"
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {', '.join(PARTS)}",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("FCC_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "FCC_BENCH_POSTGRES_URL",
            "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        ),
        help="a database to connect to; the benchmark creates one of its own",
    )
    parser.add_argument(
        "--inprocess-db",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="database of the in-process query task (default: a SQLite file)",
    )
    parser.add_argument(
        "--working-tree",
        action="store_true",
        help="benchmark flask_celery_ctx as it is in the working tree, not as"
        " committed (HEAD)",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    return args


def main(argv: t.Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    parts = args.only.split(",")
    started = time.monotonic()
    command = " ".join(["python bench/run.py", *(argv or sys.argv[1:])])
    results: dict[str, t.Any] = {}
    with bench_session(args) as bench:
        meta = bench.meta()
        meta.update(
            command=command,
            mode=mode_of(args),
            date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            load_before=os.getloadavg(),
        )
        log(f"{meta['cpu']}, {meta['cores']} cores, Python {meta['python']}")
        if "inprocess" in parts:
            results["inprocess"] = bench.inprocess()
        if "e2e" in parts:
            results["e2e"] = bench.e2e()
        if "startup" in parts:
            results["startup"] = bench.startup()
        for part in ("on_commit", "instances"):
            if part in parts:
                log(part)
                results[part] = bench.extra(part)
    meta.update(load_after=os.getloadavg(), seconds=round(time.monotonic() - started))
    results["meta"] = meta
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, args.out)
    log(f"done in {meta['seconds']}s: {args.out}")


if __name__ == "__main__":
    main()
