"""The logical relay's processor with no server: which rows of a transaction it sends when
Kafka already holds some (exactly-once restart), when it asks for a Kafka commit inside a
large transaction, and the batch's account."""

from __future__ import annotations

from typing import Any

from outbox.settings import Settings
from outbox.wire_formats import Route, route
from relays.processor import Held, Processor

SETTINGS = Settings(kafka_bootstrap="127.0.0.1:9", topic_prefix="p")


class RecordingPublisher:
    """Stands in for BatchPublisher: keeps what would be produced (no broker involved)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def route(self, aggregate_type: str) -> Route:
        return route(SETTINGS, aggregate_type)

    def send_encoded(self, topic: str, key: bytes, value: bytes, headers: list[Any]) -> bool:
        self.sent.append((topic, key))
        return True


def _row(seq: int, agg: str = "a") -> tuple[bytes | None, ...]:
    return (str(seq).encode(), f"00000000-0000-0000-0000-{seq:012d}".encode(), b"order",
            agg.encode(), b"order.placed", str(seq).encode(), None, b'{"n": 1}', b"{}",
            b"2026-12-05 10:00:00.123456+00")


def _transaction(processor: Processor, final_lsn: int, seqs: range, end_lsn: int) -> None:
    processor.begin(final_lsn, 1_700_000_000.0)
    for seq in seqs:
        processor.row(_row(seq))
    processor.commit(end_lsn)


def _processor(held: Held | None = None, **kwargs: Any) -> tuple[Processor, RecordingPublisher]:
    publisher = RecordingPublisher()
    processor = Processor(publisher, **kwargs)  # type: ignore[arg-type]
    processor.resume(held, from_lsn=0)
    return processor, publisher


def test_every_row_is_sent_and_accounted_when_kafka_holds_nothing():
    processor, publisher = _processor()
    _transaction(processor, 100, range(1, 4), 110)
    _transaction(processor, 200, range(4, 6), 210)
    assert len(publisher.sent) == 5 and publisher.sent[0] == ("p.order", b"a")
    assert (processor.events, processor.skipped, processor.seq) == (5, 0, 5)
    assert processor.end_lsn == 210 and processor.position() == Held(200, 210)
    assert processor.commit_times == [1_700_000_000.0] * 2


def test_transactions_kafka_holds_whole_are_skipped():
    processor, publisher = _processor(held=Held(commit_lsn=200, end_lsn=210))
    _transaction(processor, 100, range(1, 4), 110)
    _transaction(processor, 200, range(4, 6), 210)
    _transaction(processor, 300, range(6, 8), 310)
    assert len(publisher.sent) == 2
    assert (processor.events, processor.skipped, processor.seq) == (2, 5, 7)
    assert processor.end_lsn == 310


def test_a_transaction_kafka_holds_in_part_resumes_after_its_held_rows():
    processor, publisher = _processor(held=Held(commit_lsn=200, end_lsn=110, rows=3))
    _transaction(processor, 200, range(1, 6), 210)
    assert (processor.events, processor.skipped, processor.seq) == (2, 3, 5)
    assert len(publisher.sent) == 2


def test_a_large_transaction_asks_for_a_commit_every_n_rows():
    parts: list[Held] = []
    processor, _ = _processor(split_every=4, on_split=parts.append)
    _transaction(processor, 100, range(1, 3), 110)
    _transaction(processor, 200, range(3, 13), 210)
    # Counted within the transaction, the position naming the last whole one before it.
    assert parts == [Held(200, 110, 4), Held(200, 110, 8)]
    assert processor.events == 12 and processor.position() == Held(200, 210)


def test_a_restart_inside_a_split_transaction_asks_again_at_the_same_rows():
    parts: list[Held] = []
    processor, _ = _processor(split_every=4, on_split=parts.append)
    processor.resume(Held(200, 110, 4), from_lsn=100)
    _transaction(processor, 200, range(3, 13), 210)
    assert parts == [Held(200, 110, 8)]  # row counts stay the transaction's, not the batch's
    assert processor.skipped == 4 and processor.events == 6


def test_a_new_batch_clears_the_account_but_not_the_position():
    processor, _ = _processor()
    _transaction(processor, 100, range(1, 3), 110)
    processor.new_batch()
    assert (processor.events, processor.end_lsn, processor.commit_times) == (0, None, [])
    assert processor.last_end_lsn == 110
