"""Prometheus metrics of the projectors."""

from prometheus_client import Counter, Gauge, Histogram

APPLIED = Counter("outbox_projector_events_applied_total", "events applied", ["projector"])
DEAD_LETTERS = Counter("outbox_projector_dead_letters_total", "messages sent to the DLQ",
                       ["projector"])
RETRIES = Counter("outbox_projector_retries_total", "batch retries after an error",
                  ["projector"])
# Computed at each scrape by the runtime's LagClock (projectors/lag.py).
LAG_SECONDS = Gauge("outbox_projector_lag_seconds",
                    "now minus occurred_at of the oldest event not yet applied (0 when "
                    "caught up)", ["projector"])
# The hop into this projector: relay, broker, fetch and batching together. Fine buckets
# below a second, where a healthy pipeline's hops are.
PICKUP_SECONDS = Histogram(
    "outbox_projector_pickup_seconds",
    "from an event's occurred_at (its transaction) to the start of its apply",
    ["projector"],
    buckets=(0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
             1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0))
BATCH_SECONDS = Histogram("outbox_projector_batch_seconds", "time to apply one batch",
                          ["projector"])
OCR_RUNS = Counter("outbox_ocr_engine_runs_total", "images read by the OCR engine")
EMBEDDING_TEXTS = Counter("outbox_embedding_texts_total", "texts embedded by the model")


def start_counting(projector: str) -> None:
    """Export the projector's counters at 0 from its start: a series that first appears
    with its first dead letter (or event) is one that `increase()` cannot see grow."""
    for counter in (APPLIED, DEAD_LETTERS, RETRIES):
        counter.labels(projector)
