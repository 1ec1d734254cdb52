"""The :class:`FlaskCelery` extension."""

from __future__ import annotations

import threading
import typing as t
from contextvars import ContextVar

from celery import Celery
from celery import signals
from celery import Task
from celery.app.registry import TaskRegistry
from flask import Flask

from .cli import celery_command
from .config import celery_settings
from .context import in_app_context
from .context import TaskContext
from .task import ContextTask
from .tracing import TaskLoader
from .worker import install as install_worker_signals

# Contexts pushed by ``task_prerun``, popped by ``task_postrun``, for tasks
# that do not derive from ContextTask: an entry per traced task, with the
# request it was pushed for, so that the two signals pair up even when tasks
# are applied inline from other tasks.
_pushed: ContextVar[tuple[tuple[object, TaskContext | None], ...]] = ContextVar(
    "flask_celery_ctx_pushed", default=()
)


class FlaskCelery:
    """Celery for a Flask application.

    ``ext.celery`` exists from construction, so tasks can be declared with
    ``@ext.celery.task`` at import time. :meth:`init_app` configures it from
    the app's config and binds it to the app.

    .. code-block:: python

        ext = FlaskCelery()

        @ext.celery.task
        def add(x, y):
            return x + y

        def create_app():
            app = Flask(__name__)
            app.config["CELERY_BROKER_URL"] = "redis://localhost"
            ext.init_app(app)
            return app

    :param app: Call :meth:`init_app` on this Flask app.
    :param extra_settings: Names of settings that Celery does not know but a
        Celery plugin reads from ``app.conf``, spelled as the plugin reads
        them. Any other unknown ``CELERY_`` key is an error.
    """

    def __init__(
        self, app: Flask | None = None, *, extra_settings: t.Iterable[str] = ()
    ) -> None:
        #: The Celery application. Tasks declared on it get
        #: :class:`~flask_celery_ctx.ContextTask` as their base class unless
        #: they name another with ``base=``.
        self.celery: Celery[ContextTask] = Celery(
            task_cls=ContextTask,
            loader=TaskLoader,
            # Celery takes a registry instance; its type stubs say a class.
            tasks=_Registry(self._cover_other_tasks),  # type: ignore[arg-type]
        )
        self.celery.flask_celery = self  # type: ignore[attr-defined]
        self._extra_settings = tuple(extra_settings)
        self._app: Flask | None = None
        install_worker_signals(self)

        if app is not None:
            self.init_app(app)

    @property
    def app(self) -> Flask:
        """The Flask application that tasks run in: the one most recently
        passed to :meth:`init_app`.

        :raises RuntimeError: :meth:`init_app` was not called yet.
        """
        if self._app is None:
            raise RuntimeError(
                "FlaskCelery is not bound to a Flask app yet. Call"
                " 'ext.init_app(app)' in your app factory (or create it with"
                " 'FlaskCelery(app)') before tasks are sent or run."
            )
        return self._app

    def init_app(self, app: Flask) -> None:
        """Configure :attr:`celery` from the app's config, bind it to the app
        and add the ``flask celery`` command.

        Calling it with another app rebinds: the last app wins, for the
        configuration and for the context tasks run in.

        :param app: The Flask application.
        :raises ValueError: The config has a key meant for Celery that Celery
            would not read, or a setting given twice.
        :raises RuntimeError: This app already has a ``FlaskCelery``.
        """
        if "celery" in app.extensions:
            raise RuntimeError(
                "A 'FlaskCelery' instance has already been registered on this"
                " Flask app. Import and use that instance instead."
            )
        settings = celery_settings(app.config, self._extra_settings)
        app.extensions["celery"] = self
        app.cli.add_command(celery_command)
        self._configure(settings, app.import_name)
        self._app = app

    def _configure(self, settings: dict[str, t.Any], main: str) -> None:
        # Typed as Any: this reaches into Celery's caches, which its type
        # stubs do not describe.
        celery: t.Any = self.celery
        reconfigure = celery.configured
        celery.main = main
        celery.config_from_object(settings, force=True)
        if reconfigure:
            # Drop what was built from the previous app's settings: broker
            # connections, the producer pool, queues, the result backend.
            # Nothing is closed: kombu shares producer pools between
            # connections to the same broker.
            celery._pool = None
            for name in ("amqp", "control", "events"):
                celery.__dict__.pop(name, None)
            backend = getattr(celery._local, "backend", None)
            consumer = getattr(backend, "result_consumer", None)
            if consumer is not None:
                consumer.stop()  # it holds a connection of its own
                # The old backend's results unsubscribe when they are
                # collected; on a stopped pubsub, redis-py opens a new
                # connection for that, which nothing closes (the Redis
                # backend skips unsubscribing once this is None).
                consumer._pubsub = None
            celery._local = threading.local()
            # Tasks take some options from the settings when they are bound.
            for task in celery._tasks.values():
                if isinstance(task, ContextTask):
                    type(task).bind(celery)
                    # Celery caches them on the task too; before 5.7 its
                    # first send even writes ignore_result into the cache.
                    vars(task).pop("_exec_options", None)

    def _cover_other_tasks(self) -> None:
        """Give a context to tasks whose base class is not ContextTask, from
        Celery's task signals; called when the first such task is registered.
        ContextTask pushes its own, at less cost: Celery skips the signals
        while no receiver is connected.
        """
        # Connecting the same receiver again does nothing.
        signals.task_prerun.connect(self._on_task_prerun)
        signals.task_postrun.connect(self._on_task_postrun)

    def _on_task_prerun(self, sender: Task[t.Any, t.Any], **kwargs: t.Any) -> None:
        if sender.app is not self.celery or isinstance(sender, ContextTask):
            return
        request = sender.request
        app = self.app
        # In a worker every task gets a fresh context; inline execution in a
        # context of the same app shares it.
        ctx = None if request.is_eager and in_app_context(app) else TaskContext(app)
        _pushed.set((*_pushed.get(), (request, ctx)))

    def _on_task_postrun(
        self, sender: Task[t.Any, t.Any], retval: t.Any = None, **kwargs: t.Any
    ) -> None:
        if sender.app is not self.celery or isinstance(sender, ContextTask):
            return
        pushed = _pushed.get()
        if not pushed or pushed[-1][0] is not sender.request:
            return
        _pushed.set(pushed[:-1])
        ctx = pushed[-1][1]
        if ctx is not None:
            ctx.pop(retval if isinstance(retval, BaseException) else None)


class _Registry(TaskRegistry):
    """The task registry of a FlaskCelery app, which notices the first task
    registered whose base class is not :class:`ContextTask`.

    :param on_other_task: Called when such a task is registered.
    """

    def __init__(self, on_other_task: t.Callable[[], None]) -> None:
        super().__init__()
        self._on_other_task = on_other_task

    def __setitem__(self, name: str, task: Task[t.Any, t.Any]) -> None:
        super().__setitem__(name, task)
        if not isinstance(task, ContextTask):
            self._on_other_task()
