"""The publish right after the commit: one attempt, bounded in time, on a
connection of its own.

The sends of a commit that have a row in the outbox go to the broker over
one connection whose connect and socket timeouts are the setting
``outbox_publish_timeout``, without retries; the process keeps it for
its next commit, whichever thread makes it. The first failure stops the
attempt: the sends not published yet stay in the outbox, and a relay sends
them once the broker is back. A view's commit so returns within about that
timeout, whatever the number of its sends and whatever the broker does.

After a failure, the commits of the next :data:`HOLD` seconds in the same
process make no attempt: their sends wait for the relay too. The first
commit after that tries again.

The Redis result backend subscribes to each task's result before the task
is sent, with a reconnect loop of its own; this publish does not, so that
a result backend down delays no send. ``AsyncResult.get()`` subscribes when
it is called, and reads a result stored before.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import typing as t

from kombu.exceptions import OperationalError

from ..send import PREPARED
from ..task import ContextTask
from . import settings

if t.TYPE_CHECKING:
    from celery import Celery
    from kombu import Connection
    from kombu import Producer

logger = logging.getLogger("flask_celery_ctx")

#: Seconds after a failed attempt during which the commits of the process
#: leave their sends to the relay without trying.
HOLD = 5.0

_Key = tuple[int, str, float]

#: (app, broker URL, timeout) -> (monotonic time of the broker's last
#: failure, what happened).
_failed: dict[_Key, tuple[float, str]] = {}
_failed_lock = threading.Lock()

#: The most connections the process keeps idle per broker, from one commit
#: to the next; more are closed after their commit.
KEPT = 10

# The connections kept idle from one commit to the next, with their
# producers, and the process they were opened in. Any thread takes one for
# its commit and gives it back after: a server that runs each request in a
# thread or greenlet of its own does not connect to the broker at each
# commit.
_kept: dict[_Key, list[tuple[Connection, Producer]]] = {}
_kept_lock = threading.Lock()
_kept_pid = os.getpid()


class Attempt:
    """One bounded attempt to publish the sends of a commit with a Celery
    app; close it when done.

    The process keeps the connection from one commit to the next, for any
    of its threads (at most :data:`KEPT` idle per broker). A kept
    connection that fails at once (the broker restarted since) is replaced
    by a new one, once, for the same send.

    :param celery: The Celery app.
    """

    def __init__(self, celery: Celery[t.Any], timeout: float | None = None) -> None:
        self.celery = celery
        read = settings(celery)
        self.timeout = read.publish_timeout if timeout is None else timeout
        self._key = (id(celery), read.broker, self.timeout)
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._reused = False
        #: What stopped the attempt, once it stopped; then nothing more is
        #: published.
        self.failure: str | None = _held(self._key)
        #: How many sends were left to the relay.
        self.left = 0
        # Whether the result backend subscribes before a send; asked at the
        # first publish, which creates the backend.
        self._subscribes: bool | None = None

    def publish(
        self, task: t.Any, args: t.Any, kwargs: t.Any, options: dict[str, t.Any]
    ) -> bool:
        """Publish a send of an outbox row, unless the attempt has stopped.

        :param task: The task.
        :param args: Positional arguments, model instances as references.
        :param kwargs: Keyword arguments, likewise.
        :param options: Options of ``apply_async``, carried values included.
        :return: Whether it was published; if not, the broker failed now or
            before, and the send is left to the relay.
        :raises Exception: What the send raised when the broker is not the
            cause (the arguments, the serializer): the attempt goes on.
        """
        if self.failure is not None:
            self.left += 1
            return False
        options = {**options, "retry": False}
        if isinstance(task, ContextTask):
            # Its references made and its values carried already: its
            # apply_async publishes it as it is.
            options[PREPARED] = True
        if self._subscribes is None:
            self._subscribes = _subscribes_before_send(self.celery)
        if self._subscribes:
            # Skip the backend's subscription (see the module's docstring);
            # the message keeps the task's own ignore_result.
            headers = dict(options.get("headers") or {})
            headers["ignore_result"] = options.get("ignore_result", task.ignore_result)
            options.update(ignore_result=True, headers=headers)
        fresh = False
        while True:
            started = time.monotonic()
            try:
                producer = self._producer_or_open(fresh)
                task.apply_async(args, kwargs, producer=producer, **options)
            except Exception as exc:
                if not self.is_broker_error(exc):
                    raise
                stale = self._reused and time.monotonic() - started < self.timeout / 2
                self._discard()
                if stale and not fresh:
                    # On a new connection, not on another kept one.
                    fresh = True
                    continue
                self.failure = describe(exc, self.timeout)
                self.left += 1
                _hold(self._key, self.failure)
                return False
            return True

    def connect(self) -> bool:
        """Make sure that the broker answers, before the first publish: a
        relay then traces nothing while the broker is down.

        :return: Whether it answered; if not, :attr:`failure` says why, and
            nothing is published.
        """
        if self.failure is not None:
            return False
        try:
            self._producer_or_open()
            assert self._connection is not None
            self._connection.default_channel  # noqa: B018 (connects)
        except Exception as exc:
            if not self.is_broker_error(exc):
                raise
            self._discard()
            self.failure = describe(exc, self.timeout)
            _hold(self._key, self.failure)
            return False
        return True

    def close(self, report: bool = True) -> None:
        """Keep the connection for the process's next commit, or close it
        after a failure; log what was left to the relay, once.

        :param report: Log what was left; a relay says it in its own words.
        """
        if self._connection is not None and self._producer is not None:
            if not _give_back(self._key, (self._connection, self._producer)):
                self._discard()
            self._connection = self._producer = None
        if self.left and report:
            logger.warning(
                "%d %s %s in the outbox: the broker at %s %s; %s sent when it is back.",
                self.left,
                "task" if self.left == 1 else "tasks",
                "waits" if self.left == 1 else "wait",
                self.celery.connection_for_write().as_uri(),
                self.failure,
                "it is" if self.left == 1 else "they are",
            )

    def _producer_or_open(self, fresh: bool = False) -> Producer:
        """The attempt's producer: on a kept connection, or on a new one if
        none is kept or ``fresh``."""
        if self._producer is None:
            kept = None if fresh else _take(self._key)
            self._reused = kept is not None
            if kept is None:
                connection = self._open()
                producer = self.celery.amqp.Producer(connection, auto_declare=False)
                kept = (connection, producer)
            self._connection, self._producer = kept
        return self._producer

    def _open(self) -> Connection:
        """A connection with the timeouts of the attempt, and no retries."""
        options: dict[str, t.Any] = {"max_retries": 0}
        driver = self.celery.connection_for_write().transport.driver_type
        if driver == "redis":
            options.update(
                socket_timeout=self.timeout, socket_connect_timeout=self.timeout
            )
        elif driver == "amqp":
            options.update(read_timeout=self.timeout, write_timeout=self.timeout)
        return self.celery.connection_for_write(
            connect_timeout=self.timeout, transport_options=options
        )

    def _discard(self) -> None:
        if self._connection is not None:
            try:
                self._connection.release()
            except Exception:
                logger.debug("Closing the publish connection failed", exc_info=True)
        self._connection = self._producer = None
        self._reused = False

    def is_broker_error(self, exc: Exception) -> bool:
        """Whether ``exc`` tells of the broker, not of a send: kombu's
        ``OperationalError``, the network's, and the connection and channel
        errors of the broker's client library, but ``KeyError``, which
        kombu's Redis transport counts as a connection error too.

        :param exc: An error of a publish.
        """
        if isinstance(exc, (OperationalError, OSError)):
            return True
        if self._connection is not None:
            connection = self._connection
            found = (*connection.connection_errors, *connection.channel_errors)
        else:
            with self.celery.connection_for_write() as connection:
                found = (*connection.connection_errors, *connection.channel_errors)
        return isinstance(exc, tuple(e for e in found if not issubclass(e, KeyError)))


def describe(exc: BaseException, timeout: float) -> str:
    """What a broker error says of the broker, in a few words.

    :param exc: The error of the publish.
    :param timeout: The publish timeout, in seconds.
    """
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).lower()
        if isinstance(seen, ConnectionRefusedError) or "refused" in text:
            return "refused the connection"
        timed_out = "timeout" in text or "timed out" in text
        if isinstance(seen, (socket.timeout, TimeoutError)) or timed_out:
            return f"did not answer within {timeout:g} s"
        seen = seen.__cause__ or seen.__context__
    return f"failed: {exc!r}"


def forget() -> None:
    """Forget the failures held: the next commits try the broker again.

    :meta private:
    """
    with _failed_lock:
        _failed.clear()


def _take(key: _Key) -> tuple[Connection, Producer] | None:
    """An idle connection kept for ``key``, and its producer, taken from the
    pool; none if the pool has none."""
    with _kept_lock:
        idle = _kept_here().get(key)
        return idle.pop() if idle else None


def _give_back(key: _Key, kept: tuple[Connection, Producer]) -> bool:
    """Keep a connection for the next commit of any thread.

    :return: Whether it was kept; not if :data:`KEPT` are idle already.
    """
    with _kept_lock:
        idle = _kept_here().setdefault(key, [])
        if len(idle) >= KEPT:
            return False
        idle.append(kept)
        return True


def _kept_here() -> dict[_Key, list[tuple[Connection, Producer]]]:
    """The idle connections of this process: a forked process leaves its
    parent's alone. Called with the lock held."""
    global _kept_pid
    if _kept_pid != os.getpid():
        _kept.clear()
        _kept_pid = os.getpid()
    return _kept


def _held(broker: _Key) -> str | None:
    with _failed_lock:
        held = _failed.get(broker)
        if held is None:
            return None
        at, failure = held
        age = time.monotonic() - at
        if age >= HOLD:
            del _failed[broker]
            return None
    return f"{failure} ({age:.1f} s ago)"


def _hold(broker: _Key, failure: str) -> None:
    with _failed_lock:
        _failed[broker] = (time.monotonic(), failure)


def _subscribes_before_send(celery: Celery[t.Any]) -> bool:
    from celery.backends.redis import RedisBackend

    return isinstance(celery.backend, RedisBackend)
