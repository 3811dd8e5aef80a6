"""Tracing against the real services: one trace from the API request that creates an image,
through the relay's publish spans and every projector's apply spans, to the workers'
results; the trace id on the log lines; the OTLP/HTTP exporter really sending; and nothing
recorded while tracing is off."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import structlog
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import select

from outbox import emit, tracing
from outbox.db import make_engine
from outbox.settings import Settings
from outbox_app.api.app import create_app
from outbox_app.sample_images import text_image
from outbox_images.tables import image_event_table
from relays.publish_spans import publish_trail
from tests.auth import AUTH_A
from tests.images import upload
from tests.pipeline_harness import PROJECTOR_NAMES, Pipeline, cache_at, isolated_settings, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPANS = ("00f067aa0ba902b7", "b7ad6b7169203331")  # the client's, one per request


def traceparent(span_id: str) -> str:
    return f"00-{TRACE_ID}-{span_id}-01"


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def parent_of(span: ReadableSpan) -> str | None:
    return hex_id(span.parent.span_id, 16) if span.parent is not None else None


def span_id(span: ReadableSpan) -> str:
    return hex_id(span.context.span_id, 16)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test, into the SDK's in-memory exporter."""
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing("outbox-test", exporter=exporter)
    yield exporter
    tracing.shutdown_tracing()


@pytest.mark.slow
def test_one_trace_from_the_request_through_relay_projectors_and_workers(spans, caplog):
    # Each published and applied event is logged (with its trace id) at DEBUG.
    caplog.set_level(logging.DEBUG, logger="relays.publish_spans")
    caplog.set_level(logging.DEBUG, logger="projectors.apply_spans")
    with isolated_settings("trc") as cfg, \
            structlog.testing.capture_logs(
                processors=[structlog.contextvars.merge_contextvars]) as logs:
        pipeline = Pipeline(cfg)
        try:
            pipeline.start_relay()
            for name in PROJECTOR_NAMES:
                pipeline.start_projector(name)
            with TestClient(create_app(cfg)) as api:
                body = text_image(["Harbour Cafe receipt", "Total 12.50 USD"])
                created = api.post(
                    "/v1/images", headers={**AUTH_A, "traceparent": traceparent(CLIENT_SPANS[0])},
                    json={"filename": "scan.png", "content_type": "image/png",
                          "size": len(body), "metadata": {"title": "cafe"}}).json()
                image_id = created["id"]
                assert upload(created, body).status_code in (200, 204)
                r = api.post(f"/v1/images/{image_id}/uploaded",
                             headers={**AUTH_A, "traceparent": traceparent(CLIENT_SPANS[1])})
                assert r.json()["state"] == "ocr_pending", r.text
                doc = wait_for(lambda: (d := api.get(f"/v1/images/{image_id}",
                                                     headers=AUTH_A).json())["searchable"]
                               and d, what="searchable")
                wait_for(lambda: cache_at(cfg, image_id, doc["version"]), what="cached")
            history = _history(cfg, image_id)
            # The workers may still be on the last events, which they only skip.
            wait_for(lambda: _applied_everywhere(spans, {str(e) for e, _, _ in history}),
                     what="every event applied by every projector")
        finally:
            pipeline.stop()

    finished = spans.get_finished_spans()
    ours = [s for s in finished if hex_id(s.context.trace_id, 32) == TRACE_ID]

    # The API's spans: children of the client's spans, named after their routes.
    served = {s.name: s for s in ours if s.kind is SpanKind.SERVER}
    create = served["POST /v1/images"]
    uploaded = served["POST /v1/images/{image_id}/uploaded"]
    assert parent_of(create) == CLIENT_SPANS[0] and parent_of(uploaded) == CLIENT_SPANS[1]
    assert create.attributes["http.response.status_code"] == 201

    events = {str(e): (t, tp.split("-")[2]) for e, t, tp in history}
    assert all(tp.split("-")[1] == TRACE_ID for _, _, tp in history)
    by_type = {t: (e, parent) for e, (t, parent) in events.items()}
    assert by_type["image.requested"][1] == span_id(create)
    assert by_type["image.uploaded"][1] == span_id(uploaded)
    assert by_type["image.ocr_requested"][1] == span_id(uploaded)

    def of_event(event_id: str, kind: SpanKind, projector: str | None = None
                 ) -> list[ReadableSpan]:
        return [s for s in ours if s.kind is kind
                and s.attributes.get("messaging.message.id") == event_id
                and (projector is None or s.attributes.get("outbox.projector") == projector)]

    # Every event: published by the relay and applied by each projector, each span a child
    # of the context the event carries.
    for event_id, (event_type, parent) in events.items():
        published = of_event(event_id, SpanKind.PRODUCER)
        assert published, f"no publish span of {event_type}"
        assert {parent_of(s) for s in published} == {parent}, event_type
        for name in PROJECTOR_NAMES:
            applied = of_event(event_id, SpanKind.CONSUMER, name)
            assert applied, f"no {name} apply span of {event_type}"
            assert {parent_of(s) for s in applied} == {parent}, (name, event_type)
            # A batch handed back (a rebalance) is applied again later: a span each time.
            outcomes = [s.attributes["outbox.outcome"] for s in applied]
            assert "applied" in outcomes, (name, event_type, outcomes)

    # The workers' results continue the trace from the span of the event they handled.
    ocr_spans = {span_id(s) for s in of_event(by_type["image.ocr_requested"][0],
                                               SpanKind.CONSUMER, "ocr")}
    for result in ("image.ocr_started", "image.ocr_completed", "image.embedding_requested"):
        assert by_type[result][1] in ocr_spans, result
    embed_spans = {span_id(s) for s in of_event(by_type["image.embedding_requested"][0],
                                                 SpanKind.CONSUMER, "embed")}
    assert by_type["image.embedded"][1] in embed_spans

    # Without an exporter the trace id is still in the logs.
    published_lines = {line["event_id"] for line in logs if line["event"] == "event_published"
                       and line.get("trace_id") == TRACE_ID}
    assert published_lines >= set(events)
    for name in PROJECTOR_NAMES:
        applied_lines = {line["event_id"] for line in logs if line["event"] == "event_applied"
                         and line["projector"] == name and line.get("trace_id") == TRACE_ID}
        assert applied_lines >= set(events), name
    assert any(line["event"] == "ocr_done" and line.get("trace_id") == TRACE_ID
               for line in logs)


def _history(cfg, image_id: str) -> list:
    """(event id, type, traceparent) of each event of the image, in order."""
    engine = make_engine(cfg)
    with engine.connect() as conn:
        history = conn.execute(
            select(image_event_table.c.event_id, image_event_table.c.type,
                   image_event_table.c.traceparent)
            .where(image_event_table.c.image_id == image_id)
            .order_by(image_event_table.c.version, image_event_table.c.occurred_at)).all()
    engine.dispose()
    return history


def _applied_everywhere(spans: InMemorySpanExporter, event_ids: set[str]) -> bool:
    """Every projector has an `applied` span of each of these events."""
    done = {(s.attributes.get("outbox.projector"), s.attributes.get("messaging.message.id"))
            for s in spans.get_finished_spans()
            if s.attributes.get("outbox.outcome") == "applied"}
    return all((name, e) in done for name in PROJECTOR_NAMES for e in event_ids)


class TraceReceiver:
    """A collector stand-in on 127.0.0.1: records the body of each POST to /v1/traces."""

    def __init__(self) -> None:
        received: list[tuple[str, str, bytes]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((self.path, self.headers.get("Content-Type", ""), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                return

        self.received = received
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def spans(self) -> list[tuple[str, object]]:
        """(service name, span) of everything received so far."""
        out = []
        for path, ctype, body in self.received:
            assert path == "/v1/traces" and ctype == "application/x-protobuf"
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")
                out += [(service, span) for scope in resource_spans.scope_spans
                        for span in scope.spans]
        return out

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_a_relay_process_exports_its_spans_over_otlp_http(relay_settings, relays, engine):
    receiver = TraceReceiver()
    # Exported every 200 ms instead of 5 s, so the test does not wait.
    relay = relays("logical", OUTBOX_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="200")
    try:
        relay.wait_role("leader", timeout_s=60)
        with engine.begin() as conn:
            event_id = emit(conn, aggregate_type="order", aggregate_id="o-1", type="order.paid",
                            payload={"total": 12},
                            headers={"traceparent": traceparent(CLIENT_SPANS[0])})
        got = wait_for(lambda: [(svc, s) for svc, s in receiver.spans()
                                if s.trace_id.hex() == TRACE_ID], timeout_s=30,
                       what="the publish span at the receiver")
        service, span = got[0]
        assert service == "outbox-relay"
        assert span.parent_span_id.hex() == CLIENT_SPANS[0]
        assert span.name == f"{relay_settings.topic_prefix}.order publish"
        attributes = {a.key: a.value.string_value for a in span.attributes}
        assert attributes["messaging.message.id"] == str(event_id)
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.proc.wait(30) == 0
    finally:
        receiver.close()


def test_nothing_is_recorded_while_tracing_is_off(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.configure_tracing("off", Settings(otlp_endpoint=None))
    assert tracing.tracer() is None
    assert publish_trail() is None  # the relay notes nothing per message
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.configure_tracing("off", Settings(otlp_endpoint="http://127.0.0.1:9"))
    assert tracing.tracer() is None
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    assert tracing.configure_tracing("on", Settings(otlp_endpoint="http://127.0.0.1:9"))
    assert tracing.tracer() is not None
    tracing.shutdown_tracing()
    assert tracing.tracer() is None


def test_child_traceparent_names_the_current_span_of_the_same_trace_only(spans):
    tracer = tracing.tracer()
    assert tracer is not None
    with tracer.start_as_current_span("request",
                                      context=tracing.context_of(traceparent(CLIENT_SPANS[0]))):
        current = hex_id(trace.get_current_span().get_span_context().span_id, 16)
        assert tracing.child_traceparent(TRACE_ID) == f"00-{TRACE_ID}-{current}-01"
        other = "0af7651916cd43dd8448eb211c80319c"
        assert tracing.child_traceparent(other).split("-")[2] != current
    assert tracing.trace_id_of(tracing.child_traceparent(TRACE_ID)) == TRACE_ID
