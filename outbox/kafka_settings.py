"""How every Kafka client of the sidecar reaches a secured cluster: TLS, SASL and a
pass-through for any other librdkafka property.

The typed fields cover what managed clusters ask for (MSK, Confluent Cloud, Aiven, a
self-run cluster with its own CA). Anything else goes through `kafka_properties`, from the
environment as `OUTBOX_KAFKA_PROPERTIES__<NAME>` (upper case, dots written as single
underscores: `OUTBOX_KAFKA_PROPERTIES__SOCKET_KEEPALIVE_ENABLE=true` is
`socket.keepalive.enable`), or from the configuration file's mapping. The pass-through is
applied last by the client factory (`outbox/kafka.py`), so it can override anything.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

PROPERTIES_ENV_PREFIX = "OUTBOX_KAFKA_PROPERTIES__"
# librdkafka properties whose names hold an underscore: their environment form cannot be told
# from a dotted name, so they are spelt out.
_UNDERSCORE_NAMES = frozenset({"log_level"})


def property_name(env_suffix: str) -> str:
    """The librdkafka property of an `OUTBOX_KAFKA_PROPERTIES__<NAME>` variable's <NAME>
    (`SOCKET_KEEPALIVE_ENABLE` -> `socket.keepalive.enable`)."""
    name = env_suffix.strip().lower()
    if not name:
        raise ValueError(f"{PROPERTIES_ENV_PREFIX} names no librdkafka property")
    return name if name in _UNDERSCORE_NAMES else name.replace("_", ".")


def properties_from_environ(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Every `OUTBOX_KAFKA_PROPERTIES__<NAME>` variable as a librdkafka property."""
    environ = dict(os.environ if environ is None else environ)
    prefix = PROPERTIES_ENV_PREFIX
    # An empty variable counts as unset, as for every other setting.
    return {property_name(key[len(prefix):]): value for key, value in environ.items()
            if key.upper().startswith(prefix) and value != ""}


def _property_value(value: Any) -> Any:
    """librdkafka reads every property as text; booleans as `true`/`false`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


class KafkaSecuritySettings(BaseSettings):
    """TLS, SASL and pass-through settings shared by every producer, consumer and admin
    client (the settings class of the core inherits them)."""

    kafka_security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT",
        description="security.protocol: SSL for TLS, SASL_SSL for TLS with SASL (MSK, "
        "Confluent Cloud), SASL_PLAINTEXT for SASL without TLS")
    kafka_sasl_mechanism: SaslMechanism | None = Field(
        default=None, description="sasl.mechanism; required with SASL_SSL or SASL_PLAINTEXT")
    kafka_sasl_username: str | None = Field(default=None, description="sasl.username")
    kafka_sasl_password: SecretStr | None = Field(default=None, description="sasl.password")
    kafka_ssl_ca_location: str | None = Field(
        default=None,
        description="ssl.ca.location: PEM file of the CA that signed the brokers' "
        "certificates; unset, the system's trusted CAs")
    kafka_ssl_certificate_location: str | None = Field(
        default=None, description="ssl.certificate.location: client certificate (PEM) for "
        "mutual TLS")
    kafka_ssl_key_location: str | None = Field(
        default=None, description="ssl.key.location: the client certificate's private key")
    kafka_ssl_key_password: SecretStr | None = Field(
        default=None, description="ssl.key.password: the private key's passphrase")
    # Values are kept as secrets: a pass-through property may be one (sasl.jaas.config,
    # sasl.oauthbearer.client.secret, ssl.key.pem), and the settings cannot tell which.
    kafka_properties: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="any librdkafka property, applied last (over every other setting); "
        "environment: OUTBOX_KAFKA_PROPERTIES__<NAME>, dots as single underscores")

    @model_validator(mode="before")
    @classmethod
    def _properties_from_environment(cls, data: Any) -> Any:
        """Add the `OUTBOX_KAFKA_PROPERTIES__*` variables; over a mapping given otherwise
        (the configuration file), as the environment wins over the file."""
        from_env = properties_from_environ()
        if not from_env or not isinstance(data, dict):
            return data
        given = data.get("kafka_properties") or {}
        if isinstance(given, str):
            # A JSON value of OUTBOX_KAFKA_PROPERTIES itself is decoded by the field.
            return data
        return {**data, "kafka_properties": {**given, **from_env}}

    @field_validator("kafka_properties", mode="before")
    @classmethod
    def _property_texts(cls, value: Any) -> Any:
        """Names as librdkafka spells them, values as text."""
        if not isinstance(value, dict):
            return value
        # A name with no dot came from an environment-style key (`socket_keepalive_enable`).
        return {(name if "." in name else property_name(name)): _property_value(v)
                for name, v in ((str(k).strip(), v) for k, v in value.items())}

    @model_validator(mode="after")
    def _consistent_security(self) -> KafkaSecuritySettings:
        """Refuse a combination that would otherwise fail at the first connection, or that
        would leave a configured secret unused."""
        protocol = self.kafka_security_protocol
        sasl = protocol.startswith("SASL_")
        tls = protocol.endswith("SSL")
        if sasl:
            missing = [name for name, value in (
                ("OUTBOX_KAFKA_SASL_MECHANISM", self.kafka_sasl_mechanism),
                ("OUTBOX_KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                ("OUTBOX_KAFKA_SASL_PASSWORD", self.kafka_sasl_password)) if value is None]
            if missing:
                raise ValueError(f"OUTBOX_KAFKA_SECURITY_PROTOCOL={protocol} needs "
                                 f"{', '.join(missing)}")
        else:
            unused = [name for name, value in (
                ("OUTBOX_KAFKA_SASL_MECHANISM", self.kafka_sasl_mechanism),
                ("OUTBOX_KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                ("OUTBOX_KAFKA_SASL_PASSWORD", self.kafka_sasl_password)) if value is not None]
            if unused:
                raise ValueError(f"{', '.join(unused)} set, but OUTBOX_KAFKA_SECURITY_PROTOCOL="
                                 f"{protocol} uses no SASL: use SASL_SSL or SASL_PLAINTEXT")
        if not tls:
            unused = [name for name, value in (
                ("OUTBOX_KAFKA_SSL_CA_LOCATION", self.kafka_ssl_ca_location),
                ("OUTBOX_KAFKA_SSL_CERTIFICATE_LOCATION", self.kafka_ssl_certificate_location),
                ("OUTBOX_KAFKA_SSL_KEY_LOCATION", self.kafka_ssl_key_location),
                ("OUTBOX_KAFKA_SSL_KEY_PASSWORD", self.kafka_ssl_key_password))
                if value is not None]
            if unused:
                raise ValueError(f"{', '.join(unused)} set, but OUTBOX_KAFKA_SECURITY_PROTOCOL="
                                 f"{protocol} uses no TLS: use SSL or SASL_SSL")
        if (self.kafka_ssl_certificate_location is None) != (self.kafka_ssl_key_location is None):
            raise ValueError("mutual TLS needs both OUTBOX_KAFKA_SSL_CERTIFICATE_LOCATION and "
                             "OUTBOX_KAFKA_SSL_KEY_LOCATION")
        return self

    def kafka_security_config(self) -> dict[str, str]:
        """The librdkafka properties of the typed security fields (only those set)."""
        secret = {"sasl.password": self.kafka_sasl_password,
                  "ssl.key.password": self.kafka_ssl_key_password}
        plain = {"sasl.mechanism": self.kafka_sasl_mechanism,
                 "sasl.username": self.kafka_sasl_username,
                 "ssl.ca.location": self.kafka_ssl_ca_location,
                 "ssl.certificate.location": self.kafka_ssl_certificate_location,
                 "ssl.key.location": self.kafka_ssl_key_location}
        return {"security.protocol": self.kafka_security_protocol,
                **{k: v for k, v in plain.items() if v is not None},
                **{k: v.get_secret_value() for k, v in secret.items() if v is not None}}

    def kafka_passthrough_config(self) -> dict[str, str]:
        """The pass-through properties, as librdkafka reads them."""
        return {name: value.get_secret_value() for name, value in self.kafka_properties.items()}
