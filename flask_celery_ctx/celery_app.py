"""The Celery app class of :attr:`FlaskCelery.celery
<flask_celery_ctx.FlaskCelery.celery>`, whose ``task`` decorator keeps the
types of the function it makes a task of."""

from __future__ import annotations

import typing as t

from celery import Celery
from celery import Task

from .once import check_option as check_once
from .task import ContextTask
from .task import with_context

if t.TYPE_CHECKING:
    _P = t.ParamSpec("_P")
    _R = t.TypeVar("_R")
    _T = t.TypeVar("_T", bound=Task[t.Any, t.Any])
    _Celery = Celery[ContextTask]

    class _Decorator(t.Protocol):
        """What ``task(...)`` returns: makes a task of a function, or of an
        ``async def`` function, which returns what its coroutine returns."""

        @t.overload
        def __call__(
            self, fun: t.Callable[_P, t.Coroutine[t.Any, t.Any, _R]]
        ) -> ContextTask[_P, _R]: ...
        @t.overload
        def __call__(self, fun: t.Callable[_P, _R]) -> ContextTask[_P, _R]: ...

    class _BoundDecorator(t.Protocol):
        """What ``task(bind=True, ...)`` returns: the task's parameters are
        the function's, without ``self``."""

        @t.overload
        def __call__(
            self,
            fun: t.Callable[
                t.Concatenate[ContextTask, _P], t.Coroutine[t.Any, t.Any, _R]
            ],
        ) -> ContextTask[_P, _R]: ...
        @t.overload
        def __call__(
            self, fun: t.Callable[t.Concatenate[ContextTask, _P], _R]
        ) -> ContextTask[_P, _R]: ...
else:
    _Celery = Celery


class ContextCelery(_Celery):
    """Celery's app class, with :class:`~flask_celery_ctx.ContextTask` as the
    default task class, and, for type checkers, a ``task`` decorator that
    keeps the parameters and the return type of the function: with
    ``def add(x: int, y: int) -> int``, ``add.delay(1, "x")`` is an error
    and ``add.delay(1, 2)`` an ``AsyncResult[int]``. Celery's type stubs
    (celery-types) type every task as ``Task[Any, Any]``. At run time it is
    Celery's app class unchanged. See :doc:`/typing`.
    """

    if t.TYPE_CHECKING:
        # Celery's stubs have an overload per value of bind and base, each
        # with every option spelled out, and lose the function's types; these
        # take the same arguments, typed by the function where they can be.
        # An ``async def`` task returns what its coroutine returns.
        @t.overload  # type: ignore[override]
        def task(
            self, fun: t.Callable[_P, t.Coroutine[t.Any, t.Any, _R]]
        ) -> ContextTask[_P, _R]: ...
        @t.overload
        def task(self, fun: t.Callable[_P, _R]) -> ContextTask[_P, _R]: ...
        @t.overload
        def task(
            self, *, bind: t.Literal[False] = False, base: None = None, **options: t.Any
        ) -> _Decorator: ...
        @t.overload
        def task(
            self, *, bind: t.Literal[True], base: None = None, **options: t.Any
        ) -> _BoundDecorator: ...
        @t.overload
        def task(
            self, *, bind: bool, base: None = None, **options: t.Any
        ) -> t.Callable[[t.Callable[..., t.Any]], ContextTask]: ...
        @t.overload
        def task(
            self, *, base: type[_T], bind: bool = False, **options: t.Any
        ) -> t.Callable[[t.Callable[..., t.Any]], _T]: ...
        def task(self, *args: t.Any, **options: t.Any) -> t.Any: ...

    def _task_from_fun(  # type: ignore[override]
        self,
        fun: t.Callable[..., t.Any],
        name: str | None = None,
        base: type[Task[t.Any, t.Any]] | None = None,
        bind: bool = False,
        **options: t.Any,
    ) -> Task[t.Any, t.Any]:
        """Make a task of a function, as Celery does, on a base class derived
        from :class:`~flask_celery_ctx.ContextTask` when ``base=`` names a
        class that is not (see :func:`~flask_celery_ctx.task.with_context`).

        :raises TypeError: The ``once`` option is not a bool.
        """
        if "once" in options:
            task_name = name or self.gen_task_name(fun.__name__, fun.__module__)
            check_once(task_name, options["once"])
        if base is not None:
            base = with_context(base)
        return super()._task_from_fun(fun, name, base, bind, **options)
