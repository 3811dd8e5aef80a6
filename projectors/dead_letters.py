"""`outbox dlq list|replay <topic>`: the dead letters of a topic, and sending them back.

A dead letter keeps the original key, value and headers, plus `reason`, `source_topic` and
(for projectors) `projector`, `source_partition`, `source_offset`. Replaying publishes each
one again to its source topic, under a consumer group of its own (`<dlq>.replay`) whose
offsets are committed only after the broker acknowledged the copies: a replay interrupted
midway repeats at most what was not yet acknowledged, and a second replay sends nothing
twice. Consumers apply by version, so a replayed old event that was overtaken changes
nothing. The relay's dead letters of rows too large for the broker carry no payload
(`payload_omitted`): they are listed, never replayed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from outbox.kafka import make_producer, make_reader
from outbox.settings import Settings
from outbox.wire_formats import record_field

DLQ_HEADERS = {"reason", "projector", "source_topic", "source_partition", "source_offset",
               "payload_omitted"}
IDLE_S = 2.0  # no message for this long: the end of the topic (the high watermark of some
#               brokers cannot be trusted)


def _read(consumer: Consumer) -> Iterator[Message]:
    while True:
        batch = consumer.consume(500, timeout=IDLE_S)
        if not batch:
            return
        for msg in batch:
            if msg.error() is None:
                yield msg


def describe(msg: Message) -> dict[str, Any]:
    """A dead letter as JSON-ready data."""
    headers = {k: v.decode(errors="replace") for k, v in (msg.headers() or [])}
    return {"partition": msg.partition(), "offset": msg.offset(), "key":
            (msg.key() or b"").decode(errors="replace"),
            # The letter's event, in whichever wire format it was written.
            "event_id": record_field(msg.headers(), msg.value(), "id"),
            "type": record_field(msg.headers(), msg.value(), "type"),
            "reason": headers.get("reason"), "source_topic": headers.get("source_topic"),
            "source_offset": headers.get("source_offset"),
            "replayable": headers.get("payload_omitted") != "true"}


def list_dead_letters(settings: Settings, topic: str) -> list[dict[str, Any]]:
    """Every dead letter in `topic`, oldest first per partition."""
    consumer = make_reader(settings, f"{topic}.list")
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        return [describe(m) for m in _read(consumer)]
    finally:
        consumer.close()


def replay(settings: Settings, topic: str) -> dict[str, int]:
    """Publish the dead letters not replayed before to their source topics. Only those
    written before the replay started: a copy that fails again and comes back is left for
    the next replay, instead of going round for ever."""
    started_ms = int(time.time() * 1000)
    consumer = make_reader(settings, f"{topic}.replay", **{"auto.offset.reset": "earliest"})
    producer = make_producer(settings)
    failures: list[str] = []
    counts = {"replayed": 0, "not_replayable": 0}
    done: set[int] = set()
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p) for p in parts])
        offsets: dict[int, int] = {}
        for msg in _read(consumer):
            if msg.timestamp()[1] >= started_ms or msg.partition() in done:
                done.add(msg.partition())
                continue
            headers = list(msg.headers() or [])
            named = {k: v.decode(errors="replace") for k, v in headers}
            if named.get("payload_omitted") == "true" or not named.get("source_topic"):
                counts["not_replayable"] += 1
            else:
                producer.produce(named["source_topic"], msg.value(), msg.key(),
                                 headers=[(k, v) for k, v in headers if k not in DLQ_HEADERS],
                                 on_delivery=lambda err, _m: err and failures.append(str(err)))
                counts["replayed"] += 1
            offsets[msg.partition()] = msg.offset() + 1
        if producer.flush(60) or failures:
            raise RuntimeError(f"{len(failures) or 'some'} copies were not acknowledged; "
                               "nothing committed, run the replay again")
        if offsets:
            consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()],
                            asynchronous=False)
        return counts
    finally:
        consumer.close()
