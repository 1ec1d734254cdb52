"""The send path: what happens between ``task.delay()`` or
``task.delay_on_commit()`` and the broker, in the order it happens, as
:mod:`~flask_celery_ctx.tracing` holds the run path.
:class:`~flask_celery_ctx.ContextTask` only calls it.

A send now, ``delay()`` and ``apply_async()`` (:func:`prepare_now`):

1. the config checked unchanged since ``init_app``;
2. the carried values of ``g`` put in a header (:func:`carry_g`);
3. the model instances in the arguments, and in the signatures of ``link``,
   ``chain`` and ``chord``, made signed references, and ``argsrepr`` showing
   them as ``User(42)`` (:func:`references`);
4. Celery's ``apply_async`` serializes the message and publishes it.

A send on commit, ``delay_on_commit()`` (:func:`on_commit`):

1. its task id fixed, the carried values captured, the session found whose
   commit it waits for (:func:`session_of`); without a transaction it is
   sent at once, as above;
2. what would otherwise fail only after the commit checked now: the config,
   the signature, the instances, the serializer, the options an outbox row
   cannot hold (:func:`check`);
3. queued in the session's ``info`` under the transaction it waits for,
   the innermost savepoint or the outermost transaction, which four
   session events move on (:func:`install`);
4. ``before_commit``: the session flushed, so that pending instances have
   their keys; each send's references made, once (:func:`prepare`), and its
   row written in the outbox table, in the transaction: one ``INSERT``
   (:func:`write_rows`);
5. ``after_commit`` marks the transaction committed, ``after_rollback`` rolled
   back; ``after_transaction_end`` hands the sends of a released savepoint to
   the enclosing transaction, drops those of a rollback (and, with a warning,
   those of a session closed without a commit), and after the outermost commit publishes each
   with the message made in step 4, in one bounded attempt
   (:func:`publish_all`, :mod:`~flask_celery_ctx.outbox.publish`): a broker
   down leaves them to the relay;
6. the rows of the sends published deleted in batches, off the request
   path, before their lease ends (:mod:`~flask_celery_ctx.outbox.cleanup`).

Every send, now or on commit, has its references made by :func:`references`,
the one step before a message is final: a hook that must see each send
before it is published (or written to the outbox) goes there.
"""

from __future__ import annotations

import logging
import threading
import time
import typing as t
from functools import partial

from celery.utils import uuid
from celery.utils.functional import maybe_list
from celery.utils.saferepr import saferepr
from flask import current_app
from flask import has_app_context
from kombu import serialization
from kombu.exceptions import EncodeError
from kombu.utils.json import dumps as json_dumps

from . import carry
from . import models
from . import outbox
from . import unique
from .db import database
from .outbox import tracecontext

if t.TYPE_CHECKING:
    from celery import Celery
    from celery import Task
    from celery.result import AsyncResult
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import InstanceState
    from sqlalchemy.orm import Session
    from sqlalchemy.orm import SessionTransaction

    from .extension import FlaskCelery
    from .outbox.tracecontext import Trace
    from .task import ContextTask

logger = logging.getLogger("flask_celery_ctx")

#: The options of ``apply_async`` whose signatures the worker sends when the
#: task is done, with the task's :class:`ContextTask` loading their instances.
SIGNATURE_OPTIONS = ("link", "chain", "chord")

#: An option of :meth:`~flask_celery_ctx.ContextTask.apply_async` saying that
#: the send was prepared already (:func:`prepare`): its arguments hold
#: references, its headers the carried values; it is published as it is.
PREPARED = "flask_celery_ctx_prepared"

_KEY = "flask_celery_ctx.on_commit"

#: Takes each send in the place of the broker while set: the
#: ``celery_on_commit`` fixture of :mod:`flask_celery_ctx.testing` records
#: them there.
#:
#: :meta private:
recorder: t.Callable[[Send], None] | None = None


def extension_of(task: Task[t.Any, t.Any]) -> FlaskCelery:
    """Return the :class:`~flask_celery_ctx.FlaskCelery` whose Celery app a
    task belongs to.

    :param task: A task.
    :raises RuntimeError: The task's Celery app was not made by
        :class:`~flask_celery_ctx.FlaskCelery`.
    """
    ext: FlaskCelery | None = getattr(task.app, "flask_celery", None)
    if ext is None:
        raise RuntimeError(
            f"Task {task.name!r} belongs to a Celery app that FlaskCelery did not"
            " make. Declare tasks with '@ext.celery.task', where 'ext' is your"
            " FlaskCelery instance."
        )
    return ext


# A send now ----------------------------------------------------------------


def prepare_now(
    task: ContextTask, args: t.Any, kwargs: t.Any, options: dict[str, t.Any]
) -> tuple[t.Any, t.Any]:
    """Prepare a send of ``apply_async``: the arguments to give Celery's
    ``apply_async``, with ``options`` completed in place. A send prepared
    already (option :data:`PREPARED`) is left as it is.

    :param task: The task.
    :param args: Positional arguments.
    :param kwargs: Keyword arguments.
    :param options: Options of ``apply_async``, changed in place.
    :raises RuntimeError: See :meth:`~flask_celery_ctx.ContextTask.apply_async`.
    :raises ValueError: Likewise.
    """
    if options.pop(PREPARED, False):
        return args, kwargs
    ext = extension_of(task)
    ext.check_config_unchanged(task.name)
    if ext.carry_g:
        carry_g(ext.carry_g, task.name, options)
    return references(task, args, kwargs, options, committed=True)


def carry_g(names: tuple[str, ...], task_name: str, options: dict[str, t.Any]) -> None:
    """Put the carried values of ``g`` (:mod:`~flask_celery_ctx.carry`) into
    the ``headers`` option of a send, unless it has them already (a retry).

    :param names: The names of the attributes of ``g``.
    :param task_name: The task's name, for the error message.
    :param options: The options of ``apply_async``, changed in place.
    """
    headers = options.get("headers")
    if headers and carry.HEADER in headers:
        return
    value = carry.capture(names, task_name)
    if value is not None:
        options["headers"] = {**(headers or {}), carry.HEADER: value}


def references(
    task: ContextTask,
    args: t.Any,
    kwargs: t.Any,
    options: dict[str, t.Any],
    committed: bool = False,
) -> tuple[t.Any, t.Any]:
    """Make signed references of the instances in the arguments and in the
    signatures of the options, and show them in ``argsrepr`` and
    ``kwargsrepr``: the last step of every send before its message is
    final, now or on commit.

    A hook that must see every send before it is published, or written to
    the outbox, goes here.

    :param task: The task.
    :param args: Positional arguments.
    :param kwargs: Keyword arguments.
    :param options: Options, whose signatures are replaced in place.
    :param committed: Refuse instances whose rows are not committed yet (see
        :func:`~flask_celery_ctx.models.dump`).
    :return: The arguments to send.
    """
    app = extension_of(task).app
    if _has_signatures(options):
        _dump_signatures(task, options, committed)
    sent_args, shown_args, in_args = models.dump(
        task.name, list(args or ()), app, committed=committed
    )
    sent_kwargs, shown_kwargs, in_kwargs = models.dump(
        task.name, dict(kwargs or {}), app, committed=committed
    )
    if not (in_args or in_kwargs):
        return args, kwargs
    amqp = task.app.amqp
    # Celery 5.7 added the task_repr_maxlevels setting; before it,
    # messages show 3 levels, saferepr's default.
    maxlevels = task.app.conf.get("task_repr_maxlevels", 3)
    if type(args) is tuple:
        shown_args = tuple(shown_args)
    options.setdefault(
        "argsrepr", saferepr(shown_args, amqp.argsrepr_maxsize, maxlevels=maxlevels)
    )
    options.setdefault(
        "kwargsrepr",
        saferepr(shown_kwargs, amqp.kwargsrepr_maxsize, maxlevels=maxlevels),
    )
    return sent_args, sent_kwargs


def _has_signatures(options: dict[str, t.Any]) -> bool:
    return any(options.get(name) for name in (*SIGNATURE_OPTIONS, "link_error"))


def _dump_signatures(
    task: ContextTask, options: dict[str, t.Any], committed: bool
) -> None:
    """Make references of the instances in the signatures that the worker
    sends when the task is done, those of ``link``, ``chain`` and ``chord``
    (the body of a chord the task is part of): their tasks load them.
    Refuse those that would not be loaded."""
    check_signatures(task, options)
    app = extension_of(task).app
    for name in SIGNATURE_OPTIONS:
        value = options.get(name)
        if not value:
            continue
        signatures = [
            models.dump(signature["task"], signature, app, committed)[0]
            for signature in maybe_list(value)
        ]
        options[name] = (
            signatures if isinstance(value, (list, tuple)) else signatures[0]
        )


def check_signatures(task: ContextTask, options: dict[str, t.Any]) -> None:
    """Refuse the instances in the signatures of the options whose task
    would not load them: one that is not a ContextTask, or an error
    callback.

    :param task: The task sent.
    :param options: Its options.
    :raises ValueError: Such an instance is there.
    """
    from .task import ContextTask

    for name in SIGNATURE_OPTIONS:
        value = options.get(name)
        if not value:
            continue
        for signature in maybe_list(value):
            found = task.app.tasks.get(signature["task"])
            if not isinstance(found, ContextTask) and models.has_instances(signature):
                raise ValueError(
                    f"Task {signature['task']!r}, in the {name} of task"
                    f" {task.name!r}, got a model instance in its arguments,"
                    " but it is not a ContextTask here, so it could not load"
                    " it. Pass ids, or declare it with '@ext.celery.task'."
                )
    for errback in maybe_list(options.get("link_error")) or ():
        if models.has_instances(errback):
            raise ValueError(
                f"The error callback {errback['task']!r} of task {task.name!r}"
                " got a model instance in its arguments. The worker calls"
                " error callbacks directly, where references are not loaded:"
                " pass ids in the arguments of link_error signatures."
            )


def encode_error(
    task: Task[t.Any, t.Any], exc: EncodeError, options: dict[str, t.Any]
) -> EncodeError:
    """The error to raise when the serializer refuses a send's arguments:
    it names the task and what to pass instead.

    :param task: The task.
    :param exc: What the serializer raised.
    :param options: The send's options.
    """
    return EncodeError(
        f"The arguments of task {task.name!r} cannot be serialized with"
        f" {_serializer(task, options)!r}: {exc}. Pass values the serializer"
        " accepts: for JSON, ids, strings, numbers, lists and dicts, and"
        " instances of mapped models."
    )


def _serializer(task: Task[t.Any, t.Any], options: dict[str, t.Any]) -> str:
    """The serializer a send with these options uses."""
    return str(options.get("serializer") or task.serializer or "json")


# A send on commit: 1. queued -----------------------------------------------


class Send:
    """A send waiting for a commit.

    :meta private:
    """

    __slots__ = ("args", "kwargs", "message", "options", "row", "task", "trace")

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
        #: Its arguments and options as published, once :func:`prepare`
        #: made them, before its row is written.
        self.message: tuple[t.Any, t.Any, dict[str, t.Any]] | None = None
        #: The engine, the id and the lease of its row in the outbox, once
        #: written.
        self.row: tuple[Engine, str, float] | None = None


class _Pending:
    __slots__ = ("_outbox", "committed", "rolled_back", "sends", "written")

    def __init__(self) -> None:
        self.sends: list[Send] = []
        self.committed = False
        # Ended by a rollback, not by the session's close.
        self.rolled_back = False
        # Sends whose outbox rows were inserted in this transaction, some
        # perhaps queued in an enclosing one: a rollback of this one removes
        # the rows, and those sends need them written again.
        self.written: list[Send] = []
        self._outbox: dict[Celery[t.Any], bool] = {}

    def outbox(self, celery: Celery[t.Any]) -> bool:
        """Whether the sends of ``celery`` go through the outbox, read once
        per transaction."""
        found = self._outbox.get(celery)
        if found is None:
            found = self._outbox[celery] = outbox.enabled(celery)
        return found


def on_commit(
    task: ContextTask, args: t.Any, kwargs: t.Any, options: dict[str, t.Any]
) -> AsyncResult[t.Any]:
    """Send a task after the outermost transaction of the session that holds
    its model instances commits, or of the current app context's session
    when they are in none (see :func:`session_of`); at once when there is
    no transaction.

    :param task: The task.
    :param args: Positional arguments.
    :param kwargs: Keyword arguments.
    :param options: Options of :meth:`~celery.app.task.Task.apply_async`.
    :return: The result of the task, whose id is fixed already.
    :raises: See :meth:`~flask_celery_ctx.ContextTask.apply_async_on_commit`.
    """
    ext = extension_of(task)
    options = {**options, "task_id": options.get("task_id") or uuid()}
    if ext.carry_g:
        # Captured now: the commit may come in another context.
        carry_g(ext.carry_g, task.name, options)
    # The arguments as the serializer will see them, and the instances.
    trial, states = models.instances([list(args or ()), dict(kwargs or {})])
    signatures = [options[name] for name in _WITH_SIGNATURES if options.get(name)]
    if signatures:
        states += models.instances(signatures)[1]
    session = session_of(states)
    if session is None:
        return _send(Send(task, args, kwargs, options))
    transaction = session.get_nested_transaction() or session.get_transaction()
    store: dict[SessionTransaction, _Pending] = session.info.setdefault(_KEY, {})
    pending = store.get(transaction)  # type: ignore[arg-type]
    if pending is None:
        install()
        pending = store[transaction] = _Pending()  # type: ignore[index]
    written = pending.outbox(task.app)
    check(ext, task, trial, options, session, states, written)
    # unique_for: the key claimed in the transaction, with the outbox row.
    held = unique.claim_on_commit(task, args, kwargs, options, session)
    if held is not None:
        return task.AsyncResult(held)
    trace = tracecontext.capture() if written else None
    pending.sends.append(Send(task, args, kwargs, options, trace))
    return task.AsyncResult(options["task_id"])


# The options whose signatures may hold instances.
_WITH_SIGNATURES = (*SIGNATURE_OPTIONS, "link_error")


def session_of(states: t.Sequence[InstanceState[t.Any]]) -> Session | None:
    """The session a send waits for: the one that holds the model instances
    in its arguments and signatures, when a transaction is in progress in
    it; else the current app context's session, when it exists and a
    transaction is in progress in it; else ``None``.

    :param states: The states of the instances (:func:`~flask_celery_ctx.models.instances`).
    :raises ValueError: The instances belong to two sessions in a
        transaction: no commit makes them all visible.
    """
    held = list({s.session: None for s in states if s.session is not None})
    held = [session for session in held if session.in_transaction()]
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


def check(
    ext: FlaskCelery,
    task: ContextTask,
    trial: list[t.Any],
    options: dict[str, t.Any],
    session: Session,
    states: t.Sequence[InstanceState[t.Any]],
    written: bool,
) -> None:
    """Check, when a send is queued for the commit, what would otherwise
    fail only after it: the config, the signature, the instances, the
    serializer, and the options an outbox row cannot hold.

    :param ext: The task's extension.
    :param task: The task.
    :param trial: The positional and keyword arguments, in a list, the
        instances replaced by references with no key
        (:func:`~flask_celery_ctx.models.instances`).
    :param options: Options of :meth:`apply_async`.
    :param session: The session whose commit the send waits for.
    :param states: The states of the instances in the arguments and the
        signatures.
    :param written: Whether the send is to be written to the outbox.
    """
    ext.check_config_unchanged(task.name)
    args, kwargs = trial
    check_arguments = getattr(task, "__header__", None)
    if task.typing and check_arguments is not None:
        check_arguments(*args, **kwargs)
    signatures = _has_signatures(options)
    if signatures:
        check_signatures(task, options)
    if states:
        models.check_pending(task.name, states, session, bool(ext.app.secret_key))
    # The instances in signatures are stored as references.
    stored = models.instances(options)[0] if signatures else options
    serializer = _serializer(task, options)
    if written and serializer == "json":
        try:  # one encoding for both, when it succeeds
            json_dumps((args, kwargs, stored))
            return
        except Exception:
            pass  # tell which
    try:
        serialization.dumps((args, kwargs), serializer)
    except EncodeError as exc:
        raise encode_error(task, exc, options) from exc
    if written:
        from .outbox.table import check_options

        check_options(task.name, stored)


# 2. The session's events ----------------------------------------------------

_install_lock = threading.Lock()
_installed = False


def install() -> None:
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
            event.listen(Session, "before_commit", write_rows)
            event.listen(Session, "after_commit", _after_commit)
            event.listen(Session, "after_rollback", _after_rollback)
            event.listen(Session, "after_transaction_end", _after_transaction_end)
            _installed = True


# 3. Before the commit: the references and the outbox rows --------------------


def write_rows(session: Session) -> None:
    """Write the sends not written yet into the outbox, in the transaction
    that commits (or the savepoint released), each prepared once: the
    message the row holds is the one published after the commit.

    :param session: The session, before its commit.
    """
    store: dict[SessionTransaction, _Pending] | None = session.info.get(_KEY)
    if not store or recorder is not None:
        return
    unwritten = [
        send
        for pending in store.values()
        for send in pending.sends
        if send.row is None and pending.outbox(send.task.app)
    ]
    if not unwritten:
        return
    from .outbox import table

    session.flush()  # pending instances get their keys
    now = time.time()
    messages: list[table.Message] = []
    written: list[Send] = []
    for send in unwritten:
        try:
            args, kwargs, options = send.message = prepare(send)
        except Exception:
            # Not written: it fails again when it is sent after the commit,
            # and is reported then, as without the outbox.
            continue
        text = table.message(args, kwargs, options, send.trace, now)
        messages.append(table.Message(send.task.name, options["task_id"], text))
        written.append(send)
    lease = outbox.settings(unwritten[0].task.app).lease
    engine, ids = table.write(session, messages, lease, now)
    for send, row in zip(written, ids, strict=True):
        send.row = (engine, row, lease)
    # The transaction the rows went into: a savepoint, or the outermost one.
    transaction = session.get_nested_transaction() or session.get_transaction()
    store.setdefault(transaction, _Pending()).written.extend(written)  # type: ignore[arg-type]


def prepare(send: Send) -> tuple[t.Any, t.Any, dict[str, t.Any]]:
    """The arguments and options of a queued send as published: references
    made (:func:`references`), the option :data:`PREPARED` set.

    :param send: A send, its instances flushed.
    """
    options = dict(send.options)
    args, kwargs = references(send.task, send.args, send.kwargs, options)
    return args, kwargs, options


def _after_commit(session: Session) -> None:
    pending = _ending(session)
    if pending is not None:
        pending.committed = True


def _after_rollback(session: Session) -> None:
    pending = _ending(session)
    if pending is not None:
        pending.rolled_back = True


def _ending(session: Session) -> _Pending | None:
    """The sends of the transaction that commits or rolls back: a
    savepoint, or the outermost one."""
    store: dict[SessionTransaction, _Pending] | None = session.info.get(_KEY)
    if not store:
        return None
    transaction = session.get_nested_transaction() or session.get_transaction()
    return None if transaction is None else store.get(transaction)


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
            # Rolled back with the transaction; the keys may change too.
            send.row = send.message = None
        # A rollback drops the sends, as asked. A close without a commit
        # drops them too, unasked: at the end of a request or a task, in a
        # transaction begun after the last commit by a read, for one.
        closed = transaction.parent is None and not pending.rolled_back
        for send in pending.sends:
            if closed:
                logger.warning(
                    "Task %s[%s] dropped: it was sent with delay_on_commit in a"
                    " transaction that ended without a commit when its session"
                    " was closed (at the end of a request or a task, for one)."
                    " A transaction needs a commit even if it only read: reading"
                    " an attribute that a commit expired begins a new one."
                    " Commit after delay_on_commit, or send with delay() once"
                    " the data is committed.",
                    send.task.name,
                    send.options["task_id"],
                )
            else:
                logger.debug(
                    "Task %s[%s] dropped: its transaction was rolled back.",
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
    publish_all(pending.sends)


# 4. After the commit: the publish -------------------------------------------


def publish_all(sends: list[Send]) -> None:
    """Publish each send of a commit, in order. A send with a row goes,
    as prepared, through one bounded attempt per app
    (:mod:`~flask_celery_ctx.outbox.publish`): a broker that fails leaves
    it, and the rest, to the relay; the rows of those published are deleted
    later (:mod:`~flask_celery_ctx.outbox.cleanup`). A send without a row
    raises what its publish raised, after the others were sent.

    :param sends: The sends of the commit.
    """
    from .outbox.cleanup import delete_later
    from .outbox.publish import Attempt

    error: Exception | None = None
    published: dict[tuple[Engine, float], list[str]] = {}
    attempts: dict[Celery[t.Any], Attempt] = {}
    try:
        for send in sends:
            if send.row is None or send.message is None:
                try:
                    _send(send)
                except Exception as exc:
                    _report_unsent(send, exc)
                    error = error or exc
                continue
            app = send.task.app
            attempt = attempts.get(app) or attempts.setdefault(app, Attempt(app))
            try:
                done = attempt.publish(send.task, *send.message)
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
                engine, row, lease = send.row
                published.setdefault((engine, lease), []).append(row)
    finally:
        for attempt in attempts.values():
            attempt.close()
    for (engine, lease), ids in published.items():
        delete_later(engine, ids, lease)
    if error is not None:
        raise error


def _send(send: Send) -> AsyncResult[t.Any]:
    """Send without a row: the outbox is off, or the send's message could
    not be made before the commit; to the recorder of the tests while set."""
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
    recorder(Send(task, args, kwargs, options))
    return task.AsyncResult(options["task_id"])


def _report_unsent(send: Send, exc: Exception) -> None:
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
