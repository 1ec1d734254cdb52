"""A task module that an app names in its ``imports`` setting, imported by a
worker at start and by ``flask celery tasks``; no test imports it."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="imported_tasks.imported")
def imported() -> str:
    return "imported"
