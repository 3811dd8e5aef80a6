"""The exactly-once producer's transactional calls, bounded: librdkafka can block in one past
its own timeout (a lost group coordinator: confluentinc/librdkafka#5456), which was seen
here after a broker restart. No broker is involved: the hang is simulated, as a real one
cannot be produced on demand."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from outbox.settings import Settings
from relays import publisher as publisher_module
from relays.publisher import BatchPublisher, ProducerFatal, PublishError

SETTINGS = Settings(kafka_bootstrap="127.0.0.1:9", topic_prefix="p")


@pytest.fixture
def publisher(monkeypatch):
    monkeypatch.setattr(publisher_module, "CALL_GRACE_S", 0.2)
    pub = BatchPublisher(SETTINGS, stop_requested=lambda: False, transactional_id="t-bounded")
    yield pub
    pub.close(timeout_s=0)


def test_a_transactional_call_blocked_past_its_timeout_mock_hang_makes_the_producer_fatal(
        publisher):
    release = threading.Event()

    def send_offsets_to_transaction(timeout_s: float) -> None:
        release.wait()  # as the client does when it waits on a coordinator for ever

    start = time.monotonic()
    try:
        with pytest.raises(ProducerFatal, match="did not return within"):
            publisher._transaction_call(send_offsets_to_transaction, timeout_s=0.3)
    finally:
        release.set()
    assert time.monotonic() - start < 5  # 0.3 s + the grace, not for ever
    # Fatal: the runner replaces the producer; nothing more goes through this one.
    with pytest.raises(ProducerFatal):
        publisher._raise_if_fatal()


def test_a_bounded_call_returns_its_value_and_passes_its_timeout_on(publisher):
    seen = []

    def commit_transaction(timeout_s: float) -> str:
        seen.append(timeout_s)
        return "done"

    assert publisher._transaction_call(commit_transaction, timeout_s=1.5) == "done"
    assert seen == [1.5]


def test_a_kafka_error_in_a_bounded_call_is_a_publish_error_or_fatal(publisher):
    def timed_out(timeout_s: float) -> None:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT))

    with pytest.raises(PublishError, match="timed_out"):
        publisher._transaction_call(timed_out, timeout_s=1)

    def fenced(timeout_s: float) -> None:
        raise KafkaException(KafkaError(KafkaError._FENCED, fatal=True))

    with pytest.raises(ProducerFatal):
        publisher._transaction_call(fenced, timeout_s=1)
