"""The local broker's transaction and idempotence caveats (Tansu 0.6.0; the broker caveats of
docs/operating/relays.md), reproduced with plain confluent-kafka and kafka-python clients and
no project code in the produce or consume path, so the documentation's numbers are measured ones.

These rows document the broker: an aborted record read back, or an acknowledged message of an
idempotent (or transactional) producer lost across a restart, is the documented caveat and the
row still holds (the counts are in the row and its notes; Apache Kafka gives 0 for each).
What the project relies on is asserted: committed records all read back, transactional
offset commits visible only once committed, an open transaction held back from
read_committed readers, a fenced producer unable to commit, and no acknowledged message lost
with idempotence off."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic
from kafka import KafkaConsumer
from kafka import TopicPartition as KafkaPythonPartition

from tests.faults.report import Outcome, scale
from tests.relay_harness import stack

pytestmark = pytest.mark.slow
PARTITIONS = 3  # of the restart scenario's topic (the leak scenario uses one, for its order)
# The restart scenario's load: its pace, when the restart begins, and how long the load goes
# on once the broker is back.
RATE, LEAD_S, AFTER_S = 2_000, 1.0, 0.5
FENCED = {KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}


@dataclass
class BrokerCaveat(Outcome):
    """An outcome that documents the broker: with `documented_loss`, acknowledged messages
    missing from the topic are the broker's documented caveat, not a broken invariant."""

    documented_loss: bool = False

    def problems(self) -> list[str]:
        """Every broken invariant, leaving out a documented loss."""
        if self.documented_loss:
            return Outcome.problems(replace(self, in_kafka=self.committed, documented_loss=False))
        return super().problems()


def restart_broker() -> None:
    """Stop the broker (SIGTERM, as `infra/stack.sh` does) and start it again."""
    stack("restart-broker")


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(timeout=30)


def _read_confluent(bootstrap: str, topic: str, partitions: int, isolation: str,
                    done: Callable[[Counter[bytes]], bool], *, quiet_s: float | None = None,
                    timeout_s: float = 60.0) -> Counter[bytes]:
    """Each value in `topic` and how often it was read, by a fresh confluent-kafka reader
    (no group membership, nothing committed) from the beginning: until every partition is
    at its end and `done(values)`, or nothing new came for `quiet_s` (then something is
    missing; the broker's high watermark cannot be trusted to say where the end is)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}.reader",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "isolation.level": isolation, "fetch.wait.max.ms": 100})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    quiet_s = scale(5.0, 2.0) if quiet_s is None else quiet_s
    values: Counter[bytes] = Counter()
    at_end: set[int] = set()
    last = time.monotonic()
    deadline = last + timeout_s
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(err)
                    at_end.add(msg.partition())
                    continue
                at_end.discard(msg.partition())
                values[msg.value()] += 1
                last = time.monotonic()
            if len(at_end) == partitions and (done(values) or time.monotonic() - last > quiet_s):
                break
    finally:
        consumer.close()
    return values


def _read_kafka_python(bootstrap: str, topic: str, last_value: bytes,
                       timeout_s: float = 60.0) -> Counter[bytes]:
    """The values of `topic`'s single partition up to `last_value`, by kafka-python with
    isolation_level='read_committed'."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             isolation_level="read_committed", consumer_timeout_ms=1000)
    consumer.assign([KafkaPythonPartition(topic, 0)])
    consumer.seek_to_beginning()
    values: Counter[bytes] = Counter()
    deadline = time.monotonic() + timeout_s
    try:
        while last_value not in values and time.monotonic() < deadline:
            for msg in consumer:
                values[msg.value] += 1
                if msg.value == last_value:
                    break
    finally:
        consumer.close()
    return values


def _txn_producer(bootstrap: str, transactional_id: str) -> Producer:
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": transactional_id})
    producer.init_transactions(30)
    return producer


def _committed_offset(reader: Consumer, topic: str) -> int | None:
    """The group's committed offset of partition 0 (None when it has none)."""
    offset = reader.committed([TopicPartition(topic, 0)], timeout=15)[0].offset
    return None if offset == OFFSET_INVALID else offset


def _fence_commit_error(bootstrap: str, topic: str, transactional_id: str, value: bytes, *,
                        produce_after_fence: bytes | None, wait_s: float) -> KafkaError | None:
    """Open a transaction with `value` in it, let a second producer with the same
    transactional.id take over, optionally produce once more, then commit the old one: the
    commit's error (None if it succeeded)."""
    old = _txn_producer(bootstrap, transactional_id)
    old.begin_transaction()
    old.produce(topic, value)
    assert old.flush(30) == 0
    _txn_producer(bootstrap, transactional_id)  # takes over: the old one is fenced
    if produce_after_fence is not None:
        old.produce(topic, produce_after_fence)
        old.flush(wait_s)
    try:
        old.commit_transaction(wait_s)
    except KafkaException as exc:
        return exc.args[0]
    return None


def _describe(err: KafkaError | None) -> str:
    if err is None:
        return "it succeeded"
    kind = "fatal" if err.fatal() else "retriable" if err.retriable() else "abortable"
    return f"{err.name()} ({kind})"


def test_aborted_transaction_read_back(base_settings, uid, record):
    """A transaction of N records is aborted (a plain record written while it was open), then
    one of M committed; both read_committed clients read the topic back."""
    bootstrap = base_settings.kafka_bootstrap
    aborted_n, committed_m = int(scale(1_000, 100)), int(scale(1_000, 100))
    topic = f"t{uid}.caveat-txn"
    _create_topic(bootstrap, topic, 1)
    violations: list[str] = []
    group = f"{topic}.offsets"
    offsets_reader = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                               "enable.auto.commit": False})
    # A consumer of the group, only for its metadata (send_offsets_to_transaction).
    member = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                       "enable.auto.commit": False})
    member.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])

    producer = _txn_producer(bootstrap, f"{topic}.txn")
    producer.begin_transaction()
    for i in range(aborted_n):
        producer.produce(topic, f"aborted-{i}".encode())
    assert producer.flush(30) == 0
    plain = Producer({"bootstrap.servers": bootstrap})
    plain.produce(topic, b"plain")
    assert plain.flush(30) == 0

    # Open: all of it is stored (read_uncommitted), none of it past the last stable offset.
    stored = _read_confluent(bootstrap, topic, 1, "read_uncommitted",
                             lambda v: len(v) >= aborted_n + 1)
    if len(stored) != aborted_n + 1:
        violations.append(f"read_uncommitted saw {len(stored)} of the open transaction's "
                          f"{aborted_n} records and the plain one")
    held = _read_confluent(bootstrap, topic, 1, "read_committed", lambda v: False, quiet_s=1.0)
    if held:
        violations.append(f"read_committed saw {sum(held.values())} records past an open "
                          "transaction")

    producer.send_offsets_to_transaction([TopicPartition(topic, 0, aborted_n)],
                                         member.consumer_group_metadata(), 30)
    producer.abort_transaction(30)
    if (after_abort := _committed_offset(offsets_reader, topic)) is not None:
        violations.append(f"an aborted transaction's offset commit is visible: {after_abort}")

    producer.begin_transaction()
    for i in range(committed_m):
        producer.produce(topic, f"committed-{i}".encode())
    committed_offset = aborted_n + 1 + committed_m
    producer.send_offsets_to_transaction([TopicPartition(topic, 0, committed_offset)],
                                         member.consumer_group_metadata(), 30)
    producer.commit_transaction(30)
    # An offset commit aborted after a committed one leaves the committed one in place.
    producer.begin_transaction()
    producer.send_offsets_to_transaction([TopicPartition(topic, 0, committed_offset + 100)],
                                         member.consumer_group_metadata(), 30)
    producer.abort_transaction(30)
    if (after_commit := _committed_offset(offsets_reader, topic)) != committed_offset:
        violations.append(f"the committed transaction's offset commit reads back as "
                          f"{after_commit}, not {committed_offset}")
    member.close()
    offsets_reader.close()

    # Fencing: a zombie that only has its commit left, and one that produces once more.
    commit_only = _fence_commit_error(bootstrap, topic, f"{topic}.fence-a", b"fenced-a",
                                      produce_after_fence=None, wait_s=1)
    produced = _fence_commit_error(bootstrap, topic, f"{topic}.fence-b", b"fenced-b",
                                   produce_after_fence=b"refused-b", wait_s=10)
    if commit_only is None:
        violations.append("a fenced producer committed (it had only its commit left)")
    if produced is None or not (produced.fatal() or produced.code() in FENCED):
        violations.append(f"a fenced producer that produced again was not told it is fenced: "
                          f"{produced}")
    last = b"last"
    newest = _txn_producer(bootstrap, f"{topic}.fence-b")
    newest.begin_transaction()
    newest.produce(topic, last)
    newest.commit_transaction(30)

    seen = {"confluent-kafka": _read_confluent(bootstrap, topic, 1, "read_committed",
                                               lambda v: last in v),
            "kafka-python": _read_kafka_python(bootstrap, topic, last)}
    leaked = {client: sum(n for v, n in values.items() if v.startswith(b"aborted-"))
              for client, values in seen.items()}
    fenced = {client: sum(n for v, n in values.items() if v.startswith(b"fenced-"))
              for client, values in seen.items()}
    must_see = {f"committed-{i}".encode() for i in range(committed_m)} | {b"plain", last}
    for client, values in seen.items():
        if missing := must_see - values.keys():
            violations.append(f"{client} (read_committed) missed {len(missing)} committed "
                              "records")
        if values[b"refused-b"]:
            violations.append(f"{client} read back a record the broker refused (fenced)")
    confluent = seen["confluent-kafka"]
    out = BrokerCaveat(
        "broker: aborted transaction read back",
        f"transaction of {aborted_n} records aborted (a plain record written while it was "
        f"open), then {committed_m} committed; read_committed readers saw "
        f"{leaked['confluent-kafka']} (confluent-kafka) and {leaked['kafka-python']} "
        f"(kafka-python) aborted records (Apache Kafka: 0)",
        committed=len(must_see), in_kafka=len(must_see & confluent.keys()),
        duplicates=sum(confluent[v] - 1 for v in must_see if confluent[v] > 1),
        dead_letters=0, recover_s=0.0, violations=violations)
    out.notes += [
        f"aborted records read back by read_committed readers: confluent-kafka "
        f"{leaked['confluent-kafka']} of {aborted_n}, kafka-python {leaked['kafka-python']} of "
        f"{aborted_n}; Apache Kafka returns the aborted transactions with each fetch and the "
        "clients drop their records (0)",
        f"the records of two transactions whose producers were fenced (a new producer with "
        f"the same transactional.id, which aborts them on Apache Kafka) read back: "
        f"confluent-kafka {fenced['confluent-kafka']} of 2, kafka-python "
        f"{fenced['kafka-python']} of 2",
        "held as on Apache Kafka: the open transaction (and the plain record after it) was "
        "held back from read_committed; its offset commit was invisible after the abort, the "
        "committed one visible (and kept through a later aborted one)",
        f"a fenced producer's commit failed: after it produced again (refused), with "
        f"{_describe(produced)}; with only its commit left, with {_describe(commit_only)} "
        "(Apache Kafka: a fatal fenced error in both cases)",
    ]
    record(out)


@dataclass
class Sent:
    """A restart scenario's producer: how many messages it sent, which of them it was told
    were acknowledged, the failed reports, and the seconds from the broker's return until
    its last acknowledgement."""

    sent: int = 0
    acknowledged: set[int] = field(default_factory=set)
    failed: Counter[str] = field(default_factory=Counter)
    recover_s: float = 0.0
    transactions_aborted: int = 0
    producers_replaced: int = 0


class RestartMidLoad:
    """Paces a load at RATE messages a second and restarts the broker once, on a thread,
    LEAD_S into it. The load goes on until `count` messages were sent and the broker has
    been back for AFTER_S: Tansu keeps serving for seconds after SIGTERM, so a load of a
    fixed length could end before the broker actually stops."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._pool = ThreadPoolExecutor(1)
        self._restart: Future[float] | None = None
        self._t0 = time.monotonic()

    def _restart_broker(self) -> float:
        restart_broker()
        return time.monotonic()

    def going_on(self, sent: int) -> bool:
        """Whether to send more after `sent` messages (waits to keep the pace)."""
        now = time.monotonic()
        if self._restart is None and now - self._t0 >= LEAD_S:
            self._restart = self._pool.submit(self._restart_broker)
        if (sent >= self.count and self._restart is not None and self._restart.done()
                and now - self._restart.result() >= AFTER_S):
            return False
        if (ahead := self._t0 + sent / RATE - now) > 0:
            time.sleep(ahead)
        return True

    def back_at(self) -> float:
        """When the broker was back from its restart."""
        assert self._restart is not None, "the load ended before the restart"
        back = self._restart.result()
        self._pool.shutdown()
        return back


def _produce_one(producer: Producer, topic: str, i: int,
                 report: Callable[[KafkaError | None, Any], None]) -> None:
    value = str(i).encode()
    while True:
        try:
            producer.produce(topic, value, value, on_delivery=report)
            producer.poll(0)
            return
        except BufferError:  # the local queue is full (the broker is away): wait
            producer.poll(0.1)


def _produce_plain(bootstrap: str, topic: str, count: int, config: dict[str, Any]) -> Sent:
    """Numbered messages, one at a time, while the broker is restarted (RestartMidLoad);
    every delivery report is recorded; flush at the end."""
    sent = Sent()

    def report(err: KafkaError | None, msg: Any) -> None:
        if err is None:
            sent.acknowledged.add(int(msg.value()))
        else:
            sent.failed[err.name()] += 1

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", **config})
    load = RestartMidLoad(count)
    while load.going_on(sent.sent):
        _produce_one(producer, topic, sent.sent, report)
        sent.sent += 1
    back = load.back_at()
    assert producer.flush(scale(180, 90)) == 0, "messages left unacknowledged"
    sent.recover_s = time.monotonic() - back
    return sent


def _produce_transactional(bootstrap: str, topic: str, count: int, batch: int) -> Sent:
    """Numbered messages in transactions of `batch`, each committed, while the broker is
    restarted (RestartMidLoad). A transaction that must be aborted is aborted and its
    messages sent again; a fatal error replaces the producer. Acknowledged: the messages of
    committed transactions."""
    sent = Sent()

    def report(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            sent.failed[err.name()] += 1

    txn_id = f"{topic}.txn"
    producer = _txn_producer(bootstrap, txn_id)
    deadline = time.monotonic() + scale(300, 120)
    load = RestartMidLoad(count)
    while load.going_on(sent.sent):
        numbers = range(sent.sent, sent.sent + batch)
        step = "begin"
        while step != "done":
            assert time.monotonic() < deadline, f"the transaction at {numbers[0]} never committed"
            try:
                if step == "begin":
                    producer.begin_transaction()
                    for i in numbers:
                        _produce_one(producer, topic, i, report)
                    step = "commit"
                if step == "abort":
                    producer.abort_transaction(30)
                    sent.transactions_aborted += 1
                    step = "begin"
                else:
                    producer.commit_transaction(30)
                    step = "done"
            except KafkaException as exc:
                err = exc.args[0]
                sent.failed[f"{err.name()} (transactional call)"] += 1
                if err.fatal():
                    producer = _txn_producer(bootstrap, txn_id)
                    sent.producers_replaced += 1
                    step = "begin"
                elif err.txn_requires_abort():
                    step = "abort"
                elif not err.retriable():
                    raise
                # retriable: calling it again resumes the same commit or abort
        sent.acknowledged.update(numbers)
        sent.sent += batch
    sent.recover_s = max(0.0, time.monotonic() - load.back_at())
    return sent


VARIANTS = {
    "idempotent": ("enable.idempotence=true", {"enable.idempotence": True}),
    "not idempotent": ("enable.idempotence=false, max.in.flight.requests.per.connection=1",
                       {"enable.idempotence": False,
                        "max.in.flight.requests.per.connection": 1}),
    "transactional": ("transactional.id, read back read_committed", None),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_acknowledged_messages_across_a_broker_restart(base_settings, uid, record, variant):
    """Numbered messages from a plain confluent-kafka producer while the broker is restarted
    once; a fresh reader then counts the acknowledged ones missing from the topic."""
    bootstrap = base_settings.kafka_bootstrap
    count = int(scale(20_000, 3_000))
    topic = f"t{uid}.caveat-restart"
    _create_topic(bootstrap, topic, PARTITIONS)
    described, config = VARIANTS[variant]
    batch = int(scale(500, 250))
    start = time.monotonic()
    if config is None:
        sent = _produce_transactional(bootstrap, topic, count, batch)
    else:
        sent = _produce_plain(bootstrap, topic, count, config)
    produced_s = time.monotonic() - start
    expect = {str(i).encode() for i in sent.acknowledged}
    values = _read_confluent(bootstrap, topic, PARTITIONS,
                             "read_committed" if config is None else "read_uncommitted",
                             lambda v: expect <= v.keys())
    found = expect & values.keys()
    lost = len(expect) - len(found)
    held_back = 0
    if lost and config is None:  # in the log, yet held back from read_committed?
        stored = _read_confluent(bootstrap, topic, PARTITIONS, "read_uncommitted",
                                 lambda v: expect <= v.keys())
        held_back = len((expect - found) & stored.keys())
    out = BrokerCaveat(
        f"broker: {variant} producer across a restart",
        f"broker restarted once mid-load; {sent.sent:,} numbered messages from a plain "
        f"confluent-kafka producer ({described}): {lost} acknowledged"
        f"{' and committed' if config is None else ''} messages lost "
        "(Apache Kafka: 0)",
        committed=len(expect), in_kafka=len(found),
        duplicates=sum(n - 1 for v, n in values.items() if n > 1),
        dead_letters=0, recover_s=sent.recover_s,
        documented_loss=variant != "not idempotent")
    out.notes.append(
        f"{len(sent.acknowledged):,} of {sent.sent:,} acknowledged"
        + (f" (in committed transactions of {batch}; {sent.transactions_aborted} aborted and "
           f"sent again, {sent.producers_replaced} producers replaced)" if config is None
           else "")
        + f", {lost} of them missing"
        + (f" ({held_back} of those in the log but held back from read_committed)"
           if held_back else "")
        + f", {out.duplicates} duplicates read back; failed "
        f"reports: {_counts(sent.failed)}; load {produced_s:.1f} s; recover = from the "
        "broker's restart until the producer had its last acknowledgement")
    if len(sent.acknowledged) != sent.sent:
        out.violations.append(f"only {len(sent.acknowledged)} of {sent.sent} acknowledged")
    record(out)


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{name} ×{n}" for name, n in sorted(counts.items())) or "none"
