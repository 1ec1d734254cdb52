"""Plain Celery, no Flask: the floor.

Tasks that use the database open a SQLAlchemy session of their own and close
it, which is the least any integration has to do.
"""

from __future__ import annotations

import functools

from _common import celery_settings
from _common import done
from _common import INSERT
from _common import MARK
from _common import mark
from _common import NOOP
from _common import QUERY
from _common import settings
from _common import TRIVIAL
from celery import Celery
from sqlalchemy import create_engine
from sqlalchemy import orm
from sqlalchemy import select
from sqlalchemy.engine import Engine


class Base(orm.DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "bench_row"

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]


#: Built once, as in the Flask variants (see ``_fsqla.SELECT_ONE``).
SELECT_ONE = select(Row.name).where(Row.id == 1)

celery_app = Celery("plain")
celery_app.config_from_object(celery_settings())


@functools.cache
def engine() -> Engine:
    # Made on first use: in a prefork child, not in the parent.
    return create_engine(settings()["database_url"])


@celery_app.task(name=NOOP)
def noop() -> None:
    pass


@celery_app.task(name=MARK)
def mark_task() -> None:
    mark()


@celery_app.task(name=QUERY)
def query() -> str | None:
    with orm.Session(engine()) as session:
        return session.scalar(SELECT_ONE)


@celery_app.task(name=TRIVIAL)
def trivial(key: str, total: int) -> None:
    done(key, total)


@celery_app.task(name=INSERT)
def insert(key: str, total: int) -> None:
    with orm.Session(engine()) as session:
        session.add(Row(name=key))
        session.commit()
    done(key, total)
