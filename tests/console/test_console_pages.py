"""The console's page rendering without a server: which decisions are offered, and that
everything a saga or a person wrote is escaped."""

from __future__ import annotations

import re

from sagakit_checkout.sagas import checkout_definition

from sagakit import HistoryEntry, SagaInstance, SagaState, StepState, StepStatus
from sagakit.console import pages
from sagakit.console.html import action_form, available_actions

D = checkout_definition()
ODD = "<img src=x onerror=alert(1)>\"'&"


def saga(state: SagaState, statuses: list[StepStatus], cursor: int) -> SagaInstance:
    steps = [StepState(status=s) for s in statuses]
    steps += [StepState() for _ in range(len(D.steps) - len(steps))]
    return SagaInstance(
        saga_id=f"id-{ODD}",
        definition="checkout",
        definition_version=1,
        business_key=ODD,
        correlation_id="c",
        state=state,
        status=ODD,
        data={"note": ODD},
        steps=steps,
        created_at=1000.0,
        updated_at=1001.0,
        cursor=cursor,
        reason=ODD,
    )


OK = StepStatus.SUCCEEDED


def test_decisions_offered_fit_the_saga() -> None:
    def acts(inst: SagaInstance) -> list[str]:
        return [a for a, _ in available_actions(D, inst)]

    running = saga(SagaState.RUNNING, [OK, StepStatus.RUNNING], 1)
    assert acts(running) == ["cancel"]
    past_pivot = saga(SagaState.RUNNING, [OK] * 5 + [StepStatus.RUNNING], 5)
    assert acts(past_pivot) == []  # a cancel would be refused after the pivot
    assert acts(saga(SagaState.COMPENSATING, [OK, StepStatus.COMPENSATING], 1)) == []
    assert acts(saga(SagaState.SUCCEEDED, [OK] * 7, 6)) == []
    stuck_pivot = saga(SagaState.FAILED_NEEDS_MANUAL, [OK] * 4 + [StepStatus.UNKNOWN], 4)
    assert acts(stuck_pivot) == ["retry", "mark_done", "compensate", "accept_partial"]
    stuck_after = saga(SagaState.FAILED_NEEDS_MANUAL, [OK] * 5 + [StepStatus.FAILED], 5)
    assert acts(stuck_after) == ["retry", "mark_done", "accept_partial"]
    undoing = saga(SagaState.FAILED_NEEDS_MANUAL, [OK, StepStatus.COMPENSATION_FAILED], 1)
    assert acts(undoing) == ["retry", "mark_compensated", "accept_partial"]
    form = action_form("/c", D, undoing, csrf="t" * 64, next_url="/c/manual")
    rungs = re.findall(r'<option value="(\d)"', form)
    assert rungs == ["0", "1", "2"] and 'value="use_rung"' in form
    assert "required" in form and 'name="csrf" value="' + "t" * 64 in form


def test_pages_escape_what_sagas_and_people_wrote() -> None:
    inst = saga(SagaState.FAILED_NEEDS_MANUAL, [OK, StepStatus.COMPENSATION_FAILED], 1)
    history = [
        HistoryEntry(inst.saga_id, 1, 1000.0, "saga.started", SagaState.RUNNING, "P"),
        HistoryEntry(
            inst.saga_id,
            2,
            1001.0,
            "manual.resolved",
            SagaState.RUNNING,
            "P",
            "authorize_payment",
            {"actor": ODD, "reason": ODD, "action": "retry"},
        ),
    ]
    detail = pages.detail_page(
        "/c", inst=inst, definition=D, history=history, csrf="t", can_act=True, now=1002.0
    )
    listing = pages.list_page(
        "/c",
        query=pages.ListQuery(search=ODD),
        sagas=[inst],
        counts={SagaState.FAILED_NEEDS_MANUAL: 1},
        definitions=["checkout"],
        definition_of=lambda _: D,
        tag="x",
        more=False,
    )
    queue = pages.manual_page(
        "/c", cases=[inst], definition_of=lambda _: D, csrf="t", can_act=True, tag="x"
    )
    for page in (detail, listing, queue):
        assert "<img" not in page and "onerror=alert(1)>" not in page
        assert "&lt;img src=x onerror=alert(1)&gt;" in page
    # Links to the saga percent-encode its id.
    assert "/c/sagas/id-%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E%22%27%26" in listing


def test_detail_of_an_unknown_definition_still_shows_history() -> None:
    inst = saga(SagaState.RUNNING, [OK], 0)
    history = [HistoryEntry(inst.saga_id, 1, 1000.0, "saga.started", SagaState.RUNNING, "P")]
    page = pages.detail_page(
        "", inst=inst, definition=None, history=history, csrf="t", can_act=True, now=1.0
    )
    assert "does not know the definition" in page and "saga.started" in page
    assert "<svg" not in page
