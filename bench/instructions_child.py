"""One variant's side of the instruction count, run under callgrind.

Started by ``instructions.py`` as ``instructions_child.py VARIANT N1 N2``,
under ``valgrind --tool=callgrind --dump-before=getloadavg``: every call of
:func:`mark` (``os.getloadavg()``, which nothing else here calls) makes
callgrind write the instructions counted since the previous one, and start
again from zero. For each cell, it runs the cell's call ``N1`` times between
two marks, then ``N2`` times between two more: the runner divides the
difference of the two counts by ``N2 - N1``, so that the start-up and the
marks themselves cancel out.

The cells, each a task run in two ways:

- ``apply``: ``task.apply()``, which builds a tracer for each call, in a
  process that is not a worker (a web process, a test): measured first;
- ``hot``: the tracer a worker builds for each task once and calls for
  every message, with the request a worker gives it, once the process is
  set up as a worker's pool process sets itself up (:func:`as_worker`):
  measured second.

A worker patches Celery's ``Task.__call__`` when it starts
(``setup_worker_optimizations``), and a task class whose ``__call__``
calls ``super().__call__`` gets the worker's protected call, which runs the
task's ``run`` alone; without it, Celery's ``Task.__call__`` pushes a whole
request and task stack that a worker never pushes. The patch is for the
whole process, so the ``apply`` cells are measured before it.

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
from celery import Task

#: The cells, in the order they are reported.
CELLS = ("hot-noop", "hot-query", "apply-noop", "apply-query")
#: The cells, in the order they are measured: ``apply`` before the process
#: is set up as a worker, ``hot`` after.
ORDER = ("apply-noop", "apply-query", "hot-noop", "hot-query")


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


def as_worker(celery_app: t.Any, hostname: str) -> None:
    """Set the process up as a worker's pool process is, and give every task
    the tracer such a process gives it.

    The worker's main process calls ``loader.init_worker()`` and
    ``setup_worker_optimizations()`` before it starts its pool
    (``celery.apps.worker``), and a prefork child inherits both; then the
    child's ``process_initializer`` (``celery.concurrency.prefork``) makes
    the app current and default, finalizes it, sends
    ``worker_process_init`` and builds a tracer for each task.
    """
    from celery import signals
    from celery.app import trace

    celery_app.loader.init_worker()
    trace.setup_worker_optimizations(celery_app, hostname)
    celery_app.loader.init_worker_process()
    celery_app.set_current()
    celery_app.set_default()
    celery_app.finalize()
    signals.worker_process_init.send(sender=None)
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


def measure(runs: dict[str, t.Callable[[int], None]], n1: int, n2: int) -> None:
    """Warm the cells of ``runs`` up, then count ``n1`` and ``n2`` calls of
    each, in order, between marks."""
    for run in runs.values():
        run(20)  # warm up: caches, lazy imports, compiled statements
    gc.collect()
    gc.freeze()
    for run in runs.values():
        run(5)
        gc.collect()
        mark()
        run(n1)
        gc.collect()
        mark()
        run(n2)
        gc.collect()
        mark()


def main() -> None:
    variant, n1, n2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    celery_app = load(variant)
    hostname = f"bench@{socket.gethostname()}"
    tasks = {"noop": celery_app.tasks[NOOP], "query": celery_app.tasks[QUERY]}
    expected = {"noop": None, "query": "first"}
    for name, task in tasks.items():
        result = task.apply()
        if result.state != "SUCCESS" or result.result != expected[name]:
            raise SystemExit(f"{variant} {name}: {result.state} {result.result!r}")
    # As a web process or a test calls apply(), before any worker set-up.
    measure({f"apply-{n}": applied(task) for n, task in tasks.items()}, n1, n2)
    as_worker(celery_app, hostname)
    if not getattr(Task, "_stackprotected", False):
        raise SystemExit("Celery's worker optimizations are not in place")
    measure({f"hot-{n}": hot_path(task, hostname) for n, task in tasks.items()}, n1, n2)


if __name__ == "__main__":
    main()
