"""How far behind its topics a projector is, as of now (`outbox_projector_lag_seconds`).

The gauge is computed when it is scraped, from what the consumer loop last noted, so it
neither freezes between batches nor while a batch waits for its sink:

- a batch in hand (being applied, retried while its store is down, or handed back to be
  read again): now minus the occurred_at of its oldest event, growing for as long as that
  event is not applied;
- caught up (the last poll found nothing new): 0;
- between two batches of a backlog: now minus the occurred_at of the last event applied.

A consumer that cannot fetch at all (the broker unreachable) finds nothing new and reads 0:
the relay cannot publish either then, and `OutboxProjectorStalled` covers a projector that
applies nothing while events are published.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime


class LagClock:
    """The lag of one projector; `seconds()` is the gauge's value at any moment."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._oldest_in_hand: float | None = None
        self._last_applied: float | None = None
        self._caught_up = True  # nothing seen yet is nothing to be behind

    def batch_received(self, occurred: Iterable[datetime]) -> None:
        """A batch of events with these occurred_at times is in hand, none applied yet (a
        batch handed back and read again keeps the oldest time)."""
        stamps = [moment.timestamp() for moment in occurred]
        if stamps:
            held = self._oldest_in_hand
            self._oldest_in_hand = min(stamps) if held is None else min(held, *stamps)
            self._caught_up = False

    def batch_applied(self, occurred: Iterable[datetime]) -> None:
        """The batch in hand is applied and committed."""
        stamps = [moment.timestamp() for moment in occurred]
        if stamps:
            self._last_applied = max(stamps)
        self._oldest_in_hand = None

    def revoked(self) -> None:
        """The partitions were taken away: what was in hand is the new owner's to apply."""
        self._oldest_in_hand = None
        self._caught_up = True

    def nothing_new(self) -> None:
        """A poll found no message: the projector has read everything published to it
        (unless a batch handed back is still to be read again)."""
        if self._oldest_in_hand is None:
            self._caught_up = True

    def seconds(self) -> float:
        """The lag now: 0 when caught up, else the age of the oldest event not applied."""
        since = self._oldest_in_hand
        if since is None and not self._caught_up:
            since = self._last_applied
        return 0.0 if since is None else max(0.0, self._clock() - since)
