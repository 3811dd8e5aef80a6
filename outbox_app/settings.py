"""Settings of the example application."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr

from projectors.settings import ProjectorSettings


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
