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

The coroutine never outlives the task's context: when the waiting thread is
interrupted (a soft time limit raises ``SoftTimeLimitExceeded`` there), the
coroutine is cancelled and waited for before the exception goes on, so that
what it does after the interruption is done in the context, whose session
is then torn down.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
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
    running = _Running()

    async def in_task() -> t.Any:
        running.start()
        # Another thread, whose stacks are empty: push the task's.
        pushed = task.request is not request
        if pushed:
            task.request_stack.push(request)
            _task_stack.push(task)
        try:
            if lent is None:
                return await running.outcome(func(*args, **kwargs))
            with lent:
                return await running.outcome(func(*args, **kwargs))
        finally:
            try:
                await _end_other_tasks()
            finally:
                if pushed:
                    _task_stack.pop()
                    task.request_stack.pop()
                running.end()

    try:
        return current_app.ensure_sync(in_task)()
    except BaseException as exc:
        # Interrupted: as a ``def`` task that catches the exception, a
        # coroutine that handles its cancellation has the last word.
        if running.cancel_and_wait() and isinstance(exc, Exception):
            return running.result()
        raise


async def _end_other_tasks() -> None:
    """Cancel the tasks that the coroutine left on its loop, and wait for
    them, while the task's context lasts: ``asyncio.run`` would do it only
    after the task's end once the task was interrupted."""
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    for other in others:
        other.cancel()
    await asyncio.gather(*others, return_exceptions=True)


class _Running:
    """A task's coroutine, seen from the thread that waits for it, which may
    be interrupted: its asyncio task, its end and its outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._task: asyncio.Task[t.Any] | None = None
        self._cancelled = False
        self._ended = threading.Event()
        self._result: t.Any = None
        self._error: BaseException | None = None

    def start(self) -> None:
        """Called in the coroutine's loop before the task's coroutine is
        made.

        :raises asyncio.CancelledError: It was cancelled before it started.
        """
        with self._lock:
            if self._cancelled:
                raise asyncio.CancelledError()
            self._task = asyncio.current_task()

    async def outcome(self, awaitable: t.Awaitable[t.Any]) -> t.Any:
        """Await the task's coroutine, keeping its result or its error.

        :param awaitable: The coroutine.
        """
        try:
            self._result = await awaitable
        except BaseException as exc:
            self._error = exc
            raise
        return self._result

    def end(self) -> None:
        """Called in the coroutine's loop once it ended."""
        with self._lock:
            self._task = None
            self._ended.set()

    def cancel_and_wait(self) -> bool:
        """Cancel the coroutine and wait for its end; one that has not
        started never will.

        :return: Whether it was running and ended otherwise than by the
            cancellation: its outcome is then the task's.
        """
        with self._lock:
            self._cancelled = True
            task = self._task
            if task is not None:
                task.get_loop().call_soon_threadsafe(task.cancel)
        if task is None:
            return False
        self._ended.wait()
        return not isinstance(self._error, asyncio.CancelledError)

    def result(self) -> t.Any:
        """What the coroutine returned, or raised, once it ended."""
        if self._error is not None:
            raise self._error
        return self._result
