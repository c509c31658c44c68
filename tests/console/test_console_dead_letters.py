"""The console's dead-letter page in a real browser: a poison message parked by its
consumer is replayed by clicking, after the fix, and handled exactly once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from console_support import chromium, running_console
from playwright.async_api import Page, expect

from sagakit import Envelope, MessageKind
from sagakit.stores.base import Tx


async def shot(page: Page, shots: Path, name: str) -> None:
    await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def ping(message_id: str) -> Envelope:
    """A command the payment service does not handle yet (no reply expected)."""
    return Envelope(
        message_id=message_id,
        type="Ping",
        kind=MessageKind.COMMAND,
        source="ops-test",
        destination="payment",
        correlation_id="c-ping",
        occurred_at=time.time(),
        payload={"n": 1},
    )


async def test_replaying_a_dead_letter_by_clicking(tmp_path: Path, shots: Path) -> None:
    async with running_console(tmp_path / "data") as console, chromium() as browser:
        engine = console.engine
        payment = next(p for p in engine.participants if p.name == "payment")
        async with engine.store.transaction() as tx:  # the orchestrator's relay sends it
            await tx.outbox_add([ping("m-ping")], time.time())
        for _ in range(500):
            if await payment.store.dead_letter_count():
                break
            await asyncio.sleep(0.02)
        [letter] = await payment.store.dead_letters()
        assert "UnknownMessageType" in letter.reason

        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        await page.goto(f"{console.url}/")
        await page.click("header nav >> text=Dead letters")
        card = page.locator('article.dead-letter[data-message="m-ping"]')
        await expect(card).to_contain_text("UnknownMessageType")
        await expect(card).to_contain_text(f"payment/{letter.id}")
        await shot(page, shots, "dead-letters")

        handled: list[str] = []

        async def on_ping(tx: Tx, cmd: Envelope) -> None:
            handled.append(cmd.message_id)

        payment.add_handler("Ping", on_ping)  # the fix is deployed

        # The reason is required: clicking without one submits nothing.
        await card.locator('button[data-action="replay"]').click()
        await expect(card).to_be_visible()
        assert await payment.store.dead_letter_count() == 1
        await card.locator("textarea[name=reason]").fill("payment now handles Ping")
        await card.locator('button[data-action="replay"]').click()
        await expect(page.locator(".flash")).to_have_text("Dead letter replayed.")
        await expect(page.locator("p.empty")).to_have_text("No open dead letters.")
        for _ in range(500):
            if handled:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # time for a (wrong) second delivery to show up
        assert handled == ["m-ping"]
        assert await payment.store.inbox_has("payment", "m-ping")

        await page.click('a[data-status="settled"]')
        settled = page.locator('article.dead-letter[data-message="m-ping"]')
        await expect(settled).to_contain_text("replayed by tester")
        await expect(settled).to_contain_text("payment now handles Ping")
        await expect(settled.locator("form")).to_have_count(0)
        await shot(page, shots, "dead-letters-settled")


async def test_a_viewer_sees_dead_letters_without_the_form(tmp_path: Path) -> None:
    async with running_console(tmp_path / "data", can_act=False) as console, chromium() as b:
        store = console.engine.store
        async with store.transaction() as tx:
            await tx.dead_letter("orchestrator", None, "not json", "malformed message", 1.0)
        page = await b.new_page()
        await page.goto(f"{console.url}/dead-letters")
        card = page.locator("article.dead-letter")
        await expect(card).to_contain_text("malformed message")
        await expect(card.locator("form")).to_have_count(0)
        await expect(page.locator("p.note")).to_contain_text("look but not act")
