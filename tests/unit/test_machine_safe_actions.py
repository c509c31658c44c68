"""Safe manual decisions in the pure machine: a decision made
on a version of the saga that is gone is refused (:class:`SagaMoved`), an
``accept_partial`` that would leave a compensation or a hold open is refused unless
forced (:class:`OpenHolds`), and every decision says what it does."""

from __future__ import annotations

import pytest
from test_machine_queries_manual import Run, query_fails, rungs_fail, stuck_after_pivot

from sagakit.core.instance import SagaState, StepStatus
from sagakit.core.machine import IRREVERSIBLE, ManualAction, describe, open_holds
from sagakit.core.machine_manual import irreversible
from sagakit.errors import ManualActionRefused, OpenHolds, SagaMoved


def test_a_decision_on_another_version_is_refused_and_changes_nothing() -> None:
    run = Run()
    stuck_after_pivot(run)
    before = run.inst
    with pytest.raises(SagaMoved, match=f"version {before.version - 1}.*at version") as info:
        run.manual(ManualAction.MARK_DONE, expected_version=before.version - 1)
    assert (info.value.expected, info.value.current) == (before.version - 1, before.version)
    assert run.inst is before
    # A version check comes before the state check: a saga resolved by someone else
    # is explained as "it moved", not as "it is not in the queue".
    run.manual(ManualAction.MARK_DONE, expected_version=before.version)
    assert run.inst.state is SagaState.RUNNING
    with pytest.raises(SagaMoved):
        run.manual(ManualAction.MARK_DONE, expected_version=before.version)


def test_accept_partial_with_an_open_hold_is_refused_unless_forced() -> None:
    run = Run()
    query_fails(run, "pay")  # create done, pay's outcome unknown: both may be held
    assert open_holds(run.d, run.inst) == [
        ("create", "open"),
        ("pay", "may be open (asking its status)"),
    ]
    before = run.inst
    with pytest.raises(OpenHolds, match="create open, pay may be open") as info:
        run.manual(ManualAction.ACCEPT_PARTIAL)
    assert isinstance(info.value, ManualActionRefused)
    assert info.value.holds == open_holds(run.d, before)
    assert run.inst is before
    dec = run.manual(ManualAction.ACCEPT_PARTIAL, reason="customer keeps the hold", force=True)
    assert run.inst.state is SagaState.PARTIAL_ACCEPTED
    resolved = dec.history[0].detail
    assert resolved["forced"] is True
    assert resolved["holds_left_open"] == ["create open", "pay may be open (asking its status)"]


def test_past_the_pivot_the_steps_before_it_are_kept_not_held() -> None:
    run = Run()
    stuck_after_pivot(run)
    assert run.step("pay").status is StepStatus.SUCCEEDED
    assert open_holds(run.d, run.inst) == []
    dec = run.manual(ManualAction.ACCEPT_PARTIAL)
    assert run.inst.state is SagaState.PARTIAL_ACCEPTED
    assert "forced" not in dec.history[0].detail


def test_a_failed_undo_is_an_open_compensation() -> None:
    run = Run()
    rungs_fail(run)
    assert ("pay", "undo failed") in open_holds(run.d, run.inst)
    with pytest.raises(OpenHolds, match="pay undo failed"):
        run.manual(ManualAction.ACCEPT_PARTIAL)


def test_every_action_says_what_it_does_and_the_irreversible_ones_are_named() -> None:
    assert {a.value for a in IRREVERSIBLE} == {"mark_done", "mark_compensated", "accept_partial"}
    for action in [*ManualAction, "cancel"]:
        assert len(describe(action)) > 40
        assert ("Cannot be taken back" in describe(action)) is irreversible(action)
    assert "nothing is sent" in describe("mark_compensated")
    assert "PARTIAL_ACCEPTED" in describe(ManualAction.ACCEPT_PARTIAL)
    with pytest.raises(ManualActionRefused, match="unknown action"):
        describe("drop")
