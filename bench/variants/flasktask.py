"""Flask's documented pattern (``patterns/celery``): ``celery_init_app`` with a
``FlaskTask`` that pushes an application context around the task body.

A worker starts as the documentation shows: ``celery -A flasktask worker``,
where the module makes the app and exposes its Celery app.
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
from celery import shared_task
from celery import Task
from flask import Flask


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):  # type: ignore[type-arg]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        CELERY=celery_settings(),
        SQLALCHEMY_DATABASE_URI=settings()["database_url"],
    )
    db.init_app(app)
    celery_init_app(app)
    return app


@shared_task(name=NOOP)
def noop() -> None:
    pass


@shared_task(name=MARK)
def mark_task() -> None:
    mark()


@shared_task(name=QUERY)
def query() -> str | None:
    return query_one()


@shared_task(name=TRIVIAL)
def trivial(key: str, total: int) -> None:
    done(key, total)


@shared_task(name=INSERT)
def insert(key: str, total: int) -> None:
    insert_one(key)
    done(key, total)


flask_app = create_app()
celery_app: Celery = flask_app.extensions["celery"]
