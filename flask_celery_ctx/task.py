"""The task class of a :class:`~flask_celery_ctx.FlaskCelery` app."""

from __future__ import annotations

import typing as t

from celery import Task
from kombu.exceptions import EncodeError

from .context import inline_context

if t.TYPE_CHECKING:
    from celery.result import AsyncResult
    from celery.result import EagerResult

    from .extension import FlaskCelery


def extension_of(task: Task[t.Any, t.Any]) -> FlaskCelery:
    """Return the :class:`~flask_celery_ctx.FlaskCelery` whose Celery app a
    task belongs to.

    :param task: A task.
    :raises RuntimeError: The task's Celery app was not made by
        :class:`~flask_celery_ctx.FlaskCelery`.
    """
    ext: FlaskCelery | None = getattr(task.app, "flask_celery", None)
    if ext is None:
        raise RuntimeError(
            f"Task {task.name!r} belongs to a Celery app that FlaskCelery did not"
            " make. Declare tasks with '@ext.celery.task', where 'ext' is your"
            " FlaskCelery instance."
        )
    return ext


class ContextTask(Task):  # type: ignore[type-arg]
    """The default base class of tasks declared with ``@ext.celery.task``.

    In a worker, every task of the Celery app runs in a fresh Flask context,
    whatever its base class; that is done with Celery's task signals. This
    class adds what only a task class can do:

    - a direct call, ``add(1, 2)``, runs in the caller's application context,
      or in one pushed for the call when none is active;
    - sending a task before :meth:`~flask_celery_ctx.FlaskCelery.init_app`,
      or with arguments the serializer refuses, raises an error that says
      what to do.
    """

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        request = self.request_stack.top
        if request is not None and not request.called_directly:
            # Traced by Celery: the task signals handle the context.
            return self.run(*args, **kwargs)
        with inline_context(extension_of(self).app):
            return super().__call__(*args, **kwargs)

    def apply(
        self,
        args: t.Any = None,
        kwargs: t.Any = None,
        *arguments: t.Any,
        **options: t.Any,
    ) -> EagerResult[t.Any]:
        """Run the task inline, as :meth:`celery.app.task.Task.apply` does, in
        the caller's context of the bound app or in one pushed for it.

        :raises RuntimeError: :meth:`~flask_celery_ctx.FlaskCelery.init_app`
            was not called yet.
        """
        extension_of(self).app  # noqa: B018 (raises when not bound yet)
        return super().apply(args, kwargs, *arguments, **options)

    def apply_async(
        self,
        args: t.Any = None,
        kwargs: t.Any = None,
        *arguments: t.Any,
        **options: t.Any,
    ) -> AsyncResult[t.Any]:
        """Send the task, as :meth:`celery.app.task.Task.apply_async` does.

        :raises RuntimeError: :meth:`~flask_celery_ctx.FlaskCelery.init_app`
            was not called yet.
        :raises kombu.exceptions.EncodeError: The serializer refuses the
            arguments; the message names the task and what to pass instead.
        """
        extension_of(self).app  # noqa: B018 (raises when not bound yet)
        try:
            return super().apply_async(args, kwargs, *arguments, **options)
        except EncodeError as exc:
            serializer = options.get("serializer") or self.serializer or "json"
            raise EncodeError(
                f"The arguments of task {self.name!r} cannot be serialized with"
                f" {serializer!r}: {exc}. Pass values the serializer accepts:"
                " for JSON, ids, strings, numbers, lists and dicts."
            ) from exc
