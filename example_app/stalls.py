"""What the page says of a task whose worker stopped mid-task.

The task commits its progress after each step, which updates the row's
``updated_at``. A running analysis that has not changed for a while lost its
worker. The broker gives the task to a worker again, which runs it from the
start: once the broker's lease on the message ends (the ``sqlbroker+`` and
Redis transports' ``visibility_timeout``), or at once (RabbitMQ, when the
worker's connection closes).
"""

from __future__ import annotations

import typing as t
from datetime import datetime
from datetime import timezone

from flask import current_app

from flask_celery_ctx.sqlbroker import VISIBILITY_TIMEOUT

from .models import Analysis

#: Seconds of lease per transport, unless the transport options say.
LEASES = {"sqlbroker": VISIBILITY_TIMEOUT, "redis": 3600.0, "rediss": 3600.0}


def notice(analysis: Analysis) -> str | None:
    """What the page says of an analysis that stopped making progress, or
    ``None`` while it runs as it should.

    :param analysis: The analysis, as the page shows it.
    """
    if analysis.status != "running" or analysis.updated_at is None:
        return None
    config = current_app.config
    quiet = _age(analysis.updated_at)
    if quiet < max(5.0, 4 * config["ANALYSIS_STEP_SECONDS"]):
        return None
    said = f"No progress for {quiet:.0f} s: the worker running it stopped."
    lease = _lease(config)
    if lease is None:
        return f"{said} The broker gives it to another worker, which runs it again."
    left = lease - quiet
    when = f"in about {left:.0f} s" if left > 0 else "any moment now"
    return (
        f"{said} It will be retried from the start by a worker {when}, when the"
        f" broker's lease on it ends ({lease:.0f} s after the last progress)."
    )


def _lease(config: t.Mapping[str, t.Any]) -> float | None:
    options = config.get("CELERY_BROKER_TRANSPORT_OPTIONS") or {}
    if "visibility_timeout" in options:
        return float(options["visibility_timeout"])
    scheme = str(config["CELERY_BROKER_URL"]).split("://", 1)[0].split("+", 1)[0]
    return LEASES.get(scheme)


def _age(moment: datetime) -> float:
    """Seconds since a moment, stored in UTC, with or without its zone."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - moment).total_seconds()
