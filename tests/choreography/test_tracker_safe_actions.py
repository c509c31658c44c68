"""Safe records on a choreography's view: a record made on a version of the view that
is gone is refused, and an ``accept_partial`` while the flow's undo is unfinished
needs force (see tests/unit/test_machine_safe_actions.py for the driven sagas)."""

from __future__ import annotations

import pytest
from test_tracker_manual import FLOW, view

from sagakit.core.instance import SagaState
from sagakit.core.machine import ManualAction
from sagakit.errors import OpenHolds, SagaMoved
from sagakit.runtime.tracker_manual import VIEW_DESCRIPTIONS, resolve_view, view_holds


def test_a_view_checks_the_version_and_its_unfinished_undo() -> None:
    undoing = view("OrderCreated", "PaymentAuthorized", "InventoryFailed")
    assert view_holds(FLOW, undoing) == [("create_order", "open"), ("authorize_payment", "open")]
    with pytest.raises(OpenHolds, match="create_order open"):
        resolve_view(FLOW, undoing, "accept_partial", reason="r", actor="ann", now=200.0)
    new, rows = resolve_view(
        FLOW, undoing, "accept_partial", reason="r", actor="ann", now=200.0, force=True
    )
    assert new.state is SagaState.PARTIAL_ACCEPTED and rows[0].detail["forced"] is True
    forward = view("OrderCreated", "PaymentAuthorized")
    assert view_holds(FLOW, forward) == []
    with pytest.raises(SagaMoved):
        resolve_view(
            FLOW,
            forward,
            "mark_done",
            reason="r",
            actor="ann",
            now=200.0,
            expected_version=forward.version + 1,
        )
    assert "no compensation is sent" in VIEW_DESCRIPTIONS[ManualAction.MARK_COMPENSATED]
