"""The exhaustive checker covers its bounded space and catches planted bugs."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sagakit import SagaDefinition, Step, StepKind, command
from sagakit.core import machine as machine_module
from sagakit.core.instance import StepStatus
from sagakit.core.machine import Machine
from sagakit.testing.check_suite import CHECK_SUITE, run_suite
from sagakit.testing.checker import ORCHESTRATOR, Bounds, Checker, checkout_checker
from sagakit.testing.coverage import KINDS


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


def test_checkout_two_sagas_last_item_has_no_violation() -> None:
    report = checkout_checker(Bounds(sagas=2, stock=1, faults=0, failures=1, attempts=2)).run()
    assert report.violations == []
    assert report.complete
    assert report.states > 3_000
    # Exactly one of the two can have the last item.
    assert all("SUCCEEDED,SUCCEEDED" not in k for k in report.outcomes)
    assert "COMPENSATED,SUCCEEDED" in report.outcomes


def test_cancels_failures_and_faults_on_a_small_saga() -> None:
    report = Checker(
        three_steps(),
        Bounds(sagas=1, faults=1, failures=1, cancels=1, attempts=2),
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

    def _compensations(
        self, w: Any, env: Any, endpoint: str, key: str, records: Any, gen: int
    ) -> Any:
        for label, fn in super()._compensations(w, env, endpoint, key, records, gen):

            def untombed(fn: Any = fn) -> Any:
                out = fn()
                tomb = {r for r in out.records if r[2]}
                return out._replace(records=out.records - tomb)

            yield label, untombed


def test_planted_bug_missing_tombstone_is_caught() -> None:
    report = NoTombstones(three_steps(), Bounds(sagas=1, faults=1, failures=0, cancels=1)).run()
    assert report.violations
    assert report.trace


MACHINE_SOURCE = Path(machine_module.__file__).read_text(encoding="utf-8")


def planted_machine(monkeypatch: pytest.MonkeyPatch, old: str, new: str) -> type[Machine]:
    """``Machine`` from a copy of machine.py with ``old`` replaced by ``new`` (in this
    process only: the source file is not touched)."""
    assert MACHINE_SOURCE.count(old) == 1, f"snippet not found once: {old!r}"
    module = types.ModuleType("sagakit_planted_machine")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(MACHINE_SOURCE.replace(old, new), "planted_machine.py", "exec"), module.__dict__)
    planted: type[Machine] = module.Machine
    return planted


# (bug, snippet of machine.py, what a developer might have written, bounds that kill it,
# words of the violation)
PLANTED = {
    "compensations in forward order": (
        "for k in range(start, -1, -1):",
        "for k in range(0, start + 1):",
        Bounds(sagas=1, faults=0, failures=1, attempts=2),
        "compensations out of order",
    ),
    "unknown rung moves down the ladder (retries exhausted)": (
        '        if outcome.retryable:\n            # Out of attempts on "try again"',
        '        if False:\n            # Out of attempts on "try again"',
        CHECK_SUITE["ladder"],
        "no definite failure recorded",
    ),
    "unknown rung moves down the ladder (timed out)": (
        "        t.inst.steps[index].status = StepStatus.COMPENSATION_FAILED\n"
        "        t.needs_manual(\n"
        '            f"compensation {step.ladder[rung].label} of step {step.name!r} timed out "',
        '        self._next_rung(t, index, "timed out")\n'
        "        return t.decision()\n"
        "        t.needs_manual(\n"
        '            f"compensation {step.ladder[rung].label} of step {step.name!r} timed out "',
        Bounds(sagas=1, faults=0, failures=1, silences=1, attempts=2),
        "no definite failure recorded",
    ),
    "a step timer that fires after the step moved on still acts": (
        "                inst.state is not SagaState.RUNNING\n"
        "                or st.status is not expect\n"
        "                or st.attempt != attempt\n"
        "            ):",
        "                False\n            ):",
        Bounds(sagas=1, faults=1, failures=1, attempts=2),
        "concluded twice",
    ),
    "fence floor dropped": (
        "if reply.fence < st.fence_floor:",
        "if False:",
        Bounds(sagas=1, faults=1, failures=1, manual=1, attempts=2),
        "before a person decided",
    ),
    "attempt check on action replies dropped": (
        "and (reply.attempt != st.attempt or st.status is not StepStatus.RUNNING)",
        "and (st.status is not StepStatus.RUNNING)",
        Bounds(sagas=1, faults=1, failures=1, attempts=2),
        "concluded twice",
    ),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_machine_bug_is_caught(monkeypatch: pytest.MonkeyPatch, bug: str) -> None:
    old, new, bounds, words = PLANTED[bug]
    checker = checkout_checker(bounds)
    checker.machine = planted_machine(monkeypatch, old, new)(checker.d, ORCHESTRATOR)
    report = checker.run()
    assert report.violations, f"the checker missed a planted bug: {bug}"
    assert words in report.violations[0]
    assert report.trace
    # The same bounds pass on the real machine: the violation is the planted bug's.
    assert checkout_checker(bounds).run().violations == []


def test_the_suite_exercises_every_kind() -> None:
    # Three of the suite's configurations (the cheap ones) already reach every kind, so
    # the whole suite does too (counts only add up).
    names = ("race-cancel", "manual", "ladder")
    suite = run_suite(checkout_checker, {n: CHECK_SUITE[n] for n in names})
    assert suite.violations == []
    assert suite.complete
    missing = [k for k in KINDS if suite.exercised[k] == 0]
    assert missing == []


def test_suite_stops_at_the_first_violation_and_reports_each_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    suite = {
        "calm": Bounds(sagas=1, faults=0, failures=0),
        "failing": Bounds(sagas=1, faults=0, failures=1),
        "never run": Bounds(sagas=1, faults=1, failures=1),
    }

    two_undos = SagaDefinition(
        "two_undos",
        [
            Step("book", command("hotel", "Book"), command("hotel", "Cancel")),
            Step("fly", command("air", "Fly"), command("air", "Refund")),
            Step("pay", command("pay", "Charge"), kind=StepKind.PIVOT),
        ],
    )

    def make(bounds: Bounds) -> Checker:
        checker = Checker(two_undos, bounds)
        old, new = "for k in range(start, -1, -1):", "for k in range(0, start + 1):"
        checker.machine = planted_machine(monkeypatch, old, new)(checker.d, ORCHESTRATOR)
        return checker

    report = run_suite(make, suite)
    assert list(report.reports) == ["calm", "failing"]
    assert report.violations and report.violations[0].startswith("failing: ")
    out = report.to_json()
    assert set(out["configurations"]) == {"calm", "failing"}
    assert out["configurations"]["calm"]["violations"] == []
    assert out["exercised"]["compensation"] == sum(
        r.exercised["compensation"] for r in report.reports.values()
    )


def test_two_manual_retries_in_flight_run_the_handler_once() -> None:
    report = checkout_checker(Bounds(sagas=1, faults=1, failures=1, manual=2, attempts=2)).run()
    assert not any("applied twice" in v for v in report.violations)


def test_failures_and_timeouts_after_the_pivot_are_explored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checker = checkout_checker(Bounds(sagas=1, faults=1, failures=1, attempts=2))
    pivot = checker.d.pivot_index
    assert pivot is not None
    after = {s.name for s in checker.d.steps[pivot:]}
    seen: set[tuple[str | None, str]] = set()
    transition = checker._transition

    def watch(w: Any, i: int, d: Any, *, manual: bool = False) -> Any:
        seen.update(
            (e.step, e.event)
            for e in d.history
            if e.step in after and e.event in ("step.failed", "step.timed_out")
        )
        return transition(w, i, d, manual=manual)

    monkeypatch.setattr(checker, "_transition", watch)
    assert checker.run().violations == []
    steps = ("capture_payment", "commit_inventory", "complete_order")
    assert seen == {(s, e) for s in steps for e in ("step.failed", "step.timed_out")}
