"""Where the consumers of the log stand: how far each projector's consumer group is behind
the end of the image topic, and what each dead-letter topic holds (and how much of it was
not replayed yet).

Tansu 0.6.0 reports a partition's high watermark unreliably (it lagged the real end by
hundreds of messages here; see outbox/topics.py), so no end offset is asked for: each
partition is read from the lowest committed position of interest to the end-of-partition
signal, at most `cap` messages, and a consumer further behind is shown as "at least" that
many. The age of the oldest message a group has not committed is exact either way: it is the
first one read at its position.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from outbox.kafka import make_admin, make_reader
from outbox.wire_formats import event_topic, is_event_topic, record_field
from outbox_app.projector_specs import BUILTIN
from outbox_app.settings import AppSettings
from outbox_images.store import AGGREGATE
from projectors.rebuild import committed
from projectors.runtime import live_group

# Messages read per partition at most: a projector's backlog beyond it is "at least" this.
PROJECTOR_READ_CAP = 500
# Dead-letter topics are read whole up to this (their letters are counted per org).
DLQ_READ_CAP = 2000
READ_TIMEOUT_S = 3.0

Partition = tuple[str, int]


@dataclass
class Tail:
    """The messages of one partition from a start offset, as far as they were read."""

    offsets: list[int] = field(default_factory=list)
    timestamps_ms: list[int] = field(default_factory=list)
    orgs: list[str | None] = field(default_factory=list)
    at_end: bool = False  # read to the end of the partition (not cut by the cap or the time)

    def after(self, offset: int) -> tuple[int, int | None]:
        """How many messages at or after `offset`, and the timestamp of the first of them."""
        first = next((i for i, o in enumerate(self.offsets) if o >= offset), None)
        if first is None:
            return 0, None
        return len(self.offsets) - first, self.timestamps_ms[first]


def read_tails(settings: AppSettings, starts: dict[Partition, int], caps: dict[str, int],
               with_org: set[str], timeout_s: float = READ_TIMEOUT_S) -> dict[Partition, Tail]:
    """Read each partition from its start to its end (or `caps[topic]` messages, or the
    timeout), in one consumer that joins no group and commits nothing. For the topics in
    `with_org`, each message's `org_id` is read (in any wire format)."""
    tails = {tp: Tail() for tp in starts}
    if not starts:
        return tails
    consumer = make_reader(settings, f"{settings.topic_prefix}.status", log_level=0,
                           **{"enable.partition.eof": True, "auto.offset.reset": "earliest",
                              "fetch.wait.max.ms": 50})
    open_ = set(starts)
    deadline = time.monotonic() + timeout_s
    try:
        consumer.assign([TopicPartition(t, p, o) for (t, p), o in starts.items()])
        while open_ and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.05):
                tp = (msg.topic(), msg.partition())
                if tp not in open_:
                    continue
                err, tail = msg.error(), tails[tp]
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        tail.at_end = True
                        open_.discard(tp)
                    continue
                tail.offsets.append(msg.offset())
                tail.timestamps_ms.append(msg.timestamp()[1])
                if tp[0] in with_org:
                    tail.orgs.append(record_field(msg.headers(), msg.value(), "org_id"))
                if len(tail.offsets) >= caps[tp[0]]:
                    open_.discard(tp)
                    consumer.pause([TopicPartition(*tp)])
    finally:
        consumer.close()
    return tails


class ThroughputMeter:
    """Events per second of each consumer group, from its committed offsets sampled over
    time (the last `window_s` seconds of samples)."""

    def __init__(self, window_s: float = 60.0) -> None:
        self._window = window_s
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def observe(self, group: str, total: int, now: float | None = None) -> float | None:
        """Record `group`'s committed total; its rate since the oldest sample in the window,
        or None with one sample only (or after its offsets went back, e.g. a reset)."""
        now = time.monotonic() if now is None else now
        samples = self._samples.setdefault(group, deque())
        if samples and total < samples[-1][1]:
            samples.clear()
        samples.append((now, total))
        while len(samples) > 1 and now - samples[0][0] > self._window:
            samples.popleft()
        (t0, first), (t1, last) = samples[0], samples[-1]
        return None if t1 - t0 < 0.5 else round((last - first) / (t1 - t0), 2)


def _age_s(timestamp_ms: int | None) -> float | None:
    return None if timestamp_ms is None else round(max(0.0, time.time() - timestamp_ms / 1000), 1)


def projector_groups(settings: AppSettings) -> dict[str, str]:
    """Each image projector's consumer group (the runtime's default group id)."""
    return {spec.name: live_group(settings, spec.name) for spec in BUILTIN}


def committed_totals(settings: AppSettings) -> dict[str, dict[Partition, int]]:
    """Each projector group's committed offsets on the image topic."""
    topic = event_topic(settings, AGGREGATE)
    return {group: committed(settings, group, [topic])
            for group in projector_groups(settings).values()}


def dead_letter_topics(settings: AppSettings) -> list[str]:
    """The `<event topic>.dlq.<consumer>` topics the broker has."""
    admin = make_admin(settings, log_level=0)
    return sorted(t for t in admin.list_topics(timeout=5).topics
                  if ".dlq." in t and is_event_topic(settings, t))


def group_backlogs(settings: AppSettings, positions: dict[str, dict[Partition, int]],
                   extra: dict[Partition, int], caps: dict[str, int], with_org: set[str]
                   ) -> tuple[dict[str, tuple[int, int | None, bool]], dict[Partition, Tail]]:
    """Per group: messages after its committed offsets, the timestamp of the oldest, and
    whether that count is exact. The first read starts each partition at the lowest position
    (and reads the `extra` partitions too, returned as they were read); a group whose
    position lies past what a capped read reached gets a read of its own."""
    found: dict[str, tuple[int, int | None, bool]] = {g: (0, None, True) for g in positions}
    pending = {g: dict(offsets) for g, offsets in positions.items() if offsets}
    first: dict[Partition, Tail] | None = None
    while first is None or pending:
        starts = dict(extra) if first is None else {}
        for offsets in pending.values():
            for tp, offset in offsets.items():
                starts[tp] = min(offset, starts.get(tp, offset))
        tails = read_tails(settings, starts, caps, with_org)
        first = tails if first is None else first
        for group, offsets in pending.items():
            for tp, offset in list(offsets.items()):
                tail = tails[tp]
                reached = tail.offsets[-1] if tail.offsets else starts[tp] - 1
                if offset != starts[tp] and not tail.at_end and offset > reached:
                    continue  # past what this read reached: the next one starts there
                count, first_ms = tail.after(offset)
                behind, oldest, exact = found[group]
                if first_ms is not None:
                    oldest = first_ms if oldest is None else min(oldest, first_ms)
                found[group] = (behind + count, oldest, exact and tail.at_end)
                del offsets[tp]
        pending = {g: o for g, o in pending.items() if o}
    return found, first


def log_positions(settings: AppSettings, meter: ThroughputMeter) -> dict[str, Any]:
    """The projectors' positions (`committed`, `behind`, `behind_at_least`,
    `oldest_waiting_s`, `events_per_s`) and the dead-letter topics' letters (each with its
    org and whether a replay sent it back already)."""
    image_topic = event_topic(settings, AGGREGATE)
    positions = committed_totals(settings)
    dlqs = {t: committed(settings, f"{t}.replay", [t]) for t in dead_letter_topics(settings)}
    caps = {image_topic: PROJECTOR_READ_CAP, **{t: DLQ_READ_CAP for t in dlqs}}
    found, tails = group_backlogs(settings, positions,
                                  {tp: 0 for replayed in dlqs.values() for tp in replayed},
                                  caps, set(dlqs))
    projectors = []
    for name, group in projector_groups(settings).items():
        behind, oldest_ms, exact = found[group]
        total = sum(positions[group].values())
        projectors.append({"name": name, "group": group, "committed": total, "behind": behind,
                           "behind_at_least": not exact, "oldest_waiting_s": _age_s(oldest_ms),
                           "events_per_s": meter.observe(group, total)})
    dead_letters = []
    for topic, replayed in dlqs.items():
        letters: list[tuple[str | None, bool]] = []
        for tp, offset in replayed.items():
            tail = tails[tp]
            letters += [(org, o < offset) for org, o in zip(tail.orgs, tail.offsets, strict=True)]
        dead_letters.append({"topic": topic, "letters": letters,
                             "complete": all(tails[tp].at_end for tp in replayed)})
    return {"projectors": projectors, "dead_letters": dead_letters}
