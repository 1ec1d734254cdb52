"""An application without Flask-SQLAlchemy."""

from __future__ import annotations

import json
import os
import typing as t

from flask import current_app
from flask import Flask
from flask import g

from flask_celery_ctx import FlaskCelery

ext = FlaskCelery()


@ext.celery.task
def app_name() -> list[str | None]:  # JSON makes a list of a tuple
    seen = g.get("seen")
    g.seen = "yes"
    return [current_app.name, seen]


def create_app(config: dict[str, t.Any] | None = None) -> Flask:
    app = Flask("plainapp")
    app.config.update(json.loads(os.environ.get("FCC_CONFIG", "{}")))
    app.config.update(config or {})
    ext.init_app(app)
    return app
