"""``flask celery outbox``: list what waits in the outbox, and relay it."""

from __future__ import annotations

import datetime
import time
import typing as t

import click

if t.TYPE_CHECKING:
    from ..extension import FlaskCelery


def _extension(ctx: click.Context) -> FlaskCelery:
    # Celery's command line puts its app in the context object.
    ext: FlaskCelery = ctx.find_root().obj.app.flask_celery
    return ext


@click.group("outbox")
@click.pass_context
def outbox_command(ctx: click.Context) -> None:
    """The outbox of delay_on_commit: the sends committed and not published
    yet."""
    from .access import problems

    for error in problems(_extension(ctx)):
        click.secho(f"Error: {error}", err=True, fg="red")


@outbox_command.command("list")
@click.option("--limit", default=100, show_default=True, help="The most rows shown.")
@click.pass_context
def list_command(ctx: click.Context, limit: int) -> None:
    """List the tasks waiting in the outbox, in the order they are sent."""
    from . import table as outbox
    from .relay import engines

    now = time.time()
    found = [e for e in engines(_extension(ctx)) if outbox.has_table(e)]
    if not found:
        click.echo("Nothing waits: no database of the app has the outbox table.")
    for engine in found:
        rows = outbox.pending(engine, limit)
        click.echo(f"{engine.url.render_as_string()}: {len(rows)} waiting")
        for row in rows:
            created = datetime.datetime.fromtimestamp(
                row.created, datetime.timezone.utc
            )
            wait = max(0.0, row.available - now)
            click.echo(
                f"  {row.task_id}  {row.name}  committed {created:%Y-%m-%d %H:%M:%S}"
                f"  tries {row.attempts}  available in {wait:.0f}s"
            )


@outbox_command.command("relay")
@click.option(
    "--loop",
    is_flag=True,
    help="Keep relaying, every outbox_relay_interval seconds, until stopped.",
)
@click.pass_context
def relay_command(ctx: click.Context, loop: bool) -> None:
    """Send the tasks available in the outbox, then exit (or go on with
    --loop). Workers relay on their own; this is for when none runs."""
    from . import DEFAULT_RELAY_INTERVAL
    from . import relay_interval
    from .relay import relay_all
    from .relay import tasks_word

    ext = _extension(ctx)
    interval = relay_interval(ext.celery) or DEFAULT_RELAY_INTERVAL
    while True:
        sent = relay_all(ext)
        click.echo(f"Sent {sent} {tasks_word(sent)} from the outbox.")
        if not loop:
            return
        time.sleep(interval)
