"""The cost of each variant per task, in instructions counted by callgrind.

Run from the repository root::

    python bench/instructions.py              # about 3 minutes
    python bench/instructions.py --layouts 5  # more memory layouts

Wall-clock time on a shared machine varies by several percent from one
sample to the next; the instructions a process executes, as valgrind's
callgrind counts them, vary by a fraction of a percent. Each variant's
``instructions_child.py`` runs under callgrind, which writes its counts at
every mark the child makes; per task, a cell costs the difference between
``N2`` and ``N1`` calls, divided by ``N2 - N1``: the start-up cancels out.
Counts depend on where things land in memory and on the probes of
string-keyed dicts (string hashes, the size of the environment, the length
of the database file's path: the SELECT cells move by tens of thousands of
instructions with them), so every variant runs in several layouts, each with
its own ``PYTHONHASHSEED``, environment size and database path, and the mean
is reported with the spread.

It needs no server: the query task reads a SQLite file. valgrind is installed
with apt-get when missing and possible; otherwise the run stops and says
why. It writes ``instructions.json``, ``instructions.md`` and
``instructions.rst`` to ``bench/results`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from datetime import timezone
from importlib.metadata import version
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH / "variants"))
sys.path.insert(0, str(BENCH))

from _common import TABLE  # noqa: E402
from instructions_child import CELLS  # noqa: E402
from instructions_child import ORDER  # noqa: E402
from instructions_profile import profile  # noqa: E402
from instructions_profile import write_profile  # noqa: E402
from instructions_report import write_instructions  # noqa: E402
from instructions_report import write_worker  # noqa: E402
from instructions_worker import worker_per_task  # noqa: E402
from run import extract  # noqa: E402
from run import git  # noqa: E402
from run import VARIANTS  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy import insert  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class CannotRun(Exception):
    """The benchmark cannot run here; the message says why and what to do."""


def valgrind() -> str:
    """The path of valgrind, installed with apt-get when it is missing."""
    found = shutil.which("valgrind")
    if found is None and shutil.which("apt-get") is not None:
        log("valgrind is missing: installing it with apt-get")
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-yq", "valgrind"],
        ):
            done = subprocess.run([*sudo, *command], env=env, capture_output=True)
            if done.returncode != 0:
                break
        found = shutil.which("valgrind")
    if found is None:
        raise CannotRun(
            "valgrind is not installed and could not be installed with apt-get"
            " (it needs root, or sudo without a password). Install it"
            " (apt-get install valgrind, dnf install valgrind, brew does not"
            " have it on macOS: use Linux), then run this again."
        )
    check = subprocess.run(
        [found, "--tool=callgrind", "--callgrind-out-file=/dev/null", "true"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise CannotRun(f"valgrind does not run here: {check.stderr.strip()[-500:]}")
    return found


def prepare_database(directory: Path) -> str:
    """A SQLite file with the row the query task reads, in ``directory``;
    its URL."""
    directory.mkdir(exist_ok=True)
    url = f"sqlite:///{directory / 'bench.sqlite'}"
    engine = create_engine(url)
    TABLE.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(TABLE).values(name="first"))  # id 1
    engine.dispose()
    return url


def layout_env(layout: int) -> dict[str, str]:
    """The environment of a memory layout."""
    return {
        "PYTHONHASHSEED": str(layout),
        # Moves the stack, and what is allocated after the environment.
        "FCC_BENCH_PAD": "x" * (layout * 1237 % 4096),
    }


@contextmanager
def workspace(working_tree: bool) -> t.Iterator[tuple[Path, dict[str, str], str]]:
    """The directory a run works in, the environment of its children and the
    commit measured.

    Both are the same from one run to the next: the paths in them (the
    package's, the databases') and the environment's size are part of the
    memory layout, so a run repeats the counts of an earlier one with the
    same code, and two commits compare layout by layout. The package is
    copied into the directory, from ``HEAD`` or from the working tree, so
    that its path does not depend on which. One run at a time: a run
    removes what an earlier one left there.
    """
    directory = Path(os.environ.get("TMPDIR", "/tmp")) / "fccb-instructions"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    try:
        package = directory / "src"
        package.mkdir()
        if working_tree:
            commit = git("describe", "--always", "--dirty")
            shutil.copytree(
                BENCH.parent / "flask_celery_ctx",
                package / "flask_celery_ctx",
                ignore=shutil.ignore_patterns("__pycache__"),
            )
        else:
            commit = git("rev-parse", "--short", "HEAD")
            extract(commit, package)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/"),
            "PYTHONPATH": os.pathsep.join([str(BENCH / "variants"), str(package)]),
        }
        yield directory, env, commit
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def layout_database(layout: int, directory: Path) -> dict[str, str]:
    """The database of a memory layout, made in ``directory``: the length
    of its path moves the SELECT cells by tens of thousands of instructions,
    as much as the hash seed does."""
    url = prepare_database(directory / f"layout-{layout}{'-' * (layout * 7 % 32)}")
    return {"FCC_BENCH": json.dumps({"database_url": url})}


def run_child(
    tool: str,
    variant: str,
    layout: int,
    n1: int,
    n2: int,
    env: dict[str, str],
    directory: Path,
) -> dict[str, float]:
    """Run a variant's child under callgrind in one memory layout; return
    the instructions per call of each cell."""
    out = directory / f"{variant}-{layout}.cg"
    layout_env_ = {**env, **layout_env(layout)}
    command = [
        tool,
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        "--dump-before=getloadavg",
        sys.executable,
        str(BENCH / "instructions_child.py"),
        variant,
        str(n1),
        str(n2),
    ]
    done = subprocess.run(command, env=layout_env_, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{variant} (layout {layout}) failed:\n{done.stderr[-3000:]}"
        )
    counts = dumps(out)
    # Dump 1 is the start-up; then, per cell, N1 calls, N2 calls, and the
    # warm-up of the next cell.
    per_call = {}
    for i, cell in enumerate(ORDER):
        first, second = counts[1 + 3 * i], counts[2 + 3 * i]
        per_call[cell] = (second - first) / (n2 - n1)
    return per_call


def dumps(out: Path) -> list[int]:
    """The instruction counts of callgrind's dumps, in order."""
    files = sorted(
        out.parent.glob(f"{out.name}.*"), key=lambda p: int(p.suffix.lstrip("."))
    )
    counts = []
    for path in files:
        for line in path.read_text().splitlines():
            if line.startswith("totals:"):
                counts.append(int(line.split()[1]))
                break
        path.unlink()
    out.unlink(missing_ok=True)
    return counts


def measure(args: argparse.Namespace) -> dict[str, t.Any]:
    tool = valgrind()
    with workspace(args.working_tree) as (directory, env, commit):
        databases = [
            layout_database(layout, directory) for layout in range(args.layouts)
        ]
        jobs = [
            (variant, layout) for layout in range(args.layouts) for variant in VARIANTS
        ]
        log(
            f"{len(jobs)} runs under callgrind, {args.jobs} at a time,"
            f" {args.n1} and {args.n2} calls per cell"
        )
        samples: dict[str, dict[str, list[float]]] = {
            v: {c: [0.0] * args.layouts for c in CELLS} for v in VARIANTS
        }

        def one(job: tuple[str, int]) -> None:
            variant, layout = job
            per_call = run_child(
                tool,
                variant,
                layout,
                args.n1,
                args.n2,
                {**env, **databases[layout]},
                directory,
            )
            for cell, value in per_call.items():
                samples[variant][cell][layout] = value
            log(f"{variant} layout {layout}: done")

        with ThreadPoolExecutor(args.jobs) as pool:
            for _ in pool.map(one, jobs):
                pass
        profiles = None
        if args.profile:
            log(f"profile by Python function, with {args.profile} -X perf")
            profiles = {
                variant: profile(
                    tool,
                    args.profile,
                    variant,
                    args.n1,
                    args.n2,
                    {**env, **databases[0], "PYTHONHASHSEED": "0"},
                    directory,
                )
                for variant in ("flasktask", "ctx")
            }
    return {"samples": samples, "commit": commit, "profiles": profiles}


def measure_workers(args: argparse.Namespace) -> dict[str, t.Any]:
    """Per variant, a real worker's instructions per no-op task, through
    Redis (``instructions_worker.py``)."""
    tool = valgrind()
    with workspace(args.working_tree) as (directory, env, commit):
        jobs = [(v, layout) for layout in range(args.layouts) for v in VARIANTS]
        log(f"{len(jobs)} workers under callgrind, {args.jobs} at a time")
        per_task = {v: [0.0] * args.layouts for v in VARIANTS}

        def one(job: tuple[str, int]) -> None:
            variant, layout = job
            per_task[variant][layout] = worker_per_task(
                tool,
                variant,
                args.n1,
                args.n2,
                {**env, **layout_env(layout)},
                directory,
                args.redis_url,
            )
            log(f"{variant} worker, layout {layout}: done")

        with ThreadPoolExecutor(args.jobs) as pool:
            for _ in pool.map(one, jobs):
                pass
    return {"per_task": per_task, "commit": commit, "profiles": None}


def meta(args: argparse.Namespace, commit: str) -> dict[str, t.Any]:
    return {
        "commit": commit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python bench/instructions.py", *args.argv]),
        "python": platform.python_version(),
        "valgrind": subprocess.run(
            ["valgrind", "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "versions": {
            name: version(name)
            for name in ("celery", "kombu", "Flask", "SQLAlchemy", "Flask-SQLAlchemy")
        },
        "layouts": args.layouts,
        "calls": [args.n1, args.n2],
    }


def parse_args(argv: t.Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", type=int, default=3, help="memory layouts")
    parser.add_argument("--n1", type=int, default=20, help="calls, first count")
    parser.add_argument("--n2", type=int, default=80, help="calls, second count")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time"
    )
    parser.add_argument(
        "--working-tree",
        action="store_true",
        help="measure flask_celery_ctx as in the working tree, not as committed",
    )
    parser.add_argument(
        "--profile",
        metavar="PYTHON",
        help="also profile FlaskTask and Flask-Celery-Ctx by Python function, with"
        " this interpreter (3.12 or later, with bench/requirements.txt and the"
        " package installed)",
    )
    parser.add_argument(
        "--worker",
        action="store_true",
        help="measure instead a real worker of each variant, end to end through"
        " Redis (--redis-url)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("FCC_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.n2 <= args.n1:
        parser.error("--n2 must be larger than --n1")
    return args


def main(argv: t.Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    # Real workers (--worker), or the hot path and apply(): what is measured,
    # which samples are kept, the file they go to, and how they are shown.
    run, key, name, write = (
        (measure_workers, "per_task", "instructions-worker.json", write_worker)
        if args.worker
        else (measure, "samples", "instructions.json", write_instructions)
    )
    try:
        measured = run(args)
    except CannotRun as exc:
        log(f"cannot run the instruction count: {exc}")
        raise SystemExit(2) from None
    results = {
        key: measured[key],
        "meta": {
            **meta(args, measured["commit"]),
            "seconds": round(time.monotonic() - started),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / name).write_text(json.dumps(results, indent=1) + "\n")
    print(write(results, args.out))
    if measured["profiles"] is not None:
        write_profile(measured["profiles"], results["meta"], args.out)
    log(f"done in {results['meta']['seconds']}s: {args.out}")


if __name__ == "__main__":
    main()
