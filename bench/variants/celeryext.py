"""Flask-CeleryExt: ``FlaskCeleryExt(app)``, whose Celery app is Celery's
default app with ``AppContextTask`` as its task class.

A worker starts as Flask-CeleryExt's documentation shows:
``celery -A celeryext:celery_app worker``.
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
from celery import Celery
from flask import Flask
from flask_celeryext import FlaskCeleryExt

ext = FlaskCeleryExt()


def create_app() -> Flask:
    app = Flask(__name__)
    # Flask-CeleryExt maps ``CELERY_`` keys to Celery's names.
    app.config.update(
        {f"CELERY_{name.upper()}": value for name, value in celery_settings().items()}
    )
    app.config["SQLALCHEMY_DATABASE_URI"] = settings()["database_url"]
    db.init_app(app)
    ext.init_app(app)
    return app


flask_app = create_app()
celery_app: Celery = ext.celery


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
