"""What happens when a worker of a :class:`~flask_celery_ctx.FlaskCelery`
app starts."""

from __future__ import annotations

import logging
import typing as t

from celery import Celery
from celery import signals

logger = logging.getLogger("flask_celery_ctx")


def install(celery: Celery) -> None:
    """Connect the worker signal handlers for one Celery app.

    :param celery: The Celery app.
    """

    def on_worker_init(sender: t.Any = None, **kwargs: t.Any) -> None:
        if getattr(sender, "app", None) is celery:
            check_broker(celery)

    signals.worker_init.connect(on_worker_init, weak=False)


def check_broker(celery: Celery) -> bool:
    """Log an error that says what to do when the broker cannot be reached.

    Celery's own message names the URL but not the setting; the worker keeps
    retrying as Celery configures it.

    :param celery: The Celery app.
    :return: Whether the broker was reached.
    """
    conn = celery.connection_for_read()
    try:
        conn.connect()
    except Exception as exc:
        logger.error(
            "Cannot reach the broker at %s: %s. Start the broker, or set"
            " CELERY_BROKER_URL (or CELERY['broker_url']) in the Flask config to"
            " the URL of one that runs. The worker keeps retrying.",
            conn.as_uri(),
            exc,
        )
        return False
    finally:
        conn.release()
    return True
