"""POST /orders (idempotency, validation, limits), order status, events, ledgers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import auth, order_body, running_api, sse_events
from sagakit_checkout.invariants import status_path_violation

from sagakit.api.validation import personal_data_problem


async def test_same_key_same_body_returns_the_same_order(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        first = await env.place("key-1")
        assert first.status_code == 202, first.text
        body = first.json()
        assert set(body) == {"order_id", "saga_id", "status"}
        assert body["status"] == "PENDING_PAYMENT"
        assert first.headers["location"] == f"/orders/{body['order_id']}"
        # The JSON layout does not matter: the canonical body is compared.
        again = await env.client.post(
            "/orders",
            content=b'{"ship_to":"addr-ok-1", "card":"card-ok-1","customer":"cust-000123",'
            b'"currency":"EUR","amount":1999,"qty":1,"sku":"sku-1"}',
            headers={**auth("operator"), "Idempotency-Key": "key-1"},
        )
        assert again.status_code == 200, again.text
        assert {k: again.json()[k] for k in ("order_id", "saga_id")} == {
            k: body[k] for k in ("order_id", "saga_id")
        }
        counts = await env.engine.store.count_sagas()
        assert sum(counts.values()) == 1


async def test_same_key_other_body_is_refused(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        assert (await env.place("key-1")).status_code == 202
        r = await env.place("key-1", qty=2)
        assert r.status_code == 409
        assert r.json()["error"] == "idempotency_key_reused"
        assert "another body" in r.json()["message"]
        assert sum((await env.engine.store.count_sagas()).values()) == 1
        # Another key is another order, even with the same body.
        other = await env.place("key-2")
        assert other.status_code == 202
        assert other.json()["order_id"] != (await env.place("key-1")).json()["order_id"]


async def test_idempotency_keys_survive_a_restart(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        first = (await env.place("durable")).json()
    async with running_api(tmp_path) as env:
        again = await env.place("durable")
        assert again.status_code == 200
        assert again.json()["order_id"] == first["order_id"]
        assert again.json()["saga_id"] == first["saga_id"]
        assert (await env.place("durable", qty=3)).status_code == 409


async def test_a_key_whose_saga_never_started_starts_it_on_retry(tmp_path: Path) -> None:
    # A crash between the key's commit and the start: the retry starts the same order.
    async with running_api(tmp_path) as env:
        records = env.app.state.sagakit.records
        from sagakit.api.validation import parse_order

        order = parse_order(order_body())
        order_id, _, created = await records.claim("crashed", order.body_hash(), "operator")
        assert created
        r = await env.place("crashed")
        assert r.status_code == 200
        assert r.json()["order_id"] == order_id
        await env.engine.wait(r.json()["saga_id"])


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 400),
        ({"Idempotency-Key": ""}, 400),
        ({"Idempotency-Key": "x" * 256}, 400),
        ({"Idempotency-Key": "has space"}, 400),
    ],
)
async def test_the_idempotency_key_is_mandatory(
    tmp_path: Path, headers: dict[str, str], status: int
) -> None:
    async with running_api(tmp_path) as env:
        r = await env.client.post(
            "/orders", json=order_body(), headers={**auth("operator"), **headers}
        )
        assert r.status_code == status
        assert r.json()["error"] == "idempotency_key_required"
        assert "Idempotency-Key" in r.json()["message"]


BAD_ORDERS: list[tuple[dict[str, Any], str]] = [
    ({"qty": 0}, "qty"),
    ({"qty": "1"}, "qty"),
    ({"qty": True}, "qty"),
    ({"qty": 1.5}, "qty"),
    ({"amount": -5}, "amount"),
    ({"amount": 0}, "amount"),
    ({"amount": 19.99}, "amount"),
    ({"currency": "eur"}, "currency"),
    ({"currency": "EURO"}, "currency"),
    ({"sku": ""}, "sku"),
    ({"sku": "a b"}, "sku"),
    ({"customer": "jane.doe@example.com"}, "customer"),
    ({"customer": "John Smith"}, "customer"),
    ({"customer": "Alice"}, "customer"),
    ({"customer": "cust-"}, "customer"),
    ({"customer": 123}, "customer"),
    ({"card": "4111111111111111"}, "card"),
    ({"card": "4111 1111 1111 1111"}, "card"),
    ({"card": "card-4111-1111-1111-1111"}, "card"),
    ({"ship_to": "12 Main Street, Springfield"}, "ship_to"),
    ({"ship_to": "addr-ok"}, "ship_to"),
    ({"email": "a@b.c"}, "email"),
]


@pytest.mark.parametrize(("change", "field"), BAD_ORDERS)
async def test_invalid_orders_are_refused_naming_the_field(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    async with running_api(tmp_path) as env:
        r = await env.place("k", **change)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error"] == "invalid_fields"
        assert [f["field"] for f in body["fields"]] == [field]
        assert body["fields"][0]["problem"]
        assert sum((await env.engine.store.count_sagas()).values()) == 0


def test_personal_data_is_recognised() -> None:
    for value in ("bob@example.org", "5500 0000 0000 0004", "Jane", "Mary Ann", "Rue de la Paix 1"):
        assert personal_data_problem(value) is not None, value
    for value in ("cust-000123", "card-novoid-norefund-7", "addr-ok-42", "tok-1"):
        assert personal_data_problem(value) is None, value


async def test_missing_fields_and_bad_shapes(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        h = {**auth("operator"), "Idempotency-Key": "k"}
        r = await env.client.post("/orders", json={"sku": "sku-1"}, headers=h)
        assert r.status_code == 422
        assert {f["field"] for f in r.json()["fields"]} == {
            "qty",
            "amount",
            "currency",
            "customer",
            "card",
            "ship_to",
        }
        r = await env.client.post("/orders", json=[1, 2], headers=h)
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "body"
        for raw in (b"{", b"", b"{'a': 1}", b'{"qty": NaN}', b"\xff\xfe"):
            r = await env.client.post(
                "/orders", content=raw, headers={**h, "Content-Type": "application/json"}
            )
            assert r.status_code == 400, raw
            assert r.json()["error"] == "malformed_json"
        r = await env.client.post(
            "/orders", content=b"sku=1", headers={**h, "Content-Type": "text/plain"}
        )
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"


async def test_bodies_over_the_limit_get_413(tmp_path: Path) -> None:
    async with running_api(tmp_path, max_body=512) as env:
        h = {**auth("operator"), "Idempotency-Key": "k"}
        big = order_body(pad="x" * 600)
        r = await env.client.post("/orders", json=big, headers=h)
        assert r.status_code == 413
        assert r.json()["error"] == "payload_too_large" and "512" in r.json()["message"]

        async def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(10):
                yield b" " * 100

        r = await env.client.post(
            "/orders", content=chunks(), headers={**h, "Content-Type": "application/json"}
        )
        assert r.status_code == 413
        r = await env.client.post(
            "/sagas/x/actions",
            content=b"{" + b" " * 1000 + b"}",
            headers={**auth("operator"), "Content-Type": "application/json"},
        )
        assert r.status_code == 413
        # Just under the limit is fine.
        assert (await env.place("small")).status_code == 202


async def test_order_status_follows_the_saga_history(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        ok = await env.settled("ok")
        r = await env.client.get(f"/orders/{ok['order_id']}", headers=auth("viewer"))
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "COMPLETED" and body["terminal"] is True
        assert [h["status"] for h in body["history"]] == [
            "PENDING_PAYMENT",
            "PENDING_INVENTORY",
            "PENDING_SHIPMENT",
            "COMPLETING",
            "COMPLETED",
        ]
        times = [h["at"] for h in body["history"]]
        assert times == sorted(times)
        declined = await env.settled("declined", card="card-decline-1")
        body = (
            await env.client.get(f"/orders/{declined['order_id']}", headers=auth("viewer"))
        ).json()
        assert body["status"] == "CANCELLED"
        assert status_path_violation(("", h["status"]) for h in body["history"]) is None
        r = await env.client.get("/orders/order-nope", headers=auth("viewer"))
        assert r.status_code == 404 and "order-nope" in r.json()["message"]


async def test_events_stream_monotonic_statuses_and_end_at_terminal(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        placed = (await env.place("sse")).json()
        r = await env.client.get(f"/orders/{placed['order_id']}/events", headers=auth("viewer"))
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        statuses = [d["status"] for e, d, _ in events if e == "status" and d]
        assert statuses == [
            "PENDING_PAYMENT",
            "PENDING_INVENTORY",
            "PENDING_SHIPMENT",
            "COMPLETING",
            "COMPLETED",
        ]
        ids = [int(i) for e, _, i in events if e == "status" and i]
        assert ids == list(range(1, len(statuses) + 1))
        assert events[-1][0] == "end" and events[-1][1] == {
            "order_id": placed["order_id"],
            "status": "COMPLETED",
            "state": "SUCCEEDED",
        }
        finals = [d["terminal"] for e, d, _ in events if e == "status" and d]
        assert finals == [False] * (len(finals) - 1) + [True]
        # Reconnecting with Last-Event-ID sends only what came after.
        r = await env.client.get(
            f"/orders/{placed['order_id']}/events",
            headers={**auth("viewer"), "Last-Event-ID": "3"},
        )
        later = [d["status"] for e, d, _ in sse_events(r.text) if e == "status" and d]
        assert later == ["COMPLETING", "COMPLETED"]
        r = await env.client.get("/orders/order-nope/events", headers=auth("viewer"))
        assert r.status_code == 404


async def test_events_of_a_stuck_order_heartbeat_and_end_after_the_limit(tmp_path: Path) -> None:
    # No participants run here: the saga waits at its first step for ever.
    roles = frozenset({"orchestrator", "timers", "relays"})
    async with running_api(
        tmp_path, roles=roles, sse_heartbeat=0.05, sse_poll=0.02, sse_max_seconds=0.5
    ) as env:
        placed = (await env.place("stuck")).json()
        r = await env.client.get(f"/orders/{placed['order_id']}/events", headers=auth("viewer"))
        events = sse_events(r.text)
        assert [d["status"] for e, d, _ in events if e == "status" and d] == ["PENDING_PAYMENT"]
        assert any(e == "comment" for e, _, _ in events)
        assert not any(e == "end" for e, _, _ in events)


async def test_ledgers(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        ok = await env.settled("ok")
        oid = ok["order_id"]
        pay = (await env.client.get(f"/payments?order_id={oid}", headers=auth("viewer"))).json()
        assert sorted(p["op"] for p in pay["items"]) == ["authorize", "capture"]
        assert all(p["amount"] == 1999 for p in pay["items"])
        assert (await env.client.get("/payments", headers=auth("viewer"))).json()["items"]
        stock = (await env.client.get("/inventory/sku-1", headers=auth("viewer"))).json()
        assert stock["initial"] == stock["available"] + stock["reserved"] + stock["shipped"]
        assert stock["shipped"] == 1 and stock["reservations"] == {"COMMITTED": 1}
        r = await env.client.get("/inventory/sku-unknown", headers=auth("viewer"))
        assert r.status_code == 404
        ships = (await env.client.get(f"/shipments?order_id={oid}", headers=auth("viewer"))).json()
        assert [s["status"] for s in ships["items"]] == ["CREATED"]
        assert ships["items"][0]["address_token"] == "addr-ok-1"
        r = await env.client.get("/shipments?limit=0", headers=auth("viewer"))
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "limit"


async def test_no_checkout_no_order_routes(tmp_path: Path) -> None:
    from sagakit.api import create_app

    async with running_api(tmp_path) as env:
        app = create_app(env.engine, tokens=env.app.state.sagakit.tokens)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            r = await client.post("/orders", json=order_body(), headers=auth("admin"))
            assert r.status_code == 404
            doc = (await client.get("/openapi.json", headers=auth("admin"))).json()
            assert "/orders" not in doc["paths"] and "/sagas" in doc["paths"]
