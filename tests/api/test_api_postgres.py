"""The API over the checkout on PostgreSQL: its tables and queries are portable SQL.

Marked ``postgres``: needs the server on 127.0.0.1:5432 (``SAGAKIT_TEST_POSTGRES_DSN``
overrides it). Every store works in a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import types
import uuid
from pathlib import Path

import httpx
import pytest
from api_support import FAST, STOCK, TOKENS, auth, order_body, sse_events
from sagakit_checkout import inventory, order, payment, shipping
from sagakit_checkout.provider import FakeCardProvider
from sagakit_checkout.sagas import checkout_definition

from sagakit import Engine, SagaState
from sagakit.api import create_app

PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

pytestmark = pytest.mark.postgres


async def test_the_api_on_postgres(tmp_path: Path) -> None:
    import psycopg

    from sagakit.stores.postgres import PostgresStore

    prefix = f"sagakit_api_{uuid.uuid4().hex[:8]}"
    names = ("orchestrator", "order", "payment", "inventory", "shipping")
    stores = {n: PostgresStore(PG_DSN, schema=f"{prefix}_{n}", name=n) for n in names}
    provider = FakeCardProvider(tmp_path / "provider.db")
    engine = Engine(
        stores["orchestrator"],
        [checkout_definition(timeout=0.5, retry=FAST, forward=FAST)],
        participants=[
            order.build_order(stores["order"]),
            payment.build_payment(stores["payment"], provider),
            inventory.build_inventory(stores["inventory"]),
            shipping.build_shipping(stores["shipping"]),
        ],
        idle_poll=0.05,
    )
    checkout = types.SimpleNamespace(
        payment_store=stores["payment"],
        inventory_store=stores["inventory"],
        shipping_store=stores["shipping"],
    )
    try:
        async with engine:
            for module, n in (
                (order, "order"),
                (payment, "payment"),
                (inventory, "inventory"),
                (shipping, "shipping"),
            ):
                await stores[n].apply_migrations(module.NAMESPACE, module.MIGRATIONS)
            await inventory.seed_stock(stores["inventory"], STOCK)
            app = create_app(engine, checkout=checkout, tokens=TOKENS)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                await _exercise(client, engine)
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            for n in names:
                conn.execute(f'DROP SCHEMA IF EXISTS "{prefix}_{n}" CASCADE')


async def _exercise(client: httpx.AsyncClient, engine: Engine) -> None:
    h = {**auth("operator"), "Idempotency-Key": "pg-1"}
    first = await client.post("/orders", json=order_body(), headers=h)
    assert first.status_code == 202, first.text
    again = await client.post("/orders", json=order_body(), headers=h)
    assert again.status_code == 200 and again.json()["order_id"] == first.json()["order_id"]
    assert (await client.post("/orders", json=order_body(qty=2), headers=h)).status_code == 409
    placed = first.json()
    await engine.wait(placed["saga_id"], timeout=30)
    r = await client.get(f"/orders/{placed['order_id']}/events", headers=auth("viewer"))
    assert [d["status"] for e, d, _ in sse_events(r.text) if e == "status" and d][-1] == "COMPLETED"

    manual = await client.post(
        "/orders",
        json=order_body(card="card-novoid-norefund-1", ship_to="addr-bad-1"),
        headers={**auth("operator"), "Idempotency-Key": "pg-2"},
    )
    case = manual.json()
    assert (await engine.wait(case["saga_id"], timeout=30)).state is SagaState.FAILED_NEEDS_MANUAL
    page = await client.get("/sagas?step=authorize_payment&max_age=600", headers=auth("viewer"))
    assert [i["saga_id"] for i in page.json()["items"]] == [case["saga_id"]]
    dry = await client.post(
        "/sagas/actions/batch",
        json={
            "filter": {"state": ["FAILED_NEEDS_MANUAL"]},
            "action": "mark_compensated",
            "reason": "by hand",
            "dry_run": True,
        },
        headers=auth("operator"),
    )
    assert dry.json()["saga_ids"] == [case["saga_id"]]
    r = await client.post(
        f"/sagas/{case['saga_id']}/actions",
        json={"action": "mark_compensated", "reason": "released by hand", "confirm": True},
        headers=auth("operator"),
    )
    assert r.status_code == 200, r.text
    assert (await engine.wait(case["saga_id"], timeout=30)).state is SagaState.COMPENSATED
    detail = (await client.get(f"/sagas/{case['saga_id']}", headers=auth("viewer"))).json()
    assert any(h["event"] == "manual.resolved" for h in detail["history"])
    audit = (await client.get("/audit?actor=operator", headers=auth("admin"))).json()["items"]
    assert [a["action"] for a in audit][:1] == ["mark_compensated"]
    oid = placed["order_id"]
    pay = (await client.get(f"/payments?order_id={oid}", headers=auth("viewer"))).json()
    assert sorted(p["op"] for p in pay["items"]) == ["authorize", "capture"]
    stock = (await client.get("/inventory/sku-1", headers=auth("viewer"))).json()
    assert stock["shipped"] == 1
    ships = (await client.get(f"/shipments?order_id={oid}", headers=auth("viewer"))).json()
    assert len(ships["items"]) == 1
    assert (await client.get("/readyz", headers=auth("viewer"))).json()["ready"] is True
    metrics = (await client.get("/metrics", headers=auth("viewer"))).text
    assert 'sagakit_sagas{state="SUCCEEDED"} 1' in metrics
