"""A worker module for ``celery -A pushed_context worker``, written as many
tutorials do: it builds the app and leaves an app context pushed."""

from taskapp import create_app

flask_app = create_app()
flask_app.app_context().push()
celery_app = flask_app.extensions["celery"].celery
