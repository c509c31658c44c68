"""The console's page rendering without a server: which decisions are offered, that
everything a saga or a person wrote is escaped, how durations are read and shown, and
what a manual case's card shows of the saga (facts, open holds, never personal data)."""

from __future__ import annotations

import re

import pytest
from sagakit_checkout.sagas import checkout_definition

from sagakit import (
    HistoryEntry,
    HmacTokeniser,
    PersonalField,
    SagaDefinition,
    SagaInstance,
    SagaState,
    Step,
    StepState,
    StepStatus,
)
from sagakit.console import pages
from sagakit.console.filters import ManualQuery, human_duration, parse_duration
from sagakit.console.html import action_form, available_actions
from sagakit.console.manual import data_facts, manual_page, open_holds

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
    queue = manual_page(
        "/c",
        query=ManualQuery(reason=ODD),
        cases=[inst],
        matched=1,
        open_cases=1,
        definitions=[ODD],
        steps=[ODD],
        definition_of=lambda _: D,
        csrf="t",
        can_act=True,
        tag="x",
        now=2000.0,
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


def test_durations_are_read_and_shown_for_people() -> None:
    read = {"90": 90, "90 s": 90, "30 min": 1800, "2h": 7200, " 1 D 4 h ": 100800}
    read |= {"1.5 h": 5400, "2 hours 30 minutes": 9000, "0": 0}
    for text, seconds in read.items():
        assert parse_duration(text) == seconds, text
    for bad in ("", "soon", "-5", "2 weeks", "h", "5 h x", "1e9", "h 5", "10000000000000"):
        with pytest.raises(ValueError, match="must be"):
            parse_duration(bad)
    shown = {-5: "0 s", 0: "0 s", 59.9: "59 s", 60: "1 min", 3599: "59 min", 3600: "1 h"}
    shown |= {11520: "3 h 12 min", 86400: "1 d", 100800: "1 d 4 h", 40 * 86400: "40 d"}
    for seconds, text in shown.items():
        assert human_duration(seconds) == text, seconds


def test_case_facts_never_show_personal_fields() -> None:
    d = SagaDefinition(
        "signup",
        [Step("hold", lambda _: {}, lambda _: None), Step("pay", lambda _: {})],
        personal={
            "customer": "refuse",
            "contact.email": PersonalField("tokenise", kind="email"),
            "sku": "public",
        },
        tokeniser=HmacTokeniser("k" * 32),
    )
    data = {
        "customer": "cust-000001",
        "contact": {"email": "email-0a1b2c", "channel": "sms"},
        "sku": "sku-1",
        "amount": 4200,
        "items": [{"sku": "sku-1", "qty": 2}],
        "note": "leave it at 12 Fake Street",  # looks personal, declared or not
        "nested": {"x": 1},
        "long": "y" * 500,
    }
    shown = dict(data_facts(d, data))
    assert list(shown) == ["sku", "amount", "items", "long"]
    assert shown["items"] == '[{"sku": "sku-1", "qty": 2}]'
    assert len(shown["long"]) == 120 and shown["long"].endswith("\u2026")
    chosen = ["contact.channel", "contact.email", "contact", "customer", "amount", "missing"]
    assert data_facts(d, data, chosen) == [("contact.channel", "sms"), ("amount", "4200")]


def test_open_holds_are_steps_done_and_not_undone() -> None:
    statuses = [OK, StepStatus.COMPENSATED, StepStatus.COMPENSATION_FAILED, StepStatus.UNKNOWN]
    inst = saga(SagaState.FAILED_NEEDS_MANUAL, statuses, 3)
    assert open_holds(D, inst) == [
        ("create_order", "open"),
        ("reserve_inventory", "undo failed"),
        ("create_shipment", "may be open (outcome unknown)"),
    ]
    # The pivot and the steps after it hold nothing a compensation would release.
    done = saga(SagaState.FAILED_NEEDS_MANUAL, [StepStatus.COMPENSATED] * 4 + [OK, OK], 5)
    assert open_holds(D, done) == []
