"""The extensions, created once and bound to the app in :func:`create_app`.

Tasks and models import them from here, so that neither imports the app.
"""

from __future__ import annotations

from flask_sqlalchemy import SQLAlchemy

from flask_celery_ctx import FlaskCelery

db = SQLAlchemy()
celery_ext = FlaskCelery()
#: The Celery app, whose tasks are declared with ``@celery.task``.
celery = celery_ext.celery
