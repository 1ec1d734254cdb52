"""The extensions, created once and bound to the app in :func:`create_app`.

Tasks and models import them from here, so that neither imports the app.
"""

from __future__ import annotations

import typing as t

from celery import Celery
from flask_sqlalchemy import SQLAlchemy

from flask_celery_ctx import ContextTask
from flask_celery_ctx import FlaskCelery

db = SQLAlchemy()
celery_ext = FlaskCelery()
#: The Celery app, typed with its task class so that type checkers know the
#: methods of its tasks, such as ``delay_on_commit``.
celery = t.cast("Celery[ContextTask]", celery_ext.celery)
