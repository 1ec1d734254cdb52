"""Exactly-once effects of a task per task id: ``@ext.celery.task(once=True)``.

- :mod:`~flask_celery_ctx.once.table`: the table of the ids whose work was
  committed, ``flask_celery_once``;
- :mod:`~flask_celery_ctx.once.run`: how a worker runs such a task: the
  check, the body, the record and the commit in one transaction, or the
  skip of a duplicate;
- :mod:`~flask_celery_ctx.once.prune`: what deletes the records older than
  the retention, from a thread in every worker.

This module holds the settings alone and imports no SQLAlchemy: every app
reads them, with a database or without.
"""

from __future__ import annotations

import typing as t

from ..errors import ConfigTypeError

if t.TYPE_CHECKING:
    from celery import Celery

    from ..task import ContextTask
    from ..tracing import TracedCall

#: The settings, read from the Flask config as Celery settings are:
#: ``CELERY_ONCE_RETENTION`` or ``CELERY = {"once_retention": ...}``.
SETTINGS = ("once_retention",)
#: Seconds a record is kept: a copy of a message delivered later runs again.
DEFAULT_RETENTION = 7 * 24 * 3600.0
#: The longest wait, in seconds, between two prunings by a worker.
PRUNE_INTERVAL = 3600.0


def check_settings(settings: t.Mapping[str, t.Any]) -> None:
    """Refuse a value of the settings that would fail only in a worker.

    :param settings: The Celery settings read from the Flask config.
    :raises ValueError: A setting has a wrong value; the message names it.
    """
    value = settings.get("once_retention")
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
    ):
        raise ValueError(
            f"CELERY_ONCE_RETENTION must be a number of seconds, more than 0,"
            f" not {value!r}: how long the ids of the tasks declared with"
            " once=True are kept, so that a copy of their message delivered"
            " within it is skipped."
        )


def retention(celery: Celery[t.Any]) -> float:
    """The setting ``once_retention``, in seconds.

    :param celery: The Celery app.
    """
    value = celery.conf.get("once_retention")
    return DEFAULT_RETENTION if value is None else float(value)


def check_option(task_name: str, value: object) -> None:
    """Refuse a value of the ``once`` option that is not a bool.

    :param task_name: The task, for the message.
    :param value: The value given.
    :raises TypeError: It is not ``True`` or ``False``.
    """
    if not isinstance(value, bool):
        raise ConfigTypeError(
            f"The option once={value!r} of task {task_name!r} must be True or"
            " False: True commits the task's work with a record of its id, and"
            " skips any later delivery of the same id."
        )


def run_body(task: ContextTask, call: TracedCall, args: t.Any, kwargs: t.Any) -> t.Any:
    """Run the body of a task declared with ``once=True``, in a traced call
    (see :func:`flask_celery_ctx.once.run.run`).

    :param task: The task.
    :param call: Its traced call.
    :param args: Its positional arguments.
    :param kwargs: Its keyword arguments.
    :return: What the body returned, or what it returned the first time.
    """
    from .run import run as run_once

    return run_once(task, call, args, kwargs)
