"""Bulk decisions from the manual queue, over HTTP and once in Chromium: a decision over
a filter or a selection shows its dry run first (what each saga would become, which
would be refused and why), one confirmation applies it to exactly the sagas shown at
the versions shown, a saga that moved in between is refused and reported, and bad
input comes back with a clear message and nothing applied.

The cases are written straight into a MemoryStore, as the queue's own tests do: nine
checkout cases stopped at three kinds of step (``mark_done`` applies to two kinds and
is refused on the third, a compensation in progress), and three refunds.
"""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from console_support import chromium, console_url
from playwright.async_api import Page, expect
from sagakit_checkout.sagas import checkout_definition
from starlette.applications import Starlette
from starlette.routing import Mount

from sagakit import (
    Engine,
    SagaDefinition,
    SagaInstance,
    SagaState,
    Step,
    StepKind,
    StepState,
    StepStatus,
)
from sagakit.console import bulk, console_routes
from sagakit.stores.memory import MemoryStore

NOW = 1_800_000_000.0
CHECKOUT = checkout_definition()
OK = StepStatus.SUCCEEDED

# Where a checkout case stopped, by i % 3: its cursor and its steps' statuses.
STOPS: list[tuple[int, list[StepStatus]]] = [
    (1, [StepStatus.COMPENSATED, StepStatus.COMPENSATION_FAILED]),  # mark_done refused
    (4, [OK, OK, OK, OK, StepStatus.UNKNOWN]),
    (5, [OK, OK, OK, OK, OK, StepStatus.FAILED]),
]
CASES = [f"case-{i}" for i in range(9)]
APPLIES = [s for i, s in enumerate(CASES) if i % 3]
REFUSED = [s for i, s in enumerate(CASES) if not i % 3]


def _nothing(_: object) -> dict[str, Any]:
    return {}


REFUND = SagaDefinition(
    "refund",
    [Step("hold_refund", _nothing, _nothing), Step("pay_refund", _nothing, kind=StepKind.PIVOT)],
)


def checkout_case(i: int) -> SagaInstance:
    cursor, statuses = STOPS[i % 3]
    steps = [StepState(status=s) for s in statuses]
    steps += [StepState() for _ in range(len(CHECKOUT.steps) - len(steps))]
    return SagaInstance(
        saga_id=f"case-{i}",
        definition="checkout",
        definition_version=1,
        business_key=f"order-{i}",
        correlation_id=f"corr-{i}",
        state=SagaState.FAILED_NEEDS_MANUAL,
        status="NEEDS_ATTENTION",
        data={"sku": f"sku-{i}", "amount": 4200 + i},
        steps=steps,
        created_at=NOW - 8000.0 - i,
        updated_at=NOW - 7200.0 - 60.0 * i,  # case-8 waited longest
        cursor=cursor,
        version=9,
        reason=f"{CHECKOUT.steps[cursor].name}: stopped",
    )


def refund_case(i: int) -> SagaInstance:
    return SagaInstance(
        saga_id=f"refund-{i}",
        definition="refund",
        definition_version=1,
        business_key=f"refund-{i}",
        correlation_id=f"rc-{i}",
        state=SagaState.FAILED_NEEDS_MANUAL,
        status="NEEDS_ATTENTION",
        data={"amount": 100 + i},
        steps=[StepState(status=OK), StepState(status=StepStatus.FAILED)],
        created_at=NOW - 1000.0,
        updated_at=NOW - 900.0 + i,
        cursor=1,
        version=4,
        reason="pay_refund: bank refused",
    )


@dataclass
class Queue:
    engine: Engine
    client: httpx.AsyncClient


@asynccontextmanager
async def seeded() -> AsyncIterator[Queue]:
    store = MemoryStore("orchestrator")
    engine = Engine(store, [CHECKOUT, REFUND], roles=frozenset(), clock=lambda: NOW)
    async with engine:
        async with store.transaction() as tx:
            for inst in [
                *(checkout_case(i) for i in range(9)),
                *(refund_case(i) for i in range(3)),
            ]:
                await tx.saga_insert(inst)
        routes = console_routes(engine, actor=lambda _: "tester", can_act=lambda _: True)
        app = Starlette(routes=[Mount("/console", routes=routes)])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            yield Queue(engine, client)


def hidden(page: str, name: str) -> list[str]:
    return [html.unescape(v) for v in re.findall(rf'name="{name}" value="([^"]*)"', page)]


def rows(page: str, ok: bool) -> list[str]:
    return re.findall(rf'<tr data-saga="([^"]+)" data-ok="{str(ok).lower()}">', page)


async def queue_form(c: httpx.AsyncClient, params: dict[str, str]) -> dict[str, str]:
    """The bulk form's fields as the queue page at ``params`` renders them."""
    page = (await c.get("/console/manual", params=params)).text
    return {"csrf": hidden(page, "csrf")[0], "filter": hidden(page, "filter")[0]}


async def versions(engine: Engine) -> dict[str, int]:
    return {
        s: inst.version
        for s in CASES + [f"refund-{i}" for i in range(3)]
        if (inst := await engine.store.get_saga(s)) is not None
    }


async def test_filter_wide_decision_shows_its_dry_run_then_applies_to_exactly_those() -> None:
    async with seeded() as q:
        c = q.client
        queue = (await c.get("/console/manual", params={"definition": "checkout"})).text
        assert "Dry run on all 9 matching this filter" in queue
        assert queue.count('type="checkbox" name="saga"') == 9
        form = await queue_form(c, {"definition": "checkout"})
        before = await versions(q.engine)

        ask = {**form, "scope": "filter", "action": "mark_done", "reason": "done by hand, T-7"}
        dry = await c.post("/console/manual/bulk", data=ask)
        assert dry.status_code == 200, dry.text
        page = dry.text
        assert "Dry run: mark_done on 9 sagas" in page
        assert "cannot be taken back" in page and 'name="confirm"' in page
        assert sorted(rows(page, True)) == APPLIES and sorted(rows(page, False)) == REFUSED
        assert '<b class="ok-count">6</b> would apply' in page
        assert '<b class="refused-count">3</b> would be refused' in page
        assert "mark_done does not apply to saga case-0" in page  # the engine's reason
        assert "refund" not in " ".join(rows(page, True) + rows(page, False))
        assert sorted(hidden(page, "saga")) == sorted(f"{s}:9" for s in APPLIES)
        assert await versions(q.engine) == before, "a dry run writes nothing"

        confirm = {
            "csrf": hidden(page, "csrf")[0],
            "action": "mark_done",
            "reason": hidden(page, "reason")[0],
            "filter": hidden(page, "filter")[0],
            "saga": hidden(page, "saga"),
        }
        unconfirmed = await c.post("/console/manual/bulk/apply", data=confirm)
        assert unconfirmed.status_code == 422
        assert "tick the confirmation box" in unconfirmed.text
        assert await versions(q.engine) == before, "nothing applied without the confirmation"

        done = await c.post("/console/manual/bulk/apply", data={**confirm, "confirm": "yes"})
        assert done.status_code == 200, done.text
        assert "Bulk mark_done: 6 applied, 0 refused" in done.text
        assert sorted(rows(done.text, True)) == APPLIES
        assert 'href="/console/manual?definition=checkout"' in done.text
        after = await versions(q.engine)
        assert {s for s in after if after[s] != before[s]} == set(APPLIES)
        for saga_id in APPLIES:
            history = await q.engine.store.history(saga_id)
            decided = [h for h in history if h.event == "manual.resolved"]
            assert [(h.detail["actor"], h.version) for h in decided] == [("tester", 10)]
        left = (await c.get("/console/manual", params={"definition": "checkout"})).text
        assert "Dry run on all 3 matching this filter" in left


async def test_a_saga_moved_between_dry_run_and_confirm_is_refused_and_reported() -> None:
    async with seeded() as q:
        c = q.client
        form = await queue_form(c, {})
        ask = {**form, "scope": "selected", "action": "retry", "reason": "provider is back"}
        dry = await c.post("/console/manual/bulk", data={**ask, "saga": ["case-1", "case-2"]})
        assert dry.status_code == 200, dry.text
        assert sorted(rows(dry.text, True)) == ["case-1", "case-2"]
        assert 'name="confirm"' not in dry.text  # retry can be decided again: no box

        # Someone decides case-1 on its own before the bulk is confirmed.
        await q.engine.resolve("case-1", "mark_done", reason="by hand", actor="ann")
        confirm = {
            "csrf": hidden(dry.text, "csrf")[0],
            "action": "retry",
            "reason": "provider is back",
            "filter": "",
            "saga": hidden(dry.text, "saga"),
        }
        done = await c.post("/console/manual/bulk/apply", data=confirm)
        assert done.status_code == 200, done.text
        assert "Bulk retry: 1 applied, 1 refused" in done.text
        assert rows(done.text, False) == ["case-1"] and rows(done.text, True) == ["case-2"]
        assert "saga_moved" in done.text and "you decided on version 9" in done.text
        history = await q.engine.store.history("case-1")
        actors = [h.detail["actor"] for h in history if h.event == "manual.resolved"]
        assert actors == ["ann"], "never applied on the newer version"


async def test_select_all_on_this_page_and_the_cap() -> None:
    async with seeded() as q:
        c = q.client
        form = await queue_form(c, {"definition": "refund"})
        page_ids = hidden((await c.get("/console/manual?definition=refund")).text, "page")
        ask = {**form, "scope": "selected", "action": "retry", "reason": "bank is back"}
        dry = await c.post(
            "/console/manual/bulk", data={**ask, "all_page": "yes", "page": page_ids}
        )
        assert sorted(rows(dry.text, True)) == ["refund-0", "refund-1", "refund-2"]

        bulk.MAX_BULK, cap = 4, bulk.MAX_BULK
        try:
            form = await queue_form(c, {})
            assert "a bulk decision takes the first 4" in (await c.get("/console/manual")).text
            over = await c.post("/console/manual/bulk", data={**ask, **form, "scope": "filter"})
        finally:
            bulk.MAX_BULK = cap
        assert "Dry run: retry on 4 sagas" in over.text
        assert "12 cases match this filter: this dry run takes the first 4" in over.text


@pytest.mark.parametrize(
    ("change", "status", "said"),
    [
        ({"scope": "selected"}, 400, "No saga is selected"),
        ({"action": "cancel"}, 400, "Choose the decision to apply"),
        ({"action": ""}, 400, "Choose the decision to apply"),
        ({"reason": "  "}, 400, "Every decision needs a reason"),
        ({"reason": "call jane.doe@example.com"}, 422, "personal data"),
        ({"csrf": "forged"}, 403, "did not come from this console"),
        ({"filter": "step=nope"}, 400, "no saga definition this console knows"),
    ],
)
async def test_bad_input_comes_back_with_a_clear_message(
    change: dict[str, str], status: int, said: str
) -> None:
    async with seeded() as q:
        c = q.client
        form = await queue_form(c, {"definition": "checkout"})
        before = await versions(q.engine)
        ask = {**form, "scope": "filter", "action": "retry", "reason": "why", **change}
        r = await c.post("/console/manual/bulk", data=ask)
        assert r.status_code == status, r.text
        assert said in r.text
        if status == 400:
            assert "Nothing was applied" in r.text
            assert 'href="/console/manual' in r.text  # the way back to the queue
        if "filter" in change:
            return  # a confirmation's filter is only the way back to the queue
        # The confirmation checks the same, and one naming no saga is refused too.
        confirm: dict[str, Any] = {**ask, "saga": [] if "scope" in change else ["case-1:9"]}
        r = await c.post("/console/manual/bulk/apply", data=confirm)
        assert r.status_code == status, r.text
        assert ("names no saga" if "scope" in change else said) in r.text
        assert await versions(q.engine) == before


async def shot(page: Page, shots: Path, name: str) -> None:
    await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


async def test_in_chromium_a_bulk_decision_over_a_filter_with_its_dry_run(shots: Path) -> None:
    async with seeded() as q, console_url(q.engine) as base, chromium() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(f"{base}/manual")
        await page.select_option('form.filters select[name="definition"]', "checkout")
        await page.click("form.filters button")
        await expect(page.locator("p.matched")).to_have_text("9 of 12 match these filters.")
        bulk_form = page.locator("form.bulk")
        await bulk_form.locator('select[name="action"]').select_option("mark_done")
        await bulk_form.locator('textarea[name="reason"]').fill("shipped by hand, T-7")
        await shot(page, shots, "bulk-queue")
        await bulk_form.get_by_role("button", name="Dry run on all 9 matching this filter").click()

        await expect(page.locator("h1")).to_have_text("Dry run: mark_done on 9 sagas")
        await expect(page.locator(".ok-count")).to_have_text("6")
        await expect(page.locator(".refused-count")).to_have_text("3")
        await expect(page.locator('tr[data-ok="false"]')).to_have_count(3)
        await shot(page, shots, "bulk-dry-run")
        await page.check('input[name="confirm"]')
        await page.get_by_role("button", name="Apply mark_done to 6 sagas").click()

        await expect(page.locator("h1")).to_have_text("Bulk mark_done: 6 applied, 0 refused")
        await expect(page.locator('tr[data-ok="true"]')).to_have_count(6)
        await shot(page, shots, "bulk-result")
        await page.get_by_role("link", name="Back to the manual queue").click()
        await expect(page.locator("p.matched")).to_have_text("3 of 6 match these filters.")
        assert "definition=checkout" in page.url
        for saga_id in APPLIES:
            inst = await q.engine.store.get_saga(saga_id)
            assert inst is not None and inst.state is not SagaState.FAILED_NEEDS_MANUAL
