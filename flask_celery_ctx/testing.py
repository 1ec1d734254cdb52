"""A pytest plugin for testing the tasks of a Flask application.

pytest loads it wherever the package is installed, through the package's
``pytest11`` entry point; its fixtures do nothing until a test asks for one.
``-p no:flask_celery_ctx.testing`` turns it off, and with plugin autoloading
off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``), ``-p flask_celery_ctx.testing`` or
``pytest_plugins = ["flask_celery_ctx.testing"]`` turns it on.

Its fixtures use the ``app`` fixture that your tests define, the Flask app on
which :meth:`~flask_celery_ctx.FlaskCelery.init_app` was called:

- :func:`celery_eager`: tasks run inline, in the test's context, and their
  exceptions propagate;
- :func:`celery_worker`: a real worker runs the app's tasks in a thread of the
  test process, each task in a fresh context of the app;
- :func:`celery_on_commit`: the tasks sent with ``delay_on_commit`` are
  recorded, not sent, for the test to look at and run.

It takes the place of ``celery.contrib.pytest``, whose fixtures make a Celery
app of their own: enabled too, in ``pytest_plugins``, Celery's fixtures of
the same names (``celery_worker``...) win.
"""

from __future__ import annotations

import threading
import time
import typing as t
from contextlib import contextmanager
from contextlib import suppress

import pytest
from celery.contrib.testing.worker import TestWorkController
from celery.result import _set_task_join_will_block  # type: ignore[attr-defined]
from celery.utils.nodenames import anon_nodename
from celery.worker import state as celery_worker_state
from flask import Flask

from . import models
from . import send
from .db import database
from .worker import broker_problem

# Typed as Any: Celery's stubs type its shutdown flags as always None.
_worker_state: t.Any = celery_worker_state

if t.TYPE_CHECKING:
    from celery import Celery
    from celery.result import EagerResult
    from celery.worker import WorkController

    from .extension import FlaskCelery
    from .task import ContextTask

__all__ = [
    "OnCommitRecorder",
    "SentTask",
    "celery_eager",
    "celery_on_commit",
    "celery_worker",
    "celery_worker_parameters",
    "celery_worker_pool",
    "start_worker",
]


def extension_of(app: Flask) -> FlaskCelery:
    """Return the :class:`~flask_celery_ctx.FlaskCelery` of ``app``, checking
    that it is bound to ``app``.

    :param app: The Flask application.
    :raises RuntimeError: ``init_app`` was not called on ``app``, or was
        called on another app since.

    :meta private:
    """
    ext: FlaskCelery | None = app.extensions.get("celery")
    if ext is None:
        raise RuntimeError(
            f"The Flask app {app.name!r} of the 'app' fixture has no FlaskCelery."
            " Call 'ext.init_app(app)' in the app factory that the fixture uses."
        )
    if ext.app is not app:
        raise RuntimeError(
            f"The FlaskCelery of the 'app' fixture is bound to another app,"
            f" {ext.app.name!r}, created after it: the last app passed to"
            " 'init_app' wins. Create the app of the 'app' fixture last, or"
            " create no other app with the same FlaskCelery during the test."
        )
    return ext


@pytest.fixture
def celery_eager(app: Flask) -> t.Iterator[Celery[t.Any]]:
    """Run the tasks of ``app`` inline for one test, and yield its Celery app.

    ``delay()`` and ``apply_async()`` run the task at once, in the caller's
    context of the app (the test's, or the view's under the test client), and
    an exception the task raises propagates to the caller: Celery's
    ``task_eager_propagates``, off by default, is on. The settings are restored
    when the test ends.

    Model instances in the arguments are loaded by the query a worker runs
    (see :doc:`/testing`). Retries run at once, inside the failing call: a
    task that retries with a countdown does not wait.
    """
    celery = extension_of(app).celery
    with _eager(celery):
        yield celery


@contextmanager
def _eager(celery: Celery[t.Any]) -> t.Iterator[None]:
    """Run tasks inline, their exceptions propagated, their instances loaded
    by a worker's query."""
    conf = celery.conf
    saved = (conf.task_always_eager, conf.task_eager_propagates, models.query_always)
    conf.task_always_eager = conf.task_eager_propagates = True
    models.query_always = True
    try:
        yield
    finally:
        conf.task_always_eager, conf.task_eager_propagates, models.query_always = saved


class SentTask(t.NamedTuple):
    """A task sent with ``delay_on_commit`` or ``apply_async_on_commit``, as
    :class:`OnCommitRecorder` recorded it."""

    #: The task, as the Celery app registered it. The name that
    #: ``@ext.celery.task`` gave it in its module is Celery's lazy proxy of
    #: the same task: compare them with ``==`` (``sent.task == deactivate``),
    #: as ``is`` tells them apart; or compare :attr:`name`.
    task: ContextTask
    #: The positional arguments, as given: model instances are the very
    #: instances passed. After the request that sent them they are detached
    #: from their session, and their attributes may not load any more.
    args: tuple[t.Any, ...]
    #: The keyword arguments, as given.
    kwargs: dict[str, t.Any]
    #: The options of :meth:`~celery.app.task.Task.apply_async`.
    options: dict[str, t.Any]

    @property
    def name(self) -> str:
        """The task's name."""
        return self.task.name

    @property
    def id(self) -> str:
        """The task's id, the one its result has."""
        return str(self.options["task_id"])

    def __repr__(self) -> str:
        """The call, with model instances shown as ``Model(key)``:
        ``myapp.tasks.analyse(Analysis(1))``."""
        args = models.shown_instances(list(self.args))
        kwargs = models.shown_instances(self.kwargs)
        shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        return f"{self.name}({', '.join(shown)})"


class OnCommitRecorder:
    """The tasks that ``delay_on_commit`` and ``apply_async_on_commit`` sent
    while the :func:`celery_on_commit` fixture was in use, in order.

    A task is recorded when it would have been sent: after the commit of its
    transaction, or at once when there was no transaction; a rollback drops
    it as it would have been dropped.
    """

    def __init__(self) -> None:
        #: The tasks recorded and not run yet.
        self.sent: list[SentTask] = []

    @property
    def names(self) -> list[str]:
        """The names of the tasks in :attr:`sent`."""
        return [sent.name for sent in self.sent]

    def record(
        self, task: ContextTask, args: t.Any, kwargs: t.Any, options: t.Any
    ) -> None:
        """Record a task in the place of sending it.

        :meta private:
        """
        self.sent.append(
            SentTask(task, tuple(args or ()), dict(kwargs or {}), dict(options))
        )

    def run(self, limit: int = 100) -> list[EagerResult[t.Any]]:
        """Run the recorded tasks inline, in order, and those that they send
        on commit in turn, until none is left.

        Each task runs as ``delay()`` runs it under :func:`celery_eager`:
        model instances travel as references and are loaded by the query a
        worker runs, and an exception propagates. Outside an application context each task
        gets a fresh context, as in a worker; inside one, it shares it.

        :param limit: The most tasks to run, for tasks that keep sending
            more.
        :return: The results, in the order the tasks ran.
        :raises RuntimeError: More than ``limit`` tasks were sent.
        """
        results: list[EagerResult[t.Any]] = []
        while self.sent:
            if len(results) >= limit:
                raise RuntimeError(
                    f"{limit} tasks ran and more were sent on commit: do the"
                    f" tasks send each other in a loop? Next: {self.sent[0]!r}."
                    " Pass a larger 'limit' if they stop on their own."
                )
            sent = self.sent.pop(0)
            with _eager(sent.task.app):
                result = sent.task.apply_async(sent.args, sent.kwargs, **sent.options)
            results.append(t.cast("EagerResult[t.Any]", result))
        return results

    def clear(self) -> None:
        """Forget the recorded tasks."""
        self.sent.clear()


@pytest.fixture
def celery_on_commit(app: Flask) -> t.Iterator[OnCommitRecorder]:
    """Record the tasks sent with ``delay_on_commit`` and
    ``apply_async_on_commit`` for one test, in the place of sending them:
    no broker is needed. The test looks at :attr:`OnCommitRecorder.sent` and
    runs them with :meth:`OnCommitRecorder.run`.

    Tasks sent with ``delay()`` and ``apply_async()`` are sent as usual.
    """
    extension_of(app)
    recorder = OnCommitRecorder()
    previous = send.recorder
    send.recorder = lambda queued: recorder.record(
        queued.task, queued.args, queued.kwargs, queued.options
    )
    try:
        yield recorder
    finally:
        send.recorder = previous


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    """The pool of the :func:`celery_worker` fixture: ``"solo"``, one task at
    a time in the worker's thread. Override it to return ``"threads"``."""
    return "solo"


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, t.Any]:
    """More arguments of :func:`start_worker` for the :func:`celery_worker`
    fixture, such as ``{"concurrency": 4, "queues": ["reports"]}``. Override
    it to change them."""
    return {}


@pytest.fixture
def celery_worker(
    app: Flask, celery_worker_pool: str, celery_worker_parameters: dict[str, t.Any]
) -> t.Iterator[WorkController]:
    """Start a worker of ``app`` in a thread for one test, and stop it after.

    It is ready when the test starts, consumes from the app's broker and runs
    each task in a fresh context of ``app``, as a worker process would. See
    :func:`start_worker` for what it needs and refuses.
    """
    with start_worker(app, pool=celery_worker_pool, **celery_worker_parameters) as w:
        yield w


@contextmanager
def start_worker(
    app: Flask,
    *,
    pool: str = "solo",
    concurrency: int = 1,
    ready_timeout: float = 10,
    shutdown_timeout: float = 10,
    loglevel: str = "WARNING",
    **parameters: t.Any,
) -> t.Iterator[WorkController]:
    """Run a worker of ``app`` in a thread while the block runs.

    This is what the :func:`celery_worker` fixture uses; call it in tests that
    do not use pytest fixtures. The worker consumes from the broker that the
    app's config names: ``memory://`` works within the test process, with
    ``cache+memory://`` for results.

    :param app: The Flask application, bound to its
        :class:`~flask_celery_ctx.FlaskCelery`.
    :param pool: ``"solo"`` or ``"threads"``.
    :param concurrency: How many tasks run at once with the threads pool.
    :param ready_timeout: How many seconds to wait for the worker to be ready.
    :param shutdown_timeout: How many seconds a running task has to finish when
        the block ends.
    :param loglevel: The worker's log level.
    :param parameters: Passed to :class:`celery.worker.WorkController`, such
        as ``queues``.
    :raises RuntimeError: The app uses an in-memory SQLite database, the
        broker cannot be reached, or the worker did not start or stop in time.
    """
    ext = extension_of(app)
    check_database(app)
    celery = ext.celery
    check_broker(celery)
    # The worker's thread resolves tasks through Celery's default app.
    celery.set_current()
    celery.set_default()
    conf = celery.conf
    saved_options = conf.broker_transport_options
    with celery.connection_for_read() as conn:
        in_memory = conn.transport.driver_type == "memory"
    if in_memory:
        # The memory broker is polled once a second unless told otherwise:
        # too slow for a test.
        conf.broker_transport_options = {"polling_interval": 0.01, **saved_options}
    worker: WorkController = TestWorkController(
        app=celery,
        pool=pool,
        concurrency=concurrency,
        loglevel=loglevel,
        hostname=parameters.pop("hostname", anon_nodename()),
        ready_callback=None,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        **parameters,
    )
    thread = threading.Thread(target=worker.start, name="celery-worker", daemon=True)
    try:
        thread.start()
        _wait_ready(worker, thread, app.name, ready_timeout)
        # A worker marks its process as one where joining a result blocks;
        # the test runs in the same process and waits for results.
        _set_task_join_will_block(False)
        yield worker
    except BaseException:
        # The error that ended the block matters more than a slow stop.
        with suppress(RuntimeError):
            _stop(worker, thread, shutdown_timeout)
        raise
    else:
        _stop(worker, thread, shutdown_timeout)
    finally:
        conf.broker_transport_options = saved_options


def _wait_ready(
    worker: t.Any, thread: threading.Thread, name: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not worker._on_started.wait(0.05):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(
                f"The worker of {name!r} did not get ready in {timeout}s (see"
                " its log). Check the broker and the queues it consumes from."
            )


def _stop(worker: t.Any, thread: threading.Thread, timeout: float) -> None:
    # As Celery's own embedded worker stops: the worker's loop checks this
    # flag each time it wakes up.
    _worker_state.should_terminate = 0
    deadline = time.monotonic() + timeout
    try:
        thread.join(0.05)
        while thread.is_alive() and time.monotonic() < deadline:
            # Its loop may wait for the broker for seconds, or for ever: wake
            # it with a message to the worker alone.
            with suppress(Exception):
                worker.app.control.broadcast(
                    "ping", destination=[worker.hostname], reply=False
                )
            thread.join(0.25)
    finally:
        _worker_state.should_terminate = None
    if thread.is_alive():
        raise RuntimeError(
            f"The worker thread did not stop within {timeout}s: a task is still"
            " running. Pass a larger 'shutdown_timeout' or make the task end."
        )


def check_database(app: Flask) -> None:
    """Refuse an in-memory SQLite database for a worker thread.

    :param app: The Flask application.
    :raises RuntimeError: An engine of the app's database is an in-memory
        SQLite database.

    :meta private:
    """
    found = database(app)
    for engine, name, _setting in [] if found is None else found.engines(app):
        url = engine.url
        if url.get_backend_name() != "sqlite":
            continue
        path = url.database or ""
        if path in ("", ":memory:") or "mode=memory" in str(url):
            if type(engine.pool).__name__ == "StaticPool":
                why = (
                    "the engine has a single connection, shared by every thread, so"
                    " the worker's sessions and the test's share one transaction,"
                    " and the rollback that ends each task wipes the test's"
                    " uncommitted rows"
                )
            else:
                why = (
                    "each thread gets a connection, and a database, of its own, so"
                    " the worker does not see the test's tables and rows"
                )
            raise RuntimeError(
                f"The database of {name} is an in-memory SQLite database"
                f" ({url}): a worker thread cannot use it, as {why}. Use a file"
                " database, such as f\"sqlite:///{tmp_path / 'test.db'}\", or use"
                " the 'celery_eager' fixture, which runs tasks in the test's thread."
            )


def check_broker(celery: Celery[t.Any]) -> None:
    """Raise an error that says what to do when the broker cannot be reached.

    :param celery: The Celery app.
    :raises RuntimeError: The broker cannot be reached.

    :meta private:
    """
    problem = broker_problem(celery)
    if problem is not None:
        raise RuntimeError(
            f"The worker fixture cannot use its broker. {problem}, or set"
            " CELERY_BROKER_URL (or CELERY['broker_url']) in the test config:"
            " 'memory://' needs no server, with"
            " CELERY_RESULT_BACKEND = 'cache+memory://'."
        )
