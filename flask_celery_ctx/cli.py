"""The ``flask celery`` command: Celery's command line, bound to the app."""

from __future__ import annotations

import contextvars
import os
import sys
import typing as t

import click
from flask.cli import ScriptInfo

if t.TYPE_CHECKING:
    from celery import Celery

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

    app = ctx.ensure_object(ScriptInfo).load_app()
    ext: FlaskCelery = app.extensions["celery"]
    if _needs_gevent_patches(args, ext.celery):
        _exec_with_gevent_patches(args)
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
