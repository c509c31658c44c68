"""A choreographed saga in the console, in Chromium: a view's detail and a record made
by hand (the tracker's views have no driver: no retry, compensate or cancel buttons)."""

from __future__ import annotations

from pathlib import Path

from console_support import chromium, console_url
from playwright.async_api import expect
from sagakit_checkout.choreography import CHOREOGRAPHY, open_choreography

from sagakit import SagaState
from sagakit.testing.views import escalate, heard


async def test_a_stuck_choreography_is_marked_compensated_by_hand(
    tmp_path: Path, shots: Path
) -> None:
    ch = open_choreography(tmp_path / "ch", synchronous="NORMAL", sla=600.0)
    async with (
        ch.engine(sla_check_every=3600.0, idle_poll=0.05) as engine,
        console_url(engine) as url,
        chromium() as browser,
    ):
        await heard(ch.tracker, "o-7", ["OrderCreated", "PaymentAuthorized", "InventoryFailed"])
        assert await escalate(ch.tracker) == 1
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        await page.goto(f"{url}/?definition={CHOREOGRAPHY}")
        await page.click("text=o-7")
        await expect(page.locator("h1")).to_have_text("o-7")
        await expect(page.locator("p.note").first).to_contain_text("no process drives them")
        steps = page.locator("table.steps tbody tr")
        await expect(steps).to_have_count(7)
        await expect(steps.nth(2)).to_contain_text("reserve_inventory")
        await expect(steps.nth(2)).to_contain_text("FAILED")
        buttons = page.locator("form.decide button")
        await expect(buttons).to_have_count(2)  # mark_compensated, accept_partial
        await page.screenshot(path=str(shots / "choreography-view.png"), full_page=True)

        await page.fill("textarea[name=reason]", "voided and released by hand")
        await page.click('button[data-action="mark_compensated"]')
        await expect(page.locator("section.what-it-does")).to_contain_text("no compensation")
        await page.click('button[data-confirm="mark_compensated"]')
        await page.wait_for_url("**/sagas/o-7?done=mark_compensated")
        await expect(page.locator(".flash, .notice").first).to_contain_text("mark_compensated")
        await expect(page.locator("table.history")).to_contain_text("manual.resolved")
        await expect(page.locator("form.decide")).to_have_count(0)
        await expect(steps.nth(1)).to_contain_text("tester")  # done by hand, by whom
        await page.screenshot(path=str(shots / "choreography-resolved.png"), full_page=True)
        assert (await engine.get("o-7")).state is SagaState.COMPENSATED
