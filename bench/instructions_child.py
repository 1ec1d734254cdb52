"""One variant's side of the instruction count, run under callgrind.

Started by ``instructions.py`` as ``instructions_child.py VARIANT N1 N2``,
under ``valgrind --tool=callgrind --dump-before=getloadavg``: every call of
:func:`mark` (``os.getloadavg()``, which nothing else here calls) makes
callgrind write the instructions counted since the previous one, and start
again from zero. For each cell, it runs the cell's call ``N1`` times between
two marks, then ``N2`` times between two more: the runner divides the
difference of the two counts by ``N2 - N1``, so that the start-up and the
marks themselves cancel out.

The cells, in order, each a task run in two ways:

- ``hot``: the tracer a worker builds for each task once
  (``celery.app.trace.build_tracer``, as the prefork pool's
  ``process_initializer`` does) and calls for every message, with the
  request a worker gives it;
- ``apply``: ``task.apply()``, which builds a tracer for each call.

And the tasks: ``noop`` does nothing; ``query`` runs one ``SELECT`` through
the variant's session, in a SQLite file.
"""

from __future__ import annotations

import gc
import importlib
import os
import socket
import sys
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).with_name("variants")))

from _common import NOOP
from _common import QUERY

#: The cells, in the order they are measured.
CELLS = ("hot-noop", "hot-query", "apply-noop", "apply-query")


def mark() -> None:
    """Make callgrind dump its counts (``--dump-before=getloadavg``)."""
    os.getloadavg()


def load(variant: str) -> t.Any:
    """The variant's Celery app, ready as a worker process is."""
    module = importlib.import_module(variant)
    if variant == "ctx":
        # The other variants make their app when imported, as their
        # documentation shows; FlaskCelery's is made by the app factory.
        module.create_app()
    return module.celery_app


def build_tracers(celery_app: t.Any, hostname: str) -> None:
    """Give every task the tracer a prefork worker process gives it."""
    from celery.app import trace

    celery_app.set_current()
    celery_app.set_default()
    celery_app.finalize()
    for name, task in celery_app.tasks.items():
        task.__trace__ = trace.build_tracer(
            name, task, celery_app.loader, hostname, app=celery_app
        )


def request_of(task_name: str, task_id: str, hostname: str) -> dict[str, t.Any]:
    """The request a worker passes to the tracer for a message."""
    return {
        "lang": "py",
        "task": task_name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "gen1@bench",
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "bench"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": task_id,
        },
        "reply_to": "",
        "correlation_id": task_id,
        "hostname": hostname,
        "delivery_info": {
            "exchange": "",
            "routing_key": "bench",
            "priority": 0,
            "redelivered": False,
        },
        "args": [],
        "kwargs": {},
        "is_eager": False,
        "callbacks": None,
        "errbacks": None,
        "chain": None,
        "chord": None,
    }


def hot_path(task: t.Any, hostname: str) -> t.Callable[[int], None]:
    """``n`` messages of ``task`` traced as a worker traces them."""
    template = request_of(task.name, "", hostname)

    def run(n: int) -> None:
        trace = task.__trace__
        for i in range(n):
            task_id = f"00000000-0000-0000-0000-{i:012d}"
            request = template.copy()
            request["id"] = request["root_id"] = task_id
            args: list[t.Any] = []
            kwargs: dict[str, t.Any] = {}
            request["args"], request["kwargs"] = args, kwargs
            retval, info, _, _ = trace(task_id, args, kwargs, request)
            if info is not None:
                raise SystemExit(f"{task.name} failed: {retval!r}")

    return run


def applied(task: t.Any) -> t.Callable[[int], None]:
    """``n`` calls of ``task.apply()``."""

    def run(n: int) -> None:
        apply = task.apply
        for _ in range(n):
            apply()

    return run


def main() -> None:
    variant, n1, n2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    celery_app = load(variant)
    hostname = f"bench@{socket.gethostname()}"
    build_tracers(celery_app, hostname)
    tasks = {"noop": celery_app.tasks[NOOP], "query": celery_app.tasks[QUERY]}
    runs = {}
    for name, task in tasks.items():
        result = task.apply()
        expected = "first" if name == "query" else None
        if result.state != "SUCCESS" or result.result != expected:
            raise SystemExit(f"{variant} {name}: {result.state} {result.result!r}")
        runs[f"hot-{name}"] = hot_path(task, hostname)
        runs[f"apply-{name}"] = applied(task)
    for cell in CELLS:
        runs[cell](20)  # warm up: caches, lazy imports, compiled statements
    gc.collect()
    gc.freeze()
    for cell in CELLS:
        run = runs[cell]
        run(5)
        gc.collect()
        mark()
        run(n1)
        gc.collect()
        mark()
        run(n2)
        gc.collect()
        mark()


if __name__ == "__main__":
    main()
