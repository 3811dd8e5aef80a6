"""Settings of the consumer runtime: what any projector runs with."""

from __future__ import annotations

from pydantic import Field

from outbox.settings import Settings


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
