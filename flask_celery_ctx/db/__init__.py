"""The databases that tasks use, each behind one interface,
:class:`~flask_celery_ctx.db.base.Database`.

An adapter per integration:

- :mod:`~flask_celery_ctx.db.flask_sqlalchemy`: Flask-SQLAlchemy;
- :mod:`~flask_celery_ctx.db.flask_sqlalchemy_lite`: Flask-SQLAlchemy-Lite;
- :mod:`~flask_celery_ctx.db.sessionmaker`: a plain SQLAlchemy
  ``sessionmaker`` or ``scoped_session`` given to
  :class:`~flask_celery_ctx.FlaskCelery` with ``session=``.

:func:`database` finds the one of an app: the factory given with
``session=``, else the first extension in ``app.extensions`` whose *type* an
adapter knows (Flask-SQLAlchemy and Flask-SQLAlchemy-Lite both register
under the key ``"sqlalchemy"``). It looks on first use, since the database
extension may be registered after :meth:`~flask_celery_ctx.FlaskCelery.init_app`,
and keeps what it found for the app. The rest of the package talks to the
interface only. Another integration is an adapter module with a ``find``
function, added to ``_FINDERS``.
"""

from __future__ import annotations

import typing as t
from weakref import ref
from weakref import WeakKeyDictionary

from flask import Flask

from . import flask_sqlalchemy
from . import flask_sqlalchemy_lite
from .base import Database as Database
from .base import watch_connections

_FINDERS: tuple[t.Callable[[Flask], Database | None], ...] = (
    flask_sqlalchemy.find,
    flask_sqlalchemy_lite.find,
)

_found: WeakKeyDictionary[Flask, Database] = WeakKeyDictionary()

# The last app looked up and its integration: every task asks, nearly always
# for the same app, and a look-up in ``_found`` makes a weak reference.
_last: tuple[ref[Flask], Database] | None = None


def database(app: Flask) -> Database | None:
    """The database integration of ``app``, or ``None`` when it uses none.

    :param app: The Flask application.
    """
    global _last
    last = _last
    if last is not None and last[0]() is app:
        return last[1]
    found = _found.get(app)
    if found is None:
        for find in _FINDERS:
            found = find(app)
            if found is not None:
                use(app, found)
                break
    if found is not None:
        _last = (ref(app), found)
    return found


def use(app: Flask, found: Database) -> None:
    """Make ``found`` the database integration of ``app``, whatever
    extensions it has.

    :param app: The Flask application.
    :param found: The integration.
    """
    global _last
    watch_connections()
    _found[app] = found
    _last = None
