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

from flask import Flask
from flask.ctx import AppContext
from flask.ctx import RequestContext
from flask.globals import _cv_app

from .appcontext import pop as pop_app_context
from .appcontext import push as push_app_context
from .db import database

logger = logging.getLogger("flask_celery_ctx")


def in_app_context(app: Flask) -> bool:
    """Whether an application context of ``app`` is active.

    :param app: The Flask application.
    """
    # What has_app_context() and current_app look up, without the proxy.
    ctx = _cv_app.get(None)
    return ctx is not None and ctx.app is app


class TaskContext:
    """A context pushed for one task call: an application context of its
    own, under a test request context when the app is in testing mode.

    The test request context is pushed over the application context pushed
    first: on its own, a request context pushes an application context only
    when none of its app is active, and would share one left active by the
    caller (the one ``flask`` pushes for its commands, say), its ``g`` and
    its session, and never tear it down.

    :param app: The Flask application.
    """

    __slots__ = ("app", "app_ctx", "request_ctx")

    def __init__(self, app: Flask) -> None:
        self.app = app
        #: The application context, whose ``id()`` scopes the session;
        #: ``None`` for a traced call that shares its caller's.
        app_ctx = push_app_context(app)
        self.app_ctx: AppContext | None = app_ctx
        #: The test request context, in testing mode.
        self.request_ctx: RequestContext | None = None
        if app.config["TESTING"]:  # app.testing, without its descriptor
            self.request_ctx = request_ctx = app.test_request_context()
            try:
                request_ctx.push()
            except BaseException as exc:
                pop_app_context(app_ctx, exc)
                raise

    def pop(self, exc: BaseException | None = None) -> None:
        """Pop the context and make sure its database sessions are gone,
        whatever state their connections are in and even when a teardown
        function raised (see :meth:`~flask_celery_ctx.db.base.Database.teardown`).

        :param exc: The exception the task raised, passed to teardown
            functions.
        """
        app_ctx = self.app_ctx
        if app_ctx is None:  # a call that shares its caller's context
            return
        pop = pop_app_context if self.request_ctx is None else self._pop_both
        found = database(self.app)
        if found is None:
            pop(app_ctx, exc)
        else:
            found.teardown(app_ctx, pop, exc)

    def _pop_both(self, app_ctx: AppContext, exc: BaseException | None) -> None:
        try:
            t.cast(RequestContext, self.request_ctx).pop(exc)
        finally:
            pop_app_context(app_ctx, exc)

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
