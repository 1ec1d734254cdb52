"""``outboxapp`` traced by Sentry and OpenTelemetry at once, as their docs
set them up: Sentry's Flask, Celery and SQLAlchemy integrations,
OpenTelemetry's Flask, Celery and SQLAlchemy instrumentations. Each span either records is appended to the
file ``FCC_TRACE_FILE`` as a JSON line: its tool, name, trace id, span id,
parent span id and the task id it is about, if any.

``flask --app tracedapp:create_app celery worker`` runs a traced worker.
``python tracedapp.py`` is a traced web process: it posts one order, whose
task is sent with ``delay_on_commit``, and prints the task's id. The config
comes as JSON in ``FCC_CONFIG``, as for ``outboxapp``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import typing as t

import sentry_sdk
from celery.signals import worker_process_init
from flask import Flask
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.flask import FlaskIntegration
from sentry_sdk.integrations.sqlalchemy import SqlalchemyIntegration
from sentry_sdk.transport import Transport

import outboxapp

_lock = threading.Lock()
_set_up = False


def record(**span: t.Any) -> None:
    """Append a span to ``FCC_TRACE_FILE``."""
    with _lock, open(os.environ["FCC_TRACE_FILE"], "a") as file:
        file.write(json.dumps(span) + "\n")


class FileExporter(SpanExporter):
    """Records OpenTelemetry's spans."""

    def export(self, spans: t.Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            context = span.get_span_context()
            assert context is not None
            attributes = span.attributes or {}
            record(
                tool="opentelemetry",
                name=span.name,
                trace_id=f"{context.trace_id:032x}",
                span_id=f"{context.span_id:016x}",
                parent_id=None
                if span.parent is None
                else f"{span.parent.span_id:016x}",
                task_id=attributes.get("messaging.message.id"),
            )
        return SpanExportResult.SUCCESS


class FileTransport(Transport):
    """Records Sentry's spans: streamed (Sentry 3), or in transactions
    (Sentry 2)."""

    def capture_envelope(self, envelope: Envelope) -> None:
        for item in envelope.items:
            payload = item.payload.json
            if payload is None:
                continue
            if item.type == "span":
                for span in payload.get("items", []):
                    attributes = span.get("attributes", {})
                    record_sentry(span, span.get("name"), attributes, _value)
            elif item.type == "transaction":
                segment = payload["contexts"]["trace"]
                data = segment.get("data", {})
                record_sentry(segment, payload.get("transaction"), data, dict.get)
                for span in payload.get("spans", []):
                    data = span.get("data", {})
                    record_sentry(span, span.get("description"), data, dict.get)


def _value(attributes: dict[str, t.Any], key: str) -> t.Any:
    found = attributes.get(key)
    return found.get("value") if isinstance(found, dict) else found


def record_sentry(
    span: dict[str, t.Any],
    name: str | None,
    attributes: dict[str, t.Any],
    get: t.Callable[[dict[str, t.Any], str], t.Any],
) -> None:
    record(
        tool="sentry",
        name=name,
        op=span.get("op") or get(attributes, "sentry.op"),
        trace_id=span["trace_id"],
        span_id=span["span_id"],
        parent_id=span.get("parent_span_id"),
        task_id=get(attributes, "messaging.message.id"),
    )


def set_up() -> None:
    """Start both tools in this process, once."""
    global _set_up
    if _set_up:
        return
    _set_up = True
    if int(sentry_sdk.VERSION.partition(".")[0]) >= 3:
        # Streamed spans, sent in batches: soon.
        from sentry_sdk._span_batcher import SpanBatcher

        SpanBatcher.FLUSH_WAIT_TIME = 0.5
    sentry_sdk.init(
        dsn="http://key@127.0.0.1:9/1",
        transport=FileTransport,
        traces_sample_rate=1.0,
        default_integrations=False,
        auto_enabling_integrations=False,
        integrations=[FlaskIntegration(), CeleryIntegration(), SqlalchemyIntegration()],
    )
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()  # type: ignore[no-untyped-call]
    # Its declared range ends before SQLAlchemy 2.1, which it traces as well.
    SQLAlchemyInstrumentor().instrument(skip_dep_check=True)


@worker_process_init.connect(weak=False)
def _instrument_child(**kwargs: t.Any) -> None:
    """A prefork child instruments Celery again, as OpenTelemetry's docs say."""
    CeleryInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
    CeleryInstrumentor().instrument()  # type: ignore[no-untyped-call]


def create_app(config: dict[str, t.Any] | None = None) -> Flask:
    set_up()
    app = outboxapp.create_app(config)
    FlaskInstrumentor().instrument_app(app)  # type: ignore[no-untyped-call]
    return app


def main() -> None:
    # FCC_UNTRACED: a web process with neither tool.
    app = outboxapp.create_app() if os.environ.get("FCC_UNTRACED") else create_app()
    response = app.test_client().post("/orders/traced")
    assert response.status_code == 200, response.text
    # Sentry ends the request's span when the response is closed, as a WSGI
    # server closes it.
    response.close()
    sentry_sdk.flush()
    # A batch of spans that the SDK's own thread took before this flush is
    # written by that thread: give it the moment it needs before exiting.
    time.sleep(0.5)
    sentry_sdk.flush()
    print(json.dumps({"task_id": response.json["task_id"]}))  # type: ignore[index]


if __name__ == "__main__":
    main()
