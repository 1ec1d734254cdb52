"""The Flask-SQLAlchemy extension and model of the three Flask variants (each
runs in a process of its own)."""

from __future__ import annotations

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import orm
from sqlalchemy import select

db = SQLAlchemy()


class Row(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "bench_row"

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]


def query_one() -> str | None:
    """One ``SELECT`` through the request's session."""
    return db.session.scalar(select(Row.name).where(Row.id == 1))


def insert_one(name: str) -> None:
    """Insert one row and commit."""
    db.session.add(Row(name=name))
    db.session.commit()
