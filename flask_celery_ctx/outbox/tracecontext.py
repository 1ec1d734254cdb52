"""Carry the trace of a send through the outbox.

When ``delay_on_commit`` queues a send, :func:`capture` takes the trace
context of the moment, the request's span in a view: OpenTelemetry's
(W3C ``traceparent``, ``tracestate`` and ``baggage``, by the global
propagator) and Sentry's (``sentry-trace`` and ``baggage``). The outbox row
keeps it in its message. A relay publishes the row under that context
(:func:`continued`), so that the task's span is a child of the request's,
as it is when the web process publishes at once after the commit.

Neither library is required. Each is looked at only when the app imported
it already, and only while it traces: an app without either pays one
dictionary look-up per send.
"""

from __future__ import annotations

import sys
import typing as t
from contextlib import contextmanager
from contextlib import ExitStack

#: The captured context: per tool, the headers it propagates.
Trace = dict[str, dict[str, str]]

#: The name of the span, in Sentry, around a publish by the outbox relay.
RELAY_SPAN = "outbox relay"
_RELAY_OP = "queue.relay"
_RELAY_ATTRIBUTES = {
    "sentry.op": _RELAY_OP,
    "sentry.origin": "auto.queue.flask_celery_ctx",
}


def capture() -> Trace | None:
    """The trace context of the current span, per tool; ``None`` when no tool
    traces."""
    found: Trace = {}
    if "opentelemetry.trace" in sys.modules:
        headers = _opentelemetry_headers()
        if headers:
            found["opentelemetry"] = headers
    if "sentry_sdk" in sys.modules:
        headers = _sentry_headers()
        if headers:
            found["sentry"] = headers
    return found or None


@contextmanager
def continued(trace: t.Mapping[str, t.Mapping[str, str]] | None) -> t.Iterator[None]:
    """Run what is inside under a captured trace context: a publish then
    creates its spans, and its message's headers, in that trace.

    A row that holds no Sentry trace (written without Sentry, or before its
    trace was kept) is published in a new trace: not in the relay thread's,
    which every such row would share.

    :param trace: What :func:`capture` returned, or ``None``.
    """
    trace = trace or {}
    with ExitStack() as stack:
        if "opentelemetry" in trace:
            stack.enter_context(_in_opentelemetry(trace["opentelemetry"]))
        if "sentry_sdk" in sys.modules:
            stack.enter_context(_in_sentry(trace.get("sentry")))
        yield


def _opentelemetry_headers() -> dict[str, str]:
    from opentelemetry import propagate
    from opentelemetry import trace

    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def _sentry_headers() -> dict[str, str]:
    import sentry_sdk

    if not sentry_sdk.get_client().is_active():
        return {}
    headers = {}
    traceparent = sentry_sdk.get_traceparent()
    if traceparent:
        headers["sentry-trace"] = traceparent
        baggage = sentry_sdk.get_baggage()
        if baggage:
            headers["baggage"] = baggage
    return headers


@contextmanager
def _in_opentelemetry(headers: t.Mapping[str, str]) -> t.Iterator[None]:
    try:
        from opentelemetry import context
        from opentelemetry import propagate
    except ImportError:
        yield
        return
    token = context.attach(propagate.extract(dict(headers)))
    try:
        yield
    finally:
        context.detach(token)


@contextmanager
def _in_sentry(headers: t.Mapping[str, str] | None) -> t.Iterator[None]:
    import sentry_sdk

    if not sentry_sdk.get_client().is_active():
        yield
        return
    # Sentry's Celery integration makes a span of a publish only under a
    # span: this one, in the continued trace, says that a relay sent it.
    # Sentry 3 starts it as a span; 2 as a transaction, which its
    # ``continue_trace`` returns.
    sdk: t.Any = sentry_sdk
    with sdk.isolation_scope() as isolation, sdk.new_scope() as scope:
        if headers is None:
            isolation.set_new_propagation_context()
            scope.set_new_propagation_context()
            yield
            return
        if int(sdk.VERSION.partition(".")[0]) >= 3:
            sdk.continue_trace(dict(headers))
            span = sdk.start_span(name=RELAY_SPAN, attributes=_RELAY_ATTRIBUTES)
        else:
            span = sdk.start_transaction(
                sdk.continue_trace(dict(headers), op=_RELAY_OP, name=RELAY_SPAN)
            )
        with span:
            yield
