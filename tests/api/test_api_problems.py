"""Every error of the API is an RFC 9457 problem document (``application/problem+json``)
that keeps the API's own ``error``, ``message`` and ``fields`` members."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import auth, order_body, running_api, served
from starlette.requests import Request

from sagakit.api.connections import HttpLimits, busy_reply
from sagakit.api.http import on_unexpected
from sagakit.api.limits import Limits
from sagakit.api.problems import PROBLEM_JSON, TITLES, ApiError, problem_title
from sagakit.errors import StoreError


def assert_problem(r: httpx.Response, status: int, code: str, instance: str) -> dict[str, Any]:
    """``r`` is the problem document of ``status``/``code`` for the request at ``instance``."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = r.json()
    assert body["type"] == f"/problems/{code}"
    assert body["title"] == problem_title(code, status) and body["title"]
    assert body["status"] == status
    assert body["detail"] and body["detail"] == body["message"]
    assert body["instance"] == instance
    assert body["error"] == code
    return body


async def test_a_validation_error_is_a_problem_naming_every_field(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        r = await env.place("k-422", qty=0, currency="eur")
        body = assert_problem(r, 422, "invalid_fields", "/orders")
        assert body["title"] == "Invalid fields"
        assert [f["field"] for f in body["fields"]] == ["qty", "currency"]
        assert all(f["problem"] for f in body["fields"])
        assert "qty" in body["detail"] and "currency" in body["detail"]
        # A refused query is one too, and no field list appears where none was refused.
        r = await env.client.get("/sagas?limit=0", headers=auth("viewer"))
        assert_problem(r, 422, "invalid_fields", "/sagas")
        r = await env.client.get("/orders/order-nope", headers=auth("viewer"))
        assert "fields" not in assert_problem(r, 404, "not_found", "/orders/order-nope")


async def test_not_found_unknown_routes_and_wrong_methods(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        r = await env.client.get("/no/such/route", headers=auth("viewer"))
        body = assert_problem(r, 404, "not_found", "/no/such/route")
        assert "/openapi.json" in body["detail"]
        # instance is the path as sent: still percent-encoded, a valid URI reference.
        r = await env.client.get("/orders/a%20b", headers=auth("viewer"))
        assert_problem(r, 404, "not_found", "/orders/a%20b")
        r = await env.client.delete("/sagas", headers=auth("admin"))
        assert_problem(r, 405, "method_not_allowed", "/sagas")
        assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "POST"}


async def test_authentication_and_roles(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        r = await env.client.get("/sagas")
        body = assert_problem(r, 401, "unauthorized", "/sagas")
        assert body["title"] == TITLES["unauthorized"]
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = await env.client.get("/sagas", headers={"Authorization": "Bearer nope"})
        assert_problem(r, 401, "unauthorized", "/sagas")
        r = await env.client.post(
            "/orders", json=order_body(), headers={**auth("viewer"), "Idempotency-Key": "k"}
        )
        body = assert_problem(r, 403, "forbidden", "/orders")
        assert "operator" in body["detail"]


async def test_conflicts_and_malformed_bodies(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        assert (await env.place("k-409")).status_code == 202
        r = await env.place("k-409", qty=2)
        body = assert_problem(r, 409, "idempotency_key_reused", "/orders")
        assert body["title"] == "Idempotency-Key used with another body"
        r = await env.client.post("/orders", json=order_body(), headers=auth("operator"))
        assert_problem(r, 400, "idempotency_key_required", "/orders")
        h = {**auth("operator"), "Idempotency-Key": "k-400", "Content-Type": "application/json"}
        r = await env.client.post("/orders", content=b"{", headers=h)
        assert_problem(r, 400, "malformed_json", "/orders")
        r = await env.client.post(
            "/orders", content=b"x", headers={**h, "Content-Type": "text/plain"}
        )
        assert_problem(r, 415, "unsupported_media_type", "/orders")
        # A decision on a saga that takes none: 409 with the engine's reason.
        ok = await env.settled("k-done")
        r = await env.client.post(
            f"/sagas/{ok['saga_id']}/actions",
            json={"action": "retry", "reason": "try again"},
            headers=auth("operator"),
        )
        body = assert_problem(r, 409, "refused", f"/sagas/{ok['saga_id']}/actions")
        assert "FAILED_NEEDS_MANUAL" in body["detail"]


async def test_rate_limit_and_not_ready(tmp_path: Path) -> None:
    async with running_api(tmp_path, limits=Limits(rate=0.5, burst=1, streams=8)) as env:
        assert (await env.client.get("/sagas", headers=auth("viewer"))).status_code == 200
        r = await env.client.get("/sagas", headers=auth("viewer"))
        assert_problem(r, 429, "rate_limited", "/sagas")
        assert r.headers["retry-after"] == "2"
        store = env.checkout.payment_store

        async def down() -> int:
            raise StoreError("SQLite store 'payment' could not answer: disk I/O error")

        store.outbox_pending = down  # type: ignore[method-assign]
        r = await env.client.get("/readyz", headers=auth("viewer"))
        body = assert_problem(r, 503, "not_ready", "/readyz")
        assert body["ready"] is False and "disk I/O" in body["stores"]["payment"]
        del store.outbox_pending
        r = await env.client.get("/readyz", headers=auth("viewer"))
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"


async def test_an_unexpected_failure_is_a_problem_without_the_traceback() -> None:
    scope = {"type": "http", "method": "GET", "path": "/sagas", "raw_path": b"/sagas"}
    scope |= {"headers": [], "query_string": b""}
    r = await on_unexpected(Request(scope), RuntimeError("secret internals"))
    assert r.status_code == 500 and r.media_type == PROBLEM_JSON
    body = json.loads(bytes(r.body))
    assert body["type"] == "/problems/internal_error" and body["instance"] == "/sagas"
    assert body["status"] == 500 and "secret" not in body["detail"]


def test_a_connection_turned_away_gets_a_problem() -> None:
    head, _, raw = busy_reply("/sagas").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert f"content-type: {PROBLEM_JSON}".encode() in head
    assert f"content-length: {len(raw)}".encode() in head
    body = json.loads(raw)
    assert body["type"] == "/problems/not_ready" and body["instance"] == "/sagas"
    assert body["status"] == 503 and body["error"] == "not_ready"
    # Turned away before it sent a request: there is no path to name.
    assert "instance" not in json.loads(busy_reply(None).partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 429, 503, 418])
def test_the_document_has_every_member(status: int) -> None:
    err = ApiError(status, "what went wrong")
    body = err.problem("/x")
    assert list(body)[:5] == ["type", "title", "status", "detail", "instance"]
    assert body["type"] == f"/problems/{err.code}" and body["status"] == status
    assert body["error"] == err.code and body["message"] == body["detail"] == "what went wrong"
    assert body["title"]  # a code without a title of its own takes the status's phrase


async def test_the_openapi_document_describes_problem_responses(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        doc = (await env.client.get("/openapi.json", headers=auth("viewer"))).json()
        problem = doc["components"]["schemas"]["Problem"]
        assert {"type", "title", "status", "detail", "instance", "error", "message"} <= set(
            problem["properties"]
        )
        assert "Error" not in doc["components"]["schemas"]
        errors = [
            (path, method, status, reply)
            for path, ops in doc["paths"].items()
            for method, op in ops.items()
            for status, reply in op["responses"].items()
            if int(status) >= 400
        ]
        assert errors
        for path, method, status, reply in errors:
            assert list(reply["content"]) == [PROBLEM_JSON], (path, method, status)


async def _raw(port: int, request: bytes) -> tuple[bytes, dict[str, Any]]:
    """Send ``request`` on a new connection; the response's head and its JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)


@pytest.mark.timeout(120)
async def test_the_servers_own_refusals_are_problems(tmp_path: Path) -> None:
    # uvicorn answers these itself, before the app: an unparsable request and a request
    # beyond limit_concurrency.
    limits = HttpLimits(max_header_bytes=1024, limit_concurrency=2)
    async with served(tmp_path / "d", http_limits=limits) as (url, info):
        port = int(url.rsplit(":", 1)[1])
        token = f"Authorization: Bearer {info['token']}\r\n".encode()
        # A header that grows past max_header_bytes before it ends.
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 2000
        head, body = await _raw(port, big)
        assert head.startswith(b"HTTP/1.1 400"), head
        assert f"content-type: {PROBLEM_JSON}".encode() in head
        assert body["type"] == "/problems/bad_request" and body["status"] == 400
        assert body["error"] == "bad_request" and "instance" not in body
        # One connection busy with a request (its body still to come) fills the limit.
        _, busy = await asyncio.open_connection("127.0.0.1", port)
        busy.write(b"POST /sagas/actions/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n")
        busy.write(token + b"\r\n")
        await busy.drain()
        await asyncio.sleep(0.2)
        head, body = await _raw(port, b"GET /sagas HTTP/1.1\r\nHost: x\r\n" + token + b"\r\n")
        assert head.startswith(b"HTTP/1.1 503"), head
        assert f"content-type: {PROBLEM_JSON}".encode() in head
        assert body["type"] == "/problems/not_ready" and body["instance"] == "/sagas"
        assert body["status"] == 503 and "limit of 2" in body["detail"]
        busy.close()
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient() as client:
            r = await client.get(
                f"{url}/healthz", headers={"Authorization": f"Bearer {info['token']}"}
            )
            assert r.status_code == 200
