"""One variant's side of the in-process benchmark, in a process of its own.

Started by ``run.py`` with the variant's module name as argument. It reads
commands from stdin, one a line: ``noop N`` or ``query N`` runs ``apply()`` of
that task ``N`` times and prints the microseconds per call; ``quit`` ends it.
No context is active between calls: each variant pushes and pops whatever it
pushes for every call.
"""

from __future__ import annotations

import gc
import importlib
import sys
import time
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).with_name("variants")))

from _common import NOOP
from _common import QUERY


def load(variant: str) -> dict[str, t.Any]:
    module = importlib.import_module(variant)
    if variant == "ctx":
        # The other variants make their app when imported, as their
        # documentation shows; FlaskCelery's is made by the app factory.
        module.create_app()
    celery_app = module.celery_app
    return {"noop": celery_app.tasks[NOOP], "query": celery_app.tasks[QUERY]}


def per_call(task: t.Any, n: int) -> float:
    """Microseconds per ``task.apply()``, over ``n`` calls."""
    apply = task.apply
    gc.collect()
    start = time.perf_counter()
    for _ in range(n):
        apply()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    tasks = load(sys.argv[1])
    for name, task in tasks.items():
        result = task.apply()
        if result.state != "SUCCESS":
            raise SystemExit(f"{sys.argv[1]} {name}: {result.state} {result.result!r}")
        if name == "query" and result.result != "first":
            raise SystemExit(f"{sys.argv[1]} query returned {result.result!r}")
        per_call(task, 200)  # warm up
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, count = line.strip().partition(" ")
        if command == "quit":
            break
        print(f"{per_call(tasks[command], int(count)):.3f}", flush=True)


if __name__ == "__main__":
    main()
