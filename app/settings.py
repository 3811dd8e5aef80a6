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


@lru_cache(maxsize=1)
def get_app_settings() -> AppSettings:
    """The application's settings, read once from the environment."""
    return AppSettings()
