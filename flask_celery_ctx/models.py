"""Model instances as task arguments.

An instance of a mapped class is sent as a reference, a dict that names the
model and the primary key::

    {"__model__": "myapp.models.User", "__key__": [42]}

and arrives as an instance loaded in the task's own session. References are
made only when a message is serialized (sent to a broker, or run eagerly
through ``delay``), inside lists, tuples and dicts of the arguments too. They
are loaded when Celery's tracer starts the task, in the task's context, one
query per model (see :mod:`flask_celery_ctx.tracing`).
"""

from __future__ import annotations

import typing as t

if t.TYPE_CHECKING:
    from celery import Task
    from sqlalchemy.orm import Session

MODEL = "__model__"
KEY = "__key__"


class MissingInstanceError(LookupError):
    """A task argument refers to a row that no longer exists.

    The task fails with it, unless it is declared with
    ``allow_missing_instances=True``: then the argument is ``None``.
    """


class _Shown:
    """How a reference looks in ``argsrepr``: ``User(42)``."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def model_name(cls: type[t.Any]) -> str:
    """The name of a model in a reference: its module and qualified name.

    :param cls: A mapped class.
    """
    return f"{cls.__module__}.{cls.__qualname__}"


def shown(cls: type[t.Any], key: t.Sequence[t.Any]) -> str:
    """How a reference is shown in logs and errors: ``User(42)``.

    :param cls: A mapped class.
    :param key: The primary key values.
    """
    return f"{cls.__name__}({', '.join(map(repr, key))})"


_CONTAINERS = (list, tuple, dict)


def _is_container(value: t.Any) -> bool:
    return type(value) in _CONTAINERS


def is_instance(value: t.Any) -> bool:
    """Whether a value is an instance of a mapped class.

    :param value: A value.
    """
    from sqlalchemy import inspect
    from sqlalchemy.orm import InstanceState

    return isinstance(inspect(value, raiseerr=False), InstanceState)


def instances(value: t.Any) -> t.Iterator[t.Any]:
    """Yield the model instances in a value, its lists, tuples and dicts.

    :param value: Arguments, or one of them.
    """
    if is_instance(value):
        yield value
    elif type(value) is dict:
        for item in value.values():
            yield from instances(item)
    elif _is_container(value):
        for item in value:
            yield from instances(item)


def check_pending(task_name: str, values: t.Iterable[t.Any], session: Session) -> None:
    """Check, before a send is queued for the commit, that every instance in
    ``values`` will have a primary key by then: it has one, or it is pending
    in ``session``, whose commit flushes it.

    :param task_name: The task, for the error message.
    :param values: The positional and keyword argument values.
    :param session: The session whose commit the send waits for.
    :raises ValueError: An instance is not saved and would not be.
    """
    import sqlalchemy as sa

    for value in values:
        for instance in instances(value):
            state = sa.inspect(instance)
            if state.key is None and not (state.pending and state.session is session):
                raise ValueError(
                    f"Task {task_name!r} got an instance of {type(instance).__name__}"
                    f" that has no primary key and is not pending in db.session:"
                    f" {instance!r}. Add it to db.session before the commit, or"
                    " pass a saved instance."
                )


def placeholders(value: t.Any) -> t.Any:
    """Replace the model instances in a value by a reference with no key,
    for a trial of the serializer before the keys are known.

    :param value: Arguments, or one of them.
    """
    if is_instance(value):
        return {MODEL: "", KEY: []}
    if type(value) is dict:
        return {k: placeholders(v) for k, v in value.items()}
    if _is_container(value):
        return [placeholders(v) for v in value]
    return value


def dump(task_name: str, value: t.Any) -> tuple[t.Any, t.Any, bool]:
    """Replace the model instances in a value by references.

    :param task_name: The task, for the error message.
    :param value: Arguments, or one of them.
    :return: The value to send, the value to show in ``argsrepr``, and
        whether any instance was replaced. Containers without instances are
        returned as they are.
    :raises ValueError: An instance has no primary key yet.
    """
    import sqlalchemy as sa

    if is_instance(value):
        state = sa.inspect(value)
        if state.key is None:
            what = "pending (added, not flushed)" if state.pending else "not saved"
            raise ValueError(
                f"Task {task_name!r} got an instance of {type(value).__name__} that is"
                f" {what}, so it has no primary key to send: {value!r}. Call"
                " db.session.flush() or commit() before sending it, or send it"
                " with delay_on_commit(), which sends after the commit."
            )
        cls = type(value)
        key = list(state.key[1])
        return {MODEL: model_name(cls), KEY: key}, _Shown(shown(cls, key)), True
    if not _is_container(value):
        return value, value, False
    if type(value) is dict:
        pairs = [(k, dump(task_name, v)) for k, v in value.items()]
        if not any(found for _, (_, _, found) in pairs):
            return value, value, False
        return (
            {k: sent for k, (sent, _, _) in pairs},
            {k: seen for k, (_, seen, _) in pairs},
            True,
        )
    items = [dump(task_name, v) for v in value]
    if not any(found for _, _, found in items):
        return value, value, False
    kind = type(value)
    return (
        kind(sent for sent, _, _ in items),
        kind(seen for _, seen, _ in items),
        True,
    )


def _is_reference(value: t.Any) -> bool:
    return type(value) is dict and value.keys() == {MODEL, KEY}


def _references(value: t.Any) -> t.Iterator[dict[str, t.Any]]:
    if _is_reference(value):
        yield value
    elif _is_container(value):
        for item in value.values() if type(value) is dict else value:
            yield from _references(item)


def _replace(value: t.Any, loaded: t.Callable[[dict[str, t.Any]], t.Any]) -> t.Any:
    if _is_reference(value):
        return loaded(value)
    if type(value) is dict:
        return {k: _replace(v, loaded) for k, v in value.items()}
    if _is_container(value):
        return type(value)(_replace(v, loaded) for v in value)
    return value


def load(
    task: Task[t.Any, t.Any],
    session: Session,
    args: list[t.Any],
    kwargs: dict[str, t.Any],
) -> None:
    """Replace the references in a task's arguments, in place, by instances
    loaded in ``session``: those already in its identity map as they are,
    the others with one query per model.

    :param task: The task, whose ``allow_missing_instances`` says what a
        reference to a missing row becomes.
    :param session: The task's session.
    :param args: The positional arguments, replaced in place.
    :param kwargs: The keyword arguments, replaced in place.
    :raises MissingInstanceError: A row is missing and the task does not
        allow it.
    :raises LookupError: A reference names a class that is not mapped, or
        whose module the worker has not imported.
    """
    import sqlalchemy as sa

    wanted: dict[type[t.Any], set[tuple[t.Any, ...]]] = {}
    models: dict[str, type[t.Any]] = {}
    for ref in _references([args, kwargs]):
        cls = models.get(ref[MODEL]) or _mapped_class(ref[MODEL])
        if cls is None:
            raise LookupError(
                f"Task {task.name!r} got a reference to the model {ref[MODEL]!r},"
                " which is not a mapped class of a module the worker imported."
                " Run the same code in the worker as in the sender."
            )
        models[ref[MODEL]] = cls
        wanted.setdefault(cls, set()).add(tuple(ref[KEY]))
    if not wanted:
        return

    found: dict[tuple[type[t.Any], tuple[t.Any, ...]], t.Any] = {}
    rows: list[t.Any] = []  # holds what the query loaded: the map is weak
    missing: list[str] = []
    for cls, keys in wanted.items():
        mapper = sa.inspect(cls)
        todo = []
        for key in keys:
            instance = session.identity_map.get(
                mapper.identity_key_from_primary_key(key)
            )
            if instance is None:
                todo.append(key)
            else:
                found[cls, key] = instance
        if todo:
            columns = mapper.primary_key
            if len(columns) == 1:
                where = columns[0].in_([key[0] for key in todo])
            else:
                where = sa.tuple_(*columns).in_(todo)
            rows.extend(session.scalars(sa.select(cls).where(where)))
            for key in todo:
                instance = session.identity_map.get(
                    mapper.identity_key_from_primary_key(key)
                )
                if instance is None:
                    missing.append(shown(cls, key))
                found[cls, key] = instance

    if missing and not getattr(task, "allow_missing_instances", False):
        raise MissingInstanceError(
            f"Task {task.name!r} got references to rows that do not exist (any"
            f" more): {', '.join(missing)}. They were deleted after the task was"
            " sent, or never committed. Declare the task with"
            " allow_missing_instances=True to receive None for them instead."
        )

    def loaded(ref: dict[str, t.Any]) -> t.Any:
        return found[models[ref[MODEL]], tuple(ref[KEY])]

    args[:] = [_replace(value, loaded) for value in args]
    kwargs.update({k: _replace(v, loaded) for k, v in kwargs.items()})


def _mapped_class(name: str) -> type[t.Any] | None:
    """The mapped class a reference names, looked up in the modules already
    imported: a reference never makes the worker import a module."""
    import sys

    from sqlalchemy import inspect
    from sqlalchemy.orm import Mapper

    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        found: t.Any = sys.modules.get(".".join(parts[:split]))
        for attribute in parts[split:]:
            found = getattr(found, attribute, None)
        if (
            isinstance(found, type)
            and model_name(found) == name
            and isinstance(inspect(found, raiseerr=False), Mapper)
        ):
            return found
    return None


def has_references(args: t.Any, kwargs: t.Any) -> bool:
    """Whether a task's arguments hold references.

    :param args: The positional arguments.
    :param kwargs: The keyword arguments.
    """
    # Runs for every task: a loop over the containers only.
    if not args and not kwargs:
        return False
    stack = [v for v in (args, kwargs) if type(v) in _CONTAINERS]
    while stack:
        value = stack.pop()
        if type(value) is dict:
            if len(value) == 2 and MODEL in value and KEY in value:
                return True
            value = value.values()
        stack.extend([v for v in value if type(v) in _CONTAINERS])
    return False
