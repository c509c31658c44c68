"""The console's routes over HTTP: permissions, CSRF, input checks, redirects, escaping,
pictures, static files and event streams.

Requests go through Playwright's HTTP client (it keeps cookies like a browser) to the
console served by uvicorn; one test looks at the read-only pages in Chromium.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from console_support import chromium, http_client, order_data, running_console
from playwright.async_api import APIRequestContext, expect
from sagakit_checkout.sagas import CHECKOUT

from sagakit import SagaState

ODD_KEY = "<script>alert(1)</script>\"'&order"


async def token_of(client: APIRequestContext, path: str) -> str:
    """The CSRF token of the first form on a page (the GET sets the cookie)."""
    page = await client.get(path)
    assert page.status == 200
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', await page.text())
    assert found, "no form on the page"
    return found.group(1)


async def test_forms_are_refused_without_permission(tmp_path: Path, shots: Path) -> None:
    async with running_console(tmp_path / "data", can_act=False) as console:
        saga_id = console.sagas["order-manual-5"].saga_id
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1400, "height": 700})
            await page.goto(f"{console.url}/manual")
            await expect(page.locator("article.case")).to_have_count(1)
            await expect(page.locator("form.decide")).to_have_count(0)
            await expect(page.locator("p.note")).to_contain_text("look but not act")
            await page.screenshot(path=str(shots / "manual-read-only.png"))
            await page.goto(f"{console.url}/sagas/{saga_id}")
            await expect(page.locator("form.decide")).to_have_count(0)
        async with http_client(console.url + "/") as client:
            form = {"action": "accept_partial", "reason": "because", "csrf": "x" * 64}
            refused = await client.post(f"sagas/{saga_id}/act", form=form)
            assert refused.status == 403
            assert "Not allowed" in await refused.text()
        inst = await console.engine.get(saga_id)
        assert inst.state is SagaState.FAILED_NEEDS_MANUAL


async def test_csrf_origin_and_input_checks(tmp_path: Path) -> None:
    async with running_console(tmp_path / "data") as console:
        saga_id = console.sagas["order-manual-5"].saga_id
        act = f"sagas/{saga_id}/act"
        async with (
            http_client(console.url + "/") as client,
            http_client(console.url + "/") as stranger,
        ):
            page = await client.get("manual")
            cookie = page.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie
            assert "Path=/console" in cookie
            csp = page.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
            token = await token_of(client, "manual")
            version = str((await console.engine.get(saga_id)).version)
            good = {
                "action": "use_rung",
                "rung": "2",
                "reason": "try the credit note again",
                "version": version,
            }

            no_token = await client.post(act, form={**good})
            assert no_token.status == 403 and "Form refused" in await no_token.text()
            # A token is bound to the browser's cookie: another browser cannot reuse it.
            other = await stranger.post(act, form={**good, "csrf": token})
            assert other.status == 403
            cross = await client.post(
                act, form={**good, "csrf": token}, headers={"Origin": "http://evil.example"}
            )
            assert cross.status == 403
            no_reason = await client.post(act, form={**good, "csrf": token, "reason": "  "})
            assert no_reason.status == 400 and "Reason missing" in await no_reason.text()
            unknown = await client.post(act, form={**good, "csrf": token, "action": "drop"})
            assert unknown.status == 400
            wrong = await client.post(act, form={**good, "csrf": token, "action": "mark_done"})
            assert wrong.status == 409 and "use mark_compensated" in await wrong.text()
            finished = console.sagas["order-ok-1"].saga_id
            done_version = str((await console.engine.get(finished)).version)
            cancel = {
                "action": "cancel",
                "reason": "too late",
                "csrf": token,
                "version": done_version,
            }
            late = await client.post(f"sagas/{finished}/act", form=cancel)
            assert late.status == 409 and "SUCCEEDED" in await late.text()
            assert (await console.engine.get(saga_id)).version == console.sagas[
                "order-manual-5"
            ].version, "refused posts changed nothing"

            done = await client.post(
                act,
                form={**good, "csrf": token, "next": "https://evil.example/x"},
                headers={"Origin": console.url.rsplit("/console", 1)[0]},
                max_redirects=0,
            )
            assert done.status == 303
            assert done.headers["location"] == f"/console/sagas/{saga_id}?done=use_rung"
        history = await console.engine.store.history(saga_id)
        resolved = [h for h in history if h.event == "manual.resolved"]
        assert [(h.detail["action"], h.detail["actor"], h.detail["rung"]) for h in resolved] == [
            ("use_rung", "tester", 2)
        ]


async def test_escaping_pictures_static_and_events(tmp_path: Path) -> None:
    async with running_console(tmp_path / "data") as console:
        odd = await console.engine.start(CHECKOUT, ODD_KEY, order_data("order-ok-1"))
        await console.engine.wait(odd.saga_id, 30)
        async with chromium() as browser:
            page = await browser.new_page()
            dialogs: list[str] = []
            page.on("dialog", lambda d: dialogs.append(d.message))
            await page.goto(f"{console.url}/?q=script")
            await expect(page.locator("table.sagas tbody tr")).to_have_count(1)
            await page.locator("table.sagas a").first.click()
            await expect(page.locator("h1")).to_have_text(ODD_KEY)
            assert dialogs == []
        async with http_client(console.url + "/") as client:
            listing = await (await client.get("")).text()
            assert "<script>alert" not in listing
            assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&amp;order" in listing

            saga_id = console.sagas["order-manual-5"].saga_id
            mmd = await client.get(f"sagas/{saga_id}/pictures/diagram.mmd")
            assert mmd.headers["content-type"].startswith("text/plain")
            assert (await mmd.text()).startswith("flowchart LR")
            dot = await client.get(f"sagas/{saga_id}/pictures/diagram.dot")
            assert (await dot.text()).startswith('digraph "checkout@1"')
            for name in ("timeline.svg", "diagram.svg", "flow.svg"):
                pic = await client.get(f"sagas/{saga_id}/pictures/{name}")
                assert pic.headers["content-type"] == "image/svg+xml"
                ET.fromstring(await pic.text())
            assert (await client.get(f"sagas/{saga_id}/pictures/other.svg")).status == 404
            assert (await client.get("sagas/no-such-saga")).status == 404

            css = await client.get("static/console.css")
            assert css.status == 200 and css.headers["content-type"].startswith("text/css")
            assert (await client.get("static/console.js")).status == 200
            assert (await client.get("static/secrets.txt")).status == 404

            # A finished saga's stream says where it is, then that it is final.
            done = console.sagas["order-ok-1"]
            stream = await client.get(f"sagas/{done.saga_id}/events")
            assert stream.headers["content-type"].startswith("text/event-stream")
            text = await stream.text()
            assert f'event: change\ndata: {{"tag": "{done.version}"}}' in text
            assert text.rstrip().endswith("event: end\ndata: {}")
