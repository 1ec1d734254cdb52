"""The task class of a :class:`~flask_celery_ctx.FlaskCelery` app."""

from __future__ import annotations

import types
import typing as t

from celery import Task
from celery.utils import uuid
from celery.utils.functional import maybe_list
from celery.utils.saferepr import saferepr
from flask.globals import _cv_app
from kombu import serialization
from kombu.exceptions import EncodeError

from . import carry
from . import coroutines
from . import models
from . import once
from . import oncommit
from . import tracing
from . import unique
from .context import inline_context
from .db import database
from .tracing import current as _current_call

if t.TYPE_CHECKING:
    from celery.result import AsyncResult
    from celery.result import EagerResult
    from flask import Flask
    from sqlalchemy.orm import Session
    from typing_extensions import ParamSpec
    from typing_extensions import TypeVar

    from .extension import FlaskCelery

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


#: The options of ``apply_async`` whose signatures the worker sends when the
#: task is done, with the task's :class:`ContextTask` loading their instances.
_SIGNATURE_OPTIONS = ("link", "chain", "chord")


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
        ext = extension_of(self)
        ext.check_config_unchanged(self.name)
        if ext.carry_g:
            carry.attach(ext.carry_g, self.name, options)
        if self.unique_for or "unique_for" in options or "unique_key" in options:
            return unique.send(self, args, kwargs, arguments, options, self._publish)
        return self._publish(args, kwargs, *arguments, **options)

    def _publish(
        self, args: t.Any, kwargs: t.Any, *arguments: t.Any, **options: t.Any
    ) -> AsyncResult[_R_co]:
        args, kwargs = self._dump_instances(args, kwargs, options, committed=True)
        try:
            return super().apply_async(args, kwargs, *arguments, **options)
        except EncodeError as exc:
            raise self._encode_error(exc, options) from exc

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
        names = extension_of(self).carry_g
        if names:
            # Captured now: the commit may come in another context.
            carry.attach(names, self.name, options)
        return oncommit.send_on_commit(self, args, kwargs, options)

    def check_sendable(
        self, args: t.Any, kwargs: t.Any, options: dict[str, t.Any], session: Session
    ) -> None:
        """Check, when a send is queued for the commit, what would otherwise
        fail only after it: the config, the signature, the instances, the
        serializer.

        :param args: Positional arguments of the task.
        :param kwargs: Keyword arguments of the task.
        :param options: Options of :meth:`apply_async`.
        :param session: The session whose commit the send waits for.
        :meta private:
        """
        ext = extension_of(self)
        ext.check_config_unchanged(self.name)
        args, kwargs = list(args or ()), dict(kwargs or {})
        check_arguments = getattr(self, "__header__", None)
        if self.typing and check_arguments is not None:
            check_arguments(*args, **kwargs)
        sign = models.signer(ext.app)
        models.check_pending(self.name, [args, kwargs], session, sign)
        self._check_signatures(options)
        signatures = [options.get(name) for name in _SIGNATURE_OPTIONS]
        models.check_pending(self.name, signatures, session, sign, embedded=True)
        args, kwargs = models.placeholders([args, kwargs])
        try:
            serialization.dumps((args, kwargs), self._serializer(options))
        except EncodeError as exc:
            raise self._encode_error(exc, options) from exc

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

    def _dump_instances(
        self,
        args: t.Any,
        kwargs: t.Any,
        options: dict[str, t.Any],
        committed: bool = False,
    ) -> tuple[t.Any, t.Any]:
        """Make references of the instances in the arguments and in the
        signatures of the options; with ``committed``, refuse instances whose
        rows are not committed yet (see :func:`~flask_celery_ctx.models.dump`).
        """
        app = extension_of(self).app
        self._dump_signatures(options, app, committed)
        sent_args, shown_args, in_args = models.dump(
            self.name, list(args or ()), app, committed=committed
        )
        sent_kwargs, shown_kwargs, in_kwargs = models.dump(
            self.name, dict(kwargs or {}), app, committed=committed
        )
        if not (in_args or in_kwargs):
            return args, kwargs
        amqp = self.app.amqp
        # Celery 5.7 added the task_repr_maxlevels setting; before it,
        # messages show 3 levels, saferepr's default.
        maxlevels = self.app.conf.get("task_repr_maxlevels", 3)
        if type(args) is tuple:
            shown_args = tuple(shown_args)
        options.setdefault(
            "argsrepr", saferepr(shown_args, amqp.argsrepr_maxsize, maxlevels=maxlevels)
        )
        options.setdefault(
            "kwargsrepr",
            saferepr(shown_kwargs, amqp.kwargsrepr_maxsize, maxlevels=maxlevels),
        )
        return sent_args, sent_kwargs

    def _dump_signatures(
        self, options: dict[str, t.Any], app: Flask, committed: bool
    ) -> None:
        """Make references of the instances in the arguments of the signatures
        that the worker sends when this task is done, those of ``link``,
        ``chain`` and ``chord`` (the body of a chord this task is part of):
        their tasks load them. Refuse those that would not be loaded.
        """
        self._check_signatures(options)
        for name in _SIGNATURE_OPTIONS:
            value = options.get(name)
            if not value:
                continue
            signatures = [
                models.dump(signature["task"], signature, app, True, committed)[0]
                for signature in maybe_list(value)
            ]
            options[name] = (
                signatures if isinstance(value, (list, tuple)) else signatures[0]
            )

    def _check_signatures(self, options: dict[str, t.Any]) -> None:
        """Refuse the instances in the signatures of the options whose task
        would not load them: one that is not a ContextTask, or an error
        callback."""
        for name in _SIGNATURE_OPTIONS:
            value = options.get(name)
            if not value:
                continue
            for signature in maybe_list(value):
                task = self.app.tasks.get(signature["task"])
                if not isinstance(task, ContextTask) and models.has_instances(
                    signature
                ):
                    raise ValueError(
                        f"Task {signature['task']!r}, in the {name} of task"
                        f" {self.name!r}, got a model instance in its arguments,"
                        " but it is not a ContextTask here, so it could not load"
                        " it. Pass ids, or declare it with '@ext.celery.task'."
                    )
        for errback in maybe_list(options.get("link_error")) or ():
            if models.has_instances(errback):
                raise ValueError(
                    f"The error callback {errback['task']!r} of task {self.name!r}"
                    " got a model instance in its arguments. The worker calls"
                    " error callbacks directly, where references are not loaded:"
                    " pass ids in the arguments of link_error signatures."
                )

    def _serializer(self, options: dict[str, t.Any]) -> str:
        """The serializer a send with these options uses."""
        return str(options.get("serializer") or self.serializer or "json")

    def _encode_error(self, exc: EncodeError, options: dict[str, t.Any]) -> EncodeError:
        return EncodeError(
            f"The arguments of task {self.name!r} cannot be serialized with"
            f" {self._serializer(options)!r}: {exc}. Pass values the serializer accepts:"
            " for JSON, ids, strings, numbers, lists and dicts, and instances"
            " of mapped models."
        )


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
