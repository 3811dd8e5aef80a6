"""OpenTelemetry tracing along the outbox's path, off (and costing nothing) unless configured.

A process records spans only after `configure_tracing` found an exporter: the OTLP/HTTP
endpoint of `OUTBOX_OTLP_ENDPOINT`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (`OTEL_SDK_DISABLED=true` turns it off again).
Otherwise `tracer()` is None and every caller skips its span work: the relay checks once per
publisher, the consumer runtime once per batch.

Spans link through the W3C `traceparent` each outbox row carries in its headers (and each
Kafka record with it): the relay's publish span and every projector's apply span are
children of that context, and a row written while a span is current names that span as its
parent (`child_traceparent`), so a worker's result continues the trace of the event it
handled. The provider is this module's own rather than the global one, so a test can put
the SDK's in-memory exporter in and take it out again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from outbox.settings import Settings

PROPAGATOR = TraceContextTextMapPropagator()
TRACES_PATH = "/v1/traces"

_lock = threading.Lock()
_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


def otlp_traces_url(endpoint: str) -> str:
    """The traces URL of an OTLP/HTTP collector given by its base URL (or the full URL)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


def _configured_exporter(settings: Settings | None) -> SpanExporter | None:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoint = settings.otlp_endpoint if settings is not None else None
    standard = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint and not standard:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Without an endpoint of ours the exporter reads the standard variables itself.
    return OTLPSpanExporter(endpoint=otlp_traces_url(endpoint) if endpoint else None)


def configure_tracing(service: str, settings: Settings | None = None, *,
                      exporter: SpanExporter | None = None) -> bool:
    """Record spans of this process as `service` when an exporter is configured (see the
    module docstring); True when tracing is on. `exporter` (e.g. the SDK's
    InMemorySpanExporter) replaces the configured one and gets each span as it ends."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    chosen = exporter or _configured_exporter(settings)
    if chosen is None:
        return False
    # Spans are exported off the hot path, in batches; a given exporter sees each at once.
    processor = SimpleSpanProcessor(chosen) if exporter is not None \
        else BatchSpanProcessor(chosen)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(processor)
    global _provider, _tracer
    with _lock:
        old, _provider, _tracer = _provider, provider, provider.get_tracer("outbox")
    if old is not None:
        old.shutdown()
    return True


def shutdown_tracing() -> None:
    """Export what is buffered and stop recording spans."""
    global _provider, _tracer
    with _lock:
        old, _provider, _tracer = _provider, None, None
    if old is not None:
        old.shutdown()


def tracer() -> trace.Tracer | None:
    """The tracer of this process, or None while tracing is off."""
    return _tracer


def context_of(traceparent: str | None) -> Context | None:
    """The remote parent context a `traceparent` header names (None when absent)."""
    if not traceparent:
        return None
    return PROPAGATOR.extract({"traceparent": traceparent})


def context_from_headers(headers: Mapping[str, str]) -> Context:
    """The parent context of an incoming request's W3C headers (an empty one without)."""
    return PROPAGATOR.extract(headers)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` header (lower case), or None when it is absent
    or malformed (not 32 hex digits, or all zeros)."""
    parts = (traceparent or "").strip().split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        try:
            int(parts[1], 16)
        except ValueError:
            return None
        return parts[1].lower()
    return None


def child_traceparent(trace_id: str) -> str:
    """A `traceparent` in trace `trace_id` for a row being written: its parent is the
    current span when that span belongs to the same trace (the request or the event being
    handled), else a span id of its own."""
    current = trace.get_current_span().get_span_context()
    if current.is_valid and format(current.trace_id, "032x") == trace_id:
        span_id = format(current.span_id, "016x")
    else:
        span_id = os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-01"


@contextmanager
def event_scope(trace_id: str | None, span: trace.Span | None = None) -> Iterator[None]:
    """While one event is handled: its trace id on every log line, and its span current
    (so rows written meanwhile name it as their parent)."""
    with structlog.contextvars.bound_contextvars(trace_id=trace_id):
        if span is None:
            yield
        else:
            with trace.use_span(span, end_on_exit=False):
                yield

