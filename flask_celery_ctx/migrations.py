"""Alembic's autogenerate (``flask db migrate``), told to leave the tables of
the library alone.

The SQL broker creates its tables (``kombu_queue`` and ``kombu_message``,
or the names of the ``queue_tablename`` and ``message_tablename`` transport
options) when a worker or a producer first connects, the outbox creates
``flask_celery_outbox`` when it is first written to, the tasks declared
with ``once=True`` create ``flask_celery_once`` when the first of them runs,
and ``unique_for`` creates ``flask_celery_unique`` at its first send.
Celery's database result backend (``db+`` URLs) creates
``celery_taskmeta`` and ``celery_tasksetmeta``, or the names of its
``database_table_names`` setting, as the example app does on the app's own
database. Autogenerate compares the database with the app's models and
proposes to drop every table it does not know: applied, that drops the
queued tasks.
See :ref:`alembic-autogenerate`.
"""

from __future__ import annotations

import typing as t

from flask import current_app
from flask import has_app_context

from .extension import FlaskCelery
from .once.table import TABLE_NAME as ONCE_TABLE_NAME
from .outbox.table import TABLE_NAME
from .unique.table import TABLE_NAME as UNIQUE_TABLE_NAME

#: The tables kombu's SQL transport creates, unless its transport options
#: name others.
BROKER_TABLES = ("kombu_queue", "kombu_message")

#: The tables of Celery's database result backend, unless its
#: ``database_table_names`` setting names others.
RESULT_TABLES = ("celery_taskmeta", "celery_tasksetmeta")

#: The transport options that name the broker's tables.
_TABLE_OPTIONS = ("queue_tablename", "message_tablename")


def include_object(
    object: t.Any, name: str | None, type_: str, reflected: bool, compare_to: t.Any
) -> bool:
    """Alembic's ``include_object`` hook: leave out a table of the library
    that the database has and the compared metadata lacks, so that
    autogenerate never proposes to drop it. A table of the library that the
    metadata has (the outbox's, when its metadata is given too) is compared,
    and created, like the app's own.

    Pass it to ``Migrate(app, db, include_object=include_object)``, or to
    ``context.configure()`` in ``migrations/env.py``.

    :param object: The table, column, index or constraint.
    :param name: Its name.
    :param type_: What it is: ``"table"``, ``"column"``, ``"index"``...
    :param reflected: Whether it was read from the database.
    :param compare_to: What it is compared with, ``None`` when the other
        side lacks it.
    """
    if type_ != "table" or not reflected or compare_to is not None:
        return True
    return name not in library_tables()


def library_tables() -> set[str]:
    """The names of the tables that the library, its SQL broker and Celery's
    database result backend create: with an app context, those the app's
    broker transport options and ``database_table_names`` name too."""
    names = {
        TABLE_NAME, ONCE_TABLE_NAME, UNIQUE_TABLE_NAME, *BROKER_TABLES,
        *RESULT_TABLES,
    }  # fmt: skip
    if has_app_context():
        ext = current_app.extensions.get("celery")
        if isinstance(ext, FlaskCelery):
            conf = ext.celery.conf
            options = conf.broker_transport_options or {}
            names.update(str(options[k]) for k in _TABLE_OPTIONS if k in options)
            names.update(
                str(name) for name in (conf.database_table_names or {}).values()
            )
    return names
