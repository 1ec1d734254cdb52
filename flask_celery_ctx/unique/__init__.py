"""Unique sends: ``unique_for=SECONDS``, as a task option
(``@ext.celery.task(unique_for=30)``) or a send option
(``task.apply_async(args, unique_for=30)``).

A send claims a row of the table ``flask_celery_unique``, whose primary key
is the task's name and a key of the send (a hash of its arguments, or of
``unique_key``), with the send's task id and an expiry. While a live row
holds the key for another task id, a send is not published, and returns
the result of that id. The row is claimed by one statement, ``INSERT ...
ON CONFLICT DO UPDATE ... WHERE expires <= now``: the database's unique
constraint decides between senders, whatever their process, and an expired
row is taken over in the same statement.

- :func:`send`: a send with ``apply_async``, ``delay`` or the publish of an
  outbox row: the row is claimed in a short transaction of its own, and
  deleted again when the publish fails;
- :func:`claim_on_commit`: a send with ``delay_on_commit``: the row is
  claimed in the caller's transaction, so that it is committed, or rolled
  back, with the outbox row;
- :func:`finished`: a worker, or an eager run, deletes the row when the task
  finishes, unless it is to run again (a retry, a message requeued).

The message carries the key in the header :data:`HEADER`; a task whose
message has none leaves the table alone.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import typing as t

from celery.exceptions import Reject
from celery.exceptions import Retry
from celery.utils import uuid
from kombu.utils.json import dumps

from .. import models
from ..errors import ConfigValueError

if t.TYPE_CHECKING:
    from celery.result import AsyncResult
    from flask import Flask
    from sqlalchemy.orm import Session

    from ..task import ContextTask

logger = logging.getLogger("flask_celery_ctx")

#: The message header that holds the key of a unique send.
HEADER = "flask_celery_ctx_unique"

# The options of apply_async that may be given by position, in order.
_POSITIONAL = ("task_id", "producer", "link", "link_error", "shadow")
# Options of a send that is part of a canvas, or a retry: always published.
_CANVAS = ("group_id", "chord", "chain", "parent_id", "retries")


def check_task(cls: type[ContextTask]) -> None:
    """Refuse a task class whose ``unique_for`` or ``unique_key`` would fail
    only at a send, and make a function given as ``unique_key`` a static
    method.

    :param cls: A task class, as the decorator makes it.
    :raises ValueError: ``unique_for`` is not a number of seconds, or
        ``unique_key`` is given without it.
    """
    # The name the decorator gives; a class written by hand has its own.
    name = vars(cls).get("name") or cls.__qualname__
    check_seconds(cls.unique_for, name)
    key = vars(cls).get("unique_key")
    if inspect.isfunction(key) or inspect.isbuiltin(key):
        cls.unique_key = staticmethod(key)
    if cls.unique_key is not None and not cls.unique_for:
        raise ConfigValueError(
            f"Task {name!r} has unique_key but no unique_for: give"
            " unique_for=SECONDS too, how long a send stays unique."
        )


def check_seconds(value: object, task_name: str) -> None:
    """Refuse a ``unique_for`` that is not ``None`` or seconds, 0 or more.

    :param value: The value given.
    :param task_name: The task, for the message.
    :raises ValueError: It is not.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigValueError(
            f"unique_for of task {task_name!r} must be a number of seconds, 0 or"
            f" more, not {value!r}: how long a send with equal arguments is not"
            " sent again while the first has not finished (0 turns it off)."
        )


def send(
    task: ContextTask,
    args: t.Any,
    kwargs: t.Any,
    arguments: tuple[t.Any, ...],
    options: dict[str, t.Any],
    publish: t.Callable[..., AsyncResult[t.Any]],
) -> AsyncResult[t.Any]:
    """Send a task with ``publish(args, kwargs, **options)`` unless a live
    row holds its key for another task id; then return that task's result.

    The row is claimed in a transaction of its own, committed before the
    publish, and deleted when the publish raises. A send that is part of a
    canvas (a member of a group or of a chord's header, the next task of a
    chain, a callback) or a retry is published without a claim: skipping it
    would leave the canvas waiting for a task that never runs.

    :param task: The task.
    :param args: Positional arguments, model instances as given.
    :param kwargs: Keyword arguments.
    :param arguments: Options of ``apply_async`` given by position.
    :param options: Options of ``apply_async``, ``unique_for`` and
        ``unique_key`` among them.
    :param publish: Sends the task.
    :raises ValueError: ``unique_for`` is not seconds, or ``unique_key`` is
        given without it.
    :raises TypeError: The key is not JSON.
    """
    options.update(zip(_POSITIONAL, arguments, strict=False))
    wanted = _pop(task, options)
    if wanted is None:
        return publish(args, kwargs, **options)
    from .table import claim_alone
    from .table import engine_of
    from .table import release

    seconds, unique_key = wanted
    app = _app(task)
    key = key_of(task, app, args, kwargs, unique_key)
    task_id = options.get("task_id") or uuid()
    options["task_id"] = task_id
    engine = engine_of(app)
    holder = claim_alone(engine, task.name, key, task_id, seconds)
    if holder != task_id:
        return task.AsyncResult(holder)
    options["headers"] = {**(options.get("headers") or {}), HEADER: key}
    try:
        return publish(args, kwargs, **options)
    except BaseException:
        release(engine, task.name, key, task_id)
        raise


def claim_on_commit(
    task: ContextTask, args: t.Any, kwargs: t.Any, options: dict[str, t.Any],
    session: Session,
) -> str | None:  # fmt: skip
    """Claim the key of a send queued for the commit, in the session's
    transaction: the row is committed with the outbox row, and a rollback
    drops both. A send of another transaction waits for this one to end.

    :param task: The task.
    :param args: Positional arguments.
    :param kwargs: Keyword arguments.
    :param options: Options of the send, with its ``task_id``; ``unique_for``
        and ``unique_key`` are taken out, and the header put in.
    :param session: The session whose commit the send waits for.
    :return: ``None`` when the send is to be queued; else the id of the task
        that holds the key, which the send returns the result of.
    """
    wanted = _pop(task, options)
    if task.unique_for or wanted is not None:
        # The publish after the commit claims nothing more.
        options["unique_for"] = 0
    if wanted is None:
        return None
    from ..outbox.table import written_to
    from .table import claim
    from .table import engine_of

    seconds, unique_key = wanted
    app = _app(task)
    session.flush()  # primary keys for pending instances, in the key
    key = key_of(task, app, args, kwargs, unique_key)
    engine = written_to(session) or engine_of(app)
    conn = session.connection(bind_arguments={"bind": engine})
    holder = claim(conn, engine, task.name, key, options["task_id"], seconds)
    if holder != options["task_id"]:
        return holder
    options["headers"] = {**(options.get("headers") or {}), HEADER: key}
    return None


def finished(
    app: Flask, task_name: str, task_id: str, key: str, exc: BaseException | None
) -> None:
    """Delete the row of a task that finished: it succeeded, or failed for
    good. A task that retries, or whose message is requeued, keeps it.
    Called by the worker's tracer and by an eager run; what the database
    raises is logged, and the row expires in its time.

    :param app: The Flask application.
    :param task_name: The task's name.
    :param task_id: The task's id.
    :param key: The key its message carried.
    :param exc: What the task raised, if anything.
    """
    if isinstance(exc, Retry) or (
        isinstance(exc, Reject) and getattr(exc, "requeue", False)
    ):
        return
    from .table import engine_of
    from .table import release

    try:
        release(engine_of(app), task_name, key, task_id)
    except Exception:
        logger.warning(
            "The unique key of task %s[%s] could not be released; it expires"
            " at the end of its unique_for.",
            task_name,
            task_id,
            exc_info=True,
        )


def key_of(
    task: ContextTask, app: Flask, args: t.Any, kwargs: t.Any, unique_key: t.Any
) -> str:
    """The key of a send: the SHA-256 of the JSON of ``unique_key``'s value,
    of what it returns when called with the arguments, or of the arguments
    themselves, model instances as references.

    :param task: The task.
    :param app: The Flask application, whose key signs references.
    :param args: Positional arguments.
    :param kwargs: Keyword arguments.
    :param unique_key: ``None``, a callable, or a value.
    :raises TypeError: The value is not JSON.
    """
    args, kwargs = list(args or ()), dict(kwargs or {})
    if unique_key is None:
        value = models.dump(task.name, [args, kwargs], app)[0]
    elif callable(unique_key):
        try:
            value = unique_key(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"The unique_key of task {task.name!r} cannot take the task's"
                f" arguments: {exc}. Give it a function with the task's"
                " signature, or a value."
            ) from exc
    else:
        value = unique_key
    try:
        text = dumps(value, sort_keys=True)
    except TypeError:
        raise TypeError(
            f"The unique key of task {task.name!r} cannot be made into JSON:"
            f" {value!r}. Give unique_key a string or a number, or a function"
            " of the task's arguments that returns one."
        ) from None
    return hashlib.sha256(text.encode()).hexdigest()


def _pop(task: ContextTask, options: dict[str, t.Any]) -> tuple[float, t.Any] | None:
    """Take ``unique_for`` and ``unique_key`` out of the options: the
    seconds and the key of a unique send, or ``None`` when the send is not
    unique, or is part of a canvas or a retry."""
    seconds = options.pop("unique_for", task.unique_for)
    # From the class: a function set by task_annotations is no method.
    unique_key = options.pop("unique_key", type(task).unique_key)
    check_seconds(seconds, task.name)
    if not seconds:
        if unique_key is not None and seconds is None:
            raise ValueError(
                f"Task {task.name!r} was sent with unique_key but no"
                " unique_for: give unique_for=SECONDS too, how long the send"
                " stays unique."
            )
        return None
    if any(options.get(name) for name in _CANVAS):
        return None
    return float(seconds), unique_key


def _app(task: ContextTask) -> Flask:
    from ..send import extension_of

    return extension_of(task).app
