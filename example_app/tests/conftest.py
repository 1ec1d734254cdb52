"""Fixtures of the example's tests, as an application's own tests have them:
the ``app`` that the fixtures of the package's pytest plugin (celery_eager,
celery_worker, celery_on_commit) use."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from example_app import create_app
from example_app.extensions import db


@pytest.fixture
def app(tmp_path: Path) -> t.Iterator[Flask]:
    app = create_app(
        {
            "TESTING": True,
            # A file: a worker thread cannot share an in-memory database.
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'test.sqlite'}",
            # In the test process: no broker server to run.
            "CELERY_BROKER_URL": "memory://",
            "CELERY_RESULT_BACKEND": "cache+memory://",
            "ANALYSIS_STEP_SECONDS": 0,
        }
    )
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
