"""The second part of the logical relay: it turns the listener's outbox rows into Kafka
records, each in its aggregate type's wire format, and keeps the account of a batch: how
many events, the last whole transaction, their commit times.

In exactly-once mode it also skips what Kafka already holds (every transaction up to the
position committed in Kafka, and the first rows of one that was published in parts), and
asks for a Kafka commit inside a PostgreSQL transaction with more events than
`relay_transaction_max_events`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from outbox.envelope import OutboxRecord, encode_value, kafka_headers, rfc3339
from outbox.wire_formats import Encode
from relays.listener import Row, SchemaMismatch
from relays.publisher import BatchPublisher

_ALL = float("inf")


@dataclass(frozen=True)
class Held:
    """What Kafka holds of the stream: every transaction whose commit record is before
    `commit_lsn`, and of the one at `commit_lsn` all of it (`rows` None) or its first `rows`
    events. `end_lsn` is where the stream resumes after the last whole one."""

    commit_lsn: int
    end_lsn: int
    rows: int | None = None


def _record(row: Row, commit_time: float) -> OutboxRecord:
    """The row as an OutboxRecord (the slow path, for a row that needs a dead letter)."""
    _, eid, agg_type, agg_id, etype, version, org, payload, headers, created = row
    assert eid and agg_type and agg_id and etype and payload and created
    return OutboxRecord(
        id=eid.decode(), aggregate_type=agg_type.decode(), aggregate_id=agg_id.decode(),
        type=etype.decode(), aggregate_version=None if version is None else int(version),
        org_id=None if org is None else org.decode(), payload_json=payload.decode(),
        headers_json=(headers or b"{}").decode(), occurred_at=rfc3339(created.decode()),
        commit_time=commit_time)


class Processor:
    """Encodes and sends the rows of whole transactions; one batch at a time."""

    def __init__(self, publisher: BatchPublisher, *, split_every: int | None = None,
                 on_split: Callable[[Held], None] | None = None) -> None:
        self._publisher = publisher
        self._topics: dict[bytes, tuple[str, Encode | None]] = {}
        self.held: Held | None = None  # exactly-once: what not to send again
        self._split_every = split_every or 0
        self._on_split = on_split
        self._final_lsn = 0
        self._commit_time = 0.0
        self._txn_rows = 0
        self._skip_rows: float = 0
        self.last_end_lsn = 0  # after the last whole transaction seen, in any batch
        self.new_batch()

    def resume(self, held: Held | None, from_lsn: int) -> None:
        """A stream starts at `from_lsn` (after a whole transaction); `held` is what Kafka
        holds (exactly-once), not to be sent again."""
        self.held = held
        self.last_end_lsn = max(from_lsn, 0 if held is None else held.end_lsn)

    def new_batch(self) -> None:
        """Start a batch's account."""
        self.events = 0  # rows sent in this batch
        self.skipped = 0  # rows Kafka held already
        self.end_lsn: int | None = None  # after the batch's last whole transaction
        self.seq = 0  # the highest outbox seq sent
        self.commit_times: list[float] = []
        self.last_commit_time: float | None = None

    def begin(self, final_lsn: int, commit_time: float) -> None:
        """A transaction starts; decide how much of it Kafka already holds."""
        self._final_lsn = final_lsn
        self._commit_time = commit_time
        self._txn_rows = 0
        held = self.held
        if held is None or final_lsn > held.commit_lsn:
            self._skip_rows = 0
        elif final_lsn < held.commit_lsn or held.rows is None:
            self._skip_rows = _ALL
        else:
            self._skip_rows = held.rows

    def row(self, row: Row) -> None:
        """Send one outbox row (the REQUIRED_COLUMNS, as bytes), unless Kafka has it."""
        self._txn_rows += 1
        if self._txn_rows <= self._skip_rows:
            self.skipped += 1
            return
        self._send(row)
        self.events += 1
        seq = row[0]
        if seq is not None and int(seq) > self.seq:
            self.seq = int(seq)
        if self._split_every and self._txn_rows % self._split_every == 0:
            assert self._on_split is not None
            self._on_split(Held(self._final_lsn, self.last_end_lsn, self._txn_rows))

    def commit(self, end_lsn: int) -> None:
        """The transaction is whole."""
        self.end_lsn = self.last_end_lsn = end_lsn
        self.last_commit_time = self._commit_time
        self.commit_times.append(self._commit_time)

    def position(self) -> Held:
        """What Kafka will hold once this batch is committed: through its last whole
        transaction."""
        assert self.end_lsn is not None
        return Held(self._final_lsn, self.end_lsn)

    def _send(self, row: Row) -> None:
        """Encode one row in its aggregate type's wire format and produce it."""
        _seq, eid, agg_type, agg_id, etype, version, org, payload, headers, created = row
        try:
            topic, encode = self._topics.get(agg_type) or self._topic(agg_type)
            event_id, event_type = eid.decode(), etype.decode()
            if encode is None:  # the envelope, inline: the common case of the hot loop
                value = encode_value(
                    id=event_id, type=event_type, aggregate_type=agg_type.decode(),
                    aggregate_id=agg_id.decode(),
                    aggregate_version=None if version is None else int(version),
                    org_id=None if org is None else org.decode(),
                    occurred_at=rfc3339(created.decode()), payload_json=payload)
                hdrs = kafka_headers(event_id, event_type, headers)
            else:
                value, hdrs = encode(
                    event_id, event_type, agg_type.decode(), agg_id.decode(),
                    None if version is None else int(version),
                    None if org is None else org.decode(), rfc3339(created.decode()),
                    payload, headers)
        except (AttributeError, ValueError) as exc:
            raise SchemaMismatch(f"an outbox row the relay cannot decode: {exc}") from exc
        if not self._publisher.send_encoded(topic, agg_id, value, hdrs):
            self._publisher.send(_record(row, self._commit_time))  # too large: dead-lettered

    def _topic(self, aggregate_type: bytes) -> tuple[str, Encode | None]:
        """The topic (ensured) of an aggregate type and its encoder, None for the envelope
        (encoded inline); cached."""
        found = self._publisher.route(aggregate_type.decode())
        entry = (found.topic, None if found.format == "envelope" else found.encode)
        self._topics[aggregate_type] = entry
        return entry
