"""Dead-letter routes: list, detail, replay and discard (audited), and their bad input."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from api_support import Env, auth, running_api

from sagakit import Envelope, MessageKind
from sagakit.core.envelope import REPLAYED_FROM
from sagakit.stores.base import DeadLetter


def stray(message_id: str, type_: str = "Frobnicate", destination: str = "payment") -> Envelope:
    """A command no checkout handler knows: its consumer parks it as unknown."""
    return Envelope(
        message_id=message_id,
        type=type_,
        kind=MessageKind.COMMAND,
        source="ops-test",
        destination=destination,
        correlation_id="c-1",
        occurred_at=time.time(),
        payload={"n": 1},
    )


async def park(env: Env, store: str, endpoint: str, message_id: str | None, body: str) -> int:
    s = next(s for s in env.engine.stores if s.name == store)
    async with s.transaction() as tx:
        await tx.dead_letter(endpoint, message_id, body, "parked by the test", time.time())
    letters = await s.dead_letters(endpoint)
    return max(d.id for d in letters)


async def wait_parked(env: Env, store: str, settled: bool = False) -> list[DeadLetter]:
    s = next(s for s in env.engine.stores if s.name == store)
    end = time.monotonic() + 10
    while not (found := await s.dead_letters(settled=settled)):
        assert time.monotonic() < end, "nothing was parked"
        await asyncio.sleep(0.02)
    return found


async def test_list_filters_and_pages(tmp_path: Any) -> None:
    async with running_api(tmp_path) as env:
        body = stray("m-1").to_json()
        first = await park(env, "payment", "payment", "m-1", body)
        await park(env, "payment", "payment", None, "not json")
        await park(env, "orchestrator", "orchestrator", "m-3", stray("m-3").to_json())
        get, viewer = env.client.get, auth("viewer")
        page = (await get("/dead-letters", headers=viewer)).json()
        assert page["total"] == 3 and page["status"] == "open" and page["broker"] == []
        assert "payment" in page["stores"] and "orchestrator" in page["stores"]
        item = next(i for i in page["items"] if i["message_id"] == "m-1")
        assert item == {
            "store": "payment",
            "id": first,
            "endpoint": "payment",
            "message_id": "m-1",
            "type": "Frobnicate",
            "saga_id": None,
            "reason": "parked by the test",
            "at": item["at"],
            "status": "open",
            "settled_by": None,
            "settled_at": None,
            "settle_reason": None,
        }
        page = (await get("/dead-letters?store=payment", headers=viewer)).json()
        assert page["total"] == 2 and {i["store"] for i in page["items"]} == {"payment"}
        page = (await get("/dead-letters?endpoint=orchestrator", headers=viewer)).json()
        assert [i["message_id"] for i in page["items"]] == ["m-3"]
        page = (await get("/dead-letters?limit=1&offset=1", headers=viewer)).json()
        assert page["total"] == 3 and len(page["items"]) == 1 and page["offset"] == 1
        assert (await get("/dead-letters?status=settled", headers=viewer)).json()["total"] == 0
        assert (await get("/dead-letters?status=all", headers=viewer)).json()["total"] == 3

        detail = (await get(f"/dead-letters/payment/{first}", headers=viewer)).json()
        assert detail["body"] == body and detail["envelope"] == Envelope.from_json(body).to_dict()
        assert detail["parse_error"] is None
        page = (await get("/dead-letters?store=payment", headers=viewer)).json()
        malformed = next(i for i in page["items"] if i["message_id"] is None)
        detail = (await get(f"/dead-letters/payment/{malformed['id']}", headers=viewer)).json()
        assert detail["envelope"] is None and "not valid JSON" in detail["parse_error"]


async def test_discard_is_audited_and_settles_once(tmp_path: Any) -> None:
    async with running_api(tmp_path) as env:
        id = await park(env, "payment", "payment", None, "not json")
        post, op = env.client.post, auth("operator")
        url = f"/dead-letters/payment/{id}"
        r = await post(f"{url}/replay", json={"reason": "try it"}, headers=op)
        assert r.status_code == 409 and "not a valid envelope" in r.json()["message"]
        r = await post(f"{url}/discard", json={"reason": "  garbage from a test  "}, headers=op)
        assert r.status_code == 200, r.text
        letter = r.json()["dead_letter"]
        assert (letter["status"], letter["settled_by"]) == ("discarded", "operator")
        assert letter["settle_reason"] == "garbage from a test"
        r = await post(f"{url}/discard", json={"reason": "again"}, headers=op)
        assert r.status_code == 409 and "already discarded by operator" in r.json()["message"]
        page = (await env.client.get("/dead-letters", headers=op)).json()
        assert page["total"] == 0
        settled = (await env.client.get("/dead-letters?status=settled", headers=op)).json()
        assert [i["id"] for i in settled["items"]] == [id]
        audit = (await env.client.get("/audit?actor=operator", headers=auth("admin"))).json()
        rows = [(a["action"], a["outcome"], a["reason"]) for a in audit["items"]]
        assert rows == [
            ("dead_letter.discard", "refused", "again"),
            ("dead_letter.discard", "applied", "garbage from a test"),
            ("dead_letter.replay", "refused", "try it"),
        ]
        assert [a["dead_letter_id"] for a in audit["items"]] == [id, id, id]


async def test_a_replay_that_fails_again_is_parked_again(tmp_path: Any) -> None:
    async with running_api(tmp_path) as env:
        async with env.engine.store.transaction() as tx:  # sent by the orchestrator's relay
            await tx.outbox_add([stray("m-stray")], time.time())
        [letter] = await wait_parked(env, "payment")
        assert "UnknownMessageType" in letter.reason
        r = await env.client.post(
            f"/dead-letters/payment/{letter.id}/replay",
            json={"reason": "payment 2.1 knows Frobnicate"},  # it does not
            headers=auth("operator"),
        )
        assert r.status_code == 200, r.text
        assert r.json()["dead_letter"]["status"] == "replayed"
        [again] = await wait_parked(env, "payment")
        assert again.id != letter.id and again.message_id == "m-stray"
        # The same message, as the replay sent it: marked with where it was replayed from.
        copy = Envelope.from_json(again.body)
        assert copy.headers == {REPLAYED_FROM: f"payment:{letter.id}"}
        assert copy.with_changes(headers={}) == Envelope.from_json(letter.body)


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/dead-letters/payment/{id}/discard", {}, 422),
        ("/dead-letters/payment/{id}/discard", {"reason": "   "}, 422),
        ("/dead-letters/payment/{id}/discard", {"reason": "x" * 1001}, 422),
        ("/dead-letters/payment/{id}/discard", {"reason": "ok", "force": True}, 422),
        ("/dead-letters/payment/{id}/discard", ["reason"], 422),
        ("/dead-letters/payment/{id}/discard", "not json", 400),
        ("/dead-letters/payment/999999/discard", {"reason": "ok"}, 404),
        ("/dead-letters/payment/abc/replay", {"reason": "ok"}, 404),
        ("/dead-letters/nowhere/{id}/replay", {"reason": "ok"}, 404),
    ],
)
async def test_bad_settlements_get_4xx(tmp_path: Any, path: str, body: Any, status: int) -> None:
    async with running_api(tmp_path) as env:
        id = await park(env, "payment", "payment", None, "not json")
        url = path.format(id=id)
        if body == "not json":
            r = await env.client.post(
                url,
                content=b"{",
                headers={**auth("operator"), "Content-Type": "application/json"},
            )
        else:
            r = await env.client.post(url, json=body, headers=auth("operator"))
        assert r.status_code == status, r.text
        letter = (
            await env.client.get(f"/dead-letters/payment/{id}", headers=auth("viewer"))
        ).json()
        assert letter["status"] == "open"


@pytest.mark.parametrize(
    "query",
    [
        "status=closed",
        "limit=0",
        "limit=501",
        "offset=-1",
        "store=nowhere",
        f"endpoint={'e' * 201}",
    ],
)
async def test_invalid_list_queries_get_422(tmp_path: Any, query: str) -> None:
    async with running_api(tmp_path) as env:
        r = await env.client.get(f"/dead-letters?{query}", headers=auth("viewer"))
        assert r.status_code == 422, r.text


async def test_unknown_dead_letters_get_404(tmp_path: Any) -> None:
    async with running_api(tmp_path) as env:
        for url in ("/dead-letters/payment/1", "/dead-letters/nowhere/1", "/dead-letters/x/-1"):
            r = await env.client.get(url, headers=auth("viewer"))
            assert r.status_code == 404 and r.json()["error"] == "not_found", url
