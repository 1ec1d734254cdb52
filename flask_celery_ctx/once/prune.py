"""What deletes the records of once tasks older than the retention: a
thread in the main process of every worker of an app that has such tasks,
every :data:`~flask_celery_ctx.once.PRUNE_INTERVAL` seconds at most, its
queries kept out of the app's traces
(:mod:`~flask_celery_ctx.outbox.untraced`)."""

from __future__ import annotations

import logging
import threading
import time
import typing as t

from celery import bootsteps

from ..db import database
from ..outbox.untraced import untraced
from . import PRUNE_INTERVAL
from . import retention

if t.TYPE_CHECKING:
    from celery import Celery

    from ..extension import FlaskCelery

logger = logging.getLogger("flask_celery_ctx")


def once_tasks(celery: Celery[t.Any]) -> list[str]:
    """The names of the app's tasks declared with ``once=True``.

    :param celery: The Celery app.
    """
    return sorted(
        name for name, task in celery.tasks.items() if getattr(task, "once", False)
    )


def prune_all(ext: FlaskCelery, now: float | None = None) -> int:
    """Delete the records older than the retention in every database the
    app's session writes to.

    :param ext: The extension.
    :param now: The time.
    :return: How many records were deleted.
    """
    from ..outbox.relay import write_engines
    from . import table as records

    before = (time.time() if now is None else now) - retention(ext.celery)
    total = 0
    with untraced():
        for engine in write_engines(ext):
            if records.has_table(engine):
                total += records.prune(engine, before)
    return total


class PruneThread(threading.Thread):
    """Prunes the records at start and then every ``interval`` seconds,
    until stopped.

    :param ext: The extension.
    :param interval: Seconds between two prunings.
    """

    def __init__(self, ext: FlaskCelery, interval: float) -> None:
        super().__init__(name="flask-celery-once-prune", daemon=True)
        self.ext = ext
        self.interval = interval
        self._stopped = threading.Event()

    def run(self) -> None:
        while True:
            self.prune()
            if self._stopped.wait(self.interval):
                return

    def prune(self) -> None:
        """Prune once, logging what failed."""
        try:
            deleted = prune_all(self.ext)
        except Exception:
            logger.exception(
                "Pruning the records of once tasks failed; tried again later."
            )
            return
        if deleted:
            logger.info(
                "Pruned %d records of once tasks past their retention.", deleted
            )

    def stop(self) -> None:
        """Stop; wait for a pruning in progress a little."""
        self._stopped.set()
        if self.is_alive():
            self.join(10)


class PruneStep(bootsteps.StartStopStep):
    """The worker bootstep that runs a :class:`PruneThread` in the worker's
    main process, when the app has tasks declared with ``once=True``. An app
    without a database gets an error in the log instead: those tasks fail."""

    label = "Once records pruning"
    requires = ("celery.worker.components:Pool",)

    def create(self, parent: t.Any) -> PruneThread | None:  # type: ignore[override]
        ext: FlaskCelery | None = getattr(parent.app, "flask_celery", None)
        if ext is None:
            return None
        names = once_tasks(ext.celery)
        if not names:
            return None
        try:
            app = ext.app
        except RuntimeError:
            return None
        if database(app) is None:
            logger.error(
                "The tasks %s are declared with once=True, but the app has no"
                " database integration to record their ids in: they will fail."
                " Set up Flask-SQLAlchemy, Flask-SQLAlchemy-Lite or"
                " FlaskCelery(session=...) in the worker's app.",
                ", ".join(names),
            )
            return None
        return PruneThread(ext, min(PRUNE_INTERVAL, retention(ext.celery)))


def install(celery: Celery[t.Any]) -> None:
    """Add the pruning to the workers of ``celery``.

    :param celery: The Celery app.
    """
    celery.steps["worker"].add(PruneStep)
