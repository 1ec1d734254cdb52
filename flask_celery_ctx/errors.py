"""Errors in how an app configures Flask-Celery-Ctx.

Each is a :class:`click.ClickException` too: where the ``flask`` command
line loads the app (``flask celery worker``, ``flask run``), it prints the
message as ``Error: ...``, without a traceback, and exits with status 1.
Elsewhere they are the built-in errors they derive from, as before.
"""

from __future__ import annotations

import click


class ConfigurationError(click.ClickException):
    """The app's configuration of Flask-Celery-Ctx is wrong; the message
    names what is wrong and what to do."""


class ConfigValueError(ConfigurationError, ValueError):
    """A setting or argument has a wrong value."""


class ConfigTypeError(ConfigurationError, TypeError):
    """An argument has a wrong type."""


class ConfigRuntimeError(ConfigurationError, RuntimeError):
    """The app is set up in a way the extension cannot work with."""
