"""The manual queue and the saga list at scale, over HTTP: 250 open cases all reachable
page by page, oldest first, with the count in the heading and the nav, how long each
waited, the facts and open holds on each card, filters that narrow (and say clearly
what is wrong with them), and the list's age and time-in-state columns, order and
filters.

The cases are written into the store directly (as a saga in the queue looks: stopped
at a step, a reason, a last change when it entered the queue), with the engine's clock
fixed, so every wait is known to the second; the console is called in process through
httpx, without a server, and once, served by uvicorn, in Chromium.
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
from sagakit.console import console_routes
from sagakit.stores.memory import MemoryStore

NOW = 1_800_000_000.0
"""The engine's clock: every wait below is measured from it."""

CASES = 250
CHECKOUT = checkout_definition()
STEPS = [s.name for s in CHECKOUT.steps]
OK, UNDONE = StepStatus.SUCCEEDED, StepStatus.COMPENSATED


def _nothing(_: object) -> dict[str, Any]:
    return {}


REFUND = SagaDefinition(
    "refund",
    [
        Step("hold_refund", _nothing, _nothing),
        Step("pay_refund", _nothing, kind=StepKind.PIVOT),
    ],
)


async def shot(page: Page, shots: Path, name: str) -> None:
    await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def wait_of(i: int) -> float:
    """Case ``i`` waited 1 h 32 min (i=0) to 5 h 41 min (i=249); case 100: 3 h 12 min."""
    return 11520.0 + 60.0 * (i - 100)


# Where a case stopped, by i % 3: its cursor, the steps' statuses and its reason.
STOPS: list[tuple[int, list[StepStatus], str]] = [
    (
        1,  # the authorisation could not be voided: an undo failed, the order undone
        [UNDONE, StepStatus.COMPENSATION_FAILED],
        "authorize_payment: VOID refused by the provider, then refund refused",
    ),
    (
        4,  # the capture's outcome is unknown: everything before it still holds
        [OK, OK, OK, OK, StepStatus.UNKNOWN],
        "capture_payment: outcome unknown after 12 attempts",
    ),
    (
        5,  # after the pivot: commit refused, a person must decide
        [OK, OK, OK, OK, OK, StepStatus.FAILED],
        "commit_inventory: recalled SKU, refused by the warehouse",
    ),
]


def manual_case(i: int) -> SagaInstance:
    cursor, statuses, reason = STOPS[i % 3]
    steps = [StepState(status=s) for s in statuses]
    steps += [StepState() for _ in range(len(STEPS) - len(steps))]
    waited = wait_of(i)
    return SagaInstance(
        saga_id=f"case-{i:03d}",
        definition="checkout",
        definition_version=1,
        business_key=f"order-{i:03d}",
        correlation_id=f"corr-{i:03d}",
        state=SagaState.FAILED_NEEDS_MANUAL,
        status="NEEDS_ATTENTION",
        data={
            "customer": f"cust-{i:06d}",
            "card": f"card-ok-{i}",
            "ship_to": f"addr-ok-{i}",
            "sku": f"sku-{i % 7}",
            "qty": 1 + i % 3,
            "amount": 4200 + i,
            "currency": "EUR",
        },
        steps=steps,
        # Started a while before it stopped; in the queue since its last change.
        created_at=NOW - waited - 300.0 - i,
        updated_at=NOW - waited,
        cursor=cursor,
        version=9,
        reason=reason,
    )


def refund_case(i: int) -> SagaInstance:
    return SagaInstance(
        saga_id=f"refund-{i:02d}",
        definition="refund",
        definition_version=1,
        business_key=f"refund-{i:02d}",
        correlation_id=f"rc-{i:02d}",
        state=SagaState.FAILED_NEEDS_MANUAL,
        status="NEEDS_ATTENTION",
        data={"amount": 100 + i},
        steps=[StepState(status=OK), StepState(status=StepStatus.FAILED)],
        created_at=NOW - 1000.0 - i,
        updated_at=NOW - 900.0 - i,  # the newest cases of all
        cursor=1,
        version=4,
        reason="pay_refund: bank refused",
    )


def running_saga(i: int) -> SagaInstance:
    return SagaInstance(
        saga_id=f"run-{i}",
        definition="checkout",
        definition_version=1,
        business_key=f"order-run-{i}",
        correlation_id=f"rr-{i}",
        state=SagaState.RUNNING if i < 4 else SagaState.SUCCEEDED,
        status="PENDING_PAYMENT" if i < 4 else "COMPLETED",
        data={"amount": 1, "sku": "sku-1", "qty": 1, "currency": "EUR"},
        steps=[StepState(status=OK)] * (4 if i < 4 else 7) + [StepState()] * (3 if i < 4 else 0),
        created_at=NOW - 86400.0 * (i + 1),  # 1 to 6 days old, the oldest sagas
        updated_at=NOW - 60.0 * (i + 1),
        cursor=4 if i < 4 else 6,
        version=3,
    )


@dataclass
class Queue:
    """A console over a store with the cases above, and a client for it."""

    engine: Engine
    client: httpx.AsyncClient


@asynccontextmanager
async def seeded_console() -> AsyncIterator[Queue]:
    store = MemoryStore("orchestrator")
    engine = Engine(store, [CHECKOUT, REFUND], roles=frozenset(), clock=lambda: NOW)
    async with engine:
        async with store.transaction() as tx:
            for inst in [
                *(manual_case(i) for i in range(CASES)),
                *(refund_case(i) for i in range(10)),
                *(running_saga(i) for i in range(6)),
            ]:
                await tx.saga_insert(inst)
        routes = console_routes(engine, actor=lambda _: "tester", can_act=lambda _: True)
        app = Starlette(routes=[Mount("/console", routes=routes)])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            yield Queue(engine, client)


def cases_on(page: str) -> list[str]:
    """The saga ids of the case cards, in page order."""
    return re.findall(r'<article class="case" data-saga="([^"]+)"', page)


def next_link(page: str) -> str | None:
    found = re.search(r'<a rel="next" href="([^"]+)"', page)
    return None if found is None else html.unescape(found.group(1))


async def walk(client: httpx.AsyncClient, path: str) -> tuple[list[str], list[str]]:
    """Every case id met following the *next* links from ``path``, and the pages."""
    ids: list[str] = []
    pages: list[str] = []
    url: str | None = path
    while url is not None:
        r = await client.get(url)
        assert r.status_code == 200, r.text
        pages.append(r.text)
        ids += cases_on(r.text)
        url = next_link(r.text)
        assert len(pages) <= 10, "the pager does not end"
    return ids, pages


def card(page: str, saga_id: str) -> str:
    found = re.search(rf'<article class="case" data-saga="{saga_id}".*?</article>', page, re.S)
    assert found, f"no card for {saga_id}"
    return found.group(0)


def nav_count(page: str) -> int:
    found = re.search(r'>Manual queue <span class="nav-count[^"]*"[^>]*>(\d+)</span></a>', page)
    assert found, "no count on the nav's manual queue link"
    return int(found.group(1))


async def test_every_open_case_is_reachable_oldest_first_with_its_wait() -> None:
    async with seeded_console() as q:
        c = q.client
        everything = [manual_case(i) for i in range(CASES)] + [refund_case(i) for i in range(10)]
        oldest_first = [s.saga_id for s in sorted(everything, key=lambda s: s.updated_at)]
        ids, pages = await walk(c, "/console/manual")
        assert ids == oldest_first, "every case once, the longest waiting first"
        assert len(pages) == 6 and [len(cases_on(p)) for p in pages] == [50] * 5 + [10]
        first = pages[0]
        assert "Manual queue: <span" in first and "260 open cases</span></h1>" in first
        assert nav_count(first) == 260
        assert "cases 1\u201350 of 260, waiting longest first" in first
        assert "cases 251\u2013260 of 260" in pages[-1]
        assert 'rel="prev"' in pages[1] and 'rel="prev"' not in first

        # How long a case waited, for a person; when it entered the queue on hover.
        assert "waiting 3 h 12 min</span>" in card(await page_of(c, "case-100"), "case-100")
        oldest = card(first, "case-249")
        assert "waiting 5 h 41 min" in oldest and "in the queue since 2027-01-15" in oldest

        # Newest first on request: the refunds entered the queue last.
        newest = await c.get("/console/manual", params={"sort": "newest"})
        assert cases_on(newest.text)[:2] == ["refund-00", "refund-01"]
        assert "refund-00" not in cases_on(first)

        # The count is on every page's nav, not only the queue's.
        for path in ("/console/", "/console/sagas/case-001", "/console/dead-letters"):
            assert nav_count((await c.get(path)).text) == 260, path


async def page_of(c: httpx.AsyncClient, saga_id: str) -> str:
    """The queue page (oldest first) that shows ``saga_id``."""
    _, pages = await walk(c, "/console/manual")
    return next(p for p in pages if saga_id in cases_on(p))


async def test_cards_show_facts_and_open_holds_never_personal_fields() -> None:
    async with seeded_console() as q:
        page = (await q.client.get("/console/manual", params={"min_wait": "5h 30min"})).text
        # case-249 (i % 3 == 0): the order undone, the authorisation's void failed.
        undoing = card(page, "case-249")
        for fact in ("<dt>amount</dt><dd>4449</dd>", "<dt>currency</dt><dd>EUR</dd>"):
            assert fact in undoing
        assert "<dt>sku</dt><dd>sku-4</dd>" in undoing and "<dt>qty</dt><dd>1</dd>" in undoing
        assert "<dt>open holds</dt><dd><b>authorize_payment</b> undo failed</dd>" in undoing
        # case-247 (i % 3 == 1): the capture's outcome is unknown, every hold before it open.
        unknown = card(page, "case-247")
        holds = re.search(r"<dt>open holds</dt><dd>(.*?)</dd>", unknown)
        assert holds is not None
        assert re.findall(r"<b>(\w+)</b> open", holds.group(1)) == STEPS[:4]
        assert "stuck at <b>capture_payment</b>" in unknown
        # The tokens of the personal fields are never on a card.
        for personal in ("cust-000249", "card-ok-249", "addr-ok-249", "customer", "ship_to"):
            assert personal not in undoing, personal


async def test_filters_narrow_the_queue_and_the_pager_keeps_them() -> None:
    async with seeded_console() as q:
        c = q.client

        async def matched(**params: str) -> list[str]:
            query = "&".join(f"{k}={v}" for k, v in params.items())
            ids, pages = await walk(c, f"/console/manual?{query}")
            assert "260 open cases" in pages[0] and nav_count(pages[0]) == 260
            if ids:
                assert f"{len(ids)} of 260 match these filters." in pages[0]
            return ids

        refunds = await matched(definition="refund")
        assert refunds == [f"refund-{i:02d}" for i in reversed(range(10))]
        capture = await matched(step="capture_payment")
        assert capture == [f"case-{i:03d}" for i in reversed(range(CASES)) if i % 3 == 1]
        assert len(capture) == 83, "more than a page: the next links kept the filter"
        # A piece of the reason, whatever its case.
        void = await matched(reason="void+REFUSED")
        assert void == [f"case-{i:03d}" for i in reversed(range(CASES)) if i % 3 == 0]
        # Waiting at least 4 h: cases 148..249 (4 h = 14400 s = 11520 + 60 * 48).
        long_wait = await matched(min_wait="4+h")
        assert long_wait == [f"case-{i:03d}" for i in reversed(range(148, CASES))]
        assert await matched(min_wait="14400") == long_wait  # a bare number is seconds
        both = await matched(step="commit_inventory", min_wait="4h", sort="newest")
        assert both == [f"case-{i:03d}" for i in range(148, CASES) if i % 3 == 2]
        assert await matched(reason="nothing+like+this") == []
        empty = (await c.get("/console/manual", params={"reason": "nothing like this"})).text
        assert "No case matches these filters." in empty

        # A decision taken on a filtered page comes back to the same page.
        query = {"step": "capture_payment", "offset": "50"}
        page = await c.get("/console/manual", params=query)
        next_url = re.search(r'name="next" value="([^"]+)"', page.text)
        token = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
        assert next_url and token
        assert html.unescape(next_url.group(1)) == "/console/manual?step=capture_payment&offset=50"
        saga_id = cases_on(page.text)[0]
        form = {
            "action": "mark_done",
            "reason": "captured: checked with the provider",
            "csrf": token.group(1),
            "next": html.unescape(next_url.group(1)),
            "version": "9",
            "confirm": "yes",  # mark_done cannot be taken back: confirmed
        }
        done = await c.post(f"/console/sagas/{saga_id}/act", data=form)
        assert done.status_code == 303, done.text
        assert done.headers["location"] == (
            "/console/manual?step=capture_payment&offset=50&done=mark_done"
        )
        assert (await q.engine.get(saga_id)).state is not SagaState.FAILED_NEEDS_MANUAL
        after = await c.get(done.headers["location"])
        assert "Decision recorded: mark_done." in after.text and "259 open cases" in after.text


async def test_bad_filters_are_explained_on_the_page() -> None:
    async with seeded_console() as q:
        c = q.client
        refused = {
            "/console/manual?min_wait=soon": "waiting at least: must be a duration such as",
            "/console/manual?min_wait=-5": "waiting at least: must be a duration such as",
            "/console/manual?min_wait=2+weeks": "waiting at least: must be a duration such as",
            "/console/manual?step=no_such_step": "step: no saga definition this console knows",
            "/console/manual?sort=sideways": "order: must be one of oldest, newest",
            "/console/manual?offset=-1": "page: must be a whole number",
            "/console/manual?reason=" + "x" * 201: "reason contains: must be at most 200",
            "/console/?min_age=abc": "age at least: must be a duration such as",
            "/console/?min_age=2h&max_age=1h": "age at least: must not exceed max_age",
            "/console/?state=BOGUS": "state: &#x27;BOGUS&#x27; is not one of RUNNING",
            "/console/?state=RUNNING,SUCCEEDED": "state: choose one state",
            "/console/?step=no_such_step": "step: no saga definition this console knows",
            "/console/?sort=random": "order: must be one of newest, oldest",
        }
        for path, message in refused.items():
            r = await c.get(path)
            assert r.status_code == 400, (path, r.status_code)
            assert "These filters cannot be used" in r.text and message in r.text, path
            # The form is still there to correct it; no list that was not asked for.
            assert 'form class="filters"' in r.text and "<article" not in r.text, path
            assert 'table class="sagas"' not in r.text, path
            assert nav_count(r.text) == 260, path


async def test_saga_list_has_age_time_in_state_order_and_filters() -> None:
    async with seeded_console() as q:
        c = q.client
        page = (await c.get("/console/")).text
        assert "<th>age</th>" in page and ">in state</th>" in page
        assert "sagas 1\u201350 of 266, newest first" in page

        oldest = (await c.get("/console/", params={"sort": "oldest"})).text
        rows = re.findall(r'<tr><td><a href="/console/sagas/([^"]+)"', oldest)
        assert rows[:6] == [f"run-{i}" for i in reversed(range(6))]
        # run-5: started 6 days ago, finished 6 min ago.
        assert '<span class="age" title="started' in oldest
        run5 = re.search(r'sagas/run-5".*?</tr>', oldest, re.S)
        assert run5 and ">6 d</span>" in run5.group(0) and ">6 min</span>" in run5.group(0)
        in_state = (await c.get("/console/", params={"sort": "in_state"})).text
        rows = re.findall(r'<tr><td><a href="/console/sagas/([^"]+)"', in_state)
        assert rows[0] == "case-249", "the longest unchanged first"

        by_step = await c.get("/console/", params={"step": "capture_payment"})
        rows = re.findall(r'<tr><td><a href="/console/sagas/([^"]+)"', by_step.text)
        # 83 cases stopped there and 4 running sagas are at it: 87, a page of 50.
        assert "sagas 1\u201350 of 87" in by_step.text and len(rows) == 50
        assert 'rel="next" href="/console/?step=capture_payment&amp;offset=50"' in by_step.text
        aged = await c.get("/console/", params={"min_age": "2d", "sort": "oldest"})
        rows = re.findall(r'<tr><td><a href="/console/sagas/([^"]+)"', aged.text)
        assert rows == [f"run-{i}" for i in reversed(range(1, 6))]
        young = await c.get("/console/", params={"max_age": "1 h", "state": "FAILED_NEEDS_MANUAL"})
        rows = re.findall(r'<tr><td><a href="/console/sagas/([^"]+)"', young.text)
        assert sorted(rows) == [f"refund-{i:02d}" for i in range(10)]


async def test_in_chromium_every_case_is_reached_by_clicking_next(shots: Path) -> None:
    async with seeded_console() as q, console_url(q.engine) as base, chromium() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(f"{base}/manual")
        await expect(page.locator("h1")).to_have_text("Manual queue: 260 open cases")
        await expect(page.locator("header nav .nav-count")).to_have_text("260")
        first = page.locator("article.case").first
        await expect(first.locator(".waiting")).to_have_text("waiting 5 h 41 min")
        await shot(page, shots, "manual-queue-paged")
        seen: list[str] = []
        for _ in range(6):
            cards = page.locator("article.case")
            seen += [await c.get_attribute("data-saga") or "" for c in await cards.all()]
            more = page.locator('a[rel="next"]')
            if await more.count() == 0:
                break
            href = await more.get_attribute("href") or ""
            await more.click()
            await page.wait_for_url(lambda at, href=href: at.endswith(href))
        everything = [manual_case(i) for i in range(CASES)] + [refund_case(i) for i in range(10)]
        assert seen == [s.saga_id for s in sorted(everything, key=lambda s: s.updated_at)]

        # The filter form is a GET form: its URL is the filtered view, to share.
        await page.goto(f"{base}/manual")
        await page.select_option('select[name="step"]', "capture_payment")
        await page.fill('input[name="min_wait"]', "4 h")
        await page.click("form.filters button")
        await expect(page.locator("p.matched")).to_have_text("34 of 260 match these filters.")
        assert "step=capture_payment" in page.url and "min_wait=4+h" in page.url
