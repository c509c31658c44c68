"""The API and console on the choreographed checkout: the tracker's views are sagas too.

Nobody drives a choreography, so the manual queue offers only the records of what a
person did by hand (mark_done, mark_compensated, accept_partial, audited); retry,
compensate, use_rung and cancel answer 409 ``no_driver`` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from api_support import PLAIN, STOCK, TOKENS, auth, served
from sagakit_checkout.choreography import (
    CHOREOGRAPHY,
    Choreography,
    open_choreography,
    place_orders,
)
from sagakit_checkout.inventory import seed_stock

from sagakit import Engine, SagaNotFound
from sagakit.api import create_app
from sagakit.core.machine_manual import irreversible
from sagakit.testing.views import escalate, heard

ORDER = {
    "customer": "cust-000123",
    "sku": "sku-1",
    "qty": 1,
    "amount": 1999,
    "currency": "EUR",
    "card": "card-ok-1",
    "ship_to": "addr-ok-1",
}
LATER = ("PENDING_SHIPMENT", "COMPLETING", "COMPLETED")
UNDOING = ["OrderCreated", "PaymentAuthorized", "InventoryFailed"]
"""Facts of a flow that began undoing itself (the inventory refused) and then stopped."""


@dataclass
class ChoreoEnv:
    """The choreographed checkout running, with the API in front of it."""

    ch: Choreography
    engine: Engine
    client: httpx.AsyncClient

    async def act(self, saga_id: str, role: str = "operator", **body: Any) -> httpx.Response:
        """POST /sagas/{saga_id}/actions (an irreversible action confirmed)."""
        if irreversible(str(body.get("action"))):
            body.setdefault("confirm", True)
        return await self.client.post(f"/sagas/{saga_id}/actions", json=body, headers=auth(role))

    async def detail(self, saga_id: str) -> dict[str, Any]:
        """GET /sagas/{saga_id} as a viewer."""
        r = await self.client.get(f"/sagas/{saga_id}", headers=auth("viewer"))
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def stuck(self, order_id: str, facts: list[str]) -> None:
        """A view that heard ``facts`` (the services never did) and then nothing: the
        tracker's SLA check puts it in the manual queue."""
        await heard(self.ch.tracker, order_id, facts, {"order_id": order_id, "reason": "no"})
        assert await escalate(self.ch.tracker) == 1


@contextlib.asynccontextmanager
async def choreography_api(tmp_path: Path) -> AsyncIterator[ChoreoEnv]:
    """The choreography on SQLite files and ``create_app`` over its engine."""
    ch = open_choreography(tmp_path / "ch", synchronous="NORMAL", sla=600.0)
    # The SLA is checked by the tests themselves (Choreography.engine's job never fires).
    async with ch.engine(sla_check_every=3600.0, idle_poll=0.05) as engine:
        await seed_stock(ch.stores["inventory"], STOCK)
        app = create_app(engine, tokens=TOKENS)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield ChoreoEnv(ch, engine, client)


async def settled(env: ChoreoEnv, order_id: str) -> None:
    """Place an order with the order service and wait until its view is terminal."""
    assert await place_orders(env.ch, [(order_id, ORDER)]) == 1
    for _ in range(400):
        with contextlib.suppress(SagaNotFound):
            if (await env.engine.get(order_id)).terminal:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the view of {order_id} did not end")


async def test_views_are_listed_and_shown_like_sagas(tmp_path: Path) -> None:
    async with choreography_api(tmp_path) as env:
        await settled(env, "o-ok")
        page = (await env.client.get("/sagas", headers=auth("viewer"))).json()
        assert page["total"] == 1 and page["counts"]["SUCCEEDED"] == 1
        item = page["items"][0]
        assert item["saga_id"] == "o-ok" and item["definition"] == CHOREOGRAPHY
        assert item["driven"] is False and item["current_step"] == "complete_order"
        assert item["status"] == "COMPLETED"
        only = await env.client.get(
            f"/sagas?definition={CHOREOGRAPHY}&state=SUCCEEDED", headers=auth("viewer")
        )
        assert [i["saga_id"] for i in only.json()["items"]] == ["o-ok"]
        detail = await env.detail("o-ok")
        assert [s["name"] for s in detail["steps"]] == list(env.ch.tracker.flow.steps)
        assert {s["status"] for s in detail["steps"]} == {"SUCCEEDED"}
        events = [h["event"] for h in detail["history"]]
        assert events[0] == "saga.started" and events[-1] == "saga.finished"
        assert detail["history"][-1]["state"] == "SUCCEEDED"
        # A finished view takes no action, and says why in the driver's absence.
        r = await env.act("o-ok", action="cancel", reason="customer asked")
        assert r.status_code == 409 and r.json()["error"] == "no_driver", r.text
        assert (await env.act("nope", action="mark_done", reason="x")).status_code == 404


async def test_an_escalated_view_is_resolved_by_an_operator(tmp_path: Path) -> None:
    async with choreography_api(tmp_path) as env:
        await env.stuck("o-stuck", ["OrderCreated", "PaymentAuthorized"])
        cases = (await env.client.get("/manual-cases", headers=auth("viewer"))).json()
        assert [c["saga_id"] for c in cases["items"]] == ["o-stuck"]
        assert cases["items"][0]["reason"].startswith("stuck: no progress")
        assert cases["items"][0]["current_step"] == "authorize_payment"

        # Actions that need a driver: refused, with the reason and what applies instead.
        for action in ("retry", "compensate", "use_rung", "cancel"):
            extra = {"rung": 1} if action == "use_rung" else {}
            r = await env.act("o-stuck", action=action, reason="try again", **extra)
            assert r.status_code == 409, r.text
            assert r.json()["error"] == "no_driver"
            message = r.json()["message"]
            assert "no process drives" in message and "mark_done" in message
        # Auth and validation as for any saga.
        decision = {"action": "mark_done", "reason": "shipped by hand, ticket 42"}
        no_token = await env.client.post("/sagas/o-stuck/actions", json=decision)
        assert no_token.status_code == 401
        assert (await env.act("o-stuck", "viewer", **decision)).status_code == 403
        assert (await env.act("o-stuck", action="mark_done", reason="")).status_code == 422

        done = await env.act("o-stuck", **decision)
        assert done.status_code == 200, done.text
        assert done.json()["saga"]["state"] == "SUCCEEDED"
        assert done.json()["saga"]["status"] == "COMPLETED"
        again = await env.act("o-stuck", **decision)
        assert again.status_code == 409 and again.json()["error"] == "refused"

        detail = await env.detail("o-stuck")
        resolved = [h for h in detail["history"] if h["event"] == "manual.resolved"]
        assert len(resolved) == 1
        assert resolved[0]["detail"]["actor"] == "operator"
        assert resolved[0]["detail"]["reason"] == "shipped by hand, ticket 42"
        assert resolved[0]["detail"]["previous_reason"].startswith("stuck")
        by_hand = [s for s in detail["steps"] if s["result"] and "resolved_by" in s["result"]]
        assert [s["name"] for s in by_hand] == list(env.ch.tracker.flow.steps[2:])
        assert (await env.client.get("/manual-cases", headers=auth("viewer"))).json()["total"] == 0
        trail = await env.client.get("/audit?saga_id=o-stuck", headers=auth("admin"))
        outcomes = [(r["action"], r["outcome"]) for r in reversed(trail.json()["items"])]
        assert outcomes == [
            ("retry", "no_driver"),
            ("compensate", "no_driver"),
            ("use_rung", "no_driver"),
            ("cancel", "no_driver"),
            ("mark_done", "applied"),
            ("mark_done", "refused"),
        ]


async def test_a_view_that_was_undoing_itself_is_marked_compensated(tmp_path: Path) -> None:
    async with choreography_api(tmp_path) as env:
        await env.stuck("o-undo", UNDOING)
        r = await env.act("o-undo", action="mark_done", reason="looks fine")
        assert r.status_code == 409 and "mark_compensated" in r.json()["message"], r.text
        r = await env.act("o-undo", action="mark_compensated", reason="voided by hand")
        assert r.status_code == 200, r.text
        assert r.json()["saga"]["state"] == "COMPENSATED"
        assert r.json()["saga"]["status"] == "CANCELLED"
        steps = {s["name"]: s["status"] for s in (await env.detail("o-undo"))["steps"]}
        # What had happened is undone by hand; what failed or never ran stays so.
        assert steps["create_order"] == steps["authorize_payment"] == "COMPENSATED"
        assert steps["reserve_inventory"] == "FAILED" and steps["complete_order"] == "PENDING"

        await env.stuck("o-partial", ["OrderCreated"])
        r = await env.act("o-partial", action="accept_partial", reason="customer keeps it")
        assert r.status_code == 200, r.text
        saga = r.json()["saga"]
        assert saga["state"] == "PARTIAL_ACCEPTED" and saga["status"] == "PARTIALLY_COMPLETED"
        assert saga["reason"] == "accepted by operator: customer keeps it"


async def test_batch_actions_on_views(tmp_path: Path) -> None:
    async with choreography_api(tmp_path) as env:
        await env.stuck("o-b1", ["OrderCreated"])
        await env.stuck("o-b2", UNDOING)
        body = {
            "filter": {"state": ["FAILED_NEEDS_MANUAL"]},
            "action": "mark_done",
            "reason": "fixed by hand",
            "dry_run": False,
            "confirm": True,
        }
        r = await env.client.post("/sagas/actions/batch", json=body, headers=auth("operator"))
        assert r.status_code == 200, r.text
        results = {x["saga_id"]: x for x in r.json()["results"]}
        assert results["o-b1"]["ok"] and results["o-b1"]["state"] == "SUCCEEDED"
        assert not results["o-b2"]["ok"] and results["o-b2"]["error"] == "refused"


async def test_the_console_shows_a_view_and_records_a_decision(tmp_path: Path) -> None:
    async with choreography_api(tmp_path) as env:
        c = env.client
        await settled(env, "o-fine")
        await env.stuck("o-console", UNDOING)
        form = {"content-type": "application/x-www-form-urlencoded"}
        login = await c.post("/console-login", content=f"token={PLAIN['operator']}", headers=form)
        assert login.status_code == 303  # the client keeps the session and form cookies

        page = await c.get("/console/sagas/o-fine")
        assert page.status_code == 200, page.text
        assert "no process drives them" in page.text and "complete_order" in page.text
        assert "does not know the definition" not in page.text
        assert 'data-action="' not in page.text  # a finished view: nothing to decide

        page = await c.get("/console/sagas/o-console")
        assert 'data-action="mark_compensated"' in page.text
        assert 'data-action="accept_partial"' in page.text
        for absent in ("retry", "compensate", "use_rung", "cancel", "mark_done"):
            assert f'data-action="{absent}"' not in page.text
        manual = await c.get("/console/manual")
        assert "o-console" in manual.text and "reserve_inventory" in manual.text
        assert 'data-action="mark_compensated"' in manual.text
        listing = await c.get(f"/console/?definition={CHOREOGRAPHY}")
        assert "o-fine" in listing.text and "o-console" in listing.text
        assert "<td>complete_order</td>" in listing.text  # the last fact's step

        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        version = re.search(r'name="version" value="([0-9]+)"', page.text)
        assert version is not None
        form = {"csrf": csrf.group(1), "version": version.group(1)}
        refused = await c.post(
            "/console/sagas/o-console/act", data={**form, "action": "retry", "reason": "again"}
        )
        assert refused.status_code == 409 and "no process drives" in refused.text
        decision = {**form, "action": "mark_compensated", "reason": "refunded"}
        asked = await c.post("/console/sagas/o-console/act", data=decision)
        # An irreversible record is confirmed first: the page says what it does.
        assert asked.status_code == 200 and "no compensation is sent" in asked.text
        decided = await c.post("/console/sagas/o-console/act", data={**decision, "confirm": "yes"})
        assert decided.status_code == 303, decided.text
        inst = await env.engine.get("o-console")
        assert inst.state.value == "COMPENSATED"
        history = await env.engine.store.history("o-console")
        assert history[-2].detail["actor"] == "operator"


async def test_serve_runs_the_choreography_and_the_hybrid(tmp_path: Path) -> None:
    async with served(tmp_path / "data", mode="choreography", orders=3) as (url, info):
        h = {"Authorization": f"Bearer {info['token']}"}
        async with httpx.AsyncClient(base_url=url, headers=h, timeout=10) as client:
            page = (await client.get("/sagas")).json()
            for _ in range(100):
                if page["total"] == 3:
                    break
                await asyncio.sleep(0.05)
                page = (await client.get("/sagas")).json()
            assert {i["definition"] for i in page["items"]} == {CHOREOGRAPHY}
            # POST /orders places the order with the order service; its view follows.
            key = {"Idempotency-Key": "ch-1"}
            placed = await client.post("/orders", json={**ORDER, "sku": "sku-00"}, headers=key)
            assert placed.status_code == 202, placed.text
            order_id = placed.json()["order_id"]
            assert placed.json()["saga_id"] == order_id
            # What the view shows by then (the flow may be well on its way).
            assert placed.json()["status"] in ("PENDING_PAYMENT", "PENDING_INVENTORY", *LATER)
            again = await client.post("/orders", json={**ORDER, "sku": "sku-00"}, headers=key)
            assert again.status_code == 200 and again.json()["order_id"] == order_id
            for _ in range(200):
                view = (await client.get(f"/orders/{order_id}")).json()
                if view["terminal"]:
                    break
                await asyncio.sleep(0.05)
            assert view["status"] == "COMPLETED", view
            assert view["history"][0]["status"] == "PENDING_PAYMENT"
            ledger = (await client.get(f"/payments?order_id={order_id}")).json()
            assert {r["order_id"] for r in ledger["items"]} == {order_id}
    assert (tmp_path / "data" / "choreography" / "tracker.db").exists()
    async with served(tmp_path / "data", mode="hybrid") as (url, _):
        h = {**auth("operator"), "Authorization": h["Authorization"], "Idempotency-Key": "hy-1"}
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            r = await client.post("/orders", json={**ORDER, "sku": "sku-00"}, headers=h)
            assert r.status_code == 202, r.text
            saga = (await client.get(f"/sagas/{r.json()['saga_id']}", headers=h)).json()
            assert saga["definition"] == "checkout-hybrid" and saga["driven"] is True
