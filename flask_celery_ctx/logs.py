"""A logging filter that puts the carried values of ``g`` and the task id on
log records (see :doc:`/carry`)."""

from __future__ import annotations

import logging
import typing as t

from celery import current_task
from flask import current_app
from flask import g
from flask import has_app_context


class CarriedValuesFilter(logging.Filter):
    """Set, on every record it sees, an attribute per carried value of ``g``
    and ``task_id``, the id of the task that logs it, for formats such as
    ``"[%(request_id)s %(task_id)s] %(message)s"``.

    Attach it to a handler, so that it sees the records of every logger, in
    the web process and in the worker alike. Outside an application
    context, or when ``g`` lacks a value, the attribute is ``default``.

    .. code-block:: python

        {"()": "flask_celery_ctx.CarriedValuesFilter", "names": ["request_id"]}

    :param names: The attributes of ``g`` every record gets, so that a format
        may name them; values that the app's ``carry_g`` names and ``g`` has
        are set too.
    :param default: The value of an attribute that ``g`` lacks, and of
        ``task_id`` outside a task.
    """

    def __init__(self, names: t.Iterable[str] = (), default: t.Any = "-") -> None:
        super().__init__()
        #: The attributes every record gets.
        self.names = tuple(names)
        #: The value of those that ``g`` lacks.
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        """Set the attributes on ``record``; keep every record.

        :param record: The log record.
        """
        names = self.names
        if has_app_context():
            ext = current_app.extensions.get("celery")
            if ext is not None:
                names = (*names, *ext.carry_g)
            for name in names:
                setattr(record, name, g.get(name, self.default))
        else:
            for name in names:
                setattr(record, name, self.default)
        task = current_task._get_current_object()  # type: ignore[attr-defined]
        record.task_id = self.default if task is None else task.request.id
        return True
