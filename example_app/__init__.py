"""An example application: submit a text, watch a Celery worker analyse it.

Run it, web server and worker together, with ``make example`` (or
``python -m example_app``). Its settings come from environment variables:

``EXAMPLE_DATABASE_URL``
    The database. Default: SQLite in the instance folder.
``EXAMPLE_BROKER_URL``
    The broker: ``redis://localhost:6379/0``, ``amqp://guest:guest@localhost//``.
    Default: SQLite in the instance folder, through the package's
    ``sqlbroker+`` transport, which gives the task of a killed worker to the
    next worker (:mod:`flask_celery_ctx.sqlbroker`).
``EXAMPLE_RESULT_BACKEND``
    Where results are stored. Default: the database, in tables of Celery's
    own; with the default database, a SQLite file of its own.
``EXAMPLE_STEP_SECONDS``
    How long each of the 20 steps of an analysis takes. Default: 0.25.

Any other setting comes from a variable named ``FLASK_`` and the key, as
Flask's ``from_prefixed_env`` reads them: ``FLASK_CELERY_TASK_DEFAULT_QUEUE``,
or ``FLASK_SECRET_KEY``, which signs the model instances sent to tasks
(default: ``dev``, fit for your own machine only).
"""

from __future__ import annotations

import os
import typing as t

from flask import Flask

from .extensions import celery_ext
from .extensions import db


def create_app(config: t.Mapping[str, t.Any] | None = None) -> Flask:
    """Create the application.

    :param config: Settings that take the place of those from the
        environment, as tests give them.
    """
    app = Flask(__name__, instance_path=os.environ.get("EXAMPLE_INSTANCE_PATH"))
    app.config.from_mapping(_settings(app.instance_path, config or {}))
    # Any other setting from FLASK_ variables: FLASK_CELERY_WORKER_CONCURRENCY=4.
    app.config.from_prefixed_env()
    app.config.from_mapping(config or {})

    db.init_app(app)
    celery_ext.init_app(app)

    from . import tasks  # noqa: F401 (the worker finds the tasks through the app)
    from .views import bp

    app.register_blueprint(bp)
    with app.app_context():
        db.create_all()
    return app


def _settings(instance: str, config: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    env = os.environ.get

    def in_instance(name: str) -> str:
        os.makedirs(instance, exist_ok=True)
        return os.path.join(instance, name)

    settings: dict[str, t.Any] = {
        "ANALYSIS_STEP_SECONDS": float(env("EXAMPLE_STEP_SECONDS", "0.25")),
        # Signs the model instances sent to tasks; the web server and the
        # worker need the same one. Set FLASK_SECRET_KEY to a random value
        # anywhere but on your own machine, as Flask's tutorial says.
        "SECRET_KEY": "dev",
        # A worker that dies mid-task leaves the message to another worker:
        # at once for a pool process, and after the broker's visibility
        # timeout (30 s by default) when the whole worker is killed.
        "CELERY_TASK_ACKS_LATE": True,
        "CELERY_TASK_REJECT_ON_WORKER_LOST": True,
        "CELERY_WORKER_PREFETCH_MULTIPLIER": 1,
    }
    # Defaults are computed only when needed, so that tests that give their
    # own URLs leave no instance folder behind.
    if "SQLALCHEMY_DATABASE_URI" not in config:
        database = env("EXAMPLE_DATABASE_URL")
        settings["SQLALCHEMY_DATABASE_URI"] = (
            database or f"sqlite:///{in_instance('example.sqlite')}"
        )
    if "CELERY_BROKER_URL" not in config:
        settings["CELERY_BROKER_URL"] = env("EXAMPLE_BROKER_URL") or (
            f"sqlbroker+sqlite:///{in_instance('broker.sqlite')}"
        )
    if "CELERY_RESULT_BACKEND" not in config:
        backend = env("EXAMPLE_RESULT_BACKEND")
        database = env("EXAMPLE_DATABASE_URL")
        if not backend:
            backend = (
                f"db+{database}"
                if database
                else f"db+sqlite:///{in_instance('results.sqlite')}"
            )
        settings["CELERY_RESULT_BACKEND"] = backend
    return settings
