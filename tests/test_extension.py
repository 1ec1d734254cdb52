"""The extension object: construction, binding, and the errors users hit."""

from __future__ import annotations

import subprocess
import sys
import typing as t

import pytest
from celery import Task
from flask import current_app
from flask import Flask
from kombu.exceptions import EncodeError

from flask_celery_ctx import ContextTask
from flask_celery_ctx import FlaskCelery
from flask_celery_ctx.testing import start_worker

from conftest import FLASK
from conftest import WorkerFactory


class LibraryTask(Task):  # type: ignore[type-arg]
    pass


# The tasks below are declared inside tests, for an extension of their own:
# shared=False keeps them out of every Celery app finalized later in the run,
# where the same names declared again would warn of duplicates.


def test_tasks_can_be_declared_before_init_app() -> None:
    ext = FlaskCelery()

    @ext.celery.task(shared=False)
    def plain() -> str:
        return current_app.name

    @ext.celery.task(base=LibraryTask, shared=False)
    def based() -> None: ...

    assert isinstance(plain, ContextTask)
    # A base class of another library: the task derives from both.
    assert isinstance(based, LibraryTask)
    assert isinstance(based, ContextTask)
    app = Flask("bound")
    ext.init_app(app)
    assert plain() == "bound"
    assert app.extensions["celery"] is ext


def test_app_given_to_the_constructor() -> None:
    app = Flask("given")
    ext = FlaskCelery(app)
    assert ext.app is app


def test_registering_twice_on_one_app() -> None:
    app = Flask(__name__)
    FlaskCelery(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        FlaskCelery(app)


def broker_host(ext: FlaskCelery) -> str:
    """The broker host of a connection from the producer pool."""
    with ext.celery.producer_or_acquire() as producer:
        return producer.connection.hostname  # type: ignore[no-any-return]


def test_last_app_wins() -> None:
    ext = FlaskCelery()

    @ext.celery.task(shared=False)
    def which() -> tuple[str, bool]:
        return current_app.name, current_app.config["TESTING"]

    first = Flask("first")
    first.config.update(
        CELERY_BROKER_URL="memory://first", CELERY_TASK_ALWAYS_EAGER=True
    )
    ext.init_app(first)
    assert which.delay().get() == ("first", False)
    assert broker_host(ext) == "first"

    second = Flask("second")
    second.config.update(CELERY_BROKER_URL="memory://second", TESTING=True)
    ext.init_app(second)
    assert ext.app is second
    assert ext.celery.conf.task_always_eager is False
    assert broker_host(ext) == "second"
    assert which.apply().get() == ("second", True)


def test_last_app_wins_for_settings_of_tasks() -> None:
    """What Celery fills in on a task from the settings follows the last app;
    what the task's options give stays."""
    ext = FlaskCelery()

    @ext.celery.task(shared=False)
    def add(a: int, b: int) -> int:
        return a + b

    @ext.celery.task(shared=False, acks_late=False)
    def given() -> None: ...

    memory = {
        "CELERY_BROKER_URL": "memory://",
        "CELERY_RESULT_BACKEND": "cache+memory://",
    }
    first = Flask("first")
    first.config.update(memory, CELERY_TASK_IGNORE_RESULT=True)
    ext.init_app(first)
    assert add.delay(1, 1).ignored
    second = Flask("second")
    second.config.update(memory, CELERY_TASK_ACKS_LATE=True)
    ext.init_app(second)
    with start_worker(second):
        assert add.delay(20, 22).get(timeout=10) == 42
    assert (add.acks_late, given.acks_late) == (True, False)


@pytest.mark.parametrize(
    "call",
    [lambda task: task.delay(), lambda task: task.apply(), lambda task: task()],
    ids=["delay", "apply", "direct"],
)
def test_not_bound_yet(call: t.Callable[[t.Any], t.Any]) -> None:
    ext = FlaskCelery()

    @ext.celery.task(shared=False)
    def early() -> None: ...

    with pytest.raises(
        RuntimeError, match=r"not bound to a Flask app yet.*ext.init_app\(app\)"
    ):
        call(early).get()


def test_unserializable_arguments() -> None:
    app = Flask(__name__)
    app.config["CELERY_BROKER_URL"] = "memory://"
    ext = FlaskCelery(app)

    @ext.celery.task(shared=False)
    def takes(value: object) -> None: ...

    with pytest.raises(
        EncodeError, match=r"task '.*takes' cannot be serialized with 'json'.*ids"
    ):
        takes.delay(object())


def test_without_flask_sqlalchemy(workers: WorkerFactory) -> None:
    """An app without Flask-SQLAlchemy runs its tasks in fresh contexts."""
    import plainapp

    worker = workers.start(
        "redis",
        "postgres",
        {},
        command=(FLASK, "--app", "plainapp:create_app", "celery"),
    )
    worker.wait_ready()
    plainapp.create_app(worker.config)
    results = [plainapp.app_name.delay().get(timeout=20) for _ in range(3)]
    assert results == [["plainapp", None]] * 3


WITHOUT_SQLALCHEMY = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sqlalchemy", "flask_sqlalchemy"):
            raise ImportError(f"{name} is not installed")

sys.meta_path.insert(0, Block())
from flask import Flask
from flask_celery_ctx import FlaskCelery

app = Flask("plain")
app.config["CELERY_TASK_ALWAYS_EAGER"] = True
ext = FlaskCelery(app)

@ext.celery.task
def add(x, y):
    return x + y

with app.app_context():
    add.delay_on_commit(1, 1)
print(add.delay(1, 2).get(), add.apply((2, 3)).get(), add(3, 4))
"""


def test_works_without_sqlalchemy_installed() -> None:
    """Flask and Celery are the only dependencies."""
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_SQLALCHEMY],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "5", "7"]


TASK_SIGNALS = """
from celery import signals, Task
from flask import Flask
from flask_celery_ctx import FlaskCelery

ext = FlaskCelery(Flask("own"))

@ext.celery.task
def plain():
    pass

ext.celery.finalize()
print(len(signals.task_prerun.receivers), len(signals.task_postrun.receivers))

class Based(Task):
    name = "based"

    def run(self):
        pass

ext.celery.register_task(Based())
print(len(signals.task_prerun.receivers), len(signals.task_postrun.receivers))
"""


def test_task_signals_connected_only_for_other_base_classes() -> None:
    """Celery skips ``task_prerun`` and ``task_postrun`` while nothing is
    connected to them: an app whose tasks all derive from ContextTask,
    Celery's built-in tasks included, leaves them so, until a task of
    another class is registered."""
    result = subprocess.run(
        [sys.executable, "-c", TASK_SIGNALS], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["0 0", "1 1"]
