"""The task registry of a :class:`~flask_celery_ctx.FlaskCelery` app.

Celery copies settings such as ``task_acks_late`` onto a task class, and
applies ``task_annotations``, the first time the task is bound to its app
(:meth:`celery.app.task.Task.bind`), which may be at import time, before
:meth:`~flask_celery_ctx.FlaskCelery.init_app` configured the app. The
registry sees every task before Celery binds it, keeps the class as
declared, and binds the tasks again whenever the config changes.
"""

from __future__ import annotations

import typing as t

from celery import Task
from celery.app.annotations import resolve_all
from celery.app.registry import TaskRegistry

from .coroutines import is_coroutine_task
from .task import ContextTask

_MISSING = object()


class Registry(TaskRegistry):
    """The task registry of a FlaskCelery app, which also notices the first
    task registered whose base class is not :class:`ContextTask`, and refuses
    such a task declared with ``async def``.

    :param on_other_task: Called when such a task is registered.
    """

    def __init__(self, on_other_task: t.Callable[[], None]) -> None:
        super().__init__()
        self._on_other_task = on_other_task
        # The attributes of each task's own class before it was bound.
        self._declared: dict[type[t.Any], dict[str, t.Any]] = {}

    def __setitem__(self, name: str, task: Task[t.Any, t.Any]) -> None:
        other = not isinstance(task, ContextTask)
        if other and is_coroutine_task(task):
            raise TypeError(
                f"Task {name!r} is declared with 'async def' on a base class"
                f" that is not a ContextTask ({type(task).__mro__[1].__qualname__}):"
                " Celery would return the coroutine without running it. Derive"
                " the base class from flask_celery_ctx.ContextTask, or declare"
                " the task with 'def'."
            )
        super().__setitem__(name, task)
        cls = type(task)
        if "__bound__" not in vars(cls):
            self._declared.setdefault(cls, dict(vars(cls)))
        if other:
            self._on_other_task()

    def rebind(self, previous_annotations: t.Any) -> None:
        """Bind the tasks already bound again, to their app's current config:
        the options taken from the config and the annotations are derived
        anew; options that the task declared, in its decorator or its class,
        stay.

        :param previous_annotations: The app's annotations before the config
            changed, which the tasks were annotated with.
        """
        for task in self.values():
            cls = type(task)
            declared = self._declared.get(cls)
            if declared is None or not vars(cls).get("__bound__"):
                continue  # not bound yet: it will be, to the current config
            derived = {attr for attr, _ in cls.from_config}
            for annotation in resolve_all(previous_annotations or (), cls):
                derived.update(key.lstrip("@") for key in annotation)
            for attr in derived:
                value = declared.get(attr, _MISSING)
                if value is not _MISSING:
                    setattr(cls, attr, value)
                elif attr in vars(cls):
                    delattr(cls, attr)
            # Bound before, so Celery does not annotate it again.
            cls.bind(task.app)
            cls.annotate()
            # Sending caches the options on the task itself.
            vars(task).pop("_exec_options", None)
