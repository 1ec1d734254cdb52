"""When a task gets a Flask context, and which one.

A task's life in a worker is traced by Celery (``celery/app/trace.py``): the
``task_prerun`` signal, ``before_start``, the body, ``on_success`` /
``on_failure`` / ``on_retry``, ``after_return``, and the ``task_postrun``
signal, sent from a ``finally`` block. The context is pushed on
``task_prerun`` and popped on ``task_postrun``, so it spans all of them, for
every task of the Celery app, whatever its base class.
"""

from __future__ import annotations

import typing as t
from contextlib import contextmanager

from flask import current_app
from flask import Flask
from flask import has_app_context
from flask.ctx import AppContext
from flask.ctx import RequestContext
from flask.globals import app_ctx

from .sqlalchemy import discard_session
from .sqlalchemy import invalidate_interrupted_session


def in_app_context(app: Flask) -> bool:
    """Whether an application context of ``app`` is active.

    :param app: The Flask application.
    """
    return has_app_context() and current_app._get_current_object() is app  # type: ignore[attr-defined]


class TaskContext:
    """A context pushed for one task call: an application context, or a test
    request context when the app is in testing mode.

    :param app: The Flask application.
    """

    __slots__ = ("_ctx", "app", "app_ctx")

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._ctx: AppContext | RequestContext = (
            app.test_request_context() if app.testing else app.app_context()
        )
        self._ctx.push()
        #: The application context, whose ``id()`` scopes the session.
        self.app_ctx: AppContext = app_ctx._get_current_object()  # type: ignore[attr-defined]

    def pop(self, exc: BaseException | None = None) -> None:
        """Pop the context and make sure its database session is gone, even
        when a teardown function raised.

        :param exc: The exception the task raised, passed to teardown
            functions.
        """
        invalidate_interrupted_session(self.app, exc)
        try:
            self._ctx.pop(exc)
        finally:
            discard_session(self.app, self.app_ctx)


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
