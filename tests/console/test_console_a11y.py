"""Accessibility and layout of the console in a real browser (Debian's Chromium via
Playwright): text contrast, the skip link, the timeline as text for the keyboard, the
polite live region, no sideways scrolling on a 400 px wide screen, and a timeline that
breaks its axis over a long wait with no label drawn over another.

The checks are written here in JavaScript run by the page; an audit with axe-core (from
npm, for these tests only: ``tests/console/axe``, installed by ``.ci/browser``) runs too
when it is installed, and is skipped, saying why, when it is not.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from console_support import chromium, order_data, running_console
from playwright.async_api import Page, expect
from sagakit_checkout.sagas import CHECKOUT, checkout_definition

from sagakit import HistoryEntry, SagaInstance, SagaState, StepState, StepStatus
from sagakit.graph import timeline_svg

SVG = "{http://www.w3.org/2000/svg}"
AXE = Path(__file__).parent / "axe" / "node_modules" / "axe-core" / "axe.min.js"
# The serious and critical WCAG 2.1 A/AA violations axe-core finds on the page.
AXE_JS = """
async () => {
  const tags = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"];
  const result = await axe.run(document, { runOnly: { type: "tag", values: tags } });
  return result.violations
    .filter((v) => v.impact === "serious" || v.impact === "critical")
    .map((v) => `${v.id}: ${v.nodes.slice(0, 3).map((n) => n.target.join(" ")).join(", ")}`);
}
"""
DEFINITION = checkout_definition()

# WCAG 2.1 contrast of every visible piece of text against the background it sits on:
# the nearest ancestor with an opaque background colour (the page is white). SVG text
# is measured by its fill against the lighter of the timeline's two lane colours.
CONTRAST_JS = """
() => {
  const rgb = (s) => (s.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const ratio = (a, b) => {
    const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p);
    return (x + 0.05) / (y + 0.05);
  };
  const background = (el) => {
    for (let n = el; n && n.nodeType === 1; n = n.parentElement) {
      const c = rgb(getComputedStyle(n).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] === 1)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const low = [];
  for (const el of document.querySelectorAll("body *")) {
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own || el.closest("title, script, style, .sr-only, a.skip")) continue;
    const box = el.getBoundingClientRect();
    if (!box.width || !box.height || getComputedStyle(el).visibility === "hidden") continue;
    const inSvg = el.closest("svg") !== null;
    const fg = rgb(inSvg ? getComputedStyle(el).fill : getComputedStyle(el).color);
    const bg = inSvg ? [248, 250, 252] : background(el);
    const r = ratio(fg.slice(0, 3), bg);
    const text = el.textContent.trim().slice(0, 30);
    if (r < 4.5) low.push(`${el.tagName} "${text}" ${r.toFixed(2)}`);
  }
  return low;
}
"""


# Pairs of texts of the timeline whose drawn boxes intersect (measured by the browser).
OVERLAP_JS = """
(svg) => {
  const boxes = [...svg.querySelectorAll("text")].map((t) => [t.textContent, t.getBBox()]);
  const hits = [];
  boxes.forEach(([a, p], i) => boxes.slice(i + 1).forEach(([b, q]) => {
    const apart = p.x >= q.x + q.width || q.x >= p.x + p.width;
    if (!apart && p.y < q.y + q.height && q.y < p.y + p.height) {
      hits.push(`${a} / ${b}`);
    }
  }));
  return hits;
}
"""


async def low_contrast(page: Page) -> list[str]:
    """The texts of the page below 4.5:1 (with their ratio)."""
    found: list[str] = await page.evaluate(CONTRAST_JS)
    return found


async def test_contrast_skip_link_and_timeline_text(tmp_path: Path) -> None:
    async with running_console(tmp_path / "data") as console, chromium() as browser:
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        manual = console.sagas["order-manual-5"].saga_id
        for path in (
            "/",
            "/manual",
            f"/sagas/{manual}",
            f"/sagas/{console.sagas['order-ok-1'].saga_id}",
        ):
            await page.goto(f"{console.url}{path}")
            await expect(page.locator("#live-indicator")).to_have_text(re.compile("live|final"))
            low = await low_contrast(page)
            assert low == [], (path, low)
            if path.startswith("/sagas/"):
                timeline = page.locator("svg.saga-timeline")
                assert await timeline.evaluate(OVERLAP_JS) == [], path

        # The skip link is the first stop of the keyboard and lands in #content.
        await page.goto(f"{console.url}/sagas/{manual}")
        await page.keyboard.press("Tab")
        focused = page.locator(":focus")
        await expect(focused).to_have_text("Skip to content")
        await expect(focused).to_be_in_viewport()
        await page.keyboard.press("Enter")
        assert await page.evaluate("document.activeElement.id") == "content"

        # The timeline's tooltips, as text a keyboard opens.
        summary = page.locator("details.timeline-text summary")
        await summary.focus()
        await page.keyboard.press("Enter")
        entries = page.locator("details.timeline-text li")
        await expect(entries.first).to_be_visible()
        await expect(page.locator("details.timeline-text")).to_contain_text(
            "authorize_payment · compensation failed"
        )
        assert await entries.count() > 5


async def test_narrow_screen_and_live_announcement(tmp_path: Path) -> None:
    async with running_console(tmp_path / "data") as console, chromium() as browser:
        page = await browser.new_page(viewport={"width": 400, "height": 800})
        manual = console.sagas["order-manual-5"].saga_id
        for path in ("/", "/manual", f"/sagas/{manual}"):
            await page.goto(f"{console.url}{path}")
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= 400, f"{path} is {width} px wide at 400 px"

        # A live update is announced briefly in the polite region, not the whole page.
        await page.goto(f"{console.url}/")
        status = page.locator("#live-status")
        await expect(status).to_have_attribute("aria-live", "polite")
        await expect(page.locator("#live-indicator")).to_have_text("live")
        saga = await console.engine.start(CHECKOUT, "order-live-6", order_data("order-ok-1"))
        await console.engine.wait(saga.saga_id, 30)
        await expect(page.locator("table.sagas")).to_contain_text("order-live-6")
        await expect(status).to_contain_text("Updated at")
        assert len(await status.inner_text()) < 80
        assert await page.evaluate("document.documentElement.scrollWidth") <= 400

        # The nav's open-case count, outside #content, follows a refresh and is told.
        await expect(page.locator("header nav .nav-count")).to_have_text("1")
        await console.engine.resolve(manual, "mark_compensated", reason="void", actor="ann")
        await expect(page.locator("header nav .nav-count")).to_have_text("0")
        await expect(status).to_contain_text("0 open cases")


def long_wait_history() -> tuple[SagaInstance, list[HistoryEntry]]:
    """A checkout that waited ten minutes for a retry of its payment, then went to a
    person, who decided a few milliseconds later (labels close together)."""
    rows: list[tuple[float, str, str | None, dict[str, Any]]] = [
        (0.0, "saga.started", None, {}),
        (0.0, "step.started", "create_order", {"attempt": 1}),
        (0.05, "step.succeeded", "create_order", {"attempt": 1}),
        (0.05, "step.started", "authorize_payment", {"attempt": 1}),
        (0.1, "retry.scheduled", "authorize_payment", {"phase": "action", "delay": 600}),
        (600.1, "step.started", "authorize_payment", {"attempt": 2}),
        (600.2, "step.failed", "authorize_payment", {"attempt": 2}),
        (600.2, "manual.escalated", "authorize_payment", {"reason": "declined twice"}),
        (600.2, "saga.finished", None, {"outcome": "FAILED_NEEDS_MANUAL"}),
        (600.21, "manual.resolved", "authorize_payment", {"action": "x", "actor": "ann"}),
        (600.21, "saga.finished", None, {"outcome": "COMPENSATED"}),
    ]
    history = [
        HistoryEntry("saga-w", n + 1, 1000.0 + at, ev, SagaState.RUNNING, "X", step, detail)
        for n, (at, ev, step, detail) in enumerate(rows)
    ]
    inst = SagaInstance(
        saga_id="saga-w",
        definition=DEFINITION.name,
        definition_version=DEFINITION.version,
        business_key="order-wait",
        correlation_id="saga-w",
        state=SagaState.COMPENSATED,
        status="X",
        data={},
        steps=[StepState(status=StepStatus.PENDING, attempt=0) for _ in DEFINITION.steps],
        created_at=1000.0,
        updated_at=1600.21,
        cursor=1,
    )
    return inst, history


def test_timeline_breaks_its_axis_over_a_long_wait() -> None:
    inst, history = long_wait_history()
    text = timeline_svg(DEFINITION, inst, history)
    root = ET.fromstring(text)
    breaks = [g for g in root.iter(f"{SVG}g") if g.get("class") == "break"]
    assert [g.get("data-seconds") for g in breaks] == ["600.0"]
    assert "10.0 min" in "".join(breaks[0].itertext())  # the label and the title say how long
    bars = [r for r in root.iter(f"{SVG}rect") if (r.get("class") or "").startswith("bar ")]
    order = next(r for r in bars if r.get("data-lane") == "create_order")
    # To scale, 50 ms of 10 min would be the 2 px minimum; with the break it is readable.
    assert float(order.get("width") or 0) > 40
    ends = [float(r.get("x") or 0) + float(r.get("width") or 0) for r in bars]
    assert max(ends) <= 930.01 and min(float(r.get("x") or 0) for r in bars) >= 170
    assert text == timeline_svg(DEFINITION, inst, history)  # deterministic


async def test_timeline_labels_do_not_overlap() -> None:
    inst, history = long_wait_history()
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1200, "height": 500})
        await page.set_content(f"<!doctype html><body>{timeline_svg(DEFINITION, inst, history)}")
        timeline = page.locator("svg.saga-timeline")
        assert await timeline.evaluate(OVERLAP_JS) == []
        # Both outcomes and both decision markers are still written out.
        for label in ("FAILED_NEEDS_MANUAL", "COMPENSATED", "ann: x", "manual"):
            await expect(timeline.locator("text", has_text=label).first).to_be_visible()


@pytest.mark.skipif(
    not AXE.exists(),
    reason="axe-core is not installed: `npm ci --prefix tests/console/axe` (.ci/browser runs it)",
)
async def test_axe_finds_no_serious_violations(tmp_path: Path) -> None:
    async with running_console(tmp_path / "data") as console, chromium() as browser:
        manual = console.sagas["order-manual-5"].saga_id
        # All main pages wide; narrow, the saga (its tables then scroll in their box).
        wide = ["/", "/manual", f"/sagas/{manual}"]
        for width, paths in ((1400, wide), (400, wide[2:])):
            # The console's CSP refuses inline scripts: only the audit's may bypass it.
            context = await browser.new_context(
                viewport={"width": width, "height": 900}, bypass_csp=True
            )
            page = await context.new_page()
            for path in paths:
                await page.goto(f"{console.url}{path}")
                await expect(page.locator("#live-indicator")).to_have_text("live")
                await page.add_script_tag(path=str(AXE))
                found = await page.evaluate(AXE_JS)
                assert found == [], (width, path, found)
            await context.close()
