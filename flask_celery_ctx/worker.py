"""What happens when a worker of a :class:`~flask_celery_ctx.FlaskCelery`
app starts, and when it forks its pool processes."""

from __future__ import annotations

import logging
import os
import typing as t

from celery import Celery
from celery import current_app as current_celery
from celery import signals
from kombu.utils.url import maybe_sanitize_url

from .config import check_environment
from .db import database
from .db.base import pool_limits
from .drivers import missing_driver

if t.TYPE_CHECKING:
    from .extension import FlaskCelery

logger = logging.getLogger("flask_celery_ctx")

#: Pools whose tasks share the worker process, and so its engines.
SHARED_ENGINE_POOLS = ("threads", "gevent", "eventlet")


def install(ext: FlaskCelery) -> None:
    """Connect the worker signal handlers for one extension.

    :param ext: The extension.
    """
    celery = ext.celery
    worker_pid: int | None = None

    def on_celeryd_init(instance: t.Any = None, **kwargs: t.Any) -> None:
        # Sent before the worker loads the broker's transport, which it does
        # before ``worker_init``.
        if getattr(instance, "app", None) is celery:
            check_transport(celery)

    def on_worker_init(sender: t.Any = None, **kwargs: t.Any) -> None:
        nonlocal worker_pid
        if getattr(sender, "app", None) is not celery:
            return
        worker_pid = os.getpid()
        check_environment_unchanged(celery)
        pool = pool_name(sender.pool_cls)
        check_pool(pool)
        hint_at_connection_errors()
        if pool in SHARED_ENGINE_POOLS:
            check_engine_pools(ext, pool, sender.concurrency)

    def on_worker_process_init(**kwargs: t.Any) -> None:
        # Sent in each prefork child, whose app is the current one; the solo
        # pool sends it too, in the worker's own process, whose connections
        # are not inherited: dropping them unclosed would leak them.
        if os.getpid() == worker_pid:
            return
        if current_celery._get_current_object() is not celery:  # type: ignore[attr-defined]
            return
        found = database(ext.app)
        if found is not None:
            found.dispose_inherited_connections(ext.app)

    signals.celeryd_init.connect(on_celeryd_init, weak=False)
    signals.worker_init.connect(on_worker_init, weak=False)
    signals.worker_process_init.connect(on_worker_process_init, weak=False)


def pool_name(pool_cls: t.Any) -> str:
    """The name of a worker's pool, as given to ``--pool``.

    :param pool_cls: The worker's pool class, or its name.
    """
    if isinstance(pool_cls, str):
        return pool_cls.rsplit(":", 1)[0].rsplit(".", 1)[-1]
    module = str(getattr(pool_cls, "__module__", ""))
    name = module.rsplit(".", 1)[-1]
    return "threads" if name == "thread" else name


def greenlets_patched(pool: str) -> bool:
    """Whether the process was monkey-patched for a greenlet pool.

    :param pool: ``"gevent"`` or ``"eventlet"``.
    """
    if pool != "gevent":
        return False
    try:
        from gevent import monkey  # type: ignore[import-untyped]
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))


def check_pool(pool: str) -> None:
    """Refuse, at start, a pool that would run half-supported.

    :param pool: The pool's name.
    :raises SystemExit: The pool is eventlet, or gevent without its monkey
        patches, with a message that says what to do.
    """
    if pool == "eventlet":
        message = (
            "The eventlet pool is not supported by Flask-Celery-Ctx: eventlet is"
            " deprecated by its maintainers. Use '--pool gevent' for many"
            " concurrent I/O-bound tasks, or '--pool threads'."
        )
    elif pool == "gevent" and not greenlets_patched(pool):
        message = (
            "The gevent pool needs gevent's monkey patches, applied before the"
            " app is imported. Start the worker with '--pool gevent' on the"
            " command line ('flask celery worker --pool gevent' or 'celery -A"
            " module worker --pool gevent'), which applies them first."
        )
    else:
        return
    logger.critical(message)
    raise SystemExit(1)


def check_engine_pools(ext: FlaskCelery, pool: str, concurrency: int) -> None:
    """Warn when more tasks can run at once than an engine has connections.

    :param ext: The extension.
    :param pool: The pool's name.
    :param concurrency: How many tasks the pool runs at once.
    """
    found = database(ext.app)
    for engine, name, setting in [] if found is None else found.engines(ext.app):
        limits = pool_limits(engine)
        if limits is None or concurrency <= sum(limits):
            continue
        size, overflow = limits
        logger.warning(
            "The %s pool runs up to %d tasks at once, but %s has pool_size %d +"
            " max_overflow %d = %d connections: tasks will wait for a connection"
            " and fail with 'QueuePool limit reached'. Raise 'pool_size' or"
            " 'max_overflow' in %s to at least %d in total, or lower the"
            " worker's --concurrency.",
            pool,
            concurrency,
            name,
            size,
            overflow,
            size + overflow,
            setting,
            concurrency,
        )


def check_environment_unchanged(celery: Celery[t.Any]) -> None:
    """Refuse, at start, a broker or result backend that the environment
    gained after ``init_app`` checked it: a command of the app's own that
    starts the worker through Celery's command line with ``-b``, for one.

    :param celery: The Celery app.
    :raises SystemExit: The environment gives another broker or result
        backend than the config, with the message of ``init_app``.
    """
    try:
        check_environment(celery.conf, os.environ)
    except ValueError as exc:
        logger.critical(
            "%s If it was not set in the environment, Celery's own command line"
            " set it from its -b/--broker or --result-backend option: a command"
            " of the app's own (or of its CLI group) that starts the worker"
            " with Celery's command line does so. Remove that command, and"
            " start the worker with 'flask celery worker'.",
            exc,
        )
        raise SystemExit(1) from None


def check_transport(celery: Celery[t.Any]) -> None:
    """Refuse, at start, a broker whose transport cannot be loaded: the
    worker would fail on it with a traceback.

    :param celery: The Celery app.
    :raises SystemExit: The transport or its client library is missing, with
        a message that says what to install.
    """
    problem = transport_problem(celery)
    if problem is not None:
        logger.critical("%s.", problem)
        raise SystemExit(1)


def transport_problem(celery: Celery[t.Any]) -> str | None:
    """Load the transport of the broker, and with it its client library.

    :param celery: The Celery app.
    :return: ``None`` when it loads, else sentences that say what to install.
    """
    conn = None
    try:
        conn = celery.connection_for_read()
        # Loaded when first used, as the worker uses it before worker_init.
        conn.transport  # noqa: B018
    except Exception as exc:
        return missing_driver(broker_url(celery), celery.conf.broker_transport, exc)
    finally:
        if conn is not None:
            conn.release()
    return None


def broker_url(celery: Celery[t.Any]) -> str:
    """The URL of the broker the worker consumes from.

    :param celery: The Celery app.
    """
    return str(celery.conf.broker_read_url or celery.conf.broker_url or "amqp://")


def broker_problem(celery: Celery[t.Any]) -> str | None:
    """Connect to the broker once.

    :param celery: The Celery app.
    :return: ``None`` when the broker was reached, else sentences that name
        its URL (without the password) and the error, and say what to do:
        start the broker, or install the client library of its transport.
    """
    problem = transport_problem(celery)
    if problem is not None:
        return problem
    conn = celery.connection_for_read()
    try:
        conn.connect()
    except ImportError as exc:
        return missing_driver(broker_url(celery), celery.conf.broker_transport, exc)
    except Exception as exc:
        url = maybe_sanitize_url(conn.as_uri(include_password=True))
        return (
            f"Cannot reach the broker at {url}:"
            f" {str(exc).rstrip('.')}. Start that broker"
        )
    finally:
        conn.release()
    return None


def connection_hint(url: object, error: object) -> str:
    """What to do when the worker cannot connect to its broker.

    :param url: The broker's URL, its password masked.
    :param error: What connecting raised.
    """
    if isinstance(error, ImportError):
        return f"{missing_driver(str(url), None, error)}."
    return (
        f"Start the broker at {url}, or set CELERY_BROKER_URL (or"
        " CELERY['broker_url']) in the Flask config to the URL of a broker"
        " that runs."
    )


class _ConnectionErrorHint(logging.Filter):
    """Adds :func:`connection_hint` to the error that the worker's consumer
    logs, after the banner, each time it fails to connect to the broker:
    Celery's own names the URL, not the setting."""

    def filter(self, record: logging.LogRecord) -> bool:
        from celery.worker.consumer import consumer

        # The message of Celery's ``ensure_connected``; not in its stubs.
        message = consumer.CONNECTION_ERROR  # type: ignore[attr-defined]
        args = record.args
        if record.msg == message and isinstance(args, tuple) and len(args) == 3:
            url, error, next_step = args
            record.args = (url, error, f"{next_step}\n{connection_hint(url, error)}")
        return True


def hint_at_connection_errors() -> None:
    """Add what to do to the worker's errors about an unreachable broker."""
    found = logging.getLogger("celery.worker.consumer.consumer")
    if not any(isinstance(f, _ConnectionErrorHint) for f in found.filters):
        found.addFilter(_ConnectionErrorHint())
