"""Tasks declared with ``async def``.

A :class:`~flask_celery_ctx.ContextTask` whose ``run`` is a coroutine
function gets, when its class is made, a plain ``run`` that runs the
coroutine to completion through the app's :meth:`~flask.Flask.ensure_sync`,
in the task's context (see :doc:`/async`). Flask's ``async_to_sync``, from
asgiref, runs the coroutine on an event loop in a thread of its own and
copies the context variables there, so ``current_app``, ``g`` and the
database session are the task's; Celery keeps the running task and its
request in thread-local stacks, which the coroutine's thread gets too, and
so does a ``scoped_session`` scoped by thread
(:meth:`~flask_celery_ctx.db.base.Database.lend_session`).
"""

from __future__ import annotations

import functools
import inspect
import typing as t

from celery._state import _task_stack  # type: ignore[attr-defined]
from flask import current_app

from .db import database
from .worker import greenlets_patched

if t.TYPE_CHECKING:
    from celery import Task

    from .task import ContextTask

#: Set on the class of a task declared with ``async def``.
MARKER = "_flask_celery_ctx_coroutine"


def is_coroutine_task(task: Task[t.Any, t.Any]) -> bool:
    """Whether a task was declared with ``async def``.

    :param task: The task.
    """
    if getattr(type(task), MARKER, False):
        return True
    return inspect.iscoroutinefunction(inspect.unwrap(task.run))


def adapt(cls: type[ContextTask]) -> None:
    """Give a task class whose ``run`` is a coroutine function a ``run`` that
    runs it to completion; leave other classes alone.

    :param cls: A class being made, ``@ext.celery.task`` makes one per task.
    """
    run = vars(cls).get("run")
    if run is None:
        return
    bound = not isinstance(run, staticmethod)
    func = run if bound else run.__func__
    if not inspect.iscoroutinefunction(func):
        return

    @functools.wraps(func)
    def run_to_completion(self: ContextTask, *args: t.Any, **kwargs: t.Any) -> t.Any:
        return run_coroutine(self, func, (self, *args) if bound else args, kwargs)

    setattr(cls, "run", run_to_completion)  # noqa: B010
    setattr(cls, MARKER, True)


def run_coroutine(
    task: ContextTask,
    func: t.Callable[..., t.Awaitable[t.Any]],
    args: t.Sequence[t.Any],
    kwargs: dict[str, t.Any],
) -> t.Any:
    """Run ``func(*args, **kwargs)`` to completion through the app's
    ``ensure_sync``, with the task and its request current in the thread
    that runs the coroutine.

    :param task: The running task.
    :param func: The coroutine function.
    :param args: Its positional arguments.
    :param kwargs: Its keyword arguments.
    :raises RuntimeError: The worker runs the gevent pool.
    """
    if greenlets_patched("gevent"):
        raise RuntimeError(
            f"Task {task.name!r} is declared with 'async def', which the gevent"
            " pool cannot run: asyncio's event loop would block the worker's"
            " other greenlets. Run it in a worker of the prefork, threads or"
            " solo pool (a queue of its own, routed with task_routes, keeps it"
            " apart), or declare it with 'def' for gevent."
        )
    request = task.request
    found = database(current_app._get_current_object())  # type: ignore[attr-defined]
    lent = None if found is None else found.lend_session()

    async def in_task() -> t.Any:
        # Another thread, whose stacks are empty: push the task's.
        pushed = task.request is not request
        if pushed:
            task.request_stack.push(request)
            _task_stack.push(task)
        try:
            if lent is None:
                return await func(*args, **kwargs)
            with lent:
                return await func(*args, **kwargs)
        finally:
            if pushed:
                _task_stack.pop()
                task.request_stack.pop()

    return current_app.ensure_sync(in_task)()
