"""The deletion of the rows of published sends, in batches, off the request
path.

Once the sends of a commit are published, their rows are done with. A
relay leaves a row alone until its lease ends (``outbox_lease``, counted
from the commit), so the process that published it need not delete it at
once, only before then. The process hands the ids of its published rows to
:func:`delete_later`; a thread of its own deletes those gathered over
:data:`GATHER` seconds with one statement per database (up to
:data:`~flask_celery_ctx.outbox.table.CHUNK` rows each), out of the way of
the requests, and out of the traces (:mod:`.untraced`): each request's
trace ends with its publish. A process that exits deletes what is left
first: at
``atexit``, and in a worker's processes, which may leave without it, at
Celery's ``worker_process_shutdown`` and ``worker_shutdown`` signals.

A row is so deleted well within its lease, and no relay publishes it again
while the process that published it lives. A process killed between a
publish and the deletion (a ``SIGKILL``) leaves the row, which a relay
publishes again once its lease ends, with the same task id: delivery is at
least once, as when a process dies between the ``COMMIT`` and the publish.

On SQLite, where a statement costs no round trip and a writer locks the
whole database, and with a lease shorter than :data:`MIN_LEASE`, the rows
are deleted at once, by the process that published them.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import typing as t
from contextlib import nullcontext

from celery import signals

from .untraced import untraced

if t.TYPE_CHECKING:
    from sqlalchemy.engine import Engine

logger = logging.getLogger("flask_celery_ctx")

#: Seconds over which the published rows of a process are gathered into one
#: statement.
GATHER = 0.05
#: The shortest lease, in seconds, under which the rows are deleted in
#: the background: with less, they are deleted at once.
MIN_LEASE = 0.5

_lock = threading.Lock()
# Held while rows are deleted.
_deleting = threading.Lock()
# Ids waiting to be deleted, per engine.
_waiting: dict[Engine, list[str]] = {}
_wake = threading.Event()
_thread: threading.Thread | None = None


def delete_later(engine: Engine, ids: list[str], lease: float) -> None:
    """Have the rows of published sends deleted, before their lease ends.

    :param engine: The engine the rows were written to.
    :param ids: Their ids.
    :param lease: The seconds from their commit to the end of their lease.
    """
    if engine.dialect.name == "sqlite" or lease < MIN_LEASE:
        delete(engine, ids)
        return
    global _thread
    with _lock:
        _waiting.setdefault(engine, []).extend(ids)
        if _thread is None:
            _thread = threading.Thread(
                target=_run, name="flask-celery-outbox-cleanup", daemon=True
            )
            _thread.start()
    _wake.set()


def flush() -> None:
    """Delete now, in the caller's thread, the rows waiting to be deleted,
    once those being deleted are."""
    with _deleting:
        with _lock:
            taken = dict(_waiting)
            _waiting.clear()
        for engine, ids in taken.items():
            delete(engine, ids)


def delete(engine: Engine, ids: list[str]) -> None:
    """Delete rows of published sends; log a failure, which leaves them to
    a relay.

    :param engine: The engine the rows were written to.
    :param ids: Their ids.
    """
    from .table import describe
    from .table import remove

    try:
        remove(engine, ids)
    except Exception as exc:
        logger.warning(
            "The outbox rows of %d sent tasks could not all be deleted: %s. A"
            " relay will send those left again.",
            len(ids),
            describe(exc),
        )


def _run() -> None:
    while True:
        _wake.wait()
        time.sleep(GATHER)  # the commits of the next moments join in
        _wake.clear()
        _flush_untraced()


def _flush_untraced(**kwargs: t.Any) -> None:
    """:func:`flush`, creating no trace of its own: the rows' traces were
    their requests'. Neither tracing library is imported for it."""
    if not _waiting:
        return
    traced = "sentry_sdk" in sys.modules or "opentelemetry" in sys.modules
    with untraced() if traced else nullcontext():
        flush()


def _forget_parents() -> None:
    """In a forked child: the parent's rows are the parent's to delete, and
    its thread is not here."""
    global _lock, _deleting, _wake, _thread
    _lock, _deleting = threading.Lock(), threading.Lock()
    _wake, _thread = threading.Event(), None
    _waiting.clear()


os.register_at_fork(after_in_child=_forget_parents)
atexit.register(_flush_untraced)
# A prefork pool's process leaves by os._exit(), without atexit.
signals.worker_process_shutdown.connect(_flush_untraced, weak=False)
signals.worker_shutdown.connect(_flush_untraced, weak=False)
