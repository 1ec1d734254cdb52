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


#: Built once, as the statement of every variant: SQLAlchemy's cost of
#: building a statement and its cache key moves by tens of thousands of
#: instructions from one process to the next, more than the integrations
#: differ.
SELECT_ONE = select(Row.name).where(Row.id == 1)


def query_one() -> str | None:
    """One ``SELECT`` through the request's session."""
    return db.session.scalar(SELECT_ONE)


def insert_one(name: str) -> None:
    """Insert one row and commit."""
    db.session.add(Row(name=name))
    db.session.commit()
