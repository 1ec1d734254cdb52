"""Pushing and popping a Flask application context, as Flask does, for less.

A worker pushes an application context for every task and pops it after.
Flask's :meth:`~flask.ctx.AppContext.pop` asks the app's
:meth:`~flask.Flask.ensure_sync` of each teardown function, at every pop,
whether it is a coroutine function (``inspect.iscoroutinefunction``, the
dearest part of a pop), and a push and a pop send three signals, which walk
their receivers even when none is connected.

:func:`push` and :func:`pop` do what Flask's do, in the same order and with
the same arguments, for less:

- they ask ``ensure_sync`` of a teardown function once, until the app's list
  of teardown functions changes;
- in place of a teardown function of the database integration, they call the
  substitute its adapter gives, which does the same for less (see
  :meth:`~flask_celery_ctx.db.base.Database.teardown_substitutes`);
- they send a signal only when a receiver is connected to it.

They do so for an app whose class keeps Flask's own ``app_context``,
``do_teardown_appcontext`` and ``ensure_sync``, on the Flask versions whose
application context they follow; for any other app, they call Flask's
methods.
"""

from __future__ import annotations

import typing as t
from functools import partial
from importlib.metadata import version

from flask import appcontext_popped
from flask import appcontext_pushed
from flask import appcontext_tearing_down
from flask import Flask
from flask.ctx import AppContext
from flask.globals import _cv_app

from .db import database
from .db.base import Teardown

#: The Flask versions whose ``AppContext.push`` and ``pop`` :func:`push` and
#: :func:`pop` follow.
FOLLOWED = ("3.0.", "3.1.")

_FOLLOWED_VERSION = version("flask").startswith(FOLLOWED)


class _Plan:
    """How to tear down a context of one app: its teardown functions, in the
    order Flask calls them, each as ``ensure_sync`` returned it for a plain
    function, worked out again by :func:`pop` when the app's list changes."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        #: A copy of the list of teardown functions, and the calls worked out
        #: from it: one attribute, which threads replace at once.
        self.calls: tuple[list[Teardown], tuple[Teardown, ...]] = ([], ())

    def work_out(self, app: Flask, funcs: list[Teardown]) -> tuple[Teardown, ...]:
        """Work out and keep the calls for the teardown functions ``funcs``
        of ``app``; return them."""
        found = database(app)
        substitutes = [] if found is None else found.teardown_substitutes()
        ensure_sync = app.ensure_sync
        calls = []
        for func in reversed(funcs):
            for original, substitute in substitutes:
                if func == original:
                    calls.append(substitute)
                    break
            else:
                if ensure_sync(func) is func:
                    calls.append(func)
                else:
                    # A coroutine function: wrapped for each call, as Flask
                    # does.
                    calls.append(partial(_call_async, ensure_sync, func))
        worked_out = tuple(calls)
        self.calls = (list(funcs), worked_out)
        return worked_out


def _call_async(
    ensure_sync: t.Callable[[Teardown], Teardown],
    func: Teardown,
    exc: BaseException | None,
) -> None:
    ensure_sync(func)(exc)


def _followed(app: Flask) -> bool:
    """Whether the app pushes and pops its contexts as Flask's own classes
    do, in a version :func:`pop` follows."""
    cls = type(app)
    return (
        _FOLLOWED_VERSION
        and cls.app_context is Flask.app_context
        and cls.do_teardown_appcontext is Flask.do_teardown_appcontext
        and cls.ensure_sync is Flask.ensure_sync
        and not {"app_context", "do_teardown_appcontext", "ensure_sync"}
        & vars(app).keys()
    )


# Where an app keeps its plan, in ``app.extensions``: with the app, for as
# long as it lives. A plan holds the app's teardown functions, which often
# refer to the app: kept anywhere else, it would keep the app alive.
_KEY = "flask_celery_ctx.appcontext"


def _plan_of(app: Flask) -> _Plan | None:
    """The plan of ``app``, made on first use, or ``None`` when the app needs
    Flask's own methods."""
    try:
        plan: _Plan | None = app.extensions[_KEY]
    except KeyError:
        plan = app.extensions[_KEY] = _Plan() if _followed(app) else None
    return plan


def push(app: Flask) -> AppContext:
    """Make an application context of ``app`` and push it, as
    ``app.app_context().push()`` does.

    :param app: The Flask application.
    :return: The context.
    """
    ctx = app.app_context()
    plan = app.extensions.get(_KEY) or _plan_of(app)
    if plan is None or type(ctx) is not AppContext:
        ctx.push()
        return ctx
    ctx._cv_tokens.append(_cv_app.set(ctx))
    if appcontext_pushed.receivers:
        appcontext_pushed.send(app, _async_wrapper=app.ensure_sync)
    return ctx


def pop(ctx: AppContext, exc: BaseException | None) -> None:
    """Pop an application context, as ``ctx.pop(exc)`` does.

    :param ctx: The context, the current one.
    :param exc: The exception passed to the teardown functions.
    :raises AssertionError: ``ctx`` is not the current context, as Flask
        raises.
    """
    app = ctx.app
    plan = app.extensions.get(_KEY) or _plan_of(app)
    if plan is None or type(ctx) is not AppContext:
        ctx.pop(exc)
        return
    tokens = ctx._cv_tokens
    try:
        if len(tokens) == 1:
            # Flask's do_teardown_appcontext(exc).
            funcs = app.teardown_appcontext_funcs
            known, calls = plan.calls
            if funcs != known:
                calls = plan.work_out(app, funcs)
            for call in calls:
                call(exc)
            if appcontext_tearing_down.receivers:
                appcontext_tearing_down.send(
                    app, _async_wrapper=app.ensure_sync, exc=exc
                )
    finally:
        current = _cv_app.get()
        _cv_app.reset(tokens.pop())
    if current is not ctx:
        raise AssertionError(
            f"Popped wrong app context. ({current!r} instead of {ctx!r})"
        )
    if appcontext_popped.receivers:
        appcontext_popped.send(app, _async_wrapper=app.ensure_sync)
