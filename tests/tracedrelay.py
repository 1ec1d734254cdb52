"""Runs the outbox relay of ``outboxapp`` for a few idle rounds, on a
database without the outbox table and then with an empty one, with
OpenTelemetry's SQLAlchemy instrumentation (an in-memory exporter) and
Sentry's tracing (a transport that keeps the envelopes) on, and prints as
JSON the spans each recorded for a query of the app, for the relay and for
the ``flask celery outbox`` commands, and how many queries the relay made.

The config comes as JSON in ``FCC_CONFIG``, as for ``outboxapp``.
"""

from __future__ import annotations

import json
import os
import time
import typing as t
from contextlib import nullcontext

import sentry_sdk
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.sqlalchemy import SqlalchemyIntegration
from sentry_sdk.transport import Transport
from sqlalchemy import event
from sqlalchemy import text
from sqlalchemy.engine import Engine

envelopes: list[Envelope] = []


class Keep(Transport):
    def capture_envelope(self, envelope: Envelope) -> None:
        envelopes.append(envelope)


def spans(exporter: InMemorySpanExporter) -> dict[str, int]:
    """The spans recorded since the last call."""
    sentry_sdk.flush()
    found = {
        "opentelemetry": len(exporter.get_finished_spans()),
        "sentry": sum(
            1
            for envelope in envelopes
            for item in envelope.items
            if item.type in ("span", "transaction")
        ),
    }
    exporter.clear()
    envelopes.clear()
    return found


def main() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Its declared range ends before SQLAlchemy 2.1, which it traces as well.
    SQLAlchemyInstrumentor().instrument(tracer_provider=provider, skip_dep_check=True)
    sentry_sdk.init(
        dsn="http://key@127.0.0.1:9/1",
        transport=Keep,
        traces_sample_rate=1.0,
        default_integrations=False,
        auto_enabling_integrations=False,
        integrations=[SqlalchemyIntegration()],
    )
    import outboxapp
    from flask_celery_ctx.outbox import table as outbox
    from flask_celery_ctx.outbox.relay import RelayThread

    app = outboxapp.create_app()
    # Sentry 3 traces a query made outside any span; 2 records queries in a
    # transaction only, as its Flask integration starts one for a request.
    sdk: t.Any = sentry_sdk
    major = int(sdk.VERSION.partition(".")[0])
    traced = nullcontext() if major >= 3 else sdk.start_transaction(name="app")
    with app.app_context(), traced:
        session = outboxapp.ext.session
        session.execute(text("SELECT 1"))
        session.commit()
        engine = t.cast(Engine, session.get_bind())
    found: dict[str, t.Any] = {"app": spans(exporter)}
    looks: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: looks.append(a[2]))
    for case in ("without the table", "with an empty outbox"):
        if case == "with an empty outbox":
            outbox.table.create(engine)
            spans(exporter)
            looks.clear()
        relay = RelayThread(outboxapp.ext, 0.2)
        relay.start()
        time.sleep(3)  # rounds, each at least one lease (1 s) apart
        relay.stop()
        found[case] = {**spans(exporter), "looks": len(looks)}
    # What a cron job or a health check runs.
    for args in (["list"], ["list", "--json"], ["relay"]):
        done = app.test_cli_runner().invoke(args=["celery", "outbox", *args])
        assert done.exit_code == 0, done.output
    found["outbox commands"] = spans(exporter)
    # A row waits, its broker down: the relay's looks add no failed publish
    # to the send's trace, nor make traces of their own.
    config = json.loads(os.environ["FCC_CONFIG"])
    down = outboxapp.create_app(
        {**config, "CELERY_BROKER_URL": "redis://127.0.0.1:9/0"}
    )
    assert down.test_client().post("/orders/waiting").status_code == 200
    spans(exporter)
    relay = RelayThread(outboxapp.ext, 0.2)
    relay.start()
    time.sleep(3)  # the row's lease (1 s), then looks
    relay.stop()
    found["broker down"] = spans(exporter)
    print(json.dumps(found))


if __name__ == "__main__":
    main()
