"""Collects each scenario's outcome; a full run (`make faults`) writes the report."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.faults.report import FULL, Outcome, write_report


@pytest.fixture(scope="session")
def outcomes() -> Iterator[list[Outcome]]:
    """The outcomes of the session's scenarios, written to bench/results/ after a full run."""
    got: list[Outcome] = []
    yield got
    if FULL and got:
        write_report(got)


@pytest.fixture
def record(outcomes: list[Outcome]) -> Callable[[Outcome], None]:
    """`record(outcome)`: keep it for the report and fail the test on a broken invariant."""

    def add(outcome: Outcome) -> None:
        outcomes.append(outcome)
        print(outcome)
        assert not outcome.problems(), outcome.problems()

    return add
