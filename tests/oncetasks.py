"""Tasks declared with ``once=True``, on ``dbapp`` and its integrations.

Workers load this module through ``CELERY_IMPORTS``. A task given a
``stop`` (``"before_commit"`` or ``"after_commit"``) and a directory blocks
at that moment, once, after writing its process id to ``<dir>/<stop>.pid``:
the test kills that process there. A later delivery finds the file and goes
on.
"""

from __future__ import annotations

import os
import time
import typing as t
from pathlib import Path

from celery import current_task
from celery import Task
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import orm
from sqlalchemy import select

from dbapp import ext
from dbapp import Note


def _block_once(stop: str, directory: str | None) -> None:
    """Write the process id and wait to be killed, unless done before."""
    if directory is None:
        return
    path = Path(directory) / f"{stop}.pid"
    if path.exists():
        return
    path.write_text(str(os.getpid()))
    time.sleep(120)


@event.listens_for(orm.Session, "after_commit")
def _after_commit(session: orm.Session) -> None:
    # The library's commit of a once task: its body may not commit. Any
    # other commit of the process (of another test, out of any task) passes.
    if getattr(current_task, "name", None) != write.name:
        return
    kwargs = current_task.request.kwargs or {}
    if kwargs.get("stop") == "after_commit":
        _block_once("after_commit", kwargs.get("directory"))


@ext.celery.task(once=True, acks_late=True, reject_on_worker_lost=True)
def write(
    name: str,
    stop: str | None = None,
    directory: str | None = None,
    pause: float = 0,
) -> dict[str, t.Any]:
    """Add a note, and wait ``pause`` seconds; the library commits it."""
    ext.session.add(Note(name=name))
    ext.session.flush()
    if stop == "before_commit":
        _block_once(stop, directory)
    time.sleep(pause)
    return {"name": name, "pid": os.getpid()}


@ext.celery.task(once=True)
def commits(name: str) -> str:
    """Commit inside the body: refused."""
    ext.session.add(Note(name=name))
    ext.session.commit()
    return "committed"


@ext.celery.task(once=True)
def savepoint(name: str) -> str:
    """Release a savepoint inside the body: allowed."""
    with ext.session.begin_nested():
        ext.session.add(Note(name=name))
    return "released"


@ext.celery.task(once=True)
def fails(name: str) -> None:
    """Add a note, then fail."""
    ext.session.add(Note(name=name))
    ext.session.flush()
    raise ValueError("failed after a flush")


@ext.celery.task(bind=True, once=True, max_retries=1, default_retry_delay=0)
def retries(self: Task, name: str) -> int:  # type: ignore[type-arg]
    """Add a note in each attempt; the first retries, the second returns."""
    ext.session.add(Note(name=f"{name}-{self.request.retries}"))
    ext.session.flush()
    if not self.request.retries:
        raise self.retry()
    return int(self.request.retries)


@ext.celery.task
def count(name: str) -> int:
    return ext.session.scalar(select(func.count()).where(Note.name == name)) or 0
