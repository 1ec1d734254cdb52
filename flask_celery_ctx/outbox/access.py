"""Whether the app's database role may use the outbox table, found when a
worker or ``flask celery outbox`` starts rather than at a user's commit.

The role needs the table, or the right to create it, and ``SELECT``,
``INSERT``, ``UPDATE`` and ``DELETE`` on it. PostgreSQL answers all of it in
one query; other databases are not asked, and a commit that cannot create
the table raises :class:`~flask_celery_ctx.outbox.table.OutboxTableError`.
"""

from __future__ import annotations

import logging
import typing as t

from sqlalchemy import text

from .table import OutboxTableError
from .table import TABLE_NAME

if t.TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from ..extension import FlaskCelery

logger = logging.getLogger("flask_celery_ctx")

_POSTGRESQL = text(
    "SELECT to_regclass(:name) IS NOT NULL,"
    " coalesce(has_schema_privilege(current_schema(), 'CREATE'), false),"
    " has_table_privilege(to_regclass(:name), 'SELECT')"
    " AND has_table_privilege(to_regclass(:name), 'INSERT')"
    " AND has_table_privilege(to_regclass(:name), 'UPDATE')"
    " AND has_table_privilege(to_regclass(:name), 'DELETE')"
)


def problem(engine: Engine) -> OutboxTableError | None:
    """What keeps the role of ``engine`` from using the outbox, or ``None``.

    :param engine: An engine the app writes to.
    """
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        row = conn.execute(_POSTGRESQL, {"name": TABLE_NAME}).one()
    present, may_create, may_write = row
    if not present and not may_create:
        return OutboxTableError(
            engine,
            "the table does not exist and this role may not create tables in"
            " the schema it would go to",
        )
    if present and not may_write:
        return OutboxTableError(
            engine,
            "this role lacks SELECT, INSERT, UPDATE or DELETE on the table",
        )
    return None


def problems(ext: FlaskCelery) -> list[OutboxTableError]:
    """What keeps the app from using the outbox, for each database it
    writes the outbox to; nothing when the outbox is off.

    :param ext: The extension.
    """
    from . import enabled
    from .relay import write_engines

    if not enabled(ext.celery):
        return []
    found: list[OutboxTableError] = []
    try:
        for engine in write_engines(ext):
            error = problem(engine)
            if error is not None:
                found.append(error)
    except Exception:
        # The database down, say: the first commit tells what is wrong.
        logger.warning("Could not check the outbox table", exc_info=True)
    return found
