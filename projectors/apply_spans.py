"""What a projector tells about each event it applies: a span, its trace id in the logs.

The consumer runtime attaches an `EventTrace` to every event of a batch: the trace id of
the `traceparent` of its Kafka record, in any wire format (always: log lines carry it), and,
while tracing is on, a CONSUMER span that is a child of that context and lasts until the
batch is committed (or handed back, or the event dead-lettered). A projector that works
event by event wraps each in `applying(event)`: its log lines then carry the event's
`trace_id`, and the rows it writes through the outbox name the event's span as their
parent, so a worker's result continues the trace of the request that started it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import structlog
from confluent_kafka import Message
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from outbox import tracing
from outbox.envelope import EventEnvelope
from outbox.wire_formats import record_field

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class EventTrace:
    """One consumed event's trace id and, while tracing is on, its apply span."""

    trace_id: str | None
    span: Span | None = None

    def failed(self, reason: str) -> None:
        """The event could not be applied (dead-lettered)."""
        if self.span is not None:
            self.span.set_status(Status(StatusCode.ERROR, reason[:300]))


def traceparent(msg: Message) -> str | None:
    """The record's `traceparent`, in any wire format (a header, `ce_traceparent`, or an
    attribute of a structured CloudEvent)."""
    return record_field(msg.headers(), msg.value(), "traceparent")


def start_apply_spans(projector: str, group: str,
                      items: Sequence[tuple[Message, EventEnvelope]]) -> None:
    """Attach an `EventTrace` to each event of the batch (spans only while tracing is on)."""
    tracer = tracing.tracer()
    for msg, event in items:
        parent = traceparent(msg)
        span = None
        if tracer is not None:
            span = tracer.start_span(
                f"{projector} apply", context=tracing.context_of(parent),
                kind=SpanKind.CONSUMER,
                attributes={"messaging.system": "kafka", "messaging.operation.type": "process",
                            "messaging.destination.name": msg.topic() or "",
                            "messaging.destination.partition.id": str(msg.partition()),
                            "messaging.kafka.offset": msg.offset() or 0,
                            "messaging.consumer.group.name": group,
                            "messaging.message.id": str(event.id),
                            "messaging.batch.message_count": len(items),
                            "outbox.projector": projector, "outbox.event_type": event.type,
                            "outbox.aggregate_id": event.aggregate_id,
                            "outbox.aggregate_version": event.aggregate_version or 0})
        event.attach_trace(EventTrace(tracing.trace_id_of(parent), span))


def note_retry(events: Sequence[EventEnvelope], error: str) -> None:
    """The batch failed and is tried again: an event on each span."""
    for event in events:
        trace = event.trace
        if trace is not None and trace.span is not None:
            trace.span.add_event("retry", {"error": error[:300]})


def end_apply_spans(projector: str, events: Sequence[EventEnvelope], outcome: str) -> None:
    """The batch is over (`applied` and committed, or `handed_back`): end the spans and, at
    DEBUG, log each applied event with its trace id."""
    log_each = outcome == "applied" and logging.getLogger(__name__).isEnabledFor(logging.DEBUG)
    for event in events:
        trace = event.trace
        if trace is None:
            continue
        if trace.span is not None:
            trace.span.set_attribute("outbox.outcome", outcome)
            trace.span.end()
        if log_each:
            log.debug("event_applied", projector=projector, event_id=str(event.id),
                      type=event.type, aggregate_id=event.aggregate_id,
                      version=event.aggregate_version, trace_id=trace.trace_id)


@contextmanager
def applying(event: EventEnvelope) -> Iterator[None]:
    """While a projector handles `event`: its trace id on log lines, its span current."""
    trace = event.trace
    scope = nullcontext() if trace is None else tracing.event_scope(trace.trace_id, trace.span)
    with scope:
        yield
