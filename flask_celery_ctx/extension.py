"""The :class:`FlaskCelery` extension."""

from __future__ import annotations

import contextlib
import os
import threading
import typing as t
from contextvars import ContextVar

from celery import signals
from celery import Task
from flask import Flask
from kombu.transport import TRANSPORT_ALIASES
from kombu.utils.url import maybe_sanitize_url

from .carry import carry_other_sends
from .carry import check_names
from .celery_app import ContextCelery
from .cli import add_to as add_command_to
from .config import celery_settings
from .config import check_environment
from .config import EAGER_KEY
from .context import in_app_context
from .context import TaskContext
from .db import database
from .db import use as use_database
from .db.sessionmaker import SessionFactory
from .errors import ConfigRuntimeError
from .errors import ConfigTypeError
from .errors import ConfigValueError
from .once import check_settings as check_once_settings
from .once import SETTINGS as ONCE_SETTINGS
from .once.prune import install as install_pruning
from .outbox import check_settings as check_outbox_settings
from .outbox import forget as forget_outbox_settings
from .outbox import SETTINGS as OUTBOX_SETTINGS
from .outbox.relay import install as install_relay
from .registry import Registry
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

# The ``sqlbroker+`` URL scheme: kombu's SQL transport, redelivering the
# messages of a dead worker. The module is imported when a URL uses it.
TRANSPORT_ALIASES.setdefault("sqlbroker", "flask_celery_ctx.sqlbroker:Transport")

if t.TYPE_CHECKING:
    from sqlalchemy.orm import scoped_session
    from sqlalchemy.orm import Session
    from sqlalchemy.orm import sessionmaker

    SessionFactoryArg = sessionmaker[t.Any] | scoped_session[t.Any]


class FlaskCelery:
    """Celery for a Flask application.

    ``ext.celery`` exists from construction, so tasks can be declared with
    ``@ext.celery.task`` at import time. :meth:`init_app` configures it from
    the app's config and binds it to the app.

    .. code-block:: python

        from flask import Flask
        from flask_celery_ctx import FlaskCelery

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
    :param session: A SQLAlchemy ``sessionmaker`` or ``scoped_session``, for
        apps that use neither Flask-SQLAlchemy nor Flask-SQLAlchemy-Lite:
        each application context gets a session of it on first use of
        :attr:`session`, closed when the context ends (see
        :doc:`/sessions`). :meth:`init_app` takes one too, for one app.
    :param extra_settings: Names of settings that Celery does not know but a
        Celery plugin reads from ``app.conf``, spelled as the plugin reads
        them. Any other unknown ``CELERY_`` key is an error.
    :param carry_g: Names of attributes of ``g`` that a task sent from an
        application context carries into its own ``g`` (see :doc:`/carry`).
    :raises TypeError: ``carry_g`` or ``extra_settings`` is a string, not a
        list of names.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        session: SessionFactoryArg | None = None,
        extra_settings: t.Iterable[str] = (),
        carry_g: t.Iterable[str] = (),
    ) -> None:
        #: The Celery application. Tasks declared on it get
        #: :class:`~flask_celery_ctx.ContextTask` as their base class unless
        #: they name another with ``base=``, and keep the types of their
        #: function for type checkers (see :doc:`/typing`).
        self.celery = ContextCelery(
            task_cls=ContextTask,
            loader=TaskLoader,
            # Celery takes a registry instance; its type stubs say a class.
            tasks=Registry(self._cover_other_tasks),  # type: ignore[arg-type]
        )
        self.celery.flask_celery = self  # type: ignore[attr-defined]
        if isinstance(extra_settings, (str, bytes)):
            raise ConfigTypeError(
                "FlaskCelery(extra_settings=...) takes a list of names of"
                f" settings, not the string {extra_settings!r}: write"
                f" extra_settings=[{extra_settings!r}]."
            )
        self._extra_settings = tuple(extra_settings)
        #: The names of the attributes of ``g`` that tasks carry from where
        #: they are sent (see :doc:`/carry`).
        self.carry_g: tuple[str, ...] = check_names(carry_g)
        if self.carry_g:
            carry_other_sends(self)
        self._session_factory = session
        self._app: Flask | None = None
        self._eager_read: t.Any = None
        install_worker_signals(self)
        install_relay(self.celery)
        install_pruning(self.celery)

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

    @property
    def session(self) -> Session:
        """The database session of the current application context, opened
        on first use: in a task, the task's own, closed when the task ends.

        It is the session of the app's database integration: the one given
        with ``session=``, else Flask-SQLAlchemy's ``db.session()`` or
        Flask-SQLAlchemy-Lite's ``db.session``. Tasks that use it run the
        same with any of them.

        :raises RuntimeError: The app has no database integration, or no
            application context is active.
        """
        found = database(self.app)
        if found is None:
            raise RuntimeError(
                "FlaskCelery has no database session for this app. Pass a"
                " SQLAlchemy sessionmaker or scoped_session with 'session=' to"
                " FlaskCelery() or init_app(), or register Flask-SQLAlchemy or"
                " Flask-SQLAlchemy-Lite on the app."
            )
        return found.session()

    def init_app(self, app: Flask, *, session: SessionFactoryArg | None = None) -> None:
        """Configure :attr:`celery` from the app's config, bind it to the app
        and add the ``flask celery`` command.

        :attr:`celery` becomes Celery's current app in every thread of the
        process, as ``celery_app.set_default()`` makes it in Flask's own
        pattern: ``AsyncResult(id)`` and ``@shared_task`` tasks find it in the
        threads that serve requests too.

        Calling it with another app rebinds: the last app wins, for the
        configuration and for the context tasks run in. With several
        extensions, the one bound last is the current Celery app.

        :param app: The Flask application.
        :param session: A SQLAlchemy ``sessionmaker`` or ``scoped_session``
            for this app, in the place of the one given to the constructor
            (see :attr:`session`).
        :raises ValueError: The config has a key meant for Celery that Celery
            would not read, or a setting given twice, or a setting of the
            outbox, of ``once`` or of a ``sqlbroker+`` broker's transport
            options a wrong value; or the environment gives
            Celery another broker or result backend (``CELERY_BROKER_URL``,
            ``CELERY_BROKER_READ_URL``, ``CELERY_BROKER_WRITE_URL``,
            ``CELERY_RESULT_BACKEND``).
        :raises TypeError: ``session`` is not a ``sessionmaker`` or
            ``scoped_session``.
        :raises RuntimeError: This app already has a ``FlaskCelery``, or a
            ``celery`` command of its own.
        """
        if "celery" in app.extensions:
            raise ConfigRuntimeError(
                "A 'FlaskCelery' instance has already been registered on this"
                " Flask app. Import and use that instance instead."
            )
        settings = celery_settings(
            app.config, (*self._extra_settings, *OUTBOX_SETTINGS, *ONCE_SETTINGS)
        )
        check_environment(settings, os.environ)
        try:
            check_outbox_settings(settings)
            check_once_settings(settings)
            check_sqlbroker_settings(settings)
        except ValueError as exc:
            raise ConfigValueError(str(exc)) from None
        add_command_to(app)
        factory = session if session is not None else self._session_factory
        if factory is not None:
            sessions = SessionFactory(factory)
            use_database(app, sessions)
            app.teardown_appcontext(sessions.close)
        app.extensions["celery"] = self
        self._configure(settings, app.import_name)
        self._app = app
        self._eager_read = app.config.get(EAGER_KEY)
        # Celery keeps its current app per thread, falling back to the
        # default app in threads that set none.
        self.celery.set_default()
        self.celery.set_current()

    def check_config_unchanged(self, task_name: str) -> None:
        """Refuse to send a task when the app's config says
        ``CELERY_TASK_ALWAYS_EAGER`` differently from what :meth:`init_app`
        read and from what Celery does: the config was changed after
        ``init_app``, which reads it once, as Flask extensions do.

        :param task_name: The task's name, for the message.
        :raises RuntimeError: The key was changed after init_app, to no effect.
        :meta private:
        """
        wanted = self.app.config.get(EAGER_KEY)
        if wanted == self._eager_read:
            return
        conf = self.celery.conf
        if bool(wanted) == bool(conf.task_always_eager):
            return
        broker = conf.broker_url or "amqp://localhost, Celery's default"
        does = (
            "would run it inline"
            if conf.task_always_eager
            else f"would send it to the broker {maybe_sanitize_url(broker)!r}"
        )
        raise RuntimeError(
            f"Task {task_name!r} was sent while app.config[{EAGER_KEY!r}] is"
            f" {wanted!r}, but init_app read the config when it was"
            f" {self._eager_read!r}: a change after init_app is not read, and"
            f" Celery {does}. In tests, use the 'celery_eager' fixture of"
            " the pytest plugin flask_celery_ctx.testing, or set the key in the"
            " config that the app factory gets, before init_app."
        )

    def _configure(self, settings: dict[str, t.Any], main: str) -> None:
        # Typed as Any: this reaches into Celery's caches, which its type
        # stubs do not describe.
        celery: t.Any = self.celery
        reconfigure = celery.configured
        celery.main = main
        celery.config_from_object(settings, force=True)
        forget_outbox_settings(celery)
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
                # It holds a connection of its own; an RPC consumer never
                # started has none, and fails to stop.
                with contextlib.suppress(AttributeError):
                    consumer.stop()
                # The old backend's results unsubscribe when they are
                # collected; on a stopped pubsub, redis-py opens a new
                # connection for that, which nothing closes (the Redis
                # backend skips unsubscribing once this is None).
                consumer._pubsub = None
            celery._local = threading.local()
        # Options that Celery copied from the previous config onto the tasks
        # bound so far, and the annotations they got, are derived anew.
        celery._tasks.rebind(celery.__dict__.pop("annotations", None))

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


def check_sqlbroker_settings(settings: t.Mapping[str, t.Any]) -> None:
    """Check the transport options of a ``sqlbroker+`` broker, where
    SQLAlchemy is installed: where it is not, the worker says at its start
    what to install.

    :param settings: The Celery settings read from the Flask config.
    :raises ValueError: A transport option has a wrong value.
    """
    url = settings.get("broker_url")
    if not (isinstance(url, str) and url.startswith("sqlbroker+")):
        return
    try:
        from .sqlbroker import check_settings
    except ImportError:
        return
    check_settings(settings)
