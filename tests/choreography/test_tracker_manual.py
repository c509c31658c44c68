"""A person's records on a choreography's view: pure decisions, and late facts after them."""

from __future__ import annotations

import pytest
from choreo_support import event
from sagakit_checkout.choreography import tracked_flow

from sagakit import SagaInstance, SagaState, StepStatus
from sagakit.errors import ManualActionRefused, NoDriver
from sagakit.runtime.tracker import observe
from sagakit.runtime.tracker_manual import VIEW_ACTIONS, available, resolve_view, undoing

FLOW = tracked_flow(sla=30.0)


def view(*facts: str, escalate: bool = True) -> SagaInstance:
    """The view after ``facts`` (one per second from t=100), then stuck if ``escalate``."""
    inst: SagaInstance | None = None
    for i, type_ in enumerate(facts):
        ev = event(type_, {"order_id": "o-1"}, message_id=f"m-{type_}", occurred_at=100.0 + i)
        inst = observe(FLOW, inst, ev, now=100.5 + i).instance
    assert inst is not None
    if escalate:
        inst.state, inst.reason = SagaState.FAILED_NEEDS_MANUAL, "stuck"
    return inst


def test_only_the_records_of_work_done_by_hand_apply() -> None:
    inst = view("OrderCreated", "PaymentAuthorized")
    assert available(FLOW, inst) == list(VIEW_ACTIONS)
    for action in ("retry", "compensate", "use_rung"):
        with pytest.raises(NoDriver, match="no process drives"):
            resolve_view(FLOW, inst, action, reason="r", actor="ann", now=200.0)
    with pytest.raises(ManualActionRefused, match="unknown manual action"):
        resolve_view(FLOW, inst, "shrug", reason="r", actor="ann", now=200.0)
    with pytest.raises(ManualActionRefused, match="needs a reason"):
        resolve_view(FLOW, inst, "mark_done", reason=" ", actor="ann", now=200.0)
    running = view("OrderCreated", escalate=False)
    assert available(FLOW, running) == []
    with pytest.raises(ManualActionRefused, match="only FAILED_NEEDS_MANUAL"):
        resolve_view(FLOW, running, "mark_done", reason="r", actor="ann", now=200.0)


def test_mark_done_finishes_every_step_by_hand_and_keeps_the_old_view() -> None:
    inst = view("OrderCreated", "PaymentAuthorized")
    new, rows = resolve_view(FLOW, inst, "mark_done", reason="done", actor="ann", now=200.0)
    assert (new.state, new.status, new.version) == (SagaState.SUCCEEDED, "COMPLETED", 3)
    assert [s.status for s in new.steps] == [StepStatus.SUCCEEDED] * 7
    assert new.steps[0].result is None  # heard from the services, not done by hand
    assert new.steps[6].result == {"resolved_by": "ann", "reason": "done"}
    assert [r.event for r in rows] == ["manual.resolved", "saga.finished"]
    assert rows[0].detail["previous_reason"] == "stuck" and new.reason is None
    assert inst.state is SagaState.FAILED_NEEDS_MANUAL and inst.steps[6].result is None


def test_a_flow_undoing_itself_can_only_be_marked_compensated_or_accepted() -> None:
    inst = view("OrderCreated", "PaymentAuthorized", "InventoryFailed")
    assert undoing(FLOW, inst)
    assert [a.value for a in available(FLOW, inst)] == ["mark_compensated", "accept_partial"]
    with pytest.raises(ManualActionRefused, match="undoing"):
        resolve_view(FLOW, inst, "mark_done", reason="r", actor="ann", now=200.0)
    new, _ = resolve_view(FLOW, inst, "mark_compensated", reason="void", actor="ann", now=200.0)
    assert (new.state, new.status) == (SagaState.COMPENSATED, "CANCELLED")
    assert [s.status for s in new.steps[:3]] == [
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATED,
        StepStatus.FAILED,
    ]
    # A capture that failed (a person must decide) is not an undo: mark_done applies.
    assert not undoing(FLOW, view("OrderCreated", "PaymentAuthorized", "PaymentCaptureFailed"))


def test_accept_partial_and_a_late_fact_after_the_decision() -> None:
    inst = view("OrderCreated", "PaymentAuthorized")
    new, _ = resolve_view(FLOW, inst, "accept_partial", reason="keep", actor="ann", now=200.0)
    assert (new.state, new.status) == (SagaState.PARTIAL_ACCEPTED, "PARTIALLY_COMPLETED")
    assert new.reason == "accepted by ann: keep"
    late = event("InventoryReserved", {"order_id": "o-1"}, message_id="m-late", occurred_at=300.0)
    seen = observe(FLOW, new, late, now=301.0)
    # The person's decision stands; the fact is in the history, marked late.
    assert seen.instance.state is SagaState.PARTIAL_ACCEPTED
    assert [h.event for h in seen.history] == ["event.late"]
