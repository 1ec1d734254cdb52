"""What every variant shares: its settings, read from the environment, and
the way a task says that it is done.

The runner passes the settings as JSON in ``FCC_BENCH``, so that a worker and
the process that sends it tasks agree on the broker, the database and the
queue.
"""

from __future__ import annotations

import json
import os
import time
import typing as t

import redis
from sqlalchemy import Column
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import Table

#: Explicit task names, the same in every variant, so that the runner sends
#: tasks by name with one client for all of them.
NOOP = "bench.noop"
QUERY = "bench.query"
TRIVIAL = "bench.trivial"
INSERT = "bench.insert"
#: A task that makes callgrind write its count (``instructions_worker.py``).
MARK = "bench.mark"

#: The table the tasks read and write, created by the runner.
TABLE = Table(
    "bench_row",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("name", String(50), nullable=False),
)


def settings() -> dict[str, t.Any]:
    """The benchmark's settings: ``broker_url``, ``database_url``, ``queue``
    and ``redis_url``."""
    defaults = {
        "broker_url": "redis://127.0.0.1:6379/0",
        "redis_url": "redis://127.0.0.1:6379/0",
        "database_url": "sqlite://",
        "queue": "fcc-bench",
    }
    return {**defaults, **json.loads(os.environ.get("FCC_BENCH", "{}"))}


def celery_settings() -> dict[str, t.Any]:
    """Celery's settings, as lower-case names, identical for every variant."""
    s = settings()
    return {
        "broker_url": s["broker_url"],
        "task_default_queue": s["queue"],
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": True,
    }


_redis: tuple[int, redis.Redis] | None = None


def _client() -> redis.Redis:
    # One client per process: prefork children must not share the parent's.
    global _redis
    if _redis is None or _redis[0] != os.getpid():
        _redis = (os.getpid(), redis.Redis.from_url(settings()["redis_url"]))
    return _redis[1]


def mark() -> None:
    """Make callgrind, run with ``--dump-before=getloadavg``, write its
    count."""
    os.getloadavg()


def done(key: str, total: int) -> None:
    """Count a finished task. The first of ``total`` records the time in
    ``KEY:first``, the last pushes it to the list ``KEY:done``."""
    client = _client()
    count = client.incr(key)
    if count == 1:
        client.set(f"{key}:first", repr(time.time()))
    if count == total:
        client.rpush(f"{key}:done", repr(time.time()))
