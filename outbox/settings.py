"""Configuration of the sidecar core, read from the environment (`OUTBOX_*`; `make up` writes
the local stack's values to `.outbox/env`), from `<VARIABLE>_FILE` for secrets and from a
TOML configuration file (`OUTBOX_CONFIG_FILE`; outbox/settings_sources.py).

Every address is configuration, so the same code runs against Apache Kafka and a managed
PostgreSQL in production, and none has a default: a process that misses one stops, naming it,
rather than reach for 127.0.0.1. Packages built on the core extend `Settings` with their own
fields and register the class in the entry-point group `outbox.settings`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal

import orjson
from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from outbox.kafka_settings import KafkaSecuritySettings
from outbox.settings_sources import SECRET, ConfigFileSource, SecretFileSource

WireFormat = Literal["envelope", "debezium", "cloudevents-binary", "cloudevents-structured"]


class Settings(KafkaSecuritySettings):
    """Settings of the outbox, its relays and its Kafka topics."""

    # An empty variable counts as unset (a required setting is then missing, not ""); an
    # unknown keyword argument is an error. Unknown variables: outbox/settings_registry.py.
    model_config = SettingsConfigDict(env_prefix="OUTBOX_", extra="forbid",
                                      env_ignore_empty=True)

    database_url: Annotated[str, SECRET] = Field(
        description="SQLAlchemy URL of the database, "
        "`postgresql+psycopg://user:password@host:port/db`")
    db_schema: str = Field(default="public", description="schema holding the outbox tables")
    kafka_bootstrap: str = Field(
        description="Kafka bootstrap servers, `host:port[,host:port...]`")
    kafka_idempotence: bool = Field(
        default=True,
        description="idempotent producers; turn off for a broker whose idempotence loses a "
        "batch in flight at its restart (Tansu 0.6, see the broker caveats of the relays' "
        "documentation): one request in flight per "
        "connection then keeps the order, and a retry may duplicate")
    topic_prefix: str = Field(
        default="outbox", description="event topics are `<topic_prefix>.<aggregate_type>`")
    emit_mode: Literal["table", "message"] = Field(
        default="table",
        description="table: `emit`/`outbox_emit` insert an outbox row; message: they write "
        "a transactional logical-decoding message (pg_logical_emit_message) and no row")
    wire_format: WireFormat = Field(
        default="envelope", description="how events are written to Kafka (per deployment)")
    # NoDecode: the validator reads the operator-friendly form as well as JSON.
    wire_formats: Annotated[dict[str, WireFormat], NoDecode] = Field(
        default_factory=dict,
        description="per aggregate type, overriding wire_format: JSON "
        '(\'{"order": "debezium"}\') or `order=debezium,invoice=envelope`')
    debezium_topic_replacement: str = Field(
        default="outbox.event.${routedByValue}",
        description="topic of the debezium format, as the outbox event router's "
        "route.topic.replacement (${routedByValue} = the aggregate type)")
    cloudevents_source: str | None = Field(
        default=None, description="the CloudEvents `source` attribute (default: "
        "/outbox-sidecar/<db_schema>)")
    topic_partitions: int = Field(default=3, ge=1,
                                  description="partitions of each new event topic")
    topic_replication_factor: int | None = Field(
        default=None, ge=1,
        description="replicas of each new topic; unset: min(3, brokers in the cluster metadata)",
    )
    topic_min_insync_replicas: int | None = Field(
        default=None, ge=1,
        description="min.insync.replicas of each new topic (with acks=all, a write needs this "
        "many replicas); unset: min(2, replication factor)",
    )
    topic_retention_ms: int = Field(
        default=-1, ge=-1,
        description="retention.ms of each new topic; -1 keeps every event forever, because the "
        "views are rebuilt by replaying the topics from offset 0: an event the log dropped is "
        "missing from every rebuilt view (why not compaction: outbox/kafka.py)",
    )

    relay_batch_size: int = Field(
        default=10000, ge=1, description="most events the relay reads and publishes at once")
    relay_poll_interval_s: float = Field(
        default=1.0, description="fallback wake-up when no NOTIFY arrives"
    )
    relay_heartbeat_s: float = Field(
        default=1.0, description="confirm the acknowledged position to the slot (and move an "
        "idle slot along, so it pins no WAL) this often",
    )
    relay_exactly_once: bool = Field(
        default=False,
        description="publish in Kafka transactions that hold whole PostgreSQL transactions, "
        "with the position reached committed in the same transaction: a read_committed "
        "consumer sees every event once, across relay crashes and restarts (see the "
        "documentation's \"Exactly-once publication\")")
    relay_transactional_id: str | None = Field(
        default=None,
        description="transactional.id of the exactly-once relay, also the consumer group "
        "that holds its position; default outbox-relay.<database>.<slot>. Unique per outbox "
        "on one Kafka cluster: a second relay with the same id is fenced")
    relay_positions_topic: str = Field(
        default="outbox-relay-positions",
        description="exactly-once: the topic of the position records, one per Kafka "
        "transaction, keyed by the transactional id (as Kafka Connect's offsets topic)")
    relay_transaction_max_events: int = Field(
        default=100_000, ge=1,
        description="exactly-once: a PostgreSQL transaction with more events than this is "
        "published in several Kafka transactions of this many events, each with its "
        "position (rows held so far), so a restart resumes inside it without a repeat")
    relay_transaction_timeout_ms: int = Field(
        default=60_000, ge=1000,
        description="exactly-once: transaction.timeout.ms of the relay's producer; a batch "
        "not acknowledged within it is aborted and published again from the position")
    relay_lock_poll_s: float = Field(default=1.0, description="standby's lock retry interval")
    relay_backfill_margin_s: float = Field(
        default=3600.0,
        description="a recreated slot re-sends rows created this long before the last "
        "acknowledged commit: the longest transaction it can not miss",
    )
    outbox_retention_s: int = Field(
        default=86400, description="the janitor deletes published rows older than this"
    )
    processed_event_retention_s: int = Field(
        default=7 * 86400,
        description="tracking records older than this are deleted: a redelivery comes within "
        "minutes, and an older event finds its aggregate moved on (workers act on the "
        "current version only)",
    )
    janitor_interval_s: float = Field(
        default=60.0, description="the janitor's pause between two clean-ups")

    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP collector (e.g. http://127.0.0.1:4318; spans go to "
        "<url>/v1/traces). Unset, and without OTEL_EXPORTER_OTLP_ENDPOINT: no spans are "
        "recorded, at no cost")
    metrics_host: str = Field(
        default="127.0.0.1",
        description="the address every long-running process serves /metrics, /healthz and "
        "/readyz on, unless given --metrics-host (0.0.0.0 in a container, so that Prometheus "
        "and the probes reach it)")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then `<VARIABLE>_FILE`, then the configuration
        file, then defaults (no .env file or secrets directory)."""
        return (init_settings, env_settings, SecretFileSource(settings_cls),
                ConfigFileSource(settings_cls))

    @field_validator("wire_formats", mode="before")
    @classmethod
    def _per_aggregate_type(cls, value: Any) -> Any:
        """JSON, or `type=format` pairs separated by commas."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("{"):
            return orjson.loads(text)
        pairs = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            aggregate_type, sep, fmt = item.partition("=")
            if not sep or not aggregate_type.strip():
                raise ValueError(f"{item!r} is not `aggregate_type=format`")
            pairs[aggregate_type.strip()] = fmt.strip()
        return pairs


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The core settings of this process, read once from the environment and the
    configuration file."""
    return Settings()
