"""An application served by threads, whose views send tasks and read their
results as Flask's own Celery example does: ``@shared_task`` and
``AsyncResult(id)``, with no Celery app named."""

from __future__ import annotations

import json
import os
import typing as t

from celery import shared_task
from celery.result import AsyncResult
from flask import current_app
from flask import Flask

from flask_celery_ctx import FlaskCelery

ext = FlaskCelery()


@shared_task
def shared_add(x: int, y: int) -> tuple[int, str]:
    return x + y, current_app.name


@ext.celery.task
def own_add(x: int, y: int) -> tuple[int, str]:
    return x + y, current_app.name


def create_app(config: dict[str, t.Any] | None = None) -> Flask:
    app = Flask("sharedapp")
    app.config.update(json.loads(os.environ.get("FCC_CONFIG", "{}")))
    app.config.update(config or {})
    ext.init_app(app)

    @app.post("/shared/<int:x>/<int:y>")
    def send_shared(x: int, y: int) -> dict[str, t.Any]:
        return {"id": shared_add.delay(x, y).id}

    @app.post("/own/<int:x>/<int:y>")
    def send_own(x: int, y: int) -> dict[str, t.Any]:
        return {"id": own_add.delay(x, y).id}

    @app.get("/result/<id>")
    def task_result(id: str) -> dict[str, t.Any]:
        result: AsyncResult[t.Any] = AsyncResult(id)
        ready = result.ready()
        return {"ready": ready, "value": result.get() if ready else None}

    return app
