"""Safe decisions in the console, over HTTP: every form carries the saga version it was
rendered at and says what each decision does; a stale form is refused with 409 on a
page that keeps the typed reason and offers the decisions that apply now; an
irreversible decision is confirmed on a page that says what it does; an
``accept_partial`` with open holds needs the *force* box.

The console runs in process (httpx, no server) over a memory store holding the manual
cases of :mod:`test_console_queue`, with the engine's clock fixed; one test serves the
checkout's console and refuses a stale form in Chromium.
"""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from console_support import chromium, running_console
from playwright.async_api import Page, expect
from starlette.applications import Starlette
from starlette.routing import Mount
from test_console_queue import CHECKOUT, NOW, manual_case

from sagakit import Engine, SagaState
from sagakit.console import console_routes
from sagakit.stores.memory import MemoryStore

UNDOING, UNKNOWN, AFTER_PIVOT = "case-000", "case-001", "case-002"
"""A case whose void failed, one whose capture is unknown (holds open), one past the pivot."""


@asynccontextmanager
async def console() -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    store = MemoryStore("orchestrator")
    engine = Engine(store, [CHECKOUT], roles=frozenset(), clock=lambda: NOW)
    async with engine:
        async with store.transaction() as tx:
            for i in range(3):
                await tx.saga_insert(manual_case(i))
        routes = console_routes(engine, actor=lambda _: "tester", can_act=lambda _: True)
        app = Starlette(routes=[Mount("/console", routes=routes)])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            yield engine, client


async def shot(page: Page, shots: Path, name: str) -> None:
    await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def hidden(page: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert found, f"no {name} field"
    return html.unescape(found.group(1))


def reason_box(page: str) -> str:
    found = re.search(r'<textarea [^>]*name="reason"[^>]*>([^<]*)</textarea>', page)
    assert found, "no reason box"
    return html.unescape(found.group(1))


async def form_of(client: httpx.AsyncClient, saga_id: str) -> dict[str, str]:
    page = (await client.get(f"/console/sagas/{saga_id}")).text
    return {"csrf": hidden(page, "csrf"), "version": hidden(page, "version")}


async def test_forms_carry_the_version_and_say_what_each_decision_does() -> None:
    async with console() as (_, c):
        page = (await c.get("/console/manual")).text
        assert page.count('name="version" value="9"') == 3
        assert page.count("What each decision does") == 3
        assert 'data-action="mark_done" data-irreversible>' in page
        assert "no compensation" not in page  # the driven saga's texts, not a view's
        assert "nothing is sent for it and nothing checks it" in page
        detail = (await c.get(f"/console/sagas/{UNKNOWN}")).text
        assert hidden(detail, "version") == "9"


async def test_a_stale_form_is_refused_with_409_and_the_reason_kept() -> None:
    async with console() as (engine, c):
        form = await form_of(c, UNKNOWN)
        reason = "captured: checked with the provider <ticket 7>"
        # Another operator decides first: the saga moves on to version 10.
        await engine.resolve(UNKNOWN, "retry", reason="asked again", actor="other")
        stale = await c.post(
            f"/console/sagas/{UNKNOWN}/act",
            data={**form, "action": "mark_done", "reason": reason, "confirm": "yes"},
        )
        assert stale.status_code == 409, stale.text
        page = stale.text
        assert "The saga changed since this form was loaded" in page
        assert "you decided on version 9, it is at version 10 now (RUNNING)" in page
        assert 'role="alert"' in page
        assert reason_box(page) == reason  # the typed reason is kept (and escaped)
        # RUNNING now: the decisions that apply are offered on the new version.
        assert hidden(page, "version") == "10"
        inst = await engine.get(UNKNOWN)
        assert inst.version == 10 and inst.state is SagaState.RUNNING
        history = await engine.store.history(UNKNOWN)
        assert [h.detail["actor"] for h in history if h.event == "manual.resolved"] == ["other"]


async def test_an_irreversible_decision_is_confirmed_first() -> None:
    async with console() as (engine, c):
        form = await form_of(c, UNDOING)
        decision = {**form, "action": "mark_compensated", "reason": "voided by phone"}
        asked = await c.post(f"/console/sagas/{UNDOING}/act", data=decision)
        assert asked.status_code == 200, asked.text
        assert "Confirm mark_compensated on version 9" in asked.text
        assert "nothing is sent for it and nothing checks it" in asked.text
        assert (
            hidden(asked.text, "confirm") == "yes" and reason_box(asked.text) == "voided by phone"
        )
        assert (await engine.get(UNDOING)).version == 9  # nothing applied yet
        confirmed = {**decision, "csrf": hidden(asked.text, "csrf"), "confirm": "yes"}
        done = await c.post(f"/console/sagas/{UNDOING}/act", data=confirmed)
        assert done.status_code == 303, done.text
        assert (await engine.get(UNDOING)).state is SagaState.COMPENSATED  # nothing left to undo
        missing = {k: v for k, v in decision.items() if k != "version"}
        old = await c.post(f"/console/sagas/{AFTER_PIVOT}/act", data=missing)
        assert old.status_code == 400 and "Reload the page" in old.text


async def test_accept_partial_with_open_holds_needs_force() -> None:
    async with console() as (engine, c):
        form = await form_of(c, UNKNOWN)
        decision = {**form, "action": "accept_partial", "reason": "customer keeps it"}
        asked = await c.post(f"/console/sagas/{UNKNOWN}/act", data=decision)
        assert asked.status_code == 200
        assert "<li><b>create_order</b> open</li>" in asked.text
        assert 'name="force" value="yes" required' in asked.text
        unforced = await c.post(
            f"/console/sagas/{UNKNOWN}/act", data={**decision, "confirm": "yes"}
        )
        assert unforced.status_code == 409
        assert "a compensation or a hold is still open" in unforced.text
        assert 'class="problem" role="alert"' in unforced.text
        assert reason_box(unforced.text) == "customer keeps it"
        forced = await c.post(
            f"/console/sagas/{UNKNOWN}/act", data={**decision, "confirm": "yes", "force": "yes"}
        )
        assert forced.status_code == 303, forced.text
        inst = await engine.get(UNKNOWN)
        assert inst.state is SagaState.PARTIAL_ACCEPTED
        # Past the pivot nothing is held: confirmed without force.
        form = await form_of(c, AFTER_PIVOT)
        past = {**form, "action": "accept_partial", "reason": "recalled SKU, keep"}
        asked = await c.post(f"/console/sagas/{AFTER_PIVOT}/act", data=past)
        assert "Open holds: none." in asked.text and 'name="force"' not in asked.text
        done = await c.post(f"/console/sagas/{AFTER_PIVOT}/act", data={**past, "confirm": "yes"})
        assert done.status_code == 303


async def test_in_chromium_a_stale_form_is_refused_with_409_and_the_reason_kept(
    tmp_path: Path, shots: Path
) -> None:
    async with running_console(tmp_path / "data") as served, chromium() as browser:
        manual = served.sagas["order-manual-5"]
        page = await browser.new_page(viewport={"width": 1200, "height": 900})
        await page.goto(f"{served.url}/manual")
        case = page.locator(f'article.case[data-saga="{manual.saga_id}"]')
        await case.locator("textarea[name=reason]").fill("voided by hand, ticket 7")
        # Meanwhile another operator retries the void: it fails again, a new version.
        before = (await served.engine.get(manual.saga_id)).version
        await served.engine.resolve(manual.saga_id, "retry", reason="try again", actor="ann")
        moved = await served.engine.wait(manual.saga_id)  # back in the queue
        assert moved.state is SagaState.FAILED_NEEDS_MANUAL and moved.version > before
        async with page.expect_response(lambda r: r.url.endswith("/act")) as answer:
            await case.locator('button[data-action="mark_compensated"]').click()
        assert (await answer.value).status == 409
        await expect(page.locator("h1")).to_have_text("Decision refused")
        await expect(page.locator("p.problem[role=alert]")).to_contain_text(
            f"you decided on version {before}, it is at version {moved.version} now"
        )
        await expect(page.locator("textarea[name=reason]")).to_have_value(
            "voided by hand, ticket 7"
        )
        await shot(page, shots, "stale-form-refused")
        history = await served.engine.store.history(manual.saga_id)
        assert [h.detail["actor"] for h in history if h.event == "manual.resolved"] == ["ann"]


async def test_a_dead_letter_discard_is_confirmed_first() -> None:
    async with console() as (engine, c):
        async with engine.store.transaction() as tx:
            await tx.dead_letter("orchestrator", None, "not json", "parked by the test", NOW)
        [letter] = await engine.store.dead_letters("orchestrator")
        page = (await c.get("/console/dead-letters")).text
        url = f"/console/dead-letters/orchestrator/{letter.id}/settle"
        form = {"csrf": hidden(page, "csrf"), "settlement": "discard", "reason": "junk, ticket 9"}
        asked = await c.post(url, data=form)
        assert asked.status_code == 200 and "Confirm discard" in asked.text
        assert "never handled" in asked.text and reason_box(asked.text) == "junk, ticket 9"
        [still] = await engine.store.dead_letters("orchestrator")
        assert still.settled_at is None
        done = await c.post(url, data={**form, "confirm": "yes"})
        assert done.status_code == 303, done.text
        [settled] = await engine.store.dead_letters("orchestrator")
        assert settled.settlement == "discarded" and settled.settled_by == "tester"
