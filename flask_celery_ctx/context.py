"""When a task gets a Flask context, and which one.

A task's context is pushed before Celery's tracer starts the task and popped
after it returns (see :mod:`flask_celery_ctx.tracing`), so it spans the
``task_prerun`` signal, ``before_start``, the body, ``on_success`` /
``on_failure`` / ``on_retry``, ``after_return`` and the ``task_postrun``
signal. Tasks of another base class get theirs on the two signals (see
:mod:`flask_celery_ctx.extension`).
"""

from __future__ import annotations

import logging
import typing as t
from contextlib import contextmanager

from flask import current_app
from flask import Flask
from flask import has_app_context
from flask.ctx import AppContext
from flask.ctx import RequestContext

from .db import database

logger = logging.getLogger("flask_celery_ctx")


def in_app_context(app: Flask) -> bool:
    """Whether an application context of ``app`` is active.

    :param app: The Flask application.
    """
    return has_app_context() and current_app._get_current_object() is app  # type: ignore[attr-defined]


class TaskContext:
    """A context pushed for one task call: an application context of its
    own, under a test request context when the app is in testing mode.

    :param app: The Flask application.
    """

    __slots__ = ("_ctx", "app", "app_ctx")

    def __init__(self, app: Flask) -> None:
        self.app = app
        #: The application context, whose ``id()`` scopes the session.
        self.app_ctx = app.app_context()
        self._ctx: AppContext | _TestRequestContext = (
            _TestRequestContext(self.app_ctx) if app.testing else self.app_ctx
        )
        self._ctx.push()

    def pop(self, exc: BaseException | None = None) -> None:
        """Pop the context and make sure its database sessions are gone,
        whatever state their connections are in and even when a teardown
        function raised (see :class:`~flask_celery_ctx.db.base.Database`).

        :param exc: The exception the task raised, passed to teardown
            functions.
        """
        found = database(self.app)
        if found is not None:
            found.before_teardown(self.app_ctx, exc)
        try:
            self._ctx.pop(exc)
        finally:
            if found is not None:
                found.after_teardown(self.app_ctx)

    def close(self, exc: BaseException | None, task_name: str) -> None:
        """Pop the context once its task is done, logging, not raising, what
        a teardown function raised: the task's outcome is already recorded,
        and a worker would report the error as a second outcome.

        :param exc: The exception the task raised, passed to teardown
            functions.
        :param task_name: The task's name, for the log.
        """
        try:
            self.pop(exc)
        except Exception:
            logger.exception("Tearing down the context of task %r raised", task_name)


class _TestRequestContext:
    """A test request context over an application context of its own.

    A request context pushes an application context only when none of its
    app is active; it would share one left active by the caller (the one
    ``flask`` pushes for its commands, say), its ``g`` and its session, and
    never tear it down.

    :param app_ctx: The application context, pushed first and popped last.
    """

    __slots__ = ("app_ctx", "request_ctx")

    def __init__(self, app_ctx: AppContext) -> None:
        self.app_ctx = app_ctx
        self.request_ctx: RequestContext = app_ctx.app.test_request_context()

    def push(self) -> None:
        self.app_ctx.push()
        try:
            self.request_ctx.push()
        except BaseException:
            self.app_ctx.pop()
            raise

    def pop(self, exc: BaseException | None = None) -> None:
        try:
            self.request_ctx.pop(exc)
        finally:
            self.app_ctx.pop(exc)


@contextmanager
def inline_context(app: Flask) -> t.Iterator[None]:
    """Run a block in the caller's context of ``app``, or in a new one pushed
    for it when there is none.

    :param app: The Flask application.
    """
    if in_app_context(app):
        yield
        return
    ctx = TaskContext(app)
    try:
        yield
    except BaseException as exc:
        ctx.pop(exc)
        raise
    ctx.pop()
