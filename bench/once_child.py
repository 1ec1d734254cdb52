"""The child of ``once.py``, run under callgrind: what ``once=True`` adds
to a task that writes a row, on the worker's hot path.

Started as ``once_child.py N1 N2`` (under ``valgrind --tool=callgrind
--dump-before=getloadavg``), or as ``once_child.py statements`` without
valgrind, which prints the statements of one task of each kind as JSON.

Two tasks of the ``ctx`` variant (Flask-Celery-Ctx, Flask-SQLAlchemy, a
SQLite file), each traced as a worker traces it, every message with a new
task id:

- ``write``: adds a row and commits, as a task without the option does;
- ``write_once``: declared with ``once=True``, adds a row; the library
  looks for the record of its id, inserts it and commits.
"""

from __future__ import annotations

import gc
import json
import re
import socket
import sys
import typing as t
from itertools import count
from pathlib import Path

sys.path.insert(0, str(Path(__file__).with_name("variants")))
sys.path.insert(0, str(Path(__file__).parent))

import ctx
from _fsqla import db
from _fsqla import Row
from instructions_child import build_tracers
from instructions_child import mark
from instructions_child import request_of

#: The cells, in the order they are measured.
CELLS = ("write", "write_once")

_ids = count()


@ctx.celery_app.task(name="bench.write")
def write() -> None:
    db.session.add(Row(name="written"))
    db.session.commit()


@ctx.celery_app.task(name="bench.write_once", once=True)
def write_once() -> None:
    db.session.add(Row(name="written"))


def hot_path(task: t.Any, hostname: str) -> t.Callable[[int], None]:
    """``n`` messages of ``task``, each with an id never used before, traced
    as a worker traces them."""
    template = request_of(task.name, "", hostname)

    def run(n: int) -> None:
        trace = task.__trace__
        for _ in range(n):
            task_id = f"00000000-0000-0000-0000-{next(_ids):012d}"
            request = template.copy()
            request["id"] = request["root_id"] = task_id
            args: list[t.Any] = []
            kwargs: dict[str, t.Any] = {}
            request["args"], request["kwargs"] = args, kwargs
            retval, info, _, _ = trace(task_id, args, kwargs, request)
            if info is not None:
                raise SystemExit(f"{task.name} failed: {retval!r}")

    return run


def statements(runs: dict[str, t.Callable[[int], None]]) -> dict[str, list[str]]:
    """The statements one task of each kind sends, ``COMMIT`` included."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    seen: list[str] = []

    def on_execute(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        # "SELECT flask_celery_once", "INSERT bench_row": the verb, the table.
        table = re.search(r"\b(?:FROM|INTO|UPDATE)\s+(\w+)", statement)
        seen.append(f"{statement.split()[0]} {table[1] if table else ''}".strip())

    def on_commit(conn: t.Any) -> None:
        seen.append("COMMIT")

    event.listen(Engine, "before_cursor_execute", on_execute)
    event.listen(Engine, "commit", on_commit)
    found = {}
    for cell in CELLS:
        seen.clear()
        runs[cell](1)
        found[cell] = list(seen)
    return found


def main() -> None:
    ctx.create_app()
    celery_app = ctx.celery_app
    hostname = f"bench@{socket.gethostname()}"
    build_tracers(celery_app, hostname)
    runs = {
        name: hot_path(celery_app.tasks[f"bench.{name}"], hostname) for name in CELLS
    }
    for cell in CELLS:
        runs[cell](20)  # warm up: the table created, statements compiled
    if sys.argv[1] == "statements":
        print(json.dumps(statements(runs)))
        return
    n1, n2 = int(sys.argv[1]), int(sys.argv[2])
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
