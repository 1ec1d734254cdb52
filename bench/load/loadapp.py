"""The application the load benchmark runs: one task that writes a row."""

from __future__ import annotations

import json
import os

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import orm

from flask_celery_ctx import FlaskCelery

db = SQLAlchemy()
ext = FlaskCelery()


class Row(db.Model):  # type: ignore[name-defined,misc]
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    n: orm.Mapped[int]


@ext.celery.task(ignore_result=True)
def write_row(n: int) -> None:
    db.session.add(Row(n=n))
    db.session.commit()


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(json.loads(os.environ["FCC_LOAD_CONFIG"]))
    db.init_app(app)
    ext.init_app(app)
    # Touch the database in the factory, as many apps do: the worker's parent
    # holds a pooled connection when it forks.
    with app.app_context():
        db.create_all()
    return app
