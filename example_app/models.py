"""The example's one model: a text submitted for analysis."""

from __future__ import annotations

import typing as t
from datetime import datetime
from datetime import timezone

import sqlalchemy as sa
from sqlalchemy import orm

from .extensions import db


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Analysis(db.Model):  # type: ignore[name-defined,misc]
    """A text to analyse, and how far its analysis has got."""

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    text: orm.Mapped[str] = orm.mapped_column(sa.Text)
    #: ``queued``, ``running``, ``done`` or ``failed``.
    status: orm.Mapped[str] = orm.mapped_column(sa.String(10), default="queued")
    #: Percent done.
    progress: orm.Mapped[int] = orm.mapped_column(default=0)
    result: orm.Mapped[dict[str, t.Any] | None] = orm.mapped_column(sa.JSON)
    error: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    task_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(36))
    created_at: orm.Mapped[datetime] = orm.mapped_column(default=_now)
    #: When the row last changed: its task's progress, each step.
    updated_at: orm.Mapped[datetime | None] = orm.mapped_column(
        default=_now, onupdate=_now
    )

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")

    def to_dict(self) -> dict[str, t.Any]:
        """What the page shows of it, as JSON."""
        return {
            "id": self.id,
            "excerpt": self.text[:80],
            "status": self.status,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
            "task_id": self.task_id,
        }
