"""Values of ``g`` carried from where a task is sent into the task.

``FlaskCelery(carry_g=["request_id", "user_id"])`` names attributes of
``g``. When a :class:`~flask_celery_ctx.ContextTask` is sent from an
application context, the named attributes that ``g`` has there travel in one
message header, :data:`HEADER`, as a JSON object; when the task runs, in a
worker or inline, they are set on its ``g`` before its hooks run (see
:doc:`/carry`).

The header is an ordinary custom header: Celery keeps it in the request's
``headers`` and sends it again with a retry, and a task sending another task
carries its own ``g`` values on, so a whole workflow shares them.
"""

from __future__ import annotations

import json
import logging
import typing as t

from celery import signals
from flask import current_app
from flask import g
from flask import has_app_context
from kombu.exceptions import EncodeError

from .errors import ConfigTypeError
from .errors import ConfigValueError

if t.TYPE_CHECKING:
    from celery import Task

    from .extension import FlaskCelery

logger = logging.getLogger("flask_celery_ctx")

#: The message header that carries the values, a JSON object.
HEADER = "flask_g"


def check_names(names: t.Iterable[str]) -> tuple[str, ...]:
    """Return the names of the attributes of ``g`` to carry, checked.

    :param names: The names given to ``FlaskCelery(carry_g=...)``.
    :raises TypeError: ``names`` is a string, or holds something else than
        strings.
    :raises ValueError: A name is not a Python identifier.
    """
    if isinstance(names, (str, bytes)):
        raise ConfigTypeError(
            f"FlaskCelery(carry_g=...) takes a list of names of attributes of g,"
            f" not the string {names!r}: write carry_g=[{names!r}]."
        )
    checked: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise ConfigTypeError(
                f"FlaskCelery(carry_g=...) takes names of attributes of g as"
                f" strings, not {name!r}."
            )
        if not name.isidentifier():
            raise ConfigValueError(
                f"FlaskCelery(carry_g=...) got {name!r}, which is not the name of"
                " an attribute of g: use a Python identifier, such as"
                " 'request_id'."
            )
        if name not in checked:
            checked.append(name)
    return tuple(checked)


def capture(names: tuple[str, ...], task_name: str) -> str | None:
    """Return the header value that carries the named attributes of the
    current ``g``: ``None`` outside an application context, or when ``g`` has
    none of them.

    :param names: The names of the attributes.
    :param task_name: The task's name, for the error message.
    :raises kombu.exceptions.EncodeError: A value is not JSON; the message
        names the attribute.
    """
    if not has_app_context():
        return None
    values = {name: g.get(name) for name in names if name in g}
    if not values:
        return None
    try:
        return json.dumps(values, separators=(",", ":"))
    except (TypeError, ValueError):
        for name, value in values.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise EncodeError(
                    f"g.{name} is {value!r}, which cannot be carried into task"
                    f" {task_name!r}: carried values travel as JSON ({exc}). Set"
                    f" g.{name} to a string, number, boolean, None, or a list or"
                    " dict of them, or remove it from carry_g."
                ) from exc
        raise


def carry_other_sends(ext: FlaskCelery) -> None:
    """Carry the values in the messages of the extension's tasks that are not
    sent by :meth:`~flask_celery_ctx.ContextTask.apply_async`: tasks of
    another base class, and ``send_task()`` by name. Connected only for an
    extension that carries values, so that other sends pay nothing.

    :param ext: The extension.
    """

    def on_before_publish(
        sender: str | None = None,
        headers: dict[str, t.Any] | None = None,
        **kwargs: t.Any,
    ) -> None:
        if headers is None or HEADER in headers or not has_app_context():
            return
        if current_app.extensions.get("celery") is not ext:
            return  # a context of another app
        value = capture(ext.carry_g, str(sender))
        if value is not None:
            headers[HEADER] = value

    signals.before_task_publish.connect(on_before_publish, weak=False)


def restore(names: tuple[str, ...], task: Task[t.Any, t.Any]) -> None:
    """Set the values a running task carries on its ``g``, once its request
    is pushed and its context is active.

    Only the names in ``names`` are set, and only those ``g`` does not have
    already: a task run inline in its caller's context keeps the caller's
    values. A header that is not a JSON object is logged and left alone.

    :param names: The names of the attributes of ``g`` this app carries.
    :param task: The task.
    """
    headers = task.request.headers
    value = headers.get(HEADER) if isinstance(headers, dict) else None
    if value is None:
        return
    try:
        values = json.loads(value)
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
    except (TypeError, ValueError) as exc:
        logger.warning(
            "Task %s[%s] has a %r header that is not a JSON object (%s): its"
            " values are not set on g.",
            task.name,
            task.request.id,
            HEADER,
            exc,
        )
        return
    for name in names:
        if name in values and name not in g:
            setattr(g, name, values[name])
