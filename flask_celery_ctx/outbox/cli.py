"""``flask celery outbox``: list what waits in the outbox, relay it, and
retry or drop the rows kept as dead."""

from __future__ import annotations

import datetime
import json
import time
import typing as t

import click

from .untraced import untraced

if t.TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from ..extension import FlaskCelery
    from .table import Health


def _extension(ctx: click.Context) -> FlaskCelery:
    # Celery's command line puts its app in the context object.
    ext: FlaskCelery = ctx.find_root().obj.app.flask_celery
    return ext


def _engines(ctx: click.Context) -> list[Engine]:
    """The engines of the app whose databases have the outbox table, with
    every column."""
    from . import table as outbox
    from .relay import engines

    with untraced():
        found = [e for e in engines(_extension(ctx)) if outbox.has_table(e)]
        try:
            for engine in found:
                outbox.check_columns(engine)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
    return found


@click.group("outbox")
@click.pass_context
def outbox_command(ctx: click.Context) -> None:
    """The outbox of delay_on_commit: the sends committed and not published
    yet."""
    from .access import problems

    with untraced():
        found = problems(_extension(ctx))
    for error in found:
        click.secho(f"Error: {error}", err=True, fg="red")


@outbox_command.command("list")
@click.option("--limit", default=100, show_default=True, help="The most rows shown.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object, for monitoring: the rows and a summary.",
)
@click.pass_context
def list_command(ctx: click.Context, limit: int, as_json: bool) -> None:
    """List the tasks in the outbox, in the order they are sent, with their
    state (waiting, leased, dead), attempts and last error."""
    from . import table as outbox

    now = time.time()
    found = _engines(ctx)
    if as_json:
        with untraced():
            report = _report(found, limit, now)
        click.echo(json.dumps(report, indent=2))
        return
    if not found:
        click.echo("Nothing waits: no database of the app has the outbox table.")
    for engine in found:
        with untraced():
            counts = outbox.health(engine, now)
            rows = outbox.pending(engine, limit)
        click.echo(
            f"{engine.url.render_as_string()}: {counts.waiting} waiting,"
            f" {counts.leased} leased, {counts.dead} dead"
        )
        for row in rows:
            created = datetime.datetime.fromtimestamp(
                row.created, datetime.timezone.utc
            )
            state = outbox.state(row, now)
            when = "" if state == "dead" else f"  available in {_seconds(row, now)}"
            click.echo(
                f"  {row.task_id}  {row.name}  {state}  attempts {row.attempts}"
                f"  committed {created:%Y-%m-%d %H:%M:%S}{when}"
            )
            if row.last_error:
                click.echo(f"      last error: {row.last_error}")


def _report(engines: list[Engine], limit: int, now: float) -> dict[str, t.Any]:
    """What ``list --json`` prints: per database its rows and their summary,
    and the summary of all. Ages and times are in seconds; ``available_in``
    is ``null`` for a dead row, ``0`` for a row available now."""
    from . import table as outbox

    databases = []
    healths = []
    for engine in engines:
        rows = [
            {
                "id": row.id,
                "task_id": row.task_id,
                "task": row.name,
                "state": outbox.state(row, now),
                "age": round(now - row.created, 3),
                "attempts": row.attempts,
                "last_error": row.last_error,
                "available_in": None
                if row.dead is not None
                else round(max(0.0, row.available - now), 3),
            }
            for row in outbox.pending(engine, limit)
        ]
        health = outbox.health(engine, now)
        healths.append(health)
        databases.append(
            {
                "database": engine.url.render_as_string(),
                "summary": _summary([health], now),
                "rows": rows,
            }
        )
    return {"summary": _summary(healths, now), "databases": databases}


def _summary(healths: list[Health], now: float) -> dict[str, t.Any]:
    """Counts by state, and the ages of the oldest rows not dead and of the
    oldest waiting, in seconds (``null`` when there is none)."""

    def age(times: list[float | None]) -> float | None:
        known = [at for at in times if at is not None]
        return round(now - min(known), 3) if known else None

    return {
        "waiting": sum(h.waiting for h in healths),
        "leased": sum(h.leased for h in healths),
        "dead": sum(h.dead for h in healths),
        "oldest_age": age([h.oldest for h in healths]),
        "oldest_waiting_age": age([h.oldest_waiting for h in healths]),
    }


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
    from . import settings
    from .relay import relay_all
    from .relay import tasks_word

    ext = _extension(ctx)
    interval = settings(ext.celery).relay_interval or DEFAULT_RELAY_INTERVAL
    _engines(ctx)  # a table of an older version is refused clearly
    while True:
        sent = relay_all(ext)
        click.echo(f"Sent {sent} {tasks_word(sent)} from the outbox{_left(ctx)}.")
        if not loop:
            return
        time.sleep(interval)


@outbox_command.command("retry")
@click.argument("task_id", required=False)
@click.option("--all", "every", is_flag=True, help="Every dead row.")
@click.pass_context
def retry_command(ctx: click.Context, task_id: str | None, every: bool) -> None:
    """Make a dead row (TASK_ID), or every dead row (--all), wait again, its
    attempts reset: the next relay sends it."""
    from . import table as outbox

    if every == (task_id is not None):
        raise click.UsageError("Give the task id of a dead row, or --all.")
    count = sum(outbox.retry(engine, task_id) for engine in _engines(ctx))
    if not count and task_id is not None:
        raise click.ClickException(_not_dead(task_id))
    rows = "row waits" if count == 1 else "rows wait"
    click.echo(f"{count} dead {rows} again, sent by the next relay.")


@outbox_command.command("drop")
@click.argument("task_id")
@click.pass_context
def drop_command(ctx: click.Context, task_id: str) -> None:
    """Delete the dead row of TASK_ID: its task is never sent."""
    from . import table as outbox

    if not sum(outbox.drop(engine, task_id) for engine in _engines(ctx)):
        raise click.ClickException(_not_dead(task_id))
    click.echo(f"Dropped the dead row of task {task_id}: it will not be sent.")


def _not_dead(task_id: str) -> str:
    return (
        f"No dead row has the task id {task_id!r}. `flask celery outbox list`"
        " shows the rows, their task ids and states; only dead rows are"
        " retried or dropped."
    )


def _left(ctx: click.Context) -> str:
    """What still waits after a relay, and why, for its report."""
    from . import table as outbox

    now = time.time()
    found = _engines(ctx)
    with untraced():
        counts = [outbox.summary(engine) for engine in found]
    waiting = sum(c.waiting for c in counts)
    dead = sum(c.dead for c in counts)
    text = ""
    firsts = [c.first for c in counts if c.first is not None]
    if firsts:
        first = min(firsts, key=lambda row: row.available)
        text += (
            f"; {waiting} wait, the first available in {_seconds(first, now)}"
            f" ({outbox.state(first, now)})"
        )
    if dead:
        text += f"; {dead} dead: see `flask celery outbox list`"
    return text


def _seconds(row: t.Any, now: float) -> str:
    return f"{max(0.0, row.available - now):.0f}s"
