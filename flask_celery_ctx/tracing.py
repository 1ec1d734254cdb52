"""How Celery's tracer runs a :class:`~flask_celery_ctx.ContextTask` in a
Flask context.

Celery traces every task it runs (``celery/app/trace.py``): it pushes the
task's request, sends ``task_prerun``, calls its loader's ``on_task_init``,
then ``before_start``, the task itself (its ``__call__``), ``on_success`` /
``on_failure`` / ``on_retry`` and ``after_return``, and sends
``task_postrun`` from a ``finally`` block. A worker builds each task's tracer
once and keeps it as the task's ``__trace__``; ``apply()`` builds one per
call.

Three places take part in a traced call of a ContextTask, and share a
:class:`TracedCall`, which is also the context pushed for the call:

- the context is pushed before the tracer runs and popped after it returns:
  around the worker's tracer (:func:`trace_in_context`) and around
  ``apply()``;
- the loader (:class:`TaskLoader`) loads the model instances in the
  arguments, once the request is pushed and before the hooks see them;
- the task's ``__call__`` tells the traced call from a direct call, which
  needs a context of its own, raises what loading the instances raised, and
  rolls back the session of a task that raised before the tracer calls its
  errbacks and hooks (:meth:`TracedCall.failed`); the body of a task
  declared with ``once=True`` runs through :mod:`flask_celery_ctx.once.run`,
  which commits its work with the record of its id, or skips it.

In eager mode, Celery's ``apply()`` runs the next attempt of a task that
retried inside the failed attempt's call; :func:`end_retried_attempt` pops
the failed attempt's context first.

A worker runs this for every message, so it makes few objects and calls:
each thread keeps its TracedCall current from one task to the next and starts
it again for each (:func:`begin`), the context is pushed and popped as Flask
does it, for less (:mod:`flask_celery_ctx.appcontext`), and Celery skips its
task signals while nothing is connected to them, so a ContextTask does not
pay for their dispatch.
"""

from __future__ import annotations

import typing as t
from contextvars import ContextVar
from contextvars import Token

from celery.exceptions import Retry
from celery.loaders.app import AppLoader

from . import carry
from . import unique
from .appcontext import push as push_app_context
from .context import logger
from .context import TaskContext
from .db import database

if t.TYPE_CHECKING:
    from celery import Task
    from flask import Flask

    from .extension import FlaskCelery
    from .task import ContextTask

#: The header of a unique send's key, looked up in each traced request.
_UNIQUE = unique.HEADER


class TracedCall(TaskContext):
    """A call of a task that Celery's tracer runs, and the context pushed for
    it: pushed before the tracer starts, popped after it returns.

    Popping it passes the task's exception to the teardown functions: the one
    the tracer raised, or the one the task failed with, which the tracer
    returns.

    :param app: The Flask application.
    :param task: The task.
    :param args: The positional arguments the tracer passes to the hooks and
        to the task: model instances replace the references in place.
    :param kwargs: The keyword arguments, likewise.
    :param task_id: The id the tracer runs the task with.
    :param push: Whether to push a context for the call; when false, the
        call shares its caller's, and popping it does nothing.
    """

    __slots__ = (
        "args",
        "error",
        "exception",
        "kwargs",
        "started",
        "task",
        "task_id",
    )

    def start(
        self,
        app: Flask,
        task: ContextTask,
        args: t.Any,
        kwargs: t.Any,
        task_id: str,
        push: bool = True,
    ) -> None:
        """Start a call, with the parameters of the class; the worker's
        tracer starts the call of its thread again for each task."""
        #: The task; ``None`` once the call of a worker's thread is over.
        self.task: ContextTask | None = task
        self.args = args
        self.kwargs = kwargs
        self.task_id = task_id
        #: What loading the model instances raised.
        self.error: Exception | None = None
        #: Whether the tracer called the task.
        self.started = False
        #: The exception the task failed with, for the teardown functions.
        self.exception: BaseException | None = None
        if push and app.config["TESTING"]:
            TaskContext.__init__(self, app)
            return
        # TaskContext's __init__ outside testing mode, inline: a worker runs
        # it for every task.
        self.app = app
        self.request_ctx = None
        if push:
            self.app_ctx = push_app_context(app)
        else:
            self.app_ctx = None

    __init__ = start

    def failed(self, exc: Exception) -> None:
        """Tell that the task raised ``exc``, before the tracer handles it.

        A call in a context of its own rolls back what the task left
        uncommitted, and drops its sends waiting for the commit: the tracer
        then calls the errbacks, ``on_failure`` or ``on_retry`` in the same
        context and session, and their commits must not commit the failed
        task's work. A call that shares its caller's context leaves the
        caller's transaction alone.

        :param exc: The task's exception; ``Retry``, ``Ignore`` and
            ``Reject`` too.
        """
        self.exception = exc
        if self.app_ctx is not None:
            found = database(self.app)
            if found is not None:
                found.rollback()


_current: ContextVar[TracedCall | None] = ContextVar(
    "flask_celery_ctx_traced_call", default=None
)


_set = _current.set
_reset = _current.reset

#: The traced call in progress, if any: the task's ``__call__`` tells with it
#: a call by the tracer (``call.task`` is the task and ``call.started`` is
#: false) from a direct call.
current = _current.get


def begin(
    app: Flask,
    task: ContextTask,
    args: t.Any,
    kwargs: t.Any,
    task_id: str,
    push: bool = True,
) -> tuple[TracedCall, Token[TracedCall | None] | None]:
    """Start a traced call and make it the current one, with the parameters
    of :class:`TracedCall`.

    Each thread, or greenlet, keeps one call current from one task to the
    next, started again for each, rather than one made and made current per
    task. A call traced inside another gets a call of its own, current until
    :func:`end`.

    :return: The call, and the token that :func:`end` resets the current
        call with, if any.
    """
    call = _current.get()
    if call is None:
        # The first call of this thread: it stays current.
        call = TracedCall(app, task, args, kwargs, task_id, push)
        _set(call)
        return call, None
    if call.task is None:
        call.start(app, task, args, kwargs, task_id, push)
        return call, None
    call = TracedCall(app, task, args, kwargs, task_id, push)
    return call, _set(call)


def end(
    call: TracedCall, token: Token[TracedCall | None] | None, task_name: str
) -> None:
    """End a call that :func:`begin` started: pop its context, logging what
    a teardown function raised (the task's outcome is already recorded), and
    forget the task, its arguments, its contexts and its app, which the call
    of a thread would otherwise keep until its next task.

    :param call: The call.
    :param token: What :func:`begin` returned with it.
    :param task_name: The task's name, for the log.
    """
    if token is not None:
        _reset(token)
    # TaskContext.close, inline: this runs for every task.
    try:
        call.pop(call.exception)
    except Exception:
        logger.exception("Tearing down the context of task %r raised", task_name)
    call.task = call.args = call.kwargs = None
    call.app_ctx = call.request_ctx = None
    call.app = None  # type: ignore[assignment]  # until the call starts again


def end_retried_attempt(task: ContextTask, task_id: str | None) -> None:
    """Pop the context of the failed attempt of an eager task that
    ``apply()`` is about to run again.

    In eager mode, ``self.retry()`` makes Celery's ``apply()`` run the next
    attempt, with the same task id, once the tracer returns, while the failed
    attempt's context is still pushed. Popping it first gives each attempt a
    context and session of its own, as in a worker. An attempt that shared its
    caller's context leaves it to the next one.

    :param task: The task ``apply()`` runs.
    :param task_id: The id it runs it with.
    """
    call = _current.get()
    if (
        call is None
        or call.task is not task
        or call.app_ctx is None
        or task_id is None
        or call.task_id != task_id
        or not isinstance(call.exception, Retry)
    ):
        return
    call.close(call.exception, task.name)
    call.app_ctx = None


def trace_in_context(
    ext: FlaskCelery, task: ContextTask, tracer: t.Callable[..., t.Any]
) -> t.Callable[..., t.Any]:
    """Wrap a task's tracer, once, when a worker builds it: each call runs
    in a fresh context of the app the extension is bound to.

    A worker never reuses a context that is active when the task starts:
    each task gets its own ``g`` and its own session.

    :param ext: The extension of the task's Celery app.
    :param task: The task.
    :param tracer: What ``celery.app.trace.build_tracer`` built for the task.
    :return: The tracer to call for each message, with the tracer's
        arguments; it returns what the tracer returns, a ``trace_ok_t``,
        whose ``info`` holds the task's exception, if any.
    """

    name = task.name

    # Runs for every message.
    def trace(uuid: str, args: t.Any, kwargs: t.Any, request: t.Any = None) -> t.Any:
        # ext.app raises when the extension is bound to no app.
        call, token = begin(ext._app or ext.app, task, args, kwargs, uuid)
        try:
            traced = tracer(uuid, args, kwargs, request)
        except BaseException as exc:
            call.exception = exc
            raise
        else:
            info = traced[1]
            if info is not None and isinstance(info.retval, BaseException):
                call.exception = info.retval
            return traced
        finally:
            end(call, token, name)
            if request is not None and _UNIQUE in request:
                # A unique send: its key is free once the task finished.
                unique.finished(ext.app, name, uuid, request[_UNIQUE], call.exception)

    return trace


class TaskLoader(AppLoader):
    """Celery's loader of a :class:`~flask_celery_ctx.FlaskCelery` app: the
    default one, which also sets the values a task carries on its ``g`` (see
    :doc:`/carry`), and loads the model instances in the arguments of a
    traced :class:`~flask_celery_ctx.ContextTask` (see :doc:`/models`).
    """

    def on_task_init(self, task_id: str, task: Task[t.Any, t.Any]) -> None:
        """Called by the tracer for every task, in its context, once its
        request is pushed and before ``before_start``.

        A failure to load waits for the task's ``__call__``: what this method
        raises, Celery reports as an internal error, not as the task's.

        :param task_id: The task's id.
        :param task: The task.
        """
        # AppLoader's own does nothing. This runs for every task.
        names = self.app.flask_celery.carry_g  # type: ignore[attr-defined]
        if names:
            carry.restore(names, task)
        # A task without arguments has no instances to load.
        call = _current.get()
        if call is None or call.task is not task or not (call.args or call.kwargs):
            return
        try:
            call.task.load_instances(call.args, call.kwargs)
        except Exception as exc:
            call.error = exc
