"""The Kafka client factory and its security settings, with no server: which librdkafka
properties each client gets, the pass-through and its precedence, secrets kept out of
representations, and configurations refused before the first connection."""

from __future__ import annotations

import os

import pytest
import trustme
from confluent_kafka import KafkaException
from pydantic import ValidationError

from outbox.kafka import (
    PRODUCER_ROLES,
    admin_config,
    consumer_config,
    make_admin,
    make_producer,
    producer_config,
    reader_config,
)
from outbox.kafka_settings import PROPERTIES_ENV_PREFIX, property_name
from outbox.settings import Settings
from relays.publisher import BatchPublisher

SECRET_PASSWORD = "pw-5f1c9e"
SECRET_KEY_PASSWORD = "kp-83ad20"
SECRET_PASSTHROUGH = "oauth-77e3b1"
# Nothing listens there; log_level 0 keeps librdkafka quiet about it.
NOWHERE = {"kafka_bootstrap": "127.0.0.1:9", "kafka_properties": {"log_level": "0"}}


@pytest.fixture(autouse=True)
def _no_passthrough_from_outside(monkeypatch):
    """Each test sets the pass-through variables it is about, and no others."""
    for key in list(os.environ):
        if key.upper().startswith(PROPERTIES_ENV_PREFIX):
            monkeypatch.delenv(key)


def secured(**extra) -> Settings:
    return Settings(kafka_bootstrap="broker-1:9096,broker-2:9096",
                    kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                    kafka_sasl_username="relay", kafka_sasl_password=SECRET_PASSWORD,
                    kafka_ssl_ca_location="/etc/kafka/ca.pem",
                    kafka_ssl_certificate_location="/etc/kafka/client.pem",
                    kafka_ssl_key_location="/etc/kafka/client.key",
                    kafka_ssl_key_password=SECRET_KEY_PASSWORD, **extra)


def test_security_fields_reach_every_client_under_librdkafka_names():
    s = secured()
    expected = {
        "bootstrap.servers": "broker-1:9096,broker-2:9096",
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "relay", "sasl.password": SECRET_PASSWORD,
        "ssl.ca.location": "/etc/kafka/ca.pem",
        "ssl.certificate.location": "/etc/kafka/client.pem",
        "ssl.key.location": "/etc/kafka/client.key", "ssl.key.password": SECRET_KEY_PASSWORD,
    }
    for config in (producer_config(s), producer_config(s, "relay"),
                   consumer_config(s, "g", 6000), reader_config(s, "g"), admin_config(s)):
        assert {k: config.get(k) for k in expected} == expected


def test_plaintext_sets_no_security_property_but_the_protocol():
    config = admin_config(Settings(kafka_bootstrap="127.0.0.1:19092"))
    assert config == {"bootstrap.servers": "127.0.0.1:19092", "security.protocol": "PLAINTEXT"}


def test_relay_role_is_the_only_source_of_the_relays_queue_and_timeout():
    s = Settings(**NOWHERE)
    seen: list[dict] = []

    def capture(config: dict):
        seen.append(config)
        return make_producer(s)

    publisher = BatchPublisher(s, stop_requested=lambda: True, producer_factory=capture)
    publisher.close()
    relay = PRODUCER_ROLES["relay"]
    assert {k: seen[0][k] for k in relay} == relay
    assert relay["message.timeout.ms"] == 0
    assert relay["queue.buffering.max.messages"] != PRODUCER_ROLES["default"][
        "queue.buffering.max.messages"]
    # Nothing else of the producer differs between the roles but the role's own settings.
    shared = {k: v for k, v in producer_config(s).items() if k not in PRODUCER_ROLES["default"]}
    assert {k: seen[0][k] for k in shared} == shared


@pytest.mark.parametrize(("suffix", "name"), [
    ("SOCKET_KEEPALIVE_ENABLE", "socket.keepalive.enable"),
    ("ssl_endpoint_identification_algorithm", "ssl.endpoint.identification.algorithm"),
    ("LOG_LEVEL", "log_level"),
    ("DEBUG", "debug"),
])
def test_passthrough_variable_names_become_librdkafka_names(suffix, name):
    assert property_name(suffix) == name


def test_passthrough_from_the_environment_is_applied_last(monkeypatch):
    monkeypatch.setenv(f"{PROPERTIES_ENV_PREFIX}SOCKET_KEEPALIVE_ENABLE", "true")
    monkeypatch.setenv(f"{PROPERTIES_ENV_PREFIX}MESSAGE_TIMEOUT_MS", "5000")
    monkeypatch.setenv(f"{PROPERTIES_ENV_PREFIX}SASL_MECHANISM", "OAUTHBEARER")
    s = secured()
    assert {k: v.get_secret_value() for k, v in s.kafka_properties.items()} == {
        "socket.keepalive.enable": "true", "message.timeout.ms": "5000",
        "sasl.mechanism": "OAUTHBEARER"}
    # Over the typed fields, the role's settings and the caller's own.
    config = producer_config(s, "relay", **{"message.timeout.ms": 1})
    assert config["message.timeout.ms"] == "5000"
    assert config["sasl.mechanism"] == "OAUTHBEARER"
    assert reader_config(s, "g")["socket.keepalive.enable"] == "true"


def test_environment_wins_over_the_mapping_given_otherwise(monkeypatch):
    monkeypatch.setenv(f"{PROPERTIES_ENV_PREFIX}CLIENT_ID", "from-env")
    s = Settings(kafka_properties={"client.id": "from-file", "linger.ms": 20,
                                   "enable.ssl.certificate.verification": True})
    assert admin_config(s)["client.id"] == "from-env"
    # File values are typed (TOML); librdkafka reads text, booleans as true/false.
    assert producer_config(s)["linger.ms"] == "20"
    assert admin_config(s)["enable.ssl.certificate.verification"] == "true"


def test_secrets_stay_out_of_representations():
    s = secured(kafka_properties={"sasl.oauthbearer.client.secret": SECRET_PASSTHROUGH})
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump())):
        for secret in (SECRET_PASSWORD, SECRET_KEY_PASSWORD, SECRET_PASSTHROUGH):
            assert secret not in text
    assert admin_config(s)["sasl.oauthbearer.client.secret"] == SECRET_PASSTHROUGH


@pytest.mark.parametrize(("fields", "named"), [
    ({"kafka_security_protocol": "SASL_SSL"}, "OUTBOX_KAFKA_SASL_MECHANISM"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN",
      "kafka_sasl_username": "u"}, "OUTBOX_KAFKA_SASL_PASSWORD"),
    ({"kafka_sasl_username": "u"}, "OUTBOX_KAFKA_SASL_USERNAME"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN",
      "kafka_sasl_username": "u", "kafka_sasl_password": "p",
      "kafka_ssl_ca_location": "/ca.pem"}, "OUTBOX_KAFKA_SSL_CA_LOCATION"),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_certificate_location": "/c.pem"},
     "OUTBOX_KAFKA_SSL_KEY_LOCATION"),
    ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI",
      "kafka_sasl_username": "u", "kafka_sasl_password": "p"}, "kafka_sasl_mechanism"),
])
def test_inconsistent_security_is_refused_naming_the_setting(fields, named):
    with pytest.raises(ValidationError, match=named):
        Settings(**fields)


def test_security_variables_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("OUTBOX_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("OUTBOX_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("OUTBOX_KAFKA_SASL_USERNAME", "$ConnectionString")
    monkeypatch.setenv("OUTBOX_KAFKA_SASL_PASSWORD", SECRET_PASSWORD)
    config = admin_config(Settings())
    assert (config["security.protocol"], config["sasl.mechanism"], config["sasl.username"],
            config["sasl.password"]) == ("SASL_SSL", "PLAIN", "$ConnectionString",
                                         SECRET_PASSWORD)


def test_librdkafka_takes_the_secured_configuration(tmp_path):
    # A real client accepts every property the factory sets (none misspelt or misplaced) and
    # loads the files named (it would refuse a missing or unreadable one).
    ca = trustme.CA()
    client = ca.issue_cert("relay@example.com")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    client.cert_chain_pems[0].write_to_path(tmp_path / "client.pem")
    client.private_key_pem.write_to_path(tmp_path / "client.key")
    s = Settings(**NOWHERE, kafka_security_protocol="SASL_SSL",
                 kafka_sasl_mechanism="SCRAM-SHA-256", kafka_sasl_username="relay",
                 kafka_sasl_password=SECRET_PASSWORD,
                 kafka_ssl_ca_location=str(tmp_path / "ca.pem"),
                 kafka_ssl_certificate_location=str(tmp_path / "client.pem"),
                 kafka_ssl_key_location=str(tmp_path / "client.key"))
    make_admin(s)
    make_producer(s, "relay")
    with pytest.raises(KafkaException, match=r"ssl\.ca\.location"):
        make_admin(s.model_copy(update={"kafka_ssl_ca_location": str(tmp_path / "none.pem")}))


def test_librdkafka_rejects_what_the_passthrough_gets_wrong():
    with pytest.raises(KafkaException, match="Unsupported SASL mechanism: NO-SUCH-MECHANISM"):
        make_producer(Settings(kafka_security_protocol="SASL_SSL",
                               kafka_sasl_mechanism="PLAIN", kafka_sasl_username="u",
                               kafka_sasl_password="p",
                               kafka_properties={"sasl.mechanism": "NO-SUCH-MECHANISM"}))
    with pytest.raises(KafkaException, match=r"property: \"no\.such\.property\""):
        make_admin(Settings(kafka_properties={"no.such.property": "1"}))


def test_consumers_read_only_committed_transactions():
    s = Settings(**NOWHERE)
    assert consumer_config(s, "g", 6000)["isolation.level"] == "read_committed"
    assert reader_config(s, "g")["isolation.level"] == "read_committed"


def test_the_exactly_once_relay_produces_in_transactions_no_message_outliving_one():
    s = Settings(**NOWHERE, kafka_idempotence=False, relay_transaction_timeout_ms=30_000)
    seen: list[dict] = []

    def capture(config: dict):
        seen.append(config)
        return make_producer(s)

    publisher = BatchPublisher(s, stop_requested=lambda: True, producer_factory=capture,
                               transactional_id="outbox-relay.db.slot")
    publisher.close()
    config = seen[0]
    assert config["transactional.id"] == "outbox-relay.db.slot"
    # Transactions need idempotence, whatever the deployment's setting for other producers.
    assert config["enable.idempotence"] is True
    assert config["max.in.flight.requests.per.connection"] == 1  # as the deployment's
    assert config["message.timeout.ms"] == config["transaction.timeout.ms"] == 30_000
