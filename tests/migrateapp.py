"""An app whose schema Flask-Migrate manages, on a database that is its SQL
broker too: ``MIGRATE_DATABASE_URL`` names it."""

from __future__ import annotations

import os

from flask import Flask
from flask_migrate import Migrate  # type: ignore[import-untyped]
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import orm

from flask_celery_ctx import FlaskCelery
from flask_celery_ctx.migrations import include_object

db = SQLAlchemy()
ext = FlaskCelery()
migrate = Migrate(include_object=include_object)


class Note(db.Model):  # type: ignore[name-defined,misc]
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    text: orm.Mapped[str]


def create_app() -> Flask:
    app = Flask(__name__)
    url = os.environ["MIGRATE_DATABASE_URL"]
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    app.config["CELERY_BROKER_URL"] = "sqlbroker+" + url
    db.init_app(app)
    ext.init_app(app)
    migrate.init_app(app, db)
    return app
