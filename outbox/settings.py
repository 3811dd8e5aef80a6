"""Configuration of the sidecar core, read from the environment (`OUTBOX_*`; `make up` writes
the local stack's values to `.outbox/env`).

Every address is configuration, so the same code runs against Apache Kafka and a managed
PostgreSQL in production. Packages built on the core extend `Settings` with their own fields.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings of the outbox, its relays and its Kafka topics."""

    model_config = SettingsConfigDict(env_prefix="OUTBOX_", extra="ignore")

    database_url: str = "postgresql+psycopg://outbox:outbox@127.0.0.1:15432/outbox"
    db_schema: str = Field(default="public", description="schema holding the outbox tables")
    kafka_bootstrap: str = "127.0.0.1:19092"
    topic_prefix: str = "outbox"
    topic_partitions: int = 3

    relay_batch_size: int = 10000
    relay_poll_interval_s: float = Field(
        default=1.0, description="fallback wake-up when no NOTIFY arrives"
    )
    relay_heartbeat_s: float = Field(
        default=1.0, description="confirm the acknowledged position to the slot (and move an "
        "idle slot along, so it pins no WAL) this often",
    )
    relay_lock_poll_s: float = Field(default=1.0, description="standby's lock retry interval")
    relay_backfill_margin_s: float = Field(
        default=3600.0,
        description="a recreated slot re-sends rows created this long before the last "
        "acknowledged commit: the longest transaction it can not miss",
    )
    outbox_retention_s: int = Field(
        default=86400, description="the janitor deletes published rows older than this"
    )
    janitor_interval_s: float = 60.0


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The core settings of this process, read once from the environment."""
    return Settings()
