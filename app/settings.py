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


@lru_cache(maxsize=1)
def get_app_settings() -> AppSettings:
    """The application's settings, read once from the environment."""
    return AppSettings()
