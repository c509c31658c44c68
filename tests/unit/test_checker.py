"""The exhaustive checker covers its bounded space and catches planted bugs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sagakit import SagaDefinition, Step, StepKind, command
from sagakit.core import machine as machine_module
from sagakit.core.instance import StepStatus
from sagakit.testing.checker import Bounds, Checker, checkout_checker


def three_steps() -> SagaDefinition:
    return SagaDefinition(
        "ship",
        [
            Step(
                "reserve",
                command("stock", "Reserve"),
                command("stock", "Release"),
                status="RESERVING",
            ),
            Step("charge", command("pay", "Charge"), kind=StepKind.PIVOT, status="CHARGING"),
            Step("notify", command("mail", "Notify"), kind=StepKind.RETRIABLE),
        ],
    )


def test_checkout_two_sagas_last_item_one_fault_has_no_violation() -> None:
    report = checkout_checker(Bounds(sagas=2, stock=1, faults=1, failures=0)).run()
    assert report.violations == []
    assert report.complete
    assert report.states > 10_000
    # Exactly one of the two can have the last item.
    assert all("SUCCEEDED,SUCCEEDED" not in k for k in report.outcomes)
    assert "COMPENSATED,SUCCEEDED" in report.outcomes


def test_cancels_failures_and_faults_on_a_small_saga() -> None:
    report = Checker(
        three_steps(),
        Bounds(sagas=1, faults=2, failures=1, cancels=1),
        reserve="Reserve",
        release="Release",
    ).run()
    assert report.violations == []
    assert report.complete
    # Every kind of ending is reachable within these bounds.
    assert set(report.outcomes) >= {"SUCCEEDED", "COMPENSATED", "FAILED_NEEDS_MANUAL"}


def test_the_state_count_is_stable() -> None:
    bounds = Bounds(sagas=1, faults=1, failures=1)
    a = Checker(three_steps(), bounds).run()
    b = Checker(three_steps(), bounds).run()
    assert (a.states, a.transitions, a.final_states) == (b.states, b.transitions, b.final_states)


@pytest.fixture
def forget_unknown_steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Plant a bug: compensation skips steps whose outcome is unknown."""
    original = machine_module._Transition.next_compensation

    def buggy(self: Any, start: int) -> None:
        for st in self.inst.steps:
            if st.status in (StepStatus.UNKNOWN, StepStatus.RUNNING, StepStatus.WAITING_RETRY):
                st.status = StepStatus.FAILED
        original(self, start)

    monkeypatch.setattr(machine_module._Transition, "next_compensation", buggy)
    yield


@pytest.mark.usefixtures("forget_unknown_steps")
def test_planted_bug_not_compensating_unknown_outcomes_is_caught() -> None:
    report = Checker(three_steps(), Bounds(sagas=1, faults=0, failures=0, cancels=1)).run()
    assert report.violations, "the checker missed a planted bug"
    assert "effect of reserve remains" in report.violations[0]
    # The trace tells the story: a cancel lands while the reservation is on its way.
    assert any(line.startswith("cancel") for line in report.trace)


class NoTombstones(Checker):
    """Plant a bug in the participant model: a compensation leaves no tombstone."""

    def _compensations(self, w: Any, env: Any, endpoint: str, key: str, records: Any) -> Any:
        for label, fn in super()._compensations(w, env, endpoint, key, records):

            def untombed(fn: Any = fn) -> Any:
                out = fn()
                tomb = {r for r in out.records if r[2]}
                return out._replace(records=out.records - tomb)

            yield label, untombed


def test_planted_bug_missing_tombstone_is_caught() -> None:
    report = NoTombstones(three_steps(), Bounds(sagas=1, faults=1, failures=0, cancels=1)).run()
    assert report.violations
    assert report.trace
