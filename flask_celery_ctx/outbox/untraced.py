"""Keep the relay's idle looks out of the app's traces.

An idle relay asks the database, now and then, whether anything waits: with
OpenTelemetry's SQLAlchemy instrumentation or Sentry's tracing on, each
question would become a trace of its own, stored and billed. Inside
:func:`untraced`, OpenTelemetry instrumentations are suppressed, and Sentry
(3.x, or 2.x streaming spans: queries outside any span start traces of
their own) sees an unsampled span as the current one, under which it
records nothing. Neither library is required: each is left alone when the
app has not imported it.
"""

from __future__ import annotations

import sys
import typing as t
from contextlib import contextmanager
from contextlib import ExitStack


@contextmanager
def untraced() -> t.Iterator[None]:
    """Create no trace or span for what runs inside."""
    with ExitStack() as stack:
        stack.enter_context(_without_opentelemetry())
        stack.enter_context(_without_sentry())
        yield


@contextmanager
def _without_opentelemetry() -> t.Iterator[None]:
    if "opentelemetry.context" not in sys.modules:
        yield  # nothing instruments the app
        return
    from opentelemetry import context

    key = getattr(context, "_SUPPRESS_INSTRUMENTATION_KEY", None)
    if key is None:
        yield
        return
    token = context.attach(context.set_value(key, True))
    try:
        yield
    finally:
        context.detach(token)


@contextmanager
def _without_sentry() -> t.Iterator[None]:
    if "sentry_sdk" not in sys.modules:
        yield  # the app does not use it
        return
    try:
        import sentry_sdk

        # 3.x's NoOpSpan; 2.x's, for its span streaming, which starts traces
        # as 3.x does. Older versions send no query made outside a transaction.
        from sentry_sdk.traces import NoOpStreamedSpan
    except ImportError:
        yield
        return
    with (
        sentry_sdk.new_scope() as scope,
        NoOpStreamedSpan(name="flask-celery-ctx outbox relay", scope=scope),
    ):
        yield
