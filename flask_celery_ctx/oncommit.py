"""Send task messages after the commit of the session's transaction.

Sends wait in the ``info`` of the current app context's session (see
:meth:`~flask_celery_ctx.db.base.Database.session_in_transaction`), each
under the transaction it was queued in: the innermost savepoint, or the
outermost transaction. Two SQLAlchemy session events move them on:

- ``after_commit`` fires when the outermost transaction commits and also
  when a savepoint is released; it marks the transaction as committed.
- ``after_transaction_end`` fires when any transaction ends, committed,
  rolled back or closed. A released savepoint hands its sends to the
  enclosing transaction; the outermost transaction sends them, the session
  out of its way; any other end drops them.
"""

from __future__ import annotations

import logging
import threading
import typing as t

from celery.utils import uuid
from flask import current_app
from flask import has_app_context

from .db import database

if t.TYPE_CHECKING:
    from celery.result import AsyncResult
    from sqlalchemy.orm import Session
    from sqlalchemy.orm import SessionTransaction

    from .task import ContextTask

logger = logging.getLogger("flask_celery_ctx")

_KEY = "flask_celery_ctx.on_commit"
_install_lock = threading.Lock()

#: Takes each send in the place of the broker while set: the
#: ``celery_on_commit`` fixture of :mod:`flask_celery_ctx.testing` records
#: them there.
#:
#: :meta private:
recorder: t.Callable[[_Send], None] | None = None


class _Send(t.NamedTuple):
    task: ContextTask
    args: t.Any
    kwargs: t.Any
    options: dict[str, t.Any]


class _Pending:
    __slots__ = ("committed", "sends")

    def __init__(self) -> None:
        self.sends: list[_Send] = []
        self.committed = False


def session_in_transaction() -> Session | None:
    """The current app context's session, when it exists and a transaction
    is in progress in it, else ``None``.
    """
    if not has_app_context():
        return None
    found = database(current_app._get_current_object())  # type: ignore[attr-defined]
    return None if found is None else found.session_in_transaction()


def send_on_commit(
    task: ContextTask, args: t.Any, kwargs: t.Any, options: dict[str, t.Any]
) -> AsyncResult[t.Any]:
    """Send a task after the outermost transaction of the current app
    context's session commits, or at once when there is none.

    :param task: The task.
    :param args: Positional arguments.
    :param kwargs: Keyword arguments.
    :param options: Options of :meth:`~celery.app.task.Task.apply_async`.
    :return: The result of the task, whose id is fixed already.
    """
    options = {**options, "task_id": options.get("task_id") or uuid()}
    session = session_in_transaction()
    if session is None:
        return _send(_Send(task, args, kwargs, options))
    task.check_sendable(args, kwargs, options, session)
    _install(type(session))
    transaction = session.get_nested_transaction() or session.get_transaction()
    store: dict[SessionTransaction, _Pending] = session.info.setdefault(_KEY, {})
    store.setdefault(transaction, _Pending()).sends.append(  # type: ignore[arg-type]
        _Send(task, args, kwargs, options)
    )
    return task.AsyncResult(options["task_id"])


def _send(send: _Send) -> AsyncResult[t.Any]:
    if recorder is not None:
        recorder(send)
        return send.task.AsyncResult(send.options["task_id"])
    return send.task.apply_async(send.args, send.kwargs, **send.options)


def _install(cls: type[Session]) -> None:
    from sqlalchemy import event

    with _install_lock:
        if not event.contains(cls, "after_transaction_end", _after_transaction_end):
            event.listen(cls, "after_commit", _after_commit)
            event.listen(cls, "after_transaction_end", _after_transaction_end)


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
        store.setdefault(parent, _Pending()).sends.extend(pending.sends)
        return
    _send_all(pending.sends)


def _send_all(sends: list[_Send]) -> None:
    error: Exception | None = None
    for send in sends:
        try:
            _send(send)
        except Exception as exc:
            logger.error(
                "Task %s[%s] could not be sent after the commit: %r. The"
                " transaction is committed; the task was not sent.",
                send.task.name,
                send.options["task_id"],
                exc,
                exc_info=True,
            )
            if error is None:
                error = exc
                if hasattr(exc, "add_note"):
                    exc.add_note(
                        f"Raised after the commit: the transaction is committed,"
                        f" but task {send.task.name!r} [{send.options['task_id']}]"
                        " was not sent. Send it again once the cause is fixed."
                    )
    if error is not None:
        raise error
