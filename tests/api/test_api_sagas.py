"""Operator routes: list, detail, actions, batches, the manual queue and the audit."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from api_support import auth, running_api

from sagakit import SagaState
from sagakit.core.machine_manual import IRREVERSIBLE
from sagakit.errors import ConcurrencyError


async def test_list_filters_pages_and_counts(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        ok = [await env.settled(f"ok-{i}") for i in range(3)]
        declined = await env.settled("declined", card="card-decline-1")
        get = env.client.get
        page = (await get("/sagas", headers=auth("viewer"))).json()
        assert page["total"] == 4 and len(page["items"]) == 4
        assert page["counts"]["SUCCEEDED"] == 3 and page["counts"]["COMPENSATED"] == 1
        assert page["items"][0]["business_key"] == declined["order_id"]  # newest first
        page = (await get("/sagas?state=COMPENSATED", headers=auth("viewer"))).json()
        assert [i["saga_id"] for i in page["items"]] == [declined["saga_id"]]
        both = (await get("/sagas?state=COMPENSATED,SUCCEEDED", headers=auth("viewer"))).json()
        rep = (await get("/sagas?state=COMPENSATED&state=SUCCEEDED", headers=auth("viewer"))).json()
        assert both["total"] == rep["total"] == 4
        page = (await get("/sagas?limit=2&offset=1", headers=auth("viewer"))).json()
        assert page["total"] == 4 and len(page["items"]) == 2 and page["offset"] == 1
        page = (await get("/sagas?definition=checkout&version=1", headers=auth("viewer"))).json()
        assert page["total"] == 4
        assert (await get("/sagas?version=2", headers=auth("viewer"))).json()["total"] == 0
        assert (await get("/sagas?definition=other", headers=auth("viewer"))).json()["total"] == 0
        page = (await get("/sagas?step=complete_order", headers=auth("viewer"))).json()
        assert {i["saga_id"] for i in page["items"]} == {o["saga_id"] for o in ok}
        q = "/sagas?step=complete_order&state=SUCCEEDED&definition=checkout&limit=1&offset=2"
        page = (await get(q, headers=auth("viewer"))).json()
        assert page["total"] == 3 and [i["saga_id"] for i in page["items"]] == [ok[0]["saga_id"]]
        assert (await get("/sagas?step=nowhere", headers=auth("viewer"))).json()["total"] == 0
        assert (await get("/sagas?min_age=3600", headers=auth("viewer"))).json()["total"] == 0
        assert (await get("/sagas?max_age=3600", headers=auth("viewer"))).json()["total"] == 4
        page = (await get("/sagas?max_age=3600&limit=1&offset=3", headers=auth("viewer"))).json()
        assert page["total"] == 4 and len(page["items"]) == 1


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=BOGUS", "state"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("offset=-1", "offset"),
        ("version=x", "version"),
        ("version=0", "version"),
        ("min_age=nan", "min_age"),
        ("min_age=10&max_age=5", "min_age"),
        ("max_age=-1", "max_age"),
    ],
)
async def test_invalid_list_queries_get_422(tmp_path: Path, query: str, field: str) -> None:
    async with running_api(tmp_path) as env:
        r = await env.client.get(f"/sagas?{query}", headers=auth("viewer"))
        assert r.status_code == 422, r.text
        assert field in [f["field"] for f in r.json()["fields"]]


async def test_saga_detail(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        ok = await env.settled("ok")
        r = await env.client.get(f"/sagas/{ok['saga_id']}", headers=auth("viewer"))
        assert r.status_code == 200
        s = r.json()
        assert s["state"] == "SUCCEEDED" and s["terminal"] is True and s["last_error"] is None
        assert [st["name"] for st in s["steps"]] == [
            "create_order",
            "authorize_payment",
            "reserve_inventory",
            "create_shipment",
            "capture_payment",
            "commit_inventory",
            "complete_order",
        ]
        assert [st["kind"] for st in s["steps"]][3:5] == ["compensatable", "pivot"]
        assert all(st["attempt"] == 1 and st["status"] == "SUCCEEDED" for st in s["steps"])
        assert s["history"][0]["event"] == "saga.started"
        assert s["history"][-1]["event"] == "saga.finished"
        sent = s["messages"]["sent"]
        assert [m["type"] for m in sent] == [
            "CreateOrder",
            "AuthorizePayment",
            "ReserveInventory",
            "CreateShipment",
            "CapturePayment",
            "CommitReservation",
            "CompleteOrder",
        ]
        assert all(m["published_at"] is not None for m in sent)
        received = s["messages"]["received"]
        assert len(received) == 7 and all(m["message_id"].endswith("/reply") for m in received)
        assert received[0]["events"] == ["step.succeeded", "step.started"]
        assert received[-1]["events"] == ["step.succeeded", "saga.finished"]
        failed = await env.settled("bad", ship_to="addr-bad-1")
        s = (await env.client.get(f"/sagas/{failed['saga_id']}", headers=auth("viewer"))).json()
        assert s["state"] == "COMPENSATED"
        assert "bad address" in s["last_error"]
        r = await env.client.get("/sagas/nope", headers=auth("viewer"))
        assert r.status_code == 404 and r.json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"action": "retry"}, ["reason"]),
        ({"action": "retry", "reason": "   "}, ["reason"]),
        ({"action": "explode", "reason": "x"}, ["action"]),
        ({"action": "use_rung", "reason": "x"}, ["rung"]),
        ({"action": "use_rung", "reason": "x", "rung": -1}, ["rung"]),
        ({"action": "retry", "reason": "x", "rung": 1}, ["rung"]),
        ({"action": "retry", "reason": "x", "who": "me"}, ["who"]),
        ({"reason": "x"}, ["action"]),
    ],
)
async def test_invalid_actions_get_422(
    tmp_path: Path, body: dict[str, object], fields: list[str]
) -> None:
    async with running_api(tmp_path) as env:
        r = await env.client.post("/sagas/any/actions", json=body, headers=auth("operator"))
        assert r.status_code == 422, r.text
        assert [f["field"] for f in r.json()["fields"]] == fields


IRREVERSIBLE_NAMES = {a.value for a in IRREVERSIBLE}


async def test_actions_that_do_not_apply_get_409_with_the_reason(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        ok = await env.settled("ok")
        url = f"/sagas/{ok['saga_id']}/actions"
        for action in ("retry", "mark_done", "compensate", "accept_partial", "cancel"):
            body = {"action": action, "reason": "try", "confirm": action in IRREVERSIBLE_NAMES}
            r = await env.client.post(url, json=body, headers=auth("operator"))
            assert r.status_code == 409, (action, r.text)
            assert r.json()["error"] == "refused"
            assert "SUCCEEDED" in r.json()["message"]
        r = await env.client.post(
            "/sagas/nope/actions", json={"action": "retry", "reason": "x"}, headers=auth("operator")
        )
        assert r.status_code == 404


async def test_a_decision_racing_another_change_gets_409_not_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_api(tmp_path) as env:
        ok = await env.settled("ok")

        async def lost_the_race(*args: object, **kwargs: object) -> None:
            raise ConcurrencyError("version 7 expected, found 8")

        monkeypatch.setattr(env.engine, "resolve", lost_the_race)
        r = await env.client.post(
            f"/sagas/{ok['saga_id']}/actions",
            json={"action": "mark_done", "reason": "fixed by hand", "confirm": True},
            headers=auth("operator"),
        )
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "conflict"
        assert "reload it and decide again" in r.json()["message"]


async def test_cancel_of_a_running_saga_compensates_it(tmp_path: Path) -> None:
    roles = frozenset({"orchestrator", "timers", "relays"})  # nobody answers: it stays RUNNING
    async with running_api(tmp_path, roles=roles) as env:
        placed = (await env.place("to-cancel")).json()
        r = await env.client.post(
            f"/sagas/{placed['saga_id']}/actions",
            json={"action": "cancel", "reason": "customer changed their mind"},
            headers=auth("operator"),
        )
        assert r.status_code == 200, r.text
        assert r.json()["saga"]["state"] == "COMPENSATING"
        assert r.json()["actor"] == "operator"
        history = await env.engine.store.history(placed["saga_id"])
        assert any(h.event == "cancel.requested" for h in history)


async def test_a_manual_case_resolved_through_the_api_continues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_api(tmp_path) as env:
        case = await env.manual_case("manual")
        r = await env.client.get("/manual-cases", headers=auth("viewer"))
        page = r.json()
        assert page["total"] == 1
        item = page["items"][0]
        assert item["saga_id"] == case["saga_id"] and item["state"] == "FAILED_NEEDS_MANUAL"
        assert "void and refund refused" in item["reason"]
        assert item["waiting_s"] >= 0 and item["age_s"] >= item["waiting_s"]
        assert item["current_step"] == "authorize_payment"
        order = (await env.client.get(f"/orders/{case['order_id']}", headers=auth("viewer"))).json()
        assert order["status"] == "NEEDS_ATTENTION"
        with caplog.at_level(logging.INFO, logger="sagakit.api.audit"):
            r = await env.client.post(
                f"/sagas/{case['saga_id']}/actions",
                json={
                    "action": "mark_compensated",
                    "reason": "hold released by phone, #4711",
                    "confirm": True,
                },
                headers=auth("operator"),
            )
        assert r.status_code == 200, r.text
        final = await env.engine.wait(case["saga_id"], timeout=30)
        assert final.state is SagaState.COMPENSATED
        order = (await env.client.get(f"/orders/{case['order_id']}", headers=auth("viewer"))).json()
        assert order["status"] == "CANCELLED" and order["terminal"]
        resolved = [
            h
            for h in await env.engine.store.history(case["saga_id"])
            if h.event == "manual.resolved"
        ]
        assert len(resolved) == 1
        assert resolved[0].detail["actor"] == "operator"
        assert resolved[0].detail["reason"] == "hold released by phone, #4711"
        record = next(r for r in caplog.records if r.name == "sagakit.api.audit")
        assert record.__dict__["actor"] == "operator"
        assert record.__dict__["saga_id"] == case["saga_id"]
        assert record.__dict__["outcome"] == "applied"
        audit = await env.client.get(f"/audit?saga_id={case['saga_id']}", headers=auth("admin"))
        rows = audit.json()["items"]
        assert [(a["actor"], a["action"], a["outcome"]) for a in rows] == [
            ("operator", "mark_compensated", "applied"),
            ("operator", "place_order", "accepted"),
        ]
        assert rows[0]["reason"] == "hold released by phone, #4711"
        assert (await env.client.get("/manual-cases", headers=auth("viewer"))).json()["total"] == 0


async def test_batch_dry_run_then_execute(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        cases = [await env.manual_case(f"m{i}") for i in range(2)]
        ok = await env.settled("ok")
        body = {
            "filter": {"state": ["FAILED_NEEDS_MANUAL"], "definition": "checkout"},
            "action": "mark_compensated",
            "reason": "holds released in bulk",
            "dry_run": True,
        }
        r = await env.client.post("/sagas/actions/batch", json=body, headers=auth("operator"))
        assert r.status_code == 200, r.text
        dry = r.json()
        assert dry["dry_run"] is True and dry["matched"] == 2
        assert set(dry["saga_ids"]) == {c["saga_id"] for c in cases}
        assert "results" not in dry
        for c in cases:  # nothing moved
            assert (await env.engine.get(c["saga_id"])).state is SagaState.FAILED_NEEDS_MANUAL
        r = await env.client.post(
            "/sagas/actions/batch",
            json={**body, "dry_run": False, "confirm": True},
            headers=auth("operator"),
        )
        done = r.json()
        assert done["applied"] == 2 and done["failed"] == 0 and done["remaining"] == 0
        assert {x["saga_id"] for x in done["results"]} == {c["saga_id"] for c in cases}
        for c in cases:
            assert (await env.engine.wait(c["saga_id"])).state is SagaState.COMPENSATED
        # Per-saga results: a saga the action does not fit is reported, the others done.
        body = {
            "filter": {"saga_ids": [ok["saga_id"], "nope"]},
            "action": "retry",
            "reason": "x",
            "dry_run": False,
        }
        r = await env.client.post("/sagas/actions/batch", json=body, headers=auth("operator"))
        res = r.json()
        assert res["matched"] == 1 and res["failed"] == 1
        assert res["results"][0]["error"] == "refused"
        audit = (await env.client.get("/audit?actor=operator", headers=auth("admin"))).json()
        assert sum(1 for a in audit["items"] if a["action"] == "mark_compensated") == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"filter": {}, "action": "retry", "reason": "x", "dry_run": True}, "filter"),
        ({"action": "retry", "reason": "x", "dry_run": True}, "filter"),
        ({"filter": {"state": ["RUNNING"]}, "action": "retry", "reason": "x"}, "dry_run"),
        (
            {"filter": {"state": ["NOPE"]}, "action": "retry", "reason": "x", "dry_run": True},
            "filter.state",
        ),
        (
            {"filter": {"colour": "red"}, "action": "retry", "reason": "x", "dry_run": True},
            "filter.colour",
        ),
        ({"filter": {"state": "RUNNING"}, "action": "retry", "dry_run": True}, "reason"),
        (
            {
                "filter": {"step": "x"},
                "action": "retry",
                "reason": "x",
                "dry_run": True,
                "limit": 5000,
            },
            "limit",
        ),
    ],
)
async def test_invalid_batches_get_422(tmp_path: Path, body: dict[str, object], field: str) -> None:
    async with running_api(tmp_path) as env:
        r = await env.client.post("/sagas/actions/batch", json=body, headers=auth("operator"))
        assert r.status_code == 422, r.text
        assert field in [f["field"] for f in r.json()["fields"]]
