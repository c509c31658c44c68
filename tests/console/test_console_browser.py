"""The operator console in a real browser: Debian's headless Chromium via Playwright,
against the console served by uvicorn over an embedded checkout engine.

Each test writes a screenshot of every page it visits (see ``conftest.shots``).
"""

from __future__ import annotations

from pathlib import Path

from console_support import ORDERS, chromium, order_data, running_console
from playwright.async_api import Page, expect
from sagakit_checkout.sagas import CHECKOUT

from sagakit import SagaState

STEPS = [
    "create_order",
    "authorize_payment",
    "reserve_inventory",
    "create_shipment",
    "capture_payment",
    "commit_inventory",
    "complete_order",
]


async def shot(page: Page, shots: Path, name: str) -> None:
    await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


async def test_list_shows_counts_and_filters(tmp_path: Path, shots: Path) -> None:
    async with running_console(tmp_path / "data") as console, chromium() as browser:
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        await page.goto(f"{console.url}/")
        await expect(page.locator("h1")).to_have_text("Sagas")
        counts = page.locator(".counts")
        await expect(counts.locator('[data-state="all"] b')).to_have_text(str(len(ORDERS)))
        await expect(counts.locator('[data-state="SUCCEEDED"] b')).to_have_text("3")
        await expect(counts.locator('[data-state="COMPENSATED"] b')).to_have_text("1")
        await expect(counts.locator('[data-state="FAILED_NEEDS_MANUAL"] b')).to_have_text("1")
        await expect(page.locator("table.sagas tbody tr")).to_have_count(len(ORDERS))
        await expect(page.locator("#live-indicator")).to_have_text("live")
        await shot(page, shots, "list")

        # Filter by state with the count chip, then by the form's select.
        await counts.locator('[data-state="FAILED_NEEDS_MANUAL"]').click()
        rows = page.locator("table.sagas tbody tr")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("order-manual-5")
        await page.select_option('select[name="state"]', "SUCCEEDED")
        await page.click("form.filters button")
        await expect(rows).to_have_count(3)
        assert "state=SUCCEEDED" in page.url
        await shot(page, shots, "list-succeeded")

        # Search by business key (a substring), with the state filter cleared.
        await page.select_option('select[name="state"]', "")
        await page.fill('input[name="q"]', "declined")
        await page.click("form.filters button")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("order-declined-4")
        await page.fill('input[name="q"]', "no-such-order")
        await page.click("form.filters button")
        await expect(page.locator("p.empty")).to_be_visible()

        # Live: a saga started while the list is open shows up without a reload.
        await page.goto(f"{console.url}/")
        await expect(page.locator("#live-indicator")).to_have_text("live")
        saga = await console.engine.start(CHECKOUT, "order-live-6", order_data("order-ok-1"))
        await console.engine.wait(saga.saga_id, 30)
        await expect(counts.locator('[data-state="all"] b')).to_have_text(str(len(ORDERS) + 1))
        await expect(page.locator("table.sagas")).to_contain_text("order-live-6")


async def test_detail_shows_timeline_diagram_flow_and_history(tmp_path: Path, shots: Path) -> None:
    async with running_console(tmp_path / "data") as console, chromium() as browser:
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        await page.goto(f"{console.url}/")
        await page.click("text=order-manual-5")
        await expect(page.locator("h1")).to_have_text("order-manual-5")
        await expect(page.locator("dl.facts")).to_contain_text("FAILED_NEEDS_MANUAL")

        timeline = page.locator("svg.saga-timeline")
        await expect(timeline).to_be_visible()
        lanes = await timeline.locator("g.lane").evaluate_all(
            "gs => gs.map(g => g.getAttribute('data-lane'))"
        )
        assert lanes == ["saga", *STEPS]
        payment_bars = timeline.locator('rect.bar[data-lane="authorize_payment"]')
        kinds = await payment_bars.evaluate_all("rs => rs.map(r => r.getAttribute('class'))")
        assert "bar ok" in kinds and kinds.count("bar comp-failed") == 3
        await expect(timeline.locator("g.mark.escalated")).to_have_count(1)
        await expect(timeline.locator("g.mark.finished")).to_contain_text("FAILED_NEEDS_MANUAL")
        assert await timeline.locator("rect.bar title").count() > 0  # tooltips

        diagram = page.locator("svg.saga-diagram")
        await expect(diagram.locator("g.step.current")).to_have_attribute(
            "data-step", "authorize_payment"
        )
        await expect(diagram.locator('g.step[data-step="create_shipment"]')).to_have_attribute(
            "data-status", "FAILED"
        )
        await expect(diagram.locator("g.step.pivot")).to_have_attribute(
            "data-step", "capture_payment"
        )
        await expect(diagram.locator("path.comp-edge")).to_have_count(4)

        flow = page.locator("svg.saga-flow")
        columns = await flow.locator("g.column").evaluate_all(
            "gs => gs.map(g => g.getAttribute('data-column'))"
        )
        assert columns == ["orchestrator", "order", "payment", "inventory", "shipping"]
        await expect(flow.locator("g.arrow.comp")).to_have_count(4)

        steps = page.locator("table.steps")
        await expect(steps).to_contain_text("COMPENSATION_FAILED")
        await expect(steps).to_contain_text("bad address")
        history = page.locator("table.history")
        await expect(history).to_contain_text("manual.escalated")
        await expect(history).to_contain_text("compensation.escalated")
        await shot(page, shots, "detail-manual")

        await page.goto(f"{console.url}/sagas/{console.sagas['order-slow-3'].saga_id}")
        slow = page.locator("svg.saga-timeline")
        await expect(slow.locator('rect.bar.wait[data-lane="create_shipment"]')).to_have_count(2)
        await expect(page.locator("form.decide")).to_have_count(0)  # nothing to decide
        await shot(page, shots, "detail-succeeded")


async def test_resolving_a_manual_case_by_clicking(tmp_path: Path, shots: Path) -> None:
    async with running_console(tmp_path / "data") as console, chromium() as browser:
        manual = console.sagas["order-manual-5"]
        assert manual.state is SagaState.FAILED_NEEDS_MANUAL
        # A second tab watches the saga: it must follow the decision live.
        watcher = await browser.new_page(viewport={"width": 1400, "height": 900})
        await watcher.goto(f"{console.url}/sagas/{manual.saga_id}")
        await expect(watcher.locator("#live-indicator")).to_have_text("live")
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        await page.goto(f"{console.url}/manual")
        case = page.locator(f'article.case[data-saga="{manual.saga_id}"]')
        await expect(case).to_contain_text("authorize_payment")
        await expect(case).to_contain_text("failed on every rung")
        buttons = await case.locator("button.act").evaluate_all(
            "bs => bs.map(b => b.dataset.action)"
        )
        assert buttons == ["retry", "mark_compensated", "accept_partial", "use_rung"]
        await shot(page, shots, "manual-queue")

        # The reason is required: clicking without one submits nothing.
        await case.locator('button[data-action="mark_compensated"]').click()
        assert page.url.endswith("/manual")
        await case.locator("textarea[name=reason]").fill("voided by hand at the provider")
        await case.locator('button[data-action="mark_compensated"]').click()
        # It cannot be taken back: a page says what it does, and asks to confirm it.
        await expect(page.locator("h1")).to_have_text("Confirm mark_compensated")
        await expect(page.locator("section.what-it-does")).to_contain_text("nothing is sent")
        await expect(page.locator("textarea[name=reason]")).to_have_value(
            "voided by hand at the provider"
        )
        await page.click('button[data-confirm="mark_compensated"]')
        await page.wait_for_url("**/manual?done=mark_compensated")
        await expect(page.locator(".flash")).to_contain_text("mark_compensated")
        await expect(page.locator(f'article.case[data-saga="{manual.saga_id}"]')).to_have_count(0)
        await expect(page.locator("p.empty")).to_be_visible()
        await shot(page, shots, "manual-queue-after")

        done = await console.engine.wait(manual.saga_id, 30)
        assert done.state is SagaState.COMPENSATED
        await expect(watcher.locator("dl.facts")).to_contain_text("COMPENSATED")
        await expect(watcher.locator("table.history")).to_contain_text("manual.resolved")
        await expect(watcher.locator("#live-indicator")).to_have_text("final")
        await expect(watcher.locator("form.decide")).to_have_count(0)
        await page.goto(f"{console.url}/sagas/{manual.saga_id}")
        row = page.locator("table.history tr", has_text="manual.resolved")
        await expect(row).to_have_count(1)
        await expect(row).to_contain_text('"actor": "tester"')
        await expect(row).to_contain_text("voided by hand at the provider")
        await expect(page.locator("svg.saga-timeline g.mark.manual")).to_contain_text(
            "tester: mark_compensated"
        )
        await shot(page, shots, "detail-resolved")


async def test_pages_work_without_javascript(tmp_path: Path, shots: Path) -> None:
    async with running_console(tmp_path / "data") as console, chromium() as browser:
        context = await browser.new_context(java_script_enabled=False)
        page = await context.new_page()
        await page.goto(f"{console.url}/manual")
        await expect(page.locator("#live-indicator")).to_be_hidden()
        case = page.locator("article.case")
        await case.locator("textarea[name=reason]").fill("customer agreed to keep it")
        await case.locator('button[data-action="accept_partial"]').click()
        # The void failed on every rung: the hold is open, so the person forces it.
        await expect(page.locator("div.holds")).to_contain_text("authorize_payment")
        await page.check("input[name=force]")
        await page.click('button[data-confirm="accept_partial"]')
        await page.wait_for_url("**/manual?done=accept_partial")
        inst = await console.engine.get(console.sagas["order-manual-5"].saga_id)
        assert inst.state is SagaState.PARTIAL_ACCEPTED
        await page.goto(f"{console.url}/?state=PARTIAL_ACCEPTED")
        await expect(page.locator("table.sagas tbody tr")).to_have_count(1)
        await shot(page, shots, "list-no-js")
        await context.close()
