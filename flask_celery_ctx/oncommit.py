"""Send task messages after the commit of the session's transaction.

A send waits for the session that holds the model instances it is given,
when that session is in a transaction; for the current app context's
session otherwise (see :func:`session_in_transaction`). Sends wait in the
``info`` of that session, each under the transaction it was queued in: the
innermost savepoint, or the outermost transaction. Three SQLAlchemy session
events move them on:

- ``before_commit`` fires before the outermost transaction commits and
  before a savepoint is released: the sends not written yet go into the
  outbox table (:mod:`flask_celery_ctx.outbox.table`), in the transaction, so
  that they are committed or rolled back with it.
- ``after_commit`` fires when the outermost transaction commits and also
  when a savepoint is released; it marks the transaction as committed.
- ``after_transaction_end`` fires when any transaction ends, committed,
  rolled back or closed. A released savepoint hands its sends to the
  enclosing transaction; the outermost transaction sends them, the session
  out of its way, and deletes their rows; any other end drops them.

The sends with a row are published in one attempt bounded in time
(:mod:`flask_celery_ctx.outbox.publish`); a send whose publish fails after
the commit, and those after it, stay in the outbox, for a relay to publish
(:mod:`flask_celery_ctx.outbox.relay`).
"""

from __future__ import annotations

import logging
import threading
import typing as t
from functools import partial

from celery.utils import uuid
from flask import current_app
from flask import has_app_context

from . import models
from . import outbox
from . import unique
from .db import database
from .outbox import tracecontext

if t.TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session
    from sqlalchemy.orm import SessionTransaction

    from .outbox.tracecontext import Trace
    from .task import ContextTask

logger = logging.getLogger("flask_celery_ctx")

_KEY = "flask_celery_ctx.on_commit"
_install_lock = threading.Lock()
_installed = False

#: Takes each send in the place of the broker while set: the
#: ``celery_on_commit`` fixture of :mod:`flask_celery_ctx.testing` records
#: them there.
#:
#: :meta private:
recorder: t.Callable[[_Send], None] | None = None


class _Send:
    __slots__ = ("args", "kwargs", "options", "row", "task", "trace")

    def __init__(
        self,
        task: ContextTask,
        args: t.Any,
        kwargs: t.Any,
        options: dict[str, t.Any],
        trace: Trace | None = None,
    ) -> None:
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.options = options
        #: The trace context of the moment it was queued, for its row.
        self.trace = trace
        #: The engine and id of its row in the outbox, once written.
        self.row: tuple[Engine, str] | None = None


class _Pending:
    __slots__ = ("committed", "sends", "written")

    def __init__(self) -> None:
        self.sends: list[_Send] = []
        self.committed = False
        # Sends whose outbox rows were inserted in this transaction, some
        # perhaps queued in an enclosing one: a rollback of this one removes
        # the rows, and those sends need them written again.
        self.written: list[_Send] = []


def session_in_transaction(values: t.Any = None) -> Session | None:
    """The session a send of ``values`` waits for: the one that holds the
    model instances in them, when a transaction is in progress in it; else
    the current app context's session, when it exists and a transaction is
    in progress in it; else ``None``.

    :param values: The arguments and options of a send.
    :raises ValueError: The instances belong to two sessions in a
        transaction: no commit makes them all visible.
    """
    held = [s for s in models.sessions(values) if s.in_transaction()]
    if len(held) > 1:
        raise ValueError(
            "The model instances given to delay_on_commit belong to"
            f" {len(held)} sessions, each in a transaction of its own: the"
            " task would be sent after one commit, perhaps before the others."
            " Load or add them in one session, or commit the others first."
        )
    if held:
        return held[0]
    if not has_app_context():
        return None
    found = database(current_app._get_current_object())  # type: ignore[attr-defined]
    return None if found is None else found.session_in_transaction()


def send_on_commit(
    task: ContextTask, args: t.Any, kwargs: t.Any, options: dict[str, t.Any]
) -> AsyncResult[t.Any]:
    """Send a task after the outermost transaction of the session that holds
    its model instances commits, or of the current app context's session
    when they are in none (see :func:`session_in_transaction`); at once when
    there is no transaction.

    :param task: The task.
    :param args: Positional arguments.
    :param kwargs: Keyword arguments.
    :param options: Options of :meth:`~celery.app.task.Task.apply_async`.
    :return: The result of the task, whose id is fixed already.
    :raises ValueError: The instances belong to two sessions in a
        transaction.
    """
    options = {**options, "task_id": options.get("task_id") or uuid()}
    session = session_in_transaction([args, kwargs, options])
    if session is None:
        return _send(_Send(task, args, kwargs, options))
    task.check_sendable(args, kwargs, options, session)
    held = unique.claim_on_commit(task, args, kwargs, options, session)
    if held is not None:
        return task.AsyncResult(held)
    trace = None
    if outbox.enabled(task.app):
        from .outbox.table import check_options

        # The instances in signatures are stored as references.
        check_options(task.name, models.placeholders(options, embedded=True))
        trace = tracecontext.capture()
    _install()
    transaction = session.get_nested_transaction() or session.get_transaction()
    store: dict[SessionTransaction, _Pending] = session.info.setdefault(_KEY, {})
    store.setdefault(transaction, _Pending()).sends.append(  # type: ignore[arg-type]
        _Send(task, args, kwargs, options, trace)
    )
    return task.AsyncResult(options["task_id"])


def _send(send: _Send) -> AsyncResult[t.Any]:
    if recorder is not None:
        # Recorded in the place of the publish, unique_for claimed first.
        record = partial(_record, send.task)
        return unique.send(
            send.task, send.args, send.kwargs, (), dict(send.options), record
        )
    return send.task.apply_async(send.args, send.kwargs, **send.options)


def _record(
    task: ContextTask, args: t.Any, kwargs: t.Any, **options: t.Any
) -> AsyncResult[t.Any]:
    assert recorder is not None
    recorder(_Send(task, args, kwargs, options))
    return task.AsyncResult(options["task_id"])


def _install() -> None:
    """Listen to the events of every session, once.

    On ``Session`` itself, not on the class of the session at hand: each
    ``sessionmaker`` makes a subclass of its own, and SQLAlchemy's event
    registry knows classes by ``id()``, so a new subclass that takes the id
    of a collected one would be taken for installed while it is not.
    """
    global _installed
    if _installed:
        return
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    with _install_lock:
        if not _installed:
            event.listen(Session, "before_commit", _before_commit)
            event.listen(Session, "after_commit", _after_commit)
            event.listen(Session, "after_transaction_end", _after_transaction_end)
            _installed = True


def _before_commit(session: Session) -> None:
    store: dict[SessionTransaction, _Pending] | None = session.info.get(_KEY)
    if not store or recorder is not None:
        return
    from .outbox.table import write

    unwritten = [
        send
        for pending in store.values()
        for send in pending.sends
        if send.row is None and outbox.enabled(send.task.app)
    ]
    if not unwritten:
        return
    engine, ids = write(session, unwritten)
    for send, row in zip(unwritten, ids, strict=True):
        if row is not None:
            send.row = (engine, row)
    # The transaction the rows went into: a savepoint, or the outermost one.
    transaction = session.get_nested_transaction() or session.get_transaction()
    store.setdefault(transaction, _Pending()).written.extend(unwritten)  # type: ignore[arg-type]


def _after_commit(session: Session) -> None:
    store = session.info.get(_KEY)
    if not store:
        return
    # The transaction that committed: a savepoint, or the outermost one.
    transaction = session.get_nested_transaction() or session.get_transaction()
    pending = store.get(transaction)
    if pending is not None:
        pending.committed = True


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    store = session.info.get(_KEY)
    if not store:
        return
    pending = store.pop(transaction, None)
    if not store:
        del session.info[_KEY]
    if pending is None:
        return
    if not pending.committed:
        for send in pending.written:
            send.row = None  # rolled back with the transaction
        for send in pending.sends:
            logger.debug(
                "Task %s[%s] dropped: its transaction ended without a commit.",
                send.task.name,
                send.options["task_id"],
            )
        return
    parent = transaction.parent
    if parent is not None:
        # A released savepoint: its sends wait for the enclosing one.
        while not parent.nested and parent.parent is not None:
            parent = parent.parent
        store = session.info.setdefault(_KEY, {})
        enclosing = store.setdefault(parent, _Pending())
        enclosing.sends.extend(pending.sends)
        enclosing.written.extend(pending.written)
        return
    _send_all(pending.sends)


def _send_all(sends: list[_Send]) -> None:
    """Send each in order. A send with a row goes through one bounded
    attempt per app (:mod:`~flask_celery_ctx.outbox.publish`): a broker that
    fails leaves it, and the rest, to the relay. A send without a row raises
    what its publish raised, after the others were sent.
    """
    from .outbox.publish import Attempt

    error: Exception | None = None
    published: dict[Engine, list[str]] = {}
    attempts: dict[Celery[t.Any], Attempt] = {}
    try:
        for send in sends:
            if send.row is None:
                try:
                    _send(send)
                except Exception as exc:
                    _report_unsent(send, exc)
                    error = error or exc
                continue
            app = send.task.app
            attempt = attempts.get(app) or attempts.setdefault(app, Attempt(app))
            try:
                done = attempt.publish(send.task, send.args, send.kwargs, send.options)
            except Exception as exc:
                logger.warning(
                    "Task %s[%s] could not be sent after the commit: %r. It"
                    " waits in the outbox, for a relay to send it.",
                    send.task.name,
                    send.options["task_id"],
                    exc,
                )
                continue
            if done:
                published.setdefault(send.row[0], []).append(send.row[1])
    finally:
        for attempt in attempts.values():
            attempt.close()
    for engine, ids in published.items():
        _remove(engine, ids)
    if error is not None:
        raise error


def _report_unsent(send: _Send, exc: Exception) -> None:
    """Log a send without a row that failed, and note on the error that it
    is lost unless sent again."""
    logger.error(
        "Task %s[%s] could not be sent after the commit: %r. The"
        " transaction is committed; the task was not sent.",
        send.task.name,
        send.options["task_id"],
        exc,
        exc_info=True,
    )
    if hasattr(exc, "add_note"):
        exc.add_note(
            f"Raised after the commit: the transaction is committed,"
            f" but task {send.task.name!r} [{send.options['task_id']}]"
            " was not sent. Send it again once the cause is fixed."
        )


def _remove(engine: Engine, ids: list[str]) -> None:
    from .outbox.table import describe
    from .outbox.table import remove

    try:
        remove(engine, ids)
    except Exception as exc:
        logger.warning(
            "The outbox rows of %d sent tasks could not all be deleted: %s. A"
            " relay will send those left again.",
            len(ids),
            describe(exc),
        )
