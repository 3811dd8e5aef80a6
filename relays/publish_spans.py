"""What the relay tells about each event it publishes: a span, and at DEBUG a log line.

Only while tracing is on or the relay logs at DEBUG does the publisher keep a trail of the
batch in hand (a tuple per message); otherwise it keeps nothing and the publish path is
what it was. When the batch is settled, each event gets a PRODUCER span from its production
to the batch's acknowledgement, a child of the `traceparent` in its headers, and an
`event_published` line with its `trace_id`. Spans are made after the acknowledgements, off
the produce loop, so tracing slows the relay by the span work alone.
"""

from __future__ import annotations

import logging
import time

import structlog
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from outbox import tracing

log = structlog.get_logger(__name__)

Headers = list[tuple[str, bytes]]


class PublishTrail:
    """The events of the batch in hand, noted as they are produced."""

    def __init__(self, tracer: Tracer | None, log_each: bool) -> None:
        self._tracer = tracer
        self._log_each = log_each
        self._pending: list[tuple[int, str, bytes, Headers]] = []

    def note(self, topic: str, key: bytes, headers: Headers) -> None:
        """One message was produced (not yet acknowledged)."""
        self._pending.append((time.time_ns(), topic, key, headers))

    def settled(self, error: str | None = None) -> None:
        """The batch was acknowledged (`error`: it was not, and will be sent again)."""
        pending, self._pending = self._pending, []
        end = time.time_ns()
        for start, topic, key, headers in pending:
            # `ce_*`: the same fields in the cloudevents-binary wire format.
            fields = {name.removeprefix("ce_"): value.decode("utf-8", "replace")
                      for name, value in headers
                      if name.removeprefix("ce_") in ("id", "type", "traceparent")}
            traceparent = fields.get("traceparent")
            if self._tracer is not None:
                self._span(start, end, topic, fields, error)
            if self._log_each:
                log.debug("event_published", event_id=fields.get("id"), type=fields.get("type"),
                          aggregate_id=key.decode("utf-8", "replace"), topic=topic,
                          trace_id=tracing.trace_id_of(traceparent), acknowledged=error is None)

    def _span(self, start: int, end: int, topic: str, fields: dict[str, str],
              error: str | None) -> None:
        assert self._tracer is not None
        # Few attributes: each costs the relay about a microsecond per event.
        span = self._tracer.start_span(
            f"{topic} publish", context=tracing.context_of(fields.get("traceparent")),
            kind=SpanKind.PRODUCER, start_time=start,
            attributes={"messaging.system": "kafka", "messaging.destination.name": topic,
                        "messaging.message.id": fields.get("id", ""),
                        "outbox.event_type": fields.get("type", "")})
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error[:300]))
        span.end(end_time=end)

    def discard(self) -> None:
        """Forget the batch in hand (withdrawn: it is sent again from the last position)."""
        self._pending.clear()


def publish_trail() -> PublishTrail | None:
    """A trail when tracing is on or publishing is logged at DEBUG, else None."""
    tracer = tracing.tracer()
    log_each = logging.getLogger(__name__).isEnabledFor(logging.DEBUG)
    if tracer is None and not log_each:
        return None
    return PublishTrail(tracer, log_each)
