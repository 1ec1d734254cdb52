"""What ``unique_for`` adds to a send and to a worker's run, in instructions
and in statements: the child that ``unique.py`` runs under callgrind.

Started as ``unique_child.py DATABASE_URL N1 N2`` under
``valgrind --tool=callgrind --dump-before=getloadavg``: each cell runs ``N1``
times between two marks, then ``N2`` times between two more (see
``instructions_child.py``). With ``--statements`` it runs each cell ten
times outside callgrind instead, and prints the statements each call
executes, as JSON.

The app: Flask-Celery-Ctx with Flask-SQLAlchemy on a SQLite file and the
in-memory broker of kombu (``memory://``), so that a send is measured
without a server. The cells:

- ``send``: ``apply_async((i,))``, no option;
- ``send-unique``: ``apply_async((i,), unique_for=3600)``, a key never
  sent before: the key claimed, then the publish;
- ``send-duplicate``: ``apply_async((0,), unique_for=3600)`` while another
  send holds the key: nothing published;
- ``worker``: the tracer a worker calls for a message of a no-op task;
- ``worker-unique``: the same message with a key in its headers: the key
  released when the task finishes.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from instructions_child import build_tracers
from instructions_child import mark
from instructions_child import request_of
from sqlalchemy import event
from sqlalchemy.engine import Engine

from flask_celery_ctx import FlaskCelery
from flask_celery_ctx import unique

CELLS = ("send", "send-unique", "send-duplicate", "worker", "worker-unique")

ext = FlaskCelery()
db = SQLAlchemy()


@ext.celery.task
def note(number: int) -> int:
    return number


def create_app(url: str) -> Flask:
    app = Flask("bench_unique")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url,
        SECRET_KEY="bench",
        CELERY_BROKER_URL="memory://",
        CELERY_TASK_IGNORE_RESULT=True,
    )
    db.init_app(app)
    ext.init_app(app)
    return app


def cells(app: Flask) -> dict[str, t.Callable[[int], None]]:
    task = ext.celery.tasks[note.name]
    hostname = f"bench@{socket.gethostname()}"
    build_tracers(ext.celery, hostname)
    counter = iter(range(1, 10**9))
    holder = task.apply_async((0,), unique_for=3600).id

    def send(n: int) -> None:
        for _ in range(n):
            task.apply_async((next(counter),))

    def send_unique(n: int) -> None:
        for _ in range(n):
            task.apply_async((next(counter),), unique_for=3600)

    def send_duplicate(n: int) -> None:
        for _ in range(n):
            if task.apply_async((0,), unique_for=3600).id != holder:
                raise SystemExit("the duplicate was sent")

    def traced(headers: dict[str, t.Any]) -> t.Callable[[int], None]:
        template = {**request_of(task.name, "", hostname), **headers}

        def run(n: int) -> None:
            trace = task.__trace__
            for i in range(n):
                task_id = f"00000000-0000-0000-0000-{i:012d}"
                request = template.copy()
                request["id"] = request["root_id"] = task_id
                args: list[t.Any] = [i]
                kwargs: dict[str, t.Any] = {}
                request["args"], request["kwargs"] = args, kwargs
                retval, info, _, _ = trace(task_id, args, kwargs, request)
                if info is not None:
                    raise SystemExit(f"{task.name} failed: {retval!r}")

        return run

    return {
        "send": send,
        "send-unique": send_unique,
        "send-duplicate": send_duplicate,
        "worker": traced({}),
        "worker-unique": traced({unique.HEADER: "0" * 64}),
    }


def statements(runs: dict[str, t.Callable[[int], None]]) -> dict[str, float]:
    """Statements per call of each cell, over ten calls."""
    counted: list[str] = []

    def count(*args: t.Any) -> None:
        counted.append(args[2])

    event.listen(Engine, "before_cursor_execute", count)
    found = {}
    for cell in CELLS:
        counted.clear()
        runs[cell](10)
        found[cell] = len(counted) / 10
    return found


def main() -> None:
    url = sys.argv[1]
    app = create_app(url)
    with app.app_context():
        db.metadata.create_all(db.engine)
    runs = cells(app)
    for cell in CELLS:
        runs[cell](20)  # warm up: caches, lazy imports, compiled statements
    if sys.argv[2] == "--statements":
        print(json.dumps(statements(runs)))
        return
    n1, n2 = int(sys.argv[2]), int(sys.argv[3])
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
    os._exit(0)  # nothing of the exit counted


if __name__ == "__main__":
    main()
