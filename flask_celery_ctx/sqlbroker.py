"""A broker in a SQL database that redelivers the messages of a dead worker.

kombu's SQLAlchemy transport (``sqla+sqlite:///...``) needs no server, but
it hides a message once a worker fetches it and never shows it again: when
that worker is killed, its task is lost, whatever ``acks_late`` says. This
transport keeps kombu's tables and adds what Redis and RabbitMQ do:

- a fetched message is *leased* to the worker that fetched it, and the lease
  is renewed by a thread of that worker for as long as the worker lives;
- an acknowledged (or rejected) message is deleted;
- a message given back (a warm shutdown, a task rejected with ``requeue``)
  is visible again at once;
- a message whose lease was not renewed for ``visibility_timeout`` seconds
  (default 30) belonged to a worker that died: the next worker to poll the
  queue makes it visible again, marked as redelivered.

Use it with the URL scheme ``sqlbroker+``, followed by a SQLAlchemy URL:
``sqlbroker+sqlite:///broker.sqlite``. The scheme is registered with kombu
when :mod:`flask_celery_ctx` is imported.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import typing as t
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from json import dumps
from json import loads
from queue import Empty

import sqlalchemy as sa
from kombu.transport import sqlalchemy as kombu_sql
from sqlalchemy.orm import sessionmaker

if t.TYPE_CHECKING:
    from sqlalchemy.orm import Session

logger = logging.getLogger(__name__)

#: Seconds without renewal after which a fetched message is given to
#: another worker, unless ``visibility_timeout`` in the transport options
#: says otherwise.
VISIBILITY_TIMEOUT = 30.0


#: The ``version`` of a leased message. kombu's own transport counts
#: versions from 1 and leaves the messages it delivered hidden for ever:
#: those are never taken for leases that expired.
_LEASED = 0

#: kombu's transport module, with the names its type stubs lack.
_kombu: t.Any = kombu_sql

#: Tries at creating the tables, or a queue's row, that other processes are
#: creating at the same moment.
_CREATE_ATTEMPTS = 5

#: Transport options that are not :func:`sqlalchemy.create_engine`'s.
_NOT_ENGINE_OPTIONS = {
    "visibility_timeout", "polling_interval", "queue_tablename",
    "message_tablename", "callback", "errback", "max_retries", "interval_start",
    "interval_step", "interval_max", "retry_errors",
}  # fmt: skip


#: Held by a fork, and by each transaction on a SQLite broker: SQLite keeps
#: the locks of a process's connections in the process's memory, and a
#: process forked in the middle of a transaction inherits a lock that none of
#: its own connections can ever take again ("database is locked").
_FORK_LOCK = threading.RLock()


def _now() -> datetime:
    # Naive UTC, as the column is naive: the same in every process.
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Channel(kombu_sql.Channel):
    """kombu's SQL channel, with leases on the messages it delivers."""

    def __init__(self, connection: t.Any, **kwargs: t.Any) -> None:
        super().__init__(connection, **kwargs)
        options = connection.client.transport_options
        self.visibility_timeout = _seconds(
            options.get("visibility_timeout", VISIBILITY_TIMEOUT)
        )
        # Message rows held by this channel, by delivery tag. Acks come from
        # the pool's threads, renewals from the lease thread.
        self._leases: dict[str, int] = {}
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._closing = threading.Event()
        self._no_ack_queues: set[str] = set()

    def _engine_from_config(self) -> sa.Engine:
        client: t.Any = self.connection.client
        options = client.transport_options.items()
        return sa.create_engine(
            client.hostname,
            **{k: v for k, v in options if k not in _NOT_ENGINE_OPTIONS},
        )

    def _open(self) -> t.Any:
        """The engine and session factory, made once per URL, the tables
        created: kombu's, with the creation tried again while other
        processes create the same tables (workers started together on a new
        broker database). Each failed try means another process created a
        table, so the tries are few."""
        client: t.Any = self.connection.client
        hostname: str = client.hostname
        engines: dict[str, t.Any] = self._engines
        if hostname not in engines:
            with _kombu._MUTEX:
                if hostname not in engines:
                    engine = self._engine_from_config()
                    try:
                        _create_tables(engine)
                    except BaseException:
                        engine.dispose()
                        raise
                    engines[hostname] = engine, sessionmaker(bind=engine)
        return engines[hostname]

    def _unforked(self) -> t.ContextManager[t.Any]:
        """Held around a transaction of a SQLite broker: no fork happens
        in the middle of it."""
        engine, _ = self._open()
        if engine.dialect.name == "sqlite":
            return _FORK_LOCK
        return contextlib.nullcontext()

    def _get_or_create(self, queue: str) -> t.Any:
        """The row of a queue, created when missing, and read again when
        another process created it at the same moment."""
        with self._unforked():
            return self._find_or_create(queue)

    def _find_or_create(self, queue: str) -> t.Any:
        session: Session = self.session
        queue_cls = self.queue_cls
        for attempt in range(_CREATE_ATTEMPTS):
            found = session.query(queue_cls).filter(queue_cls.name == queue).first()
            if found is not None:
                return found
            created = queue_cls(queue)
            session.add(created)
            try:
                session.commit()
            except sa.exc.DatabaseError:
                session.rollback()
                if attempt == _CREATE_ATTEMPTS - 1:
                    raise
            else:
                return created
        raise AssertionError("unreachable")

    # kombu's stubs name the payload differently in the two base classes.
    def _put(  # type: ignore[override]
        self, queue: str, payload: t.Any, **kwargs: t.Any
    ) -> None:
        """Store a message. A message that could not be stored raises, for
        the producer to retry or report: kombu before 5.4 logged nothing and
        returned, and the message was lost."""
        session: Session = self.session
        with self._unforked():
            session.add(self.message_cls(dumps(payload), self._get_or_create(queue)))
            try:
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @property
    def _table(self) -> sa.Table:
        table: sa.Table = self.message_cls.__table__
        return table

    def _run(self, statement: sa.Executable) -> None:
        """Run a statement in a transaction of its own, from any thread."""
        engine, _ = self._open()
        with self._unforked(), engine.begin() as conn:
            conn.execute(statement)

    # Fetching.

    def _get(self, queue: str, timeout: float | None = None) -> t.Any:
        # kombu's, which creates the queue's row on first use.
        with self._unforked():
            row, payload = self._take(queue)
        if row is None:
            raise Empty()
        if queue not in self._no_ack_queues:
            self._hold(payload["properties"]["delivery_tag"], row)
        return payload

    def _take(self, queue: str) -> tuple[int | None, t.Any]:
        """The oldest visible message of a queue, taken in a transaction,
        once the expired leases of the queue are recovered."""
        queue_id: int = self._get_or_create(queue).id
        session: Session = self.session
        if session.get_bind().dialect.name == "sqlite":
            session.execute(sa.text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            self._recover(session, queue_id)
            found = self._fetch(session, queue_id, queue)
            session.commit()
        except BaseException:
            session.rollback()
            raise
        return found

    def _recover(self, session: Session, queue_id: int) -> None:
        """Make visible the messages whose worker stopped renewing them."""
        table = self._table
        expired = _now() - timedelta(seconds=self.visibility_timeout)
        expired_lease = sa.and_(
            table.c.visible == sa.false(),
            table.c.version == _LEASED,
            table.c.timestamp < expired,
        )
        rows = session.execute(
            sa.select(table.c.id, table.c.payload).where(
                table.c.queue_id == queue_id, expired_lease
            )
        ).all()
        for row in rows:
            # Unless another worker recovered it, and it was leased again,
            # since the select.
            session.execute(
                sa.update(table)
                .where(table.c.id == row.id, expired_lease)
                .values(
                    visible=True,
                    version=1,
                    timestamp=None,
                    payload=_redelivered(row.payload),
                )
            )

    def _fetch(
        self, session: Session, queue_id: int, queue: str
    ) -> tuple[int | None, t.Any]:
        """The oldest visible message, hidden (or deleted, for a queue
        consumed without acknowledgements) in this transaction."""
        table = self._table
        found = session.execute(
            sa.select(table.c.id, table.c.payload)
            .where(table.c.queue_id == queue_id, table.c.visible != sa.false())
            .order_by(table.c.timestamp, table.c.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if found is None:
            return None, None
        where = table.c.id == found.id
        if queue in self._no_ack_queues:
            session.execute(sa.delete(table).where(where))
        else:
            session.execute(
                sa.update(table)
                .where(where)
                .values(visible=False, version=_LEASED, timestamp=_now())
            )
        return found.id, loads(found.payload)

    def basic_consume(
        self, queue: str, no_ack: bool, *args: t.Any, **kwargs: t.Any
    ) -> t.Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: t.Any) -> t.Any:
        message = super().basic_get(queue, no_ack, **kwargs)
        if message is not None and no_ack:
            self._settle(t.cast(str, message.delivery_tag))
        return message

    # Leases.

    def _hold(self, tag: str, row: int) -> None:
        with self._lock:
            self._leases[tag] = row
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew_leases, name="sqlbroker-leases", daemon=True
                )
                self._renewer.start()

    def _release(self, tag: str) -> int | None:
        with self._lock:
            return self._leases.pop(tag, None)

    def _renew_leases(self) -> None:
        """Renew this channel's leases until it closes, a few times per
        visibility timeout, so that a slow renewal is not a lost lease."""
        interval = self.visibility_timeout / 5
        while not self._closing.wait(interval):
            with self._lock:
                rows = list(self._leases.values())
            if not rows:
                continue
            table = self._table
            try:
                self._run(
                    sa.update(table)
                    .where(table.c.id.in_(rows), table.c.visible == sa.false())
                    .values(timestamp=_now())
                )
            except Exception:
                # The database is busy or gone: the next round tries again.
                logger.warning("Could not renew the leases of %d messages", len(rows))

    # Settling.

    def _settle(self, tag: str) -> None:
        """Delete the message of a delivery that is over."""
        row = self._release(tag)
        if row is not None:
            self._run(sa.delete(self._table).where(self._table.c.id == row))

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        self._settle(delivery_tag)
        super().basic_ack(delivery_tag, multiple)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        # With ``requeue``, kombu gives the message back through _restore.
        if not requeue:
            self._settle(delivery_tag)
        super().basic_reject(delivery_tag, requeue)

    def _restore(self, message: t.Any) -> None:
        """Make a message given back visible again, in its place."""
        row = self._release(message.delivery_tag)
        if row is None:
            super()._restore(message)
            return
        self._run(
            sa.update(self._table)
            .where(self._table.c.id == row)
            .values(
                visible=True,
                version=1,
                timestamp=None,
                payload=_redelivered(dumps(message.serializable())),
            )
        )

    def close(self) -> None:
        super().close()  # gives back what was not acknowledged
        self._closing.set()


def _forget_inherited_engines() -> None:
    """In a forked process, forget the engines, and their pooled
    connections, of the process it was forked from.

    kombu keeps the transport's engines in a dictionary of its channel class:
    a prefork child forked after its worker connected to the broker would
    otherwise publish on the worker's own connections, and two processes on
    one connection corrupt its protocol stream. ``close=False`` leaves the
    parent's connections open for the parent. kombu's lock, which another
    thread of the parent may have held, is made anew.
    """
    global _FORK_LOCK
    _FORK_LOCK = threading.RLock()
    _kombu._MUTEX = threading.RLock()
    engines: dict[str, t.Any] = _kombu.Channel._engines
    for engine, _ in list(engines.values()):
        engine.dispose(close=False)


def _hold_fork_lock() -> None:
    _FORK_LOCK.acquire()


def _release_fork_lock() -> None:
    _FORK_LOCK.release()


os.register_at_fork(
    before=_hold_fork_lock,
    after_in_parent=_release_fork_lock,
    after_in_child=_forget_inherited_engines,
)


def _create_tables(engine: sa.Engine) -> None:
    """Create kombu's tables where missing, looking again at what exists
    when another process created one at the same moment."""
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            _kombu.metadata.create_all(engine)
            return
        except sa.exc.DatabaseError:
            if attempt == _CREATE_ATTEMPTS - 1:
                raise


def check_settings(settings: t.Mapping[str, t.Any]) -> None:
    """Refuse, when the app is set up, a visibility timeout that would stop
    the worker only once it connects.

    :param settings: The Celery settings read from the Flask config.
    :raises ValueError: ``broker_url`` is a ``sqlbroker+`` URL, and the
        transport options' ``visibility_timeout`` is not seconds above 0.
    """
    url = settings.get("broker_url")
    options = settings.get("broker_transport_options") or {}
    if (
        isinstance(url, str)
        and url.startswith("sqlbroker+")
        and isinstance(options, t.Mapping)
        and "visibility_timeout" in options
    ):
        _seconds(options["visibility_timeout"])


def _seconds(value: t.Any) -> float:
    """The visibility timeout, checked."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = 0
    if not 0 < seconds < math.inf or isinstance(value, bool):
        raise ValueError(
            "visibility_timeout in CELERY_BROKER_TRANSPORT_OPTIONS must be a"
            f" number of seconds above 0, not {value!r}."
        )
    return seconds


def _redelivered(payload: str) -> str:
    """The payload, marked as Celery and kombu see a redelivery."""
    message = loads(payload)
    message["redelivered"] = True
    message["properties"].setdefault("delivery_info", {})["redelivered"] = True
    return dumps(message)


class Transport(kombu_sql.Transport):
    """kombu's SQLAlchemy transport, with :class:`Channel`."""

    Channel = Channel
