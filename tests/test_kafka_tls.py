"""Secured Kafka for real: a relay process and a projector reach a broker over TLS through the
client factory, an untrusted broker certificate fails clearly, and SASL credentials reach a
broker that requires authentication.

Tansu 0.6.0 serves no TLS itself (tests/tls_proxy.py says why), so the TLS endpoint is a
TLS-terminating proxy in front of a Tansu of the test's own that advertises the proxy's
address: the clients see a TLS listener as they would on a managed cluster."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from confluent_kafka import KafkaError, KafkaException

from outbox import emit
from outbox.envelope import EventEnvelope
from outbox.kafka import make_admin
from outbox.settings import Settings
from outbox.topics import KafkaUnreachable, describe_topics
from projectors.runtime import ConsumerRuntime
from tests.own_kafka import OwnTansu
from tests.pipeline_harness import wait_for
from tests.tls_proxy import TlsProxy

pytestmark = pytest.mark.slow


@dataclass
class TlsBroker:
    bootstrap: str
    ca: Path
    other_ca: Path
    proxy: TlsProxy


@pytest.fixture
def tls_broker(tmp_path) -> Iterator[TlsBroker]:
    """A broker reachable only over TLS, with a certificate from a CA made for this test."""
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    other.cert_pem.write_to_path(tmp_path / "other-ca.pem")
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    proxy = TlsProxy(tmp_path / "server.pem")
    broker = OwnTansu(tmp_path / "tansu.log", proxy.port)
    broker.start()
    try:
        proxy.start(broker.port)
        yield TlsBroker(f"127.0.0.1:{proxy.port}", tmp_path / "ca.pem",
                        tmp_path / "other-ca.pem", proxy)
    finally:
        proxy.stop()
        broker.stop()


class CollectingProjector:
    """A projector that remembers the aggregate ids of what it applied."""

    name = "tls-check"
    aggregate_types = ("parcel",)

    def __init__(self) -> None:
        self.applied: set[str] = set()

    def apply(self, events: list[EventEnvelope]) -> None:
        self.applied |= {e.aggregate_id for e in events}

    def close(self) -> None:
        return None


def test_relay_publishes_and_projector_consumes_over_tls(relays, relay_settings, engine,
                                                         tls_broker):
    secured = {"kafka_bootstrap": tls_broker.bootstrap, "kafka_security_protocol": "SSL",
               "kafka_ssl_ca_location": str(tls_broker.ca)}
    ids = [str(uuid.uuid4()) for _ in range(20)]
    with engine.begin() as conn:
        for agg in ids:
            emit(conn, aggregate_type="parcel", aggregate_id=agg, type="parcel.sent",
                 payload={"to": "dock 4"})
    relay = relays("poll", **{f"OUTBOX_{k.upper()}": v for k, v in secured.items()})
    relay.wait_role("leader", timeout_s=60)
    projector = CollectingProjector()
    runtime = ConsumerRuntime(relay_settings.model_copy(update={
        **secured, "projector_session_timeout_ms": 6000}), projector)
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: projector.applied == set(ids), timeout_s=90,
                 what="every event relayed and consumed over TLS")
    finally:
        runtime.stop.set()
        thread.join(30)
    # Relay, projector and their admin clients all came in through the TLS listener.
    assert tls_broker.proxy.handshakes >= 2


@pytest.mark.parametrize("trusted", ["another CA", "the system's CAs"])
def test_untrusted_broker_certificate_is_refused_with_the_reason(tls_broker, trusted):
    ca = str(tls_broker.other_ca) if trusted == "another CA" else None
    settings = Settings(kafka_bootstrap=tls_broker.bootstrap, kafka_security_protocol="SSL",
                        kafka_ssl_ca_location=ca, kafka_properties={"log_level": "0"})
    errors: list[KafkaError] = []
    admin = make_admin(settings, error_cb=errors.append)
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)
    admin.poll(1)  # serves the error callback
    assert any("certificate verify failed" in e.str() for e in errors), errors
    # `outbox topics` (and what else reads the cluster's metadata) says why.
    with pytest.raises(KafkaUnreachable, match="certificate verify failed"):
        describe_topics(settings, timeout_s=3)
    assert tls_broker.proxy.handshakes == 0


def test_relay_with_an_untrusted_certificate_logs_the_reason(
        relays, engine, tls_broker):
    with engine.begin() as conn:
        emit(conn, aggregate_type="parcel", aggregate_id=str(uuid.uuid4()),
             type="parcel.sent", payload={})
    relay = relays("poll", OUTBOX_KAFKA_BOOTSTRAP=tls_broker.bootstrap,
                   OUTBOX_KAFKA_SECURITY_PROTOCOL="SSL",
                   OUTBOX_KAFKA_SSL_CA_LOCATION=str(tls_broker.other_ca))
    wait_for(lambda: "certificate verify failed" in relay.log_path.read_text(errors="replace"),
             timeout_s=60, what="the relay's log naming the certificate failure")
    assert tls_broker.proxy.handshakes == 0


def test_sasl_credentials_reach_a_broker_that_requires_them(tmp_path):
    # Tansu checks SCRAM credentials against the users in its storage: an unknown user's
    # exchange is refused by the broker itself, which only a real SASL exchange reaches.
    broker = OwnTansu(tmp_path / "tansu.log", None, "--authentication")
    broker.start()
    try:
        settings = Settings(kafka_bootstrap=f"127.0.0.1:{broker.port}",
                            kafka_security_protocol="SASL_PLAINTEXT",
                            kafka_sasl_mechanism="SCRAM-SHA-512",
                            kafka_sasl_username="nobody", kafka_sasl_password="wrong",
                            kafka_properties={"log_level": "0"})
        errors: list[KafkaError] = []
        admin = make_admin(settings, error_cb=errors.append)
        with pytest.raises(KafkaException):
            admin.list_topics(timeout=5)
        admin.poll(1)  # serves the error callback
        assert any("SASL SCRAM authentication failed" in e.str() for e in errors), errors
    finally:
        broker.stop()
