"""The tracker: saga views built from facts that arrive late, twice or out of order."""

from __future__ import annotations

from pathlib import Path

import pytest
from choreo_support import event
from sagakit_checkout.choreography import CHOREOGRAPHY, tracked_flow
from sagakit_checkout.invariants import status_path_violation

from sagakit import SagaInstance, SagaState, StepStatus
from sagakit.runtime.tracker import Observation, Tracker, observe
from sagakit.stores.sqlite import SQLiteStore

FLOW = tracked_flow(sla=30.0)
HAPPY = [
    ("OrderCreated", {"order_id": "o-1"}),
    ("PaymentAuthorized", {"order_id": "o-1"}),
    ("InventoryReserved", {"order_id": "o-1"}),
    ("ShipmentCreated", {"order_id": "o-1"}),
    ("PaymentCaptured", {"order_id": "o-1"}),
    ("InventoryCommitted", {"order_id": "o-1"}),
    ("OrderCompleted", {"order_id": "o-1"}),
]


def run(facts: list[tuple[str, dict[str, object]]], start: float = 100.0) -> list[Observation]:
    """Apply ``facts`` in order (each one a step caused by the one before)."""
    inst: SagaInstance | None = None
    seen = []
    for i, (type_, payload) in enumerate(facts):
        ev = event(type_, payload, message_id=f"m-{type_}", occurred_at=start + i)
        obs = observe(FLOW, inst, ev, now=start + i + 0.5)
        seen.append(obs)
        inst = obs.instance
    return seen


def path(observations: list[Observation]) -> list[tuple[str, str]]:
    return [(h.event, h.status) for o in observations for h in o.history]


def test_the_happy_path_shows_the_orchestrated_statuses_in_order() -> None:
    seen = run(HAPPY)
    final = seen[-1].instance
    assert final.state is SagaState.SUCCEEDED and final.status == "COMPLETED"
    assert final.definition == CHOREOGRAPHY and final.saga_id == final.correlation_id == "o-1"
    assert [s.status for s in final.steps] == [StepStatus.SUCCEEDED] * 7
    statuses = [status for _, status in path(seen)]
    assert statuses[0] == "PENDING_PAYMENT"
    assert "PENDING_INVENTORY" in statuses and "PENDING_SHIPMENT" in statuses
    assert statuses[-1] == "COMPLETED"
    assert status_path_violation(path(seen)) is None
    assert final.created_at == 100.0 and final.data["finished_at"] == 106.0
    assert [o.instance.version for o in seen] == list(range(1, 8))


@pytest.mark.fault("F-REORDER")
def test_facts_in_reverse_order_still_end_honestly() -> None:
    seen = run(list(reversed(HAPPY)))
    final = seen[-1].instance
    assert final.state is SagaState.SUCCEEDED
    # Once COMPLETED, earlier facts are late: recorded, status unchanged.
    assert {h.event for o in seen[1:] for h in o.history} == {"event.late"}
    assert status_path_violation(path(seen)) is None
    assert final.created_at == 100.0  # the first fact (OrderCreated) came last


def test_a_cancellation_seen_first_shows_cancelling_before_cancelled() -> None:
    seen = run(
        [
            ("OrderCreated", {"order_id": "o-1"}),
            ("PaymentAuthorized", {"order_id": "o-1"}),
            ("OrderCancelled", {"order_id": "o-1", "reason": "out of stock"}),
            ("InventoryFailed", {"order_id": "o-1", "reason": "out of stock"}),
            ("PaymentVoided", {"order_id": "o-1", "voided": 1500, "reason": "out of stock"}),
        ]
    )
    events = path(seen)
    assert ("compensation.started", "CANCELLING") in events
    assert events.index(("compensation.started", "CANCELLING")) < events.index(
        ("saga.finished", "CANCELLED")
    )
    assert status_path_violation(events) is None
    final = seen[-1].instance
    assert final.state is SagaState.COMPENSATED
    steps = dict(zip(FLOW.steps, (s.status for s in final.steps), strict=True))
    assert steps["reserve_inventory"] is StepStatus.FAILED
    assert steps["authorize_payment"] is StepStatus.COMPENSATED


def test_a_failure_after_a_success_is_recorded_and_ignored() -> None:
    seen = run(
        [
            ("OrderCreated", {"order_id": "o-1"}),
            ("PaymentAuthorized", {"order_id": "o-1"}),
            ("PaymentFailed", {"order_id": "o-1", "reason": "card declined"}),
        ]
    )
    last = seen[-1]
    assert not last.changed
    assert last.instance.state is SagaState.RUNNING
    assert last.instance.status == "PENDING_INVENTORY"
    assert last.history[-1].event == "event.ignored"
    assert "already SUCCEEDED" in last.history[-1].detail["reason"]


@pytest.mark.fault("F-DUPLICATE")
def test_a_duplicate_fact_under_another_id_moves_nothing() -> None:
    first = run(HAPPY[:2])
    again = event("PaymentAuthorized", {"order_id": "o-1"}, message_id="other-id")
    obs = observe(FLOW, first[-1].instance, again, now=200.0)
    assert not obs.changed and obs.history[0].event == "event.duplicate"
    assert obs.history[0].detail["first"] == "m-PaymentAuthorized"


@pytest.mark.fault("F-REORDER")
def test_a_fact_before_its_cause_is_noted() -> None:
    ev = event("InventoryReserved", {"order_id": "o-1"}, message_id="m-2", causation_id="m-1")
    obs = observe(FLOW, None, ev, now=1.0)
    assert obs.created
    applied = [h for h in obs.history if h.event == "event.applied"]
    assert applied[0].detail["before_its_cause"] is True
    assert obs.instance.status == "PENDING_SHIPMENT"


def test_manual_facts_and_contradictions_go_to_the_manual_queue() -> None:
    seen = run(
        [
            ("OrderCreated", {"order_id": "o-1"}),
            ("ShipmentFailed", {"order_id": "o-1", "reason": "bad address"}),
            ("OrderCompleted", {"order_id": "o-1"}),
        ]
    )
    final = seen[-1].instance
    assert final.state is SagaState.FAILED_NEEDS_MANUAL and final.status == "NEEDS_ATTENTION"
    assert final.reason is not None and "contradicts" in final.reason
    release = run([("PaymentReleaseFailed", {"order_id": "o-1", "reason": "void refused"})])
    assert release[-1].instance.state is SagaState.FAILED_NEEDS_MANUAL
    assert "void refused" in (release[-1].instance.reason or "")


async def test_views_live_in_the_saga_tables_and_stuck_ones_reach_the_manual_queue(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "tracker.db", name="tracker", synchronous="NORMAL")
    clock = [1000.0]
    tracker = Tracker("tracker", store, tracked_flow(sla=60.0), clock=lambda: clock[0])
    await store.open()
    try:
        for i, (type_, payload) in enumerate(HAPPY[:3]):
            ev = event(type_, payload, message_id=f"a-{i}", occurred_at=999.0 + i)
            async with store.transaction() as tx:
                await tracker.observe(tx, await tx.saga_get("o-1"), ev)
        done = event("OrderCreated", {"order_id": "o-2"}, message_id="b", correlation_id="o-2")
        async with store.transaction() as tx:
            await tracker.observe(
                tx,
                None,
                done,
            )
        listed = await store.list_sagas(definition=CHOREOGRAPHY)
        assert {s.business_key for s in listed} == {"o-1", "o-2"}
        assert (await store.count_sagas()) == {SagaState.RUNNING: 2}
        assert (await store.history("o-1"))[0].event == "saga.started"

        clock[0] = 1030.0
        assert await tracker.check_stuck() == 0  # within the SLA
        clock[0] = 1061.0
        assert await tracker.check_stuck() == 2
        manual = await store.list_sagas(states=[SagaState.FAILED_NEEDS_MANUAL])
        assert len(manual) == 2
        stuck = {s.business_key: s for s in manual}["o-1"]
        assert stuck.status == "NEEDS_ATTENTION"
        assert stuck.reason is not None and "stuck" in stuck.reason
        assert "InventoryReserved" in stuck.reason
        history = await store.history("o-1")
        assert history[-1].event == "manual.escalated"
        assert status_path_violation([(h.event, h.status) for h in history]) is None
        assert await tracker.check_stuck() == 0  # already in the queue
    finally:
        await store.close()
