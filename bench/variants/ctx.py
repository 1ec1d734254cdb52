"""Flask-Celery-Ctx: ``FlaskCelery``, whose tasks run in a context pushed per
task, with the session removed after each.

A worker starts as the documentation shows:
``flask --app ctx:create_app celery worker``.
"""

from __future__ import annotations

from _common import celery_settings
from _common import done
from _common import INSERT
from _common import MARK
from _common import mark
from _common import NOOP
from _common import QUERY
from _common import settings
from _common import TRIVIAL
from _fsqla import db
from _fsqla import insert_one
from _fsqla import query_one
from _fsqla import Row
from flask import Flask
from sqlalchemy import select

from flask_celery_ctx import FlaskCelery

ext = FlaskCelery()
celery_app = ext.celery


@celery_app.task(name=NOOP)
def noop() -> None:
    pass


@celery_app.task(name=MARK)
def mark_task() -> None:
    mark()


@celery_app.task(name=QUERY)
def query() -> str | None:
    return query_one()


@celery_app.task(name=TRIVIAL)
def trivial(key: str, total: int) -> None:
    done(key, total)


@celery_app.task(name=INSERT)
def insert(key: str, total: int) -> None:
    insert_one(key)
    done(key, total)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["CELERY"] = celery_settings()
    app.config["SQLALCHEMY_DATABASE_URI"] = settings()["database_url"]
    app.config["SECRET_KEY"] = "bench"  # signs the model references
    db.init_app(app)
    ext.init_app(app)
    return app


# Model instances as arguments (part 4 of the benchmark) --------------------


@celery_app.task(name="bench.rows")
def rows(rows: list[Row]) -> int:
    """Receive instances, loaded by Flask-Celery-Ctx."""
    return sum(len(row.name) for row in rows)


@celery_app.task(name="bench.row_ids_in")
def row_ids_in(ids: list[int]) -> int:
    """Receive ids and load them with one ``IN`` query."""
    loaded = db.session.scalars(select(Row).where(Row.id.in_(ids))).all()
    return sum(len(row.name) for row in loaded)


@celery_app.task(name="bench.row_ids_get")
def row_ids_get(ids: list[int]) -> int:
    """Receive ids and load them one by one, as ``session.get`` does."""
    loaded = [db.session.get(Row, id) for id in ids]
    return sum(len(row.name) for row in loaded if row is not None)
