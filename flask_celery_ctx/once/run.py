"""How a task declared with ``once=True`` runs, in its traced call.

1. Its session's transaction begins with a look for the record of its id
   (:mod:`~flask_celery_ctx.once.table`). Found, the work was committed by
   an earlier delivery of the same id: the body is skipped.
2. The body runs. A commit of the session inside it is refused
   (:class:`OnceCommitError`): the work must commit with the record, or the
   record could never tell whether it was done. Savepoints are allowed.
3. When the body returns, the record is inserted in the same transaction
   and the library commits it: the work and the record commit together. A
   body that raises is rolled back by the traced call, as any task's.
4. The insert fails on the record's primary key when another run of the
   same id committed meanwhile: the work is rolled back, and skipped.

A skipped task succeeds. When the result backend already holds the first
run's success, the skip raises :exc:`~celery.exceptions.Ignore`: nothing is
stored or sent again (no result, callbacks or chord count twice). Otherwise
(the first run died before it stored its result; eager mode; no backend)
the skip returns the first run's return value, kept in the record, and
Celery stores it and sends the callbacks, once.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import typing as t

from celery.exceptions import Ignore
from celery.states import SUCCESS
from kombu.utils.json import dumps
from kombu.utils.json import loads
from sqlalchemy.exc import IntegrityError

from ..db import database
from . import table as records

if t.TYPE_CHECKING:
    from celery.backends.base import Backend
    from sqlalchemy.orm import Session

    from ..task import ContextTask
    from ..tracing import TracedCall

logger = logging.getLogger("flask_celery_ctx")

# The key of session.info that holds the name of the once task whose body
# runs in the session.
_RUNNING = "flask_celery_ctx_once"

_listening = False
_listen_lock = threading.Lock()


class OnceCommitError(RuntimeError):
    """A task declared with ``once=True`` committed its session inside its
    body.

    :param task_name: The task.
    """

    def __init__(self, task_name: str) -> None:
        super().__init__(
            f"Task {task_name!r} is declared with once=True: its work is"
            " committed with the record of its id when it returns, and may not"
            " be committed before. Remove the commit() from the task (flush()"
            " and savepoints, begin_nested(), are fine), or declare it without"
            " once=True and make it idempotent by hand."
        )


def run(task: ContextTask, call: TracedCall, args: t.Any, kwargs: t.Any) -> t.Any:
    """Run the body of ``task`` at most once to a commit per task id.

    :param task: The task, declared with ``once=True``.
    :param call: Its traced call, whose context is active.
    :param args: The positional arguments of the body.
    :param kwargs: Its keyword arguments.
    :return: What the body returned; for a skipped task, what the first run
        returned.
    :raises celery.exceptions.Ignore: The task is skipped, and the result
        backend holds the first run's result already.
    :raises RuntimeError: The app has no database integration.
    """
    found = database(call.app)
    if found is None:
        raise RuntimeError(
            f"Task {task.name!r} is declared with once=True, which commits its"
            " work with a record of its id in the app's database, but the app"
            " has no database integration: no Flask-SQLAlchemy,"
            " Flask-SQLAlchemy-Lite or FlaskCelery(session=...). Set one up in"
            " the worker's app, or declare the task without once=True."
        )
    if not _listening:
        _listen()
    task_id = call.task_id
    session = found.session()
    engine = records.engine_of(session, task.name)
    conn = session.connection(bind_arguments={"bind": engine})
    records.create(conn, engine)
    row = records.find(conn, task_id)
    if row is not None:
        return _skip(task, task_id, *row, concurrent=False)
    info = session.info
    info[_RUNNING] = task.name
    try:
        if task._base_call is not None:
            retval = task._base_call(*args, **kwargs)
        else:
            retval = task.run(*args, **kwargs)
    finally:
        info.pop(_RUNNING, None)
    result = _dumps(retval)
    session.flush()
    # Again: a body that rolled back ended the first connection's transaction.
    conn = session.connection(bind_arguments={"bind": engine})
    now = time.time()
    try:
        records.record(conn, task_id, task.name, now, result)
    except IntegrityError:
        session.rollback()
        return _skip(task, task_id, now, result, concurrent=True)
    session.commit()
    records.created(engine)
    return retval


def _skip(
    task: ContextTask, task_id: str, at: float, result: str | None, concurrent: bool
) -> t.Any:
    """Log the skip of a task whose id has a record, and end it: by
    :exc:`~celery.exceptions.Ignore` when the result backend holds its
    first success, else with the first run's return value."""
    if concurrent:
        why = (
            "another run of the same id committed its work while this one ran;"
            " this run's work was rolled back"
        )
    else:
        when = datetime.datetime.fromtimestamp(at, datetime.timezone.utc)
        why = (
            f"its work was committed at {when.isoformat(timespec='seconds')}"
            " by an earlier delivery of the same id (a redelivery, or a message"
            " sent twice)"
        )
    stored = _stored(task, task_id)
    logger.info(
        "Task %s[%s] skipped (once=True): %s. %s",
        task.name,
        task_id,
        why,
        "Its result is stored already."
        if stored
        else "It succeeds with the first run's return value.",
    )
    if stored:
        raise Ignore()
    return None if result is None else loads(result)


def _stored(task: ContextTask, task_id: str) -> bool:
    """Whether the result backend holds a success of ``task_id``: never for
    an eager task, a task that ignores its result, or a backend that cannot
    be asked from a worker (``rpc://``, none)."""
    request = task.request
    if request.is_eager or request.ignore_result or task.ignore_result:
        return False
    backend: Backend = task.backend
    if not _queryable(backend):
        return False
    try:
        meta = backend.get_task_meta(task_id)
    except Exception:
        logger.warning(
            "Could not ask the result backend about task %s[%s]",
            task.name,
            task_id,
            exc_info=True,
        )
        return False
    return bool(meta.get("status") == SUCCESS)


def _queryable(backend: Backend) -> bool:
    from celery.backends.base import DisabledBackend
    from celery.backends.rpc import RPCBackend

    return not isinstance(backend, (DisabledBackend, RPCBackend))


def _dumps(retval: t.Any) -> str | None:
    """The return value in JSON, ``None`` for ``None`` or a value that JSON
    cannot hold."""
    if retval is None:
        return None
    try:
        return dumps(retval)
    except (TypeError, ValueError):
        return None


def _listen() -> None:
    """Refuse the commits of a session inside a once task's body, for every
    session, once."""
    global _listening
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    with _listen_lock:
        if not _listening:
            event.listen(Session, "before_commit", _refuse_commit, insert=True)
            _listening = True


def _refuse_commit(session: Session) -> None:
    name = session.info.get(_RUNNING)
    if name is not None and not session.in_nested_transaction():
        raise OnceCommitError(name)
