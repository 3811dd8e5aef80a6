"""Prometheus metrics of the relays."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS_PUBLISHED = Counter("outbox_relay_events_published_total", "events acknowledged by Kafka",
                           ["mode"])
BATCHES = Counter("outbox_relay_batches_total", "batches published", ["mode"])
DEAD_LETTERS = Counter("outbox_relay_dead_letters_total",
                       "rows the broker cannot take, sent to `<topic>.dlq.relay`", ["mode"])
PUBLISH_ERRORS = Counter("outbox_relay_publish_errors_total", "batches that failed", ["mode"])
SLOT_RECREATIONS = Counter("outbox_relay_slot_recreations_total",
                           "slots made again with a backfill", ["reason"])
PUBLISH_LATENCY = Histogram(
    "outbox_relay_publish_latency_seconds",
    "commit (or insert, in poll mode) to Kafka acknowledgement",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SLOT_RETAINED_WAL_BYTES = Gauge("outbox_relay_slot_retained_wal_bytes",
                                "WAL the replication slot keeps (current WAL - restart_lsn)")
SLOT_LAG_BYTES = Gauge("outbox_relay_slot_lag_bytes",
                       "WAL not yet confirmed by the relay (current WAL - confirmed_flush_lsn)")
OLDEST_UNPUBLISHED_AGE = Gauge("outbox_relay_oldest_unpublished_age_seconds",
                               "age of the oldest event not yet published")
IS_LEADER = Gauge("outbox_relay_leader", "1 while this process holds the relay lock")


def start_counting(mode: str) -> None:
    """Export the relay's counters of `mode` at 0 from its start: a series that first
    appears with its first error or dead letter is one that `increase()` cannot see grow.
    Slot recreations are labelled by a reason known only when one happens; their alert
    counts a new series as well."""
    for counter in (EVENTS_PUBLISHED, BATCHES, DEAD_LETTERS, PUBLISH_ERRORS):
        counter.labels(mode)
