"""Counting dead letters with kafka-python, a client independent of the relay's and the
projectors' confluent-kafka."""

from __future__ import annotations

from kafka import KafkaConsumer

from outbox.settings import Settings


def dead_letters(settings: Settings) -> int:
    """How many messages the dead-letter topics of these settings' prefix hold (read to
    their end: the broker's watermarks are not relied on)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000)
    topics = [t for t in consumer.topics()
              if t.startswith(f"{settings.topic_prefix}.") and ".dlq" in t]
    if not topics:
        consumer.close()
        return 0
    consumer.subscribe(topics)
    count = sum(1 for _ in consumer)
    consumer.close()
    return count
