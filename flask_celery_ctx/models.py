"""Model instances as task arguments.

An instance of any mapped SQLAlchemy class (a model of Flask-SQLAlchemy's
``db.Model``, or of a plain ``DeclarativeBase``) is sent as a signed
reference, a dict that names the model and the primary key::

    {"__model__": "myapp.models.User", "__key__": [42], "__sig__": "..."}

and arrives as an instance loaded in the task's own session. The signature is
made with the app's ``SECRET_KEY`` (see :func:`signer`): only references that
a sender of the app made are loaded, so a dict of the same shape that came
from elsewhere (the JSON of a request) cannot become an instance.

References are made only when a message is serialized (sent to a broker, or
run eagerly through ``delay``), inside lists, tuples and dicts of the
arguments too (their subclasses as well, such as a relationship's
collection, which become lists and dicts), and in the arguments of the
signatures a message embeds for the worker to send (``link``, ``chain``, a
chord's body). They are loaded when Celery's tracer starts the task, in
the task's context, with one query per model for up to
:data:`KEYS_PER_QUERY` keys (see :mod:`flask_celery_ctx.tracing`).
"""

from __future__ import annotations

import hashlib
import json
import pkgutil
import reprlib
import sys
import typing as t
from weakref import WeakKeyDictionary

from itsdangerous import Signer

if t.TYPE_CHECKING:
    from celery import Task
    from flask import Flask
    from sqlalchemy.orm import InstanceState
    from sqlalchemy.orm import Session

MODEL = "__model__"
KEY = "__key__"
SIG = "__sig__"

#: The salt of the signatures of references: they are valid for nothing else
#: signed with the app's ``SECRET_KEY``.
SALT = "flask-celery-ctx.model-reference"

#: How many primary key values one query loads at most; a composite key counts
#: one per column. Databases limit the parameters of a statement (PostgreSQL
#: to 65,535, SQLite to 32,766, Oracle's ``IN`` lists to 1,000 items).
KEYS_PER_QUERY = 500

#: Load every reference with the query a worker runs, also those whose
#: instance is in the session already: the eager fixtures of
#: :mod:`flask_celery_ctx.testing` set it, so that a test runs what a worker
#: would.
#:
#: :meta private:
query_always = False


class MissingInstanceError(LookupError):
    """A task argument refers to a row that no longer exists.

    The task fails with it, unless it is declared with
    ``allow_missing_instances=True``: then the argument is ``None``.
    """


class InvalidReferenceError(ValueError):
    """A task argument looks like a model reference but its signature does not
    verify with the worker's ``SECRET_KEY``: it was not made by a sender of
    the app, or the sender used another key. The task fails with it.
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


def signer(app: Flask) -> Signer | None:
    """The signer of references with the app's ``SECRET_KEY``, which also
    verifies with the keys of ``SECRET_KEY_FALLBACKS``, as Flask's sessions
    do; ``None`` when the app has no ``SECRET_KEY``.

    :param app: The Flask application.
    """
    if not app.secret_key:
        return None
    keys = (*(app.config.get("SECRET_KEY_FALLBACKS") or ()), app.secret_key)
    cached = _signers.get(app)
    if cached is None or cached[0] != keys:
        cached = _signers[app] = (
            keys,
            Signer(list(keys), salt=SALT, digest_method=hashlib.sha256),
        )
    return cached[1]


# Per app: the keys and the signer made with them, made again when they change.
_signers: WeakKeyDictionary[Flask, tuple[tuple[t.Any, ...], Signer]] = (
    WeakKeyDictionary()
)


def _signed_text(name: t.Any, key: t.Any) -> bytes:
    # The same text in the sender and the worker: the key values the
    # serializer gives back (UUID, datetime, Decimal) read the same.
    return json.dumps([name, key], default=str, separators=(",", ":")).encode()


_SCALARS = frozenset({str, int, float, bool, type(None), bytes})


def _state(value: t.Any) -> InstanceState[t.Any] | None:
    """The state of a mapped instance; ``None`` for any other value."""
    # Called for every argument sent: the common values are told at once, and
    # nothing is mapped before SQLAlchemy is imported.
    if type(value) in _SCALARS or "sqlalchemy" not in sys.modules:
        return None
    kind = _instance_state()
    # Where SQLAlchemy's default instrumentation keeps it: no registry
    # look-up for the common case.
    state = getattr(value, "_sa_instance_state", None)
    if isinstance(state, kind):
        return state
    from sqlalchemy import inspect

    state = inspect(value, raiseerr=False)
    return state if isinstance(state, kind) else None


_found: list[type[InstanceState[t.Any]]] = []


def _instance_state() -> type[InstanceState[t.Any]]:
    """SQLAlchemy's ``InstanceState``, imported once it is needed."""
    if not _found:
        from sqlalchemy.orm import InstanceState

        _found.append(InstanceState)
    return _found[0]


_CONTAINERS = (list, tuple, dict)


def _is_container(value: t.Any) -> bool:
    return type(value) in _CONTAINERS


def _replace_instances(
    value: t.Any,
    replace: t.Callable[[t.Any, InstanceState[t.Any]], t.Any],
) -> tuple[t.Any, bool]:
    """Replace the mapped instances in a value, its lists, tuples and dicts.

    :param value: Arguments, or one of them.
    :param replace: Called with each instance and its state; returns what
        replaces it.
    :return: The value with the instances replaced, and whether there was
        any. Containers without instances are returned as they are; a
        subclass of list, tuple or dict that holds instances becomes a list
        or a dict.
    """
    kind = type(value)
    is_dict, is_container = kind is dict, kind in _CONTAINERS
    if not is_container and kind not in _SCALARS and isinstance(value, _CONTAINERS):
        # A relationship's collection (InstrumentedList), a namedtuple, a
        # signature: what the serializer sends as a list or a dict.
        is_dict, is_container = isinstance(value, dict), True
    if not is_container:
        state = _state(value)
        return (value, False) if state is None else (replace(value, state), True)
    if is_dict:
        pairs = [(k, _replace_instances(v, replace)) for k, v in value.items()]
        if not any(found for _, (_, found) in pairs):
            return value, False
        return {k: new for k, (new, _) in pairs}, True
    items = [_replace_instances(v, replace) for v in value]
    if not any(found for _, found in items):
        return value, False
    # A subclass (a relationship's collection) becomes a list.
    made = kind if kind in _CONTAINERS else list
    return made(new for new, _ in items), True


def _shown_instance(instance: t.Any, state: InstanceState[t.Any]) -> t.Any:
    if state.key is None:
        return instance
    return _Shown(shown(type(instance), state.key[1]))


def shown_instances(value: t.Any) -> t.Any:
    """Replace the saved instances in a value by how they are shown in logs,
    ``User(42)``.

    :param value: Arguments, or one of them.
    """
    return _replace_instances(value, _shown_instance)[0]


def instances(value: t.Any) -> tuple[t.Any, list[InstanceState[t.Any]]]:
    """Find the instances in a value, its lists, tuples, dicts and
    signatures, for a trial of the serializer before their keys are known.

    :param value: Arguments, or one of them.
    :return: The value with each instance replaced by a reference with no
        key, and the states of the instances, in the order met.
    """
    found: list[InstanceState[t.Any]] = []
    placeholder = {MODEL: "", KEY: [], SIG: ""}

    def add(instance: t.Any, state: InstanceState[t.Any]) -> dict[str, t.Any]:
        found.append(state)
        return placeholder

    return _replace_instances(value, add)[0], found


def sessions(value: t.Any) -> list[Session]:
    """The sessions that hold the instances in a value, its lists, tuples,
    dicts and signatures, each once, in the order met.

    :param value: Arguments and options, or one of them.
    """
    found = {s.session: None for s in instances(value)[1] if s.session is not None}
    return list(found)


def check_pending(
    task_name: str,
    states: t.Iterable[InstanceState[t.Any]],
    session: Session,
    signs: bool,
) -> None:
    """Check, before a send is queued for the commit, that every instance
    can be sent by then: it has a primary key, or it is pending in
    ``session``, whose commit flushes it; and the app has a ``SECRET_KEY``.

    :param task_name: The task, for the error message.
    :param states: The states of the instances (:func:`instances`).
    :param session: The session whose commit the send waits for.
    :param signs: Whether the app has a ``SECRET_KEY`` to sign with.
    :raises ValueError: An instance is not saved and would not be.
    :raises RuntimeError: The app has no ``SECRET_KEY`` to sign with.
    """
    for state in states:
        if not signs:
            raise _no_secret_key(task_name, state.obj())
        if state.key is None and not (state.pending and state.session is session):
            raise ValueError(
                f"Task {task_name!r} got an instance of {state.class_.__name__}"
                f" that has no primary key and is not pending in db.session:"
                f" {state.obj()!r}. Add it to db.session before the commit, or"
                " pass a saved instance."
            )


def has_instances(signature: t.Any) -> bool:
    """Whether a signature holds mapped instances, in its arguments, its
    options or the signatures it embeds.

    :param signature: A signature, or the dict of one.
    """
    return _replace_instances(signature, lambda *_: None)[1]


def _no_secret_key(task_name: str, instance: t.Any) -> RuntimeError:
    return RuntimeError(
        f"Task {task_name!r} got an instance of {type(instance).__name__},"
        " which is sent as a reference signed with the app's SECRET_KEY, but"
        " SECRET_KEY is not set. Set SECRET_KEY in the config, the same in"
        " the web and the worker processes."
    )


def dump(
    task_name: str,
    value: t.Any,
    app: Flask,
    committed: bool = False,
) -> tuple[t.Any, t.Any, bool]:
    """Replace the mapped instances in a value by signed references.

    :param task_name: The task, for the error messages.
    :param value: Arguments, or one of them.
    :param app: The app whose :func:`signer` signs them, made only when the
        value holds an instance: most sends hold none.
    :param committed: Refuse an instance whose row its session inserted in
        the transaction still in progress: a message sent now would reach a
        worker that cannot see the row.
    :return: The value to send, the value to show in ``argsrepr``, and
        whether any instance was replaced. Containers without instances are
        returned as they are.
    :raises ValueError: An instance has no primary key yet, or, with
        ``committed``, its row is not committed yet.
    :raises RuntimeError: The app has no ``SECRET_KEY`` to sign with.
    """

    signers: list[Signer | None] = []

    def reference(instance: t.Any, state: InstanceState[t.Any]) -> dict[str, t.Any]:
        if not signers:
            signers.append(signer(app))
        sign = signers[0]
        if state.key is None:
            what = "pending (added, not flushed)" if state.pending else "not saved"
            raise ValueError(
                f"Task {task_name!r} got an instance of {type(instance).__name__}"
                f" that is {what}, so it has no primary key to send: {instance!r}."
                " Send it with delay_on_commit(), which sends after the commit,"
                " or commit before sending it."
            )
        if committed and _inserted_uncommitted(state):
            raise ValueError(
                f"Task {task_name!r} got an instance of {type(instance).__name__}"
                f" whose row is inserted in a transaction not committed yet:"
                f" {instance!r}. A worker cannot see the row before the commit,"
                " and would not find it. Send it with delay_on_commit(), which"
                " sends after the commit, or commit before sending it."
            )
        if sign is None:
            raise _no_secret_key(task_name, instance)
        name, key = model_name(type(instance)), list(state.key[1])
        sig = sign.get_signature(_signed_text(name, key)).decode()
        return {MODEL: name, KEY: key, SIG: sig}

    sent, found = _replace_instances(value, reference)
    if not found:
        return value, value, False
    return sent, _replace_instances(value, _shown_instance)[0], True


def _inserted_uncommitted(state: InstanceState[t.Any]) -> bool:
    """Whether the row of ``state`` was inserted by its session in the
    transaction still in progress there (or in a savepoint of it), where no
    other connection sees it."""
    session = state.session
    if session is None:
        return False
    transaction = session.get_nested_transaction() or session.get_transaction()
    while transaction is not None:
        if state in transaction._new:
            return True
        transaction = transaction.parent
    return False


_REFERENCE = {MODEL, KEY, SIG}


def _is_reference(value: t.Any) -> bool:
    return type(value) is dict and len(value) == 3 and value.keys() == _REFERENCE


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


def _verify(task_name: str, sign: Signer | None, ref: dict[str, t.Any]) -> None:
    name, key, sig = ref[MODEL], ref[KEY], ref[SIG]
    what = f"a reference to the model {reprlib.repr(name)} with the key {reprlib.repr(key)}"
    if sign is None:
        raise InvalidReferenceError(
            f"Task {task_name!r} got {what}, signed with the sender's SECRET_KEY,"
            " but SECRET_KEY is not set here to verify it. Set SECRET_KEY, the"
            " same in the web and the worker processes."
        )
    if not (
        type(name) is str
        and type(key) is list
        and type(sig) is str
        and sign.verify_signature(_signed_text(name, key), sig)
    ):
        raise InvalidReferenceError(
            f"Task {task_name!r} got {what}, whose signature does not verify with"
            " the SECRET_KEY here. Either it was not made by a sender of this"
            " app (a dict of that shape that came from elsewhere, such as the"
            " JSON of a request, is refused), or the sender and the worker have"
            " different SECRET_KEYs: give the web and the worker processes the"
            " same SECRET_KEY, and when changing it, keep the old key in"
            " SECRET_KEY_FALLBACKS until the tasks sent with it have run."
        )


def _model(task_name: str, name: str) -> type[t.Any]:
    """The mapped class a verified reference names, imported."""
    from sqlalchemy import inspect
    from sqlalchemy.orm import Mapper

    try:
        cls = pkgutil.resolve_name(name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise LookupError(
            f"Task {task_name!r} got a reference to the model {name!r}, which"
            f" cannot be imported here: {exc}. Run the same code in the worker"
            " as in the sender."
        ) from exc
    if not (
        isinstance(cls, type)
        and isinstance(inspect(cls, raiseerr=False), Mapper)
        and model_name(cls) == name
    ):
        raise LookupError(
            f"Task {task_name!r} got a reference to the model {name!r}, which is"
            " not a mapped class here. Run the same code in the worker as in"
            " the sender."
        )
    return cls


def load(
    task: Task[t.Any, t.Any],
    session: Session,
    args: list[t.Any],
    kwargs: dict[str, t.Any],
    sign: Signer | None,
) -> None:
    """Replace the references in a task's arguments, in place, by instances
    loaded in ``session``: those already in its identity map as they are,
    the others with one query per model and :data:`KEYS_PER_QUERY` keys.

    :param task: The task, whose ``allow_missing_instances`` says what a
        reference to a missing row becomes.
    :param session: The task's session.
    :param args: The positional arguments, replaced in place.
    :param kwargs: The keyword arguments, replaced in place.
    :param sign: The app's :func:`signer`, which verifies the references.
    :raises InvalidReferenceError: A reference's signature does not verify.
    :raises MissingInstanceError: A row is missing and the task does not
        allow it.
    :raises LookupError: A reference names a model the worker does not have.
    """
    import sqlalchemy as sa

    models: dict[str, type[t.Any]] = {}
    wanted: dict[type[t.Any], set[tuple[t.Any, ...]]] = {}
    for ref in _references([args, kwargs]):
        _verify(task.name, sign, ref)
        cls = models.get(ref[MODEL])
        if cls is None:
            cls = models[ref[MODEL]] = _model(task.name, ref[MODEL])
        wanted.setdefault(cls, set()).add(tuple(ref[KEY]))
    if not wanted:
        return

    found: dict[tuple[type[t.Any], tuple[t.Any, ...]], t.Any] = {}
    missing: list[str] = []
    for cls, keys in wanted.items():
        mapper = sa.inspect(cls)
        todo = []
        for key in keys:
            instance = None
            if not query_always:
                instance = session.identity_map.get(
                    mapper.identity_key_from_primary_key(key)
                )
            if instance is None:
                todo.append(key)
            else:
                found[cls, key] = instance
        columns = mapper.primary_key
        size = max(1, KEYS_PER_QUERY // len(columns))
        by_key: dict[tuple[t.Any, ...], t.Any] = {}
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            if len(columns) == 1:
                where = columns[0].in_([key[0] for key in chunk])
            else:
                where = sa.tuple_(*columns).in_(chunk)
            # unique(): a joined eager load repeats an instance per row.
            for instance in session.scalars(sa.select(cls).where(where)).unique():
                by_key[sa.inspect(instance).identity] = instance
        for key in todo:
            instance = by_key.get(key)
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
            if len(value) == 3 and MODEL in value and KEY in value and SIG in value:
                return True
            value = value.values()
        stack.extend([v for v in value if type(v) in _CONTAINERS])
    return False
