"""The task class of a :class:`~flask_celery_ctx.FlaskCelery` app."""

from __future__ import annotations

import types
import typing as t

from celery import Task
from celery.utils import uuid
from flask.globals import _cv_app
from kombu.exceptions import EncodeError

from . import coroutines
from . import models
from . import once
from . import send
from . import tracing
from . import unique
from .context import inline_context
from .db import database
from .send import extension_of
from .tracing import current as _current_call

if t.TYPE_CHECKING:
    from celery.result import AsyncResult
    from celery.result import EagerResult
    from typing_extensions import ParamSpec
    from typing_extensions import TypeVar

    # Defaults, for ``ContextTask`` without type arguments: any arguments.
    _P = ParamSpec("_P", default=...)
    _R_co = TypeVar("_R_co", covariant=True, default=t.Any)
    _GenericTask = Task
else:
    _P = t.ParamSpec("_P")
    _R_co = t.TypeVar("_R_co", covariant=True)

    class _TaskOf:
        """``_GenericTask[P, R]``: Celery's Task, generic in its parameters
        and result for type checkers, as in its type stubs, and Task itself
        at run time. Celery's own takes type arguments from 5.5 on only; a
        class of ours in the bases of every task would lengthen Celery's
        look-ups of their methods (``task_has_custom``, for each tracer)."""

        def __getitem__(self, params: t.Any) -> t.Any:
            return types.GenericAlias(Task, params)

    _GenericTask = _TaskOf()


class ContextTask(_GenericTask[_P, _R_co]):
    """The default base class of tasks declared with ``@ext.celery.task``.

    - Run by a worker or inline with :meth:`apply`, the task runs in a Flask
      context that spans its hooks too (see :doc:`/contexts`). A task
      declared with ``base=`` a class of another library derives from both
      (see :func:`with_context`).
    - A direct call, ``add(1, 2)``, runs in the caller's application context,
      or in one pushed for the call when none is active.
    - When the task raises, the session of a context pushed for it is rolled
      back before Celery calls its errbacks and hooks, which then commit
      only their own work (see :doc:`/sessions`).
    - Sending a task before :meth:`~flask_celery_ctx.FlaskCelery.init_app`,
      or with arguments the serializer refuses, raises an error that says
      what to do.
    - :meth:`delay_on_commit` and :meth:`apply_async_on_commit` send after
      the commit of the session's transaction (see :doc:`/on-commit`).
    - Model instances in the arguments travel as references and arrive
      loaded in the task's session (see :doc:`/models`).
    - A task declared with ``async def`` runs its coroutine to completion
      through the app's ``ensure_sync`` (see :doc:`/async`).
    - For type checkers it is generic, as Celery's ``Task`` is in its type
      stubs: ``ContextTask[[int, int], int]`` takes two ints and returns an
      int; ``ContextTask`` alone takes anything (see :doc:`/typing`).
    """

    #: What an argument that refers to a deleted row becomes: when false, the
    #: task fails with :exc:`~flask_celery_ctx.MissingInstanceError`; when
    #: true, the argument is ``None``. Set it with
    #: ``@ext.celery.task(allow_missing_instances=True)``.
    allow_missing_instances: bool = False

    #: Whether the task's work commits once per task id: when true, the
    #: library commits the task's session when it returns, with a record of
    #: its id, and a later delivery of the same id is skipped. Set it with
    #: ``@ext.celery.task(once=True)`` (see :doc:`/once`).
    once: bool = False

    #: Seconds during which a send with equal arguments is not published
    #: again while the first has not finished; it returns the first's
    #: result (see :doc:`/unique`). Set it with
    #: ``@ext.celery.task(unique_for=30)``, or per send with
    #: ``apply_async(..., unique_for=30)``; ``None`` or ``0``: off.
    unique_for: float | None = None

    #: What makes two sends equal in the place of their arguments: a value,
    #: or a function of the task's arguments that returns one (see
    #: :doc:`/unique`).
    unique_key: t.Any = None

    _context_tracer: t.Callable[..., t.Any] | None = None

    #: The ``__call__`` of a base class that follows ContextTask in the
    #: class's bases (see :func:`with_context`), which a traced call runs in
    #: the place of ``run``; ``None`` when that is Celery's own.
    _base_call: t.Callable[..., t.Any] | None = None

    if not t.TYPE_CHECKING:
        # ContextTask[[int, int], int], on Celery 5.4 too.
        __class_getitem__ = classmethod(types.GenericAlias)

    def __init_subclass__(cls, **kwargs: t.Any) -> None:
        super().__init_subclass__(**kwargs)
        coroutines.adapt(cls)
        unique.check_task(cls)
        mro = cls.__mro__
        after = mro[mro.index(ContextTask) + 1 :]
        owner = next(base for base in after if "__call__" in vars(base))
        cls._base_call = None if owner is Task else vars(owner)["__call__"]

    @property
    def __trace__(self) -> t.Callable[..., t.Any] | None:
        """The tracer a worker runs the task with, in a fresh context.

        A worker builds a tracer for each task with Celery's ``build_tracer``
        and stores it here, before it runs any; it is kept wrapped in
        :func:`~flask_celery_ctx.tracing.trace_in_context`.

        :meta private:
        """
        return self._context_tracer

    @__trace__.setter
    def __trace__(self, tracer: t.Callable[..., t.Any] | None) -> None:
        self._context_tracer = (
            None
            if tracer is None
            else tracing.trace_in_context(extension_of(self), self, tracer)
        )

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R_co:
        call = _current_call()
        if call is not None and call.task is self and not call.started:
            # Traced by Celery, in the context pushed for it.
            call.started = True
            try:
                if call.error is not None:
                    raise call.error
                if self.once:
                    return t.cast("_R_co", once.run_body(self, call, args, kwargs))
                if self._base_call is not None:
                    return t.cast("_R_co", self._base_call(*args, **kwargs))
                return self.run(*args, **kwargs)
            except Exception as exc:
                call.failed(exc)
                raise
        with inline_context(extension_of(self).app):
            return super().__call__(*args, **kwargs)

    def apply(
        self,
        args: t.Any = None,
        kwargs: t.Any = None,
        link: t.Any = None,
        link_error: t.Any = None,
        task_id: str | None = None,
        retries: int | None = None,
        throw: bool | None = None,
        logfile: t.Any = None,
        loglevel: t.Any = None,
        headers: t.Any = None,
        **options: t.Any,
    ) -> EagerResult[_R_co]:
        """Run the task inline, as :meth:`celery.app.task.Task.apply` does, in
        the caller's context of the bound app or in one pushed for it. Each
        attempt of a task that retries in a context pushed for it runs in a
        new one, after the failed attempt's context is popped.

        :raises RuntimeError: :meth:`~flask_celery_ctx.FlaskCelery.init_app`
            was not called yet.
        """
        app = extension_of(self).app
        if task_id is None:
            # Celery's apply() makes the same, if not given one.
            task_id = uuid()
        else:  # the next attempt of a task that retried, maybe
            tracing.end_retried_attempt(self, task_id)
        # Copies: model references in them are replaced by instances in place.
        args, kwargs = list(args or ()), dict(kwargs or {})
        # not in_app_context(app), inline.
        caller = _cv_app.get(None)
        push = caller is None or caller.app is not app
        call, token = tracing.begin(app, self, args, kwargs, task_id, push)
        try:
            result = super().apply(
                args,
                kwargs,
                link,
                link_error,
                task_id,
                retries,
                throw,
                logfile,
                loglevel,
                headers,
                **options,
            )
        except BaseException as exc:
            call.exception = exc
            raise
        else:
            retval = result.result
            if isinstance(retval, BaseException):
                call.exception = retval
            return result
        finally:
            tracing.end(call, token, self.name)
            if headers and unique.HEADER in headers:
                unique.finished(
                    app, self.name, task_id, headers[unique.HEADER], call.exception
                )

    def apply_async(
        self,
        args: t.Any = None,
        kwargs: t.Any = None,
        *arguments: t.Any,
        **options: t.Any,
    ) -> AsyncResult[_R_co]:
        """Send the task, as :meth:`celery.app.task.Task.apply_async` does.
        Model instances in the arguments, and in those of the signatures of
        the ``link``, ``chain`` and ``chord`` options, are sent as signed
        references (see :doc:`/models`).

        :raises RuntimeError: :meth:`~flask_celery_ctx.FlaskCelery.init_app`
            was not called yet, ``CELERY_TASK_ALWAYS_EAGER`` was changed in
            the app's config after it, or an instance is to be sent and the
            app has no ``SECRET_KEY``.
        :raises ValueError: An instance has no primary key yet, or is in a
            signature whose task would not load it: a ``link_error``
            callback, or a task that is not a ContextTask.
        :raises kombu.exceptions.EncodeError: The serializer refuses the
            arguments; the message names the task and what to pass instead.
            Or a value of ``g`` to carry is not JSON (see :doc:`/carry`).
        """
        if self.unique_for or "unique_for" in options or "unique_key" in options:
            return unique.send(self, args, kwargs, arguments, options, self._publish)
        return self._publish(args, kwargs, *arguments, **options)

    def _publish(
        self, args: t.Any, kwargs: t.Any, *arguments: t.Any, **options: t.Any
    ) -> AsyncResult[_R_co]:
        args, kwargs = send.prepare_now(self, args, kwargs, options)
        try:
            return super().apply_async(args, kwargs, *arguments, **options)
        except EncodeError as exc:
            raise send.encode_error(self, exc, options) from exc

    def delay_on_commit(
        self, *args: _P.args, **kwargs: _P.kwargs
    ) -> AsyncResult[_R_co]:
        """Send the task once the current transaction commits, as
        :meth:`apply_async_on_commit` does.

        :param args: Positional arguments of the task.
        :param kwargs: Keyword arguments of the task.
        :return: The task's result, whose id is known at once.
        """
        return self.apply_async_on_commit(args, kwargs)

    def apply_async_on_commit(
        self, args: t.Any = None, kwargs: t.Any = None, **options: t.Any
    ) -> AsyncResult[_R_co]:
        """Send the task after the outermost transaction of the session that
        holds the model instances in the arguments commits, or of the current
        app context's session when they are in none; at once when no
        transaction is in progress. A rollback drops it. See
        :doc:`/on-commit` for the rules.

        :param args: Positional arguments of the task.
        :param kwargs: Keyword arguments of the task.
        :param options: Options of :meth:`apply_async`.
        :return: The task's result, whose id is known at once.
        :raises TypeError: The arguments do not fit the task's signature.
        :raises ValueError: An instance in the arguments is not saved and is
            not pending in the session, or the instances belong to two
            sessions in a transaction.
        :raises kombu.exceptions.EncodeError: The serializer refuses the
            arguments, or a value of ``g`` to carry is not JSON.
        """
        return send.on_commit(self, args, kwargs, options)

    def load_instances(self, args: t.Any, kwargs: t.Any) -> None:
        """Replace the references in the arguments of the running task by
        instances loaded in its session; called when the tracer starts the
        task, in the task's context, after the ``task_prerun`` signal and
        before ``before_start``, so that the hooks see the instances too.

        The request keeps the references, for retries and stored results.

        :param args: The positional arguments, replaced in place.
        :param kwargs: The keyword arguments, replaced in place.
        :raises MissingInstanceError: A row is gone, and the task does not
            allow it.
        :meta private:
        """
        if not models.has_references(args, kwargs):
            return
        app = extension_of(self).app
        found = database(app)
        if found is None:
            raise RuntimeError(
                f"Task {self.name!r} got model references, but the app has no"
                " database session to load them in: no Flask-SQLAlchemy,"
                " Flask-SQLAlchemy-Lite or FlaskCelery(session=...). Pass ids"
                " instead, or set up the database in the worker's app."
            )
        request = self.request
        request.args, request.kwargs = list(args), dict(kwargs)
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise TypeError(
                f"Task {self.name!r} got its arguments as"
                f" {type(args).__name__}, which cannot be replaced in place."
            )
        models.load(self, found.session(), args, kwargs, models.signer(app))


_with_context: dict[type[t.Any], type[ContextTask]] = {}


def with_context(base: type[Task[t.Any, t.Any]]) -> type[ContextTask]:
    """The base class of a task declared with ``base=`` on a FlaskCelery app:
    ``base`` itself when it derives from ContextTask, else a class of the same
    name that derives from ContextTask and ``base``, in that order, made once
    per base. The task gets its context, its instances and the on-commit
    sends, and ``base`` its hooks, its ``apply_async`` and its ``__call__``.

    :param base: The class given with ``base=``, a :class:`celery.Task`.
    """
    if issubclass(base, ContextTask):
        return base
    found = _with_context.get(base)
    if found is None:
        namespace = {
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        }
        found = _with_context[base] = t.cast(
            "type[ContextTask]",
            type(t.cast("str", base.__name__), (ContextTask, base), namespace),
        )
    return found
