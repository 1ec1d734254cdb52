"""The ``flask celery`` command: Celery's command line, bound to the app."""

from __future__ import annotations

import contextvars
import os
import sys
import typing as t

import click
from click.core import ParameterSource
from flask.cli import ScriptInfo

from .config import override_problem
from .errors import ConfigRuntimeError
from .outbox.cli import outbox_command
from .tasklist import tasks_command

if t.TYPE_CHECKING:
    from celery import Celery
    from flask import Flask

    from .extension import FlaskCelery

# Run the same command line again, with gevent's monkey patches applied
# before anything else is imported, as Celery's own ``celery`` program does.
_GEVENT_MAIN = (
    "from gevent import monkey; monkey.patch_all()\n"
    "import sys; from flask.cli import main; sys.argv[0] = 'flask'; main()"
)
_PATCHED_ENV = "GEVENT_PATCHED_BY_FLASK_CELERY_CTX"


@click.command(
    "celery",
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def celery_command(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Run Celery's command line for this app: worker, beat, inspect, ...

    'flask celery --help' lists Celery's commands, and 'flask celery worker
    --help' the worker's options.
    """
    from celery.bin.celery import celery as celery_main

    celery_main.add_command(tasks_command)
    app = ctx.ensure_object(ScriptInfo).load_app()
    ext: FlaskCelery = app.extensions["celery"]
    _check_overrides(celery_main, args, ext.celery)
    _check_transport(celery_main, args, ext.celery)
    if _needs_gevent_patches(args, ext.celery):
        _exec_with_gevent_patches(args)
    celery_main.add_command(outbox_command)
    # As Celery's own ``app.start()`` does: the app is the default of -A.
    for param in celery_main.params:
        if param.name == "app":
            param.default = ext.celery
    # Outside the app context that ``flask`` pushed for the command: each
    # task pushes its own, and nothing else in the worker shares one.
    contextvars.Context().run(
        celery_main.main,
        args=list(args),
        prog_name=ctx.command_path,
        auto_envvar_prefix="CELERY",
    )


def add_to(app: Flask) -> None:
    """Add ``flask celery`` to the app's command line.

    :param app: The Flask application.
    :raises RuntimeError: The app has a ``celery`` command of its own, which
        ``flask celery`` would replace.
    """
    found = app.cli.commands.get("celery")
    if found is not None and found is not celery_command:
        callback = getattr(found, "callback", None)
        where = (
            f" ({callback.__module__}.{callback.__qualname__})"
            if callback is not None
            else ""
        )
        raise ConfigRuntimeError(
            f"The app already has a 'celery' command{where}. FlaskCelery adds"
            " 'flask celery', Celery's whole command line bound to the app"
            " ('flask celery worker', 'beat', 'inspect', ...), which would"
            " replace it. Remove the app's own command, or give it another"
            " name, such as @app.cli.command('celery-tools'). See"
            " 'Migrating from other integrations' in the docs."
        )
    app.cli.add_command(celery_command)


# Celery's global options that override a setting of the config, with their
# environment variables (``celery/bin/celery.py``): the option's own, and the
# one Click derives from the ``CELERY`` prefix.
_OVERRIDES = {
    "broker": ("broker_url", "-b/--broker", ("BROKER_URL", "CELERY_BROKER")),
    "result_backend": (
        "result_backend",
        "--result-backend",
        ("RESULT_BACKEND", "CELERY_RESULT_BACKEND"),
    ),
}


def _check_overrides(
    celery_main: click.Group, args: t.Sequence[str], celery: Celery[t.Any]
) -> None:
    """Refuse a broker or result backend given on the command line or in the
    environment that differs from the app's config: the worker would use it,
    and the app that sends tasks would not."""
    try:
        parsed = celery_main.make_context(
            "celery", list(args), auto_envvar_prefix="CELERY", resilient_parsing=True
        )
    except click.ClickException:
        return  # Celery's own parsing reports it
    for param, (name, option, variables) in _OVERRIDES.items():
        value = parsed.params.get(param)
        if not value:
            continue
        if parsed.get_parameter_source(param) is ParameterSource.ENVIRONMENT:
            variable = next(
                (v for v in variables if os.environ.get(v) == value), variables[0]
            )
            source = f"The environment variable {variable}"
            undo = f"Unset {variable}"
        else:
            source, undo = f"The option {option}", f"Leave out {option}"
        problem = override_problem(celery.conf, name, value, source, undo)
        if problem is not None:
            raise click.ClickException(problem)


#: Celery's commands that load the broker's transport. A worker started
#: otherwise (``celery -A ... worker``) checks it when it starts too.
_BROKER_COMMANDS = {
    "beat",
    "call",
    "control",
    "events",
    "inspect",
    "purge",
    "status",
    "worker",
}


def _check_transport(
    celery_main: click.Group, args: t.Sequence[str], celery: Celery[t.Any]
) -> None:
    """Refuse a command that uses the broker when its transport cannot be
    loaded (``redis`` installed without ``celery[redis]``): Celery would
    fail on it with a traceback."""
    command = next((arg for arg in args if arg in celery_main.commands), None)
    if command not in _BROKER_COMMANDS or "--help" in args:
        return
    from .worker import transport_problem

    problem = transport_problem(celery)
    if problem is not None:
        raise click.ClickException(f"{problem}.")


def _needs_gevent_patches(args: t.Sequence[str], celery: Celery[t.Any]) -> bool:
    """Whether ``args`` start a gevent worker in a process not patched yet."""
    import celery as celery_module

    # The parser Celery's own ``celery`` program patches by; untyped.
    find_option: t.Any = celery_module._find_option_with_arg
    if "worker" not in args or os.environ.get(_PATCHED_ENV):
        return False
    try:
        pool = find_option(list(args), ["-P"], ["--pool"])
    except KeyError:
        pool = celery.conf.worker_pool
    return bool(pool == "gevent")


def _exec_with_gevent_patches(args: t.Sequence[str]) -> t.NoReturn:
    if tuple(sys.argv[-len(args) :]) != tuple(args):
        raise click.UsageError(
            "A gevent worker must be started from the command line, where its"
            " monkey patches can be applied before the app is imported."
        )
    os.environ[_PATCHED_ENV] = "1"
    os.execv(sys.executable, [sys.executable, "-c", _GEVENT_MAIN, *sys.argv[1:]])
