"""The publish right after the commit: one attempt, bounded in time, on a
connection of its own.

The sends of a commit that have a row in the outbox go to the broker over
one connection whose connect and socket timeouts are the setting
``outbox_publish_timeout``, without retries. The first failure stops the
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
import socket
import threading
import time
import typing as t

from kombu.exceptions import OperationalError

from . import publish_timeout

if t.TYPE_CHECKING:
    from celery import Celery
    from kombu import Connection
    from kombu import Producer

logger = logging.getLogger("flask_celery_ctx")

#: Seconds after a failed attempt during which the commits of the process
#: leave their sends to the relay without trying.
HOLD = 5.0

#: Broker (masked URL) -> (monotonic time of its last failure, what
#: happened).
_failed: dict[str, tuple[float, str]] = {}
_failed_lock = threading.Lock()


class Attempt:
    """One bounded attempt to publish the sends of a commit with a Celery
    app; close it when done.

    :param celery: The Celery app.
    """

    def __init__(self, celery: Celery[t.Any]) -> None:
        self.celery = celery
        self.timeout = publish_timeout(celery)
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        configured = celery.connection_for_write()
        #: The URL of the broker, its password masked.
        self.broker = configured.as_uri()
        self._driver = configured.transport.driver_type
        #: What stopped the attempt, once it stopped; then nothing more is
        #: published.
        self.failure: str | None = _held(self.broker)
        #: How many sends were left to the relay.
        self.left = 0

    def publish(
        self, task: t.Any, args: t.Any, kwargs: t.Any, options: dict[str, t.Any]
    ) -> bool:
        """Publish a send, unless the attempt has stopped.

        :param task: The task.
        :param args: Positional arguments.
        :param kwargs: Keyword arguments.
        :param options: Options of ``apply_async``.
        :return: Whether it was published; if not, the broker failed now or
            before, and the send is left to the relay.
        :raises Exception: What the send raised when the broker is not the
            cause (the arguments, the serializer): the attempt goes on.
        """
        if self.failure is not None:
            self.left += 1
            return False
        producer = self._producer_or_open()
        options = {**options, "producer": producer, "retry": False}
        if _subscribes_before_send(self.celery):
            # Skip the backend's subscription (see the module's docstring);
            # the message keeps the task's own ignore_result.
            headers = dict(options.get("headers") or {})
            headers["ignore_result"] = options.get("ignore_result", task.ignore_result)
            options.update(ignore_result=True, headers=headers)
        try:
            task.apply_async(args, kwargs, **options)
        except Exception as exc:
            if not self._is_broker_error(exc):
                raise
            self.failure = describe(exc, self.timeout)
            self.left += 1
            _hold(self.broker, self.failure)
            return False
        return True

    def close(self) -> None:
        """Close the connection; log what was left to the relay, once."""
        if self._connection is not None:
            try:
                self._connection.release()
            except Exception:
                logger.debug("Closing the publish connection failed", exc_info=True)
            self._connection = None
        if self.left:
            logger.warning(
                "%d %s %s in the outbox: the broker at %s %s; %s sent when it is back.",
                self.left,
                "task" if self.left == 1 else "tasks",
                "waits" if self.left == 1 else "wait",
                self.broker,
                self.failure,
                "it is" if self.left == 1 else "they are",
            )

    def _producer_or_open(self) -> Producer:
        if self._producer is None:
            options: dict[str, t.Any] = {"max_retries": 0}
            if self._driver == "redis":
                options.update(
                    socket_timeout=self.timeout, socket_connect_timeout=self.timeout
                )
            elif self._driver == "amqp":
                options.update(read_timeout=self.timeout, write_timeout=self.timeout)
            self._connection = self.celery.connection_for_write(
                connect_timeout=self.timeout, transport_options=options
            )
            self._producer = self.celery.amqp.Producer(
                self._connection, auto_declare=False
            )
        return self._producer

    def _is_broker_error(self, exc: Exception) -> bool:
        connection = self._connection
        errors: tuple[type[BaseException], ...] = (OperationalError, OSError)
        if connection is not None:
            errors += connection.connection_errors + connection.channel_errors
        return isinstance(exc, errors)


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


def _held(broker: str) -> str | None:
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


def _hold(broker: str, failure: str) -> None:
    with _failed_lock:
        _failed[broker] = (time.monotonic(), failure)


def _subscribes_before_send(celery: Celery[t.Any]) -> bool:
    from celery.backends.redis import RedisBackend

    return isinstance(celery.backend, RedisBackend)
