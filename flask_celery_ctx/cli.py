"""The ``flask celery`` command: Celery's command line, bound to the app."""

from __future__ import annotations

import typing as t

import click
from flask.cli import ScriptInfo

if t.TYPE_CHECKING:
    from .extension import FlaskCelery


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
    # As Celery's own ``app.start()`` does: the app is the default of -A.
    for param in celery_main.params:
        if param.name == "app":
            param.default = ext.celery
    celery_main.main(
        args=list(args),
        prog_name=ctx.command_path,
        auto_envvar_prefix="CELERY",
    )
