"""The ``flask celery tasks`` command: the app's tasks, and the options that
decide their delivery, read from the app alone, without a worker."""

from __future__ import annotations

import json
import typing as t

import click

if t.TYPE_CHECKING:
    from celery import Celery
    from celery import Task

#: The columns of the table, in order; ``--json`` gives these keys and the
#: exchange and routing key of the route.
COLUMNS = (
    "name",
    "base",
    "queue",
    "acks_late",
    "reject_on_worker_lost",
    "ignore_result",
    "time_limit",
    "soft_time_limit",
    "rate_limit",
    "max_retries",
)


@click.command("tasks")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead.")
@click.pass_context
def tasks_command(ctx: click.Context, as_json: bool) -> None:
    """List the app's tasks: name, base class, queue, and the options that
    decide their delivery, as the config and its annotations make them.

    Celery's own tasks (celery.chord_unlock, ...) are left out.
    """
    from celery.bin.base import CLIContext

    celery: Celery[t.Any] = ctx.find_object(CLIContext).app  # type: ignore[union-attr]
    found = describe(celery)
    if as_json:
        click.echo(json.dumps(found, indent=2))
    else:
        click.echo(_table(found))


def describe(celery: Celery[t.Any]) -> list[dict[str, t.Any]]:
    """Describe the tasks of a Celery app, as a worker of it would run them:
    after importing the modules of its ``imports`` and ``include`` settings
    and of ``autodiscover_tasks``, as a worker does at start.

    :param celery: The Celery app.
    :return: A dict per task, sorted by name, with the keys of
        :data:`COLUMNS`, ``exchange``, ``routing_key`` and ``route_error``.
    """
    celery.loader.import_default_modules()
    return [
        _describe_task(celery, task)
        for _, task in sorted(celery.tasks.items())
        if type(task).__module__ != "celery.app.builtins"
    ]


def _describe_task(celery: Celery[t.Any], task: Task[t.Any, t.Any]) -> dict[str, t.Any]:
    conf = celery.conf
    cls = type(task)
    # A task made from a function is an instance of a class made for it,
    # whose base is the class given with base= or the app's task class,
    # which Celery subclasses for the app.
    base = cls.__bases__[0] if vars(cls).get("_decorated") else cls
    if vars(base).get("_app") is celery and vars(base).get("abstract"):
        base = base.__bases__[0]
    return {
        "name": task.name,
        "base": f"{base.__module__}.{base.__qualname__}",
        **_route(celery, task),
        "acks_late": bool(task.acks_late),
        "reject_on_worker_lost": bool(task.reject_on_worker_lost),
        "ignore_result": bool(task.ignore_result),
        # Celery 5.4 leaves a task's time limits unset when the decorator
        # does not give them; the worker applies the config's then.
        "time_limit": _first(task.time_limit, conf.task_time_limit),
        "soft_time_limit": _first(task.soft_time_limit, conf.task_soft_time_limit),
        "rate_limit": task.rate_limit,
        "max_retries": task.max_retries,
    }


def _first(value: t.Any, default: t.Any) -> t.Any:
    return default if value is None else value


def _route(celery: Celery[t.Any], task: Task[t.Any, t.Any]) -> dict[str, t.Any]:
    """Where a send of the task without arguments goes, as Celery's router
    decides it from ``task_routes``, ``task_queues`` and the task's options.
    """
    # What apply_async sends with; the router changes the dict it is given.
    options = dict(task._get_exec_options())  # type: ignore[attr-defined]
    try:
        # apply_async passes the task itself as task_type; the stubs say a class.
        route = celery.amqp.router.route(options, task.name, (), {}, task)  # type: ignore[arg-type]
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        return {
            "queue": None,
            "exchange": None,
            "routing_key": None,
            "route_error": error,
        }
    queue = route["queue"]
    exchange = route.get("exchange") or queue.exchange
    return {
        "queue": queue.name,
        "exchange": getattr(exchange, "name", exchange),
        "routing_key": route.get("routing_key") or queue.routing_key,
        "route_error": None,
    }


def _table(found: list[dict[str, t.Any]]) -> str:
    rows = [[column.upper() for column in COLUMNS]]
    for task in found:
        cells = [_cell(task[column]) for column in COLUMNS]
        if task["route_error"]:
            cells[COLUMNS.index("queue")] = f"({task['route_error']})"
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    )


def _cell(value: t.Any) -> str:
    return "-" if value is None else str(value)
