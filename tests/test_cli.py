"""``flask celery`` is Celery's whole command line, bound to the app."""

from __future__ import annotations

import json
import os
import subprocess
import time
import typing as t
import uuid
from pathlib import Path

import pytest
from flask import Flask

import taskapp
from conftest import FLASK
from conftest import TESTS
from conftest import WorkerFactory

COMMANDS = [
    "worker", "beat", "inspect", "control", "status", "purge",
    "call", "result", "events", "report", "shell",
]  # fmt: skip


def flask_celery(
    config: dict[str, object], *args: str, env: t.Mapping[str, str] = {}
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLASK, "--app", "taskapp:create_app", "celery", *args],
        cwd=TESTS,
        env={**os.environ, **env, "FCC_CONFIG": json.dumps(config)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_lists_celery_commands(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["celery", "--help"])
    assert result.exit_code == 0, result.output
    assert (
        "celery [OPTIONS] COMMAND" in result.output
        or "celery [OPTIONS] [COMMAND]" in result.output
    )
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize(
    ("command", "option"),
    [("worker", "--concurrency"), ("beat", "--schedule"), ("inspect", "--destination"),
     ("control", "--destination"), ("status", "--timeout"), ("purge", "--queues"),
     ("call", "--countdown"), ("result", "--traceback"), ("events", "--dump"),
     ("report", "--help"), ("shell", "--ipython")],
)  # fmt: skip
# Celery's own ``events`` command declares -d twice; Click warns about it.
@pytest.mark.filterwarnings("ignore:The parameter -d is used more than once")
def test_each_command_has_celerys_options(
    app: Flask, command: str, option: str
) -> None:
    result = app.test_cli_runner().invoke(args=["celery", command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"celery {command} [OPTIONS]" in result.output
    assert option in result.output


def test_report_keeps_secrets(workers: WorkerFactory) -> None:
    config = workers.config()
    result = flask_celery(config, "report")
    assert result.returncode == 0, result.stderr
    assert "broker_url" in result.stdout
    assert "do-not-leak" not in result.stdout
    assert "SQLALCHEMY" not in result.stdout
    assert config["SQLALCHEMY_DATABASE_URI"].split("@")[-1] not in result.stdout


def test_commands_against_a_live_worker(workers: WorkerFactory) -> None:
    worker = workers()
    config = worker.config
    ping = flask_celery(
        config, "inspect", "ping", "-d", f"{worker.name}@{os.uname().nodename}"
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "pong" in ping.stdout

    registered = flask_celery(config, "inspect", "registered")
    assert "taskapp.add" in registered.stdout

    call = flask_celery(config, "call", "taskapp.add", "--args", "[2, 3]")
    assert call.returncode == 0, call.stderr
    task_id = call.stdout.strip()
    worker.client()
    assert taskapp.add.AsyncResult(task_id).get(timeout=20) == 5

    result = flask_celery(config, "result", task_id)
    assert result.stdout.strip() == "5"


def test_purge(workers: WorkerFactory) -> None:
    config = workers.config()  # no worker consumes this queue
    taskapp.create_app(config)
    taskapp.add.delay(1, 1)
    purge = flask_celery(config, "purge", "-f")
    assert purge.returncode == 0, purge.stderr
    assert "Purged 1 message" in purge.stdout


def test_beat_sends_scheduled_tasks(workers: WorkerFactory, tmp_path: object) -> None:
    name = f"beat-{uuid.uuid4().hex[:6]}"
    schedule = {
        "tick": {
            "task": "taskapp.write_then",
            "schedule": 0.5,
            "args": ["commit", name],
        }
    }
    worker = workers(CELERY_BEAT_SCHEDULE=schedule)
    beat = subprocess.Popen(
        [FLASK, "--app", "taskapp:create_app", "celery", "beat",
         "--schedule", f"{tmp_path}/schedule", "--loglevel", "INFO"],
        cwd=TESTS, env={**os.environ, "FCC_CONFIG": json.dumps(worker.config)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        worker.client()
        deadline = time.monotonic() + 30
        while taskapp.count_items.delay(name).get(timeout=20) < 2:
            assert time.monotonic() < deadline, "beat sent nothing"
            time.sleep(0.5)
    finally:
        beat.terminate()
        beat.wait(20)


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_worker_runs_outside_an_app_context(workers: WorkerFactory, pool: str) -> None:
    """Flask pushes an app context for its commands; the worker leaves it."""
    worker = workers(pool=pool)
    worker.wait_for("worker_init in an app context: False")


def assert_one_error_block(result: subprocess.CompletedProcess[str]) -> None:
    """Printed as Click prints a usage error: no traceback, status 1."""
    assert result.returncode == 1, result.stderr
    # The test app prints lines of its own before.
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: ")
    assert "Traceback" not in result.stdout + result.stderr


OTHER_BROKER = "redis://someone:s3cret@127.0.0.1:6379/9"


@pytest.mark.parametrize(
    ("env", "args", "source", "setting"),
    [({"BROKER_URL": OTHER_BROKER}, [], "environment variable BROKER_URL", "broker_url"),
     ({"CELERY_BROKER": OTHER_BROKER}, [], "environment variable CELERY_BROKER", "broker_url"),
     ({"CELERY_BROKER_URL": OTHER_BROKER}, [], "environment variable CELERY_BROKER_URL", "broker_url"),
     ({}, ["-b", OTHER_BROKER], "option -b/--broker", "broker_url"),
     ({}, ["--broker", OTHER_BROKER], "option -b/--broker", "broker_url"),
     ({"RESULT_BACKEND": OTHER_BROKER}, [], "environment variable RESULT_BACKEND", "result_backend"),
     ({"CELERY_RESULT_BACKEND": OTHER_BROKER}, [], "environment variable CELERY_RESULT_BACKEND", "result_backend"),
     ({}, ["--result-backend", OTHER_BROKER], "option --result-backend", "result_backend")],
)  # fmt: skip
def test_worker_refuses_another_broker_than_the_config(
    workers: WorkerFactory, env: dict[str, str], args: list[str], source: str,
    setting: str,
) -> None:  # fmt: skip
    """The worker would consume from one broker while the app sends to the
    one its config names."""
    config = workers.config()
    result = flask_celery(config, *args, "worker", "--pool", "solo", env=env)
    assert_one_error_block(result)
    output = result.stdout + result.stderr
    assert f"The {source} sets Celery's {setting} to" in output
    assert "'redis://someone:**@127.0.0.1:6379/9'" in output
    assert f"says {config[f'CELERY_{setting.upper()}']!r}" in output
    assert "s3cret" not in output
    assert f"give the value you mean to CELERY_{setting.upper()}" in output
    assert " ready." not in output


@pytest.mark.parametrize(
    ("config", "fix"),
    [({"CELERY_REDBEAT_REDIS_URL": "redis://"},
      "FlaskCelery(extra_settings=['redbeat_redis_url'])"),
     ({"CELERY_CONFIG": {"task_ignore_result": True}}, "rename CELERY_CONFIG to CELERY"),
     ({"CELERY": {"eager_propagates_exceptions": True}},
      "did you mean 'task_eager_propagates'?"),
     ({"CELERY_BROKR_URL": "redis://"},
      "CELERY_BROKR_URL is not a Celery setting. Did you mean CELERY_BROKER_URL?"),
     ({"CELERY_OUTBOX": "yes"}, "CELERY_OUTBOX must be True or False, not 'yes'"),
     ({"CELERY": "redis://"}, "CELERY must be a dict of Celery settings")],
)  # fmt: skip
def test_worker_says_how_to_fix_the_config(
    workers: WorkerFactory, config: dict[str, t.Any], fix: str
) -> None:
    result = flask_celery({**workers.config(), **config}, "worker", "--pool", "solo")
    assert_one_error_block(result)
    output = result.stdout + result.stderr
    assert fix in output
    assert " ready." not in output


@pytest.mark.parametrize(
    "variable", ["CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL"]
)
@pytest.mark.parametrize("command", [["worker", "--pool", "solo"], ["purge", "-f"]])
def test_commands_refuse_another_read_or_write_broker(
    workers: WorkerFactory, variable: str, command: list[str]
) -> None:
    """Celery consumes from the read broker and sends to the write broker,
    both read from the environment before the config."""
    config = workers.config()
    result = flask_celery(config, *command, env={variable: OTHER_BROKER})
    assert_one_error_block(result)
    output = result.stdout + result.stderr
    setting = variable.removeprefix("CELERY_").lower()
    assert f"The environment variable {variable} sets Celery's {setting}" in output
    assert "'redis://someone:**@127.0.0.1:6379/9'" in output
    assert "says nothing, so Celery uses its broker_url," in output
    assert "s3cret" not in output
    assert " ready." not in output


@pytest.mark.parametrize(
    "env",
    [
        "BROKER_URL",
        "CELERY_BROKER_URL",
        "CELERY_BROKER_READ_URL",
        "CELERY_BROKER_WRITE_URL",
        "RESULT_BACKEND",
        "--broker",
    ],
)
def test_worker_accepts_the_configs_own_broker(
    workers: WorkerFactory, env: str
) -> None:
    config = workers.config()
    value = config["CELERY_RESULT_BACKEND" if "RESULT" in env else "CELERY_BROKER_URL"]
    if env.startswith("--"):
        worker = workers.start("redis", "postgres", {}, command=[
            FLASK, "--app", "taskapp:create_app", "celery", env, value])  # fmt: skip
    else:
        worker = workers.start("redis", "postgres", {}, env={env: value})
    worker.wait_ready()
    worker.client()
    assert taskapp.add.delay(2, 2).get(timeout=20) == 4


OWN_COMMAND_APP = """
import click
from flask import Flask
from flask_celery_ctx import FlaskCelery

ext = FlaskCelery()


@click.group("celery")
def celery_group():
    pass


def create_app(kind):
    app = Flask(__name__)
    app.config["CELERY_BROKER_URL"] = "redis://127.0.0.1:9/0"
    if kind == "late":
        ext.init_app(app)

        @app.cli.command("celery", context_settings={"ignore_unknown_options": True})
        @click.argument("args", nargs=-1, type=click.UNPROCESSED)
        def celery(args):
            click.echo("forum celery command ran")
            ext.celery.start(list(args))

        return app
    if kind == "command":
        @app.cli.command("celery")
        @click.argument("args", nargs=-1)
        def celery(args):
            click.echo("forum celery command ran")
    else:
        app.cli.add_command(celery_group)
    ext.init_app(app)
    return app
"""


@pytest.mark.parametrize(
    ("kind", "found"),
    [("command", "forum.create_app.<locals>.celery"), ("group", "forum.celery_group")],
)
def test_an_apps_own_celery_command_is_refused(
    tmp_path: Path, kind: str, found: str
) -> None:
    """It would shadow ``flask celery``, or be shadowed, without a word."""
    (tmp_path / "forum.py").write_text(OWN_COMMAND_APP)
    result = subprocess.run(
        [FLASK, "--app", f"forum:create_app('{kind}')", "celery", "-b", "memory://",
         "worker", "--pool", "solo"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert_one_error_block(result)
    output = result.stdout + result.stderr
    assert f"The app already has a 'celery' command ({found})" in output
    assert "Remove the app's own command" in output
    assert "forum celery command ran" not in output
    assert " ready." not in output


def test_a_worker_started_by_an_apps_own_command_checks_the_broker(
    tmp_path: Path,
) -> None:
    """A command registered after init_app replaces ``flask celery``; the
    worker it starts refuses the broker that its ``-b`` put in the
    environment after init_app checked it."""
    (tmp_path / "forum.py").write_text(OWN_COMMAND_APP)
    result = subprocess.run(
        [FLASK, "--app", "forum:create_app('late')", "celery", "-b", "memory://",
         "worker", "--pool", "solo"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert "forum celery command ran" in output
    assert result.returncode != 0, output
    assert (
        "The environment variable CELERY_BROKER_URL sets Celery's broker_url to"
        " 'memory:" in output
    )
    assert "from its -b/--broker or --result-backend option" in output
    assert " ready." not in output


SETUP_APP = """
from flask import Flask
from flask_celery_ctx import FlaskCelery


def create_app(kind):
    app = Flask(__name__)
    app.config["CELERY_BROKER_URL"] = "memory://"
    if kind == "session":
        FlaskCelery().init_app(app, session="sqlite://")
    elif kind == "twice":
        FlaskCelery(app)
        FlaskCelery(app)
    elif kind == "carry":
        FlaskCelery(app, carry_g="user")
    elif kind == "extra":
        FlaskCelery(app, extra_settings="redbeat_redis_url")
    elif kind == "visibility":
        app.config["CELERY_BROKER_URL"] = "sqlbroker+sqlite:///broker.sqlite"
        app.config["CELERY_BROKER_TRANSPORT_OPTIONS"] = {"visibility_timeout": 0}
        FlaskCelery(app)
    elif kind in ("unique_for", "once"):
        ext = FlaskCelery(app)
        options = {"unique_for": "ten"} if kind == "unique_for" else {"once": "yes"}

        @ext.celery.task(**options)
        def deliver():
            pass
    else:
        FlaskCelery(app)
        app.config["MISSING_KEY"]
    return app
"""


@pytest.mark.parametrize(
    ("kind", "message"),
    [("session", "FlaskCelery(session=...) takes a sqlalchemy.orm.sessionmaker"),
     ("twice", "A 'FlaskCelery' instance has already been registered"),
     ("carry", "FlaskCelery(carry_g=...) takes a list of names"),
     ("extra", "FlaskCelery(extra_settings=...) takes a list of names of settings"),
     ("visibility", "visibility_timeout in CELERY_BROKER_TRANSPORT_OPTIONS must be"),
     ("unique_for", "unique_for of task 'shop.deliver' must be a number of seconds"),
     ("once", "The option once='yes' of task 'shop.deliver' must be True or False")],
)  # fmt: skip
def test_errors_of_the_setup_are_one_error_block(
    tmp_path: Path, kind: str, message: str
) -> None:
    (tmp_path / "shop.py").write_text(SETUP_APP)
    result = subprocess.run(
        [FLASK, "--app", f"shop:create_app('{kind}')", "celery", "worker"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert_one_error_block(result)
    assert message in result.stderr


def test_other_errors_of_the_app_keep_their_traceback(tmp_path: Path) -> None:
    (tmp_path / "shop.py").write_text(SETUP_APP)
    result = subprocess.run(
        [FLASK, "--app", "shop:create_app('bug')", "celery", "worker"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "KeyError: 'MISSING_KEY'" in result.stderr
