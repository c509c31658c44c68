"""Bounded resources (issue #14 part 5): connection limits of ``sagakit serve``, a rate
limit and an event-stream cap per token, SQLite reads off the event loop, batches that
yield, and a client hanging up mid-body logged as one INFO line."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import auth, running_api, served
from starlette.types import Message, Receive, Scope, Send

from sagakit.api.auth import Principal, Role
from sagakit.api.cli import _limits_of
from sagakit.api.connections import (
    HttpLimits,
    accept_batch,
    asks_for_probe,
    default_max_connections,
    guarded_protocol,
    listen_wider,
)
from sagakit.api.http import PRINCIPAL
from sagakit.api.limits import Limits, RequestLimits, is_event_stream, request_cost
from sagakit.api.sagas import PAGE_SLICE, page_reply
from sagakit.cli import build_parser
from sagakit.errors import ConfigurationError
from sagakit.stores.sqlite import SQLiteStore

# -- per-token rate limit ----------------------------------------------------------------


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _call(app: Any, path: str, who: str | None = "alice") -> tuple[int, dict[str, str]]:
    """One GET through ``app`` as token ``who``: (status, headers)."""
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": path, "headers": []}
    if who is not None:
        scope[PRINCIPAL] = Principal(who, Role.VIEWER)
    started: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            started.append(message)

    await app(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in started[0]["headers"]}
    return started[0]["status"], headers


async def test_a_token_beyond_its_burst_gets_429_with_retry_after() -> None:
    clock = Clock()
    app = RequestLimits(_ok, Limits(rate=2, burst=3, streams=0), clock=clock)
    statuses = [(await _call(app, "/sagas"))[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    status, headers = await _call(app, "/sagas")
    assert status == 429
    assert headers["retry-after"] == "1"  # half a second to the next request, rounded up
    # Another token has its own bucket; the probes are never limited.
    assert (await _call(app, "/sagas", who="bob"))[0] == 200
    assert [(await _call(app, "/healthz"))[0] for _ in range(20)] == [200] * 20
    assert (await _call(app, "/metrics"))[0] == 200
    clock.now += 0.5  # refilled by one request
    assert (await _call(app, "/sagas"))[0] == 200
    assert (await _call(app, "/sagas"))[0] == 429


async def test_the_rate_limit_answers_json_through_the_app(tmp_path: Path) -> None:
    async with running_api(tmp_path, limits=Limits(rate=0.5, burst=2, streams=8)) as env:
        for _ in range(2):
            assert (await env.client.get("/sagas", headers=auth("viewer"))).status_code == 200
        r = await env.client.get("/sagas", headers=auth("viewer"))
        assert r.status_code == 429
        assert r.json()["error"] == "rate_limited"
        assert "retry in 2 s" in r.json()["message"]
        assert r.headers["retry-after"] == "2"
        # Another token, and the probe, still get in.
        assert (await env.client.get("/sagas", headers=auth("admin"))).status_code == 200
        assert (await env.client.get("/healthz", headers=auth("viewer"))).status_code == 200


async def test_a_large_page_costs_more_than_one_request() -> None:
    def scope(query: bytes, method: str = "GET") -> Scope:
        return {"type": "http", "method": method, "path": "/sagas", "query_string": query}

    assert request_cost(scope(b"")) == 1
    assert request_cost(scope(b"limit=99")) == 1
    assert request_cost(scope(b"state=RUNNING&limit=500")) == 6
    assert request_cost(scope(b"limit=500", "POST")) == 1
    assert request_cost(scope(b"limit=lots")) == 1  # the route answers 422
    clock = Clock()
    app = RequestLimits(_ok, Limits(rate=6, burst=10, streams=0), clock=clock)
    status = await _call_query(app, b"limit=500")
    assert status == 200  # 6 of 10
    assert await _call_query(app, b"limit=500") == 429  # 6 more do not fit in 4
    assert await _call_query(app, b"limit=10") == 200  # 1 does
    clock.now += 0.5  # 3 more: 6 in all
    assert await _call_query(app, b"limit=500") == 200
    # A page larger than the whole bucket still gets through once the bucket is full.
    clock.now += 10
    assert await _call_query(app, b"limit=5000") == 200


async def _call_query(app: Any, query: bytes) -> int:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/sagas",
        "query_string": query,
        "headers": [],
        PRINCIPAL: Principal("alice", Role.VIEWER),
    }
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return statuses[0]


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ConfigurationError, match="rate limit"):
        Limits(rate=-1)
    with pytest.raises(ConfigurationError, match="burst"):
        Limits(rate=5, burst=0)
    with pytest.raises(ConfigurationError, match="streams"):
        Limits(streams=-2)
    Limits(rate=0, burst=0, streams=0)  # everything off is allowed


# -- event streams per token -------------------------------------------------------------


async def test_event_streams_are_capped_per_token() -> None:
    release = asyncio.Event()

    async def stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await release.wait()  # held open, like an event stream

    app = RequestLimits(stream, Limits(rate=0, streams=2))
    held = [asyncio.create_task(_call(app, "/console/events")) for _ in range(2)]
    held.append(asyncio.create_task(_call(app, "/orders/o-1/events", who="bob")))
    await asyncio.sleep(0.01)
    assert app.streams_open("alice") == 2
    status, headers = await _call(app, "/console/sagas/s-1/events")
    assert status == 429 and headers["retry-after"] == "5"
    release.set()
    assert [(await t)[0] for t in held] == [200, 200, 200]
    assert app.streams_open("alice") == 0
    release.clear()
    again = asyncio.create_task(_call(app, "/console/events"))
    await asyncio.sleep(0.01)
    assert app.streams_open("alice") == 1  # a closed stream frees its place
    release.set()
    await again


def test_event_streams_are_get_paths_ending_in_events() -> None:
    assert is_event_stream({"method": "GET", "path": "/console/events"})
    assert is_event_stream({"method": "GET", "path": "/orders/o-1/events"})
    assert not is_event_stream({"method": "POST", "path": "/orders/o-1/events"})
    assert not is_event_stream({"method": "GET", "path": "/sagas"})


# -- a client that hangs up mid-body -----------------------------------------------------


async def test_a_client_hanging_up_mid_body_is_one_info_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_api(tmp_path) as env:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/sagas/actions/batch",
            "raw_path": b"/sagas/actions/batch",
            "query_string": b"",
            "root_path": "",
            "server": ("api", 80),
            "client": ("127.0.0.1", 5000),
            "headers": [
                (b"host", b"api"),
                (b"authorization", b"Bearer tok-operator"),
                (b"content-type", b"application/json"),
                (b"content-length", b"1000"),
            ],
        }
        messages: list[Message] = [
            {"type": "http.request", "body": b'{"action":', "more_body": True},
            {"type": "http.disconnect"},
        ]

        async def receive() -> Message:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            pass

        caplog.set_level(logging.DEBUG)
        await env.app(scope, receive, send)
    mine = [r for r in caplog.records if "disconnect" in r.getMessage()]
    assert len(mine) == 1, [r.getMessage() for r in caplog.records]
    assert mine[0].levelno == logging.INFO and mine[0].exc_info is None
    assert "POST /sagas/actions/batch" in mine[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- batch actions yield -----------------------------------------------------------------


async def test_a_batch_gives_the_loop_a_turn_between_sagas(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        for i in range(12):
            await env.settled(f"k-{i}")
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        body = {
            "action": "cancel",
            "reason": "load test",
            "dry_run": False,
            "limit": 100,
            "filter": {"definition": "checkout"},
        }
        r = await env.client.post("/sagas/actions/batch", json=body, headers=auth("operator"))
        stop = True
        await task
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 12
        assert ticks >= 12  # at least one turn per saga


# -- SQLite reads off the loop -----------------------------------------------------------


async def test_sqlite_reads_run_in_worker_threads_with_their_own_connections(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    try:
        loop_thread = threading.get_ident()
        assert await store._reading("x", lambda c: threading.get_ident()) == loop_thread
        store.read_in_threads(2)
        where = await asyncio.gather(
            *(store._reading("x", lambda c: (threading.get_ident(), id(c))) for _ in range(8))
        )
        assert all(thread != loop_thread for thread, _ in where)
        assert await store.count_sagas() == {}
        assert await store.list_sagas(limit=500) == []
    finally:
        await store.close()
    await store.open()  # reopened: the threads come back
    try:
        assert await store.count_sagas() == {}
    finally:
        await store.close()
    with pytest.raises(ConfigurationError, match="read threads"):
        store.read_in_threads(-1)


# -- connection limits of sagakit serve -------------------------------------------------


def test_http_limits_refuse_nonsense_and_size_the_default_cap() -> None:
    with pytest.raises(ConfigurationError, match="header_timeout"):
        HttpLimits(header_timeout=0)
    with pytest.raises(ConfigurationError, match="max_connections"):
        HttpLimits(max_connections=0)
    with pytest.raises(ConfigurationError, match="max_header_bytes"):
        HttpLimits(max_header_bytes=10)
    with pytest.raises(ConfigurationError, match="backlog"):
        HttpLimits(backlog=0)
    assert 16 <= default_max_connections() <= 1000
    # The event loop accepts a batch at a time; the kernel queues the whole backlog.
    assert HttpLimits(backlog=8).uvicorn_options()["backlog"] == 8
    assert HttpLimits().uvicorn_options()["backlog"] == accept_batch() <= 512
    options = HttpLimits(max_connections=7, keep_alive=2, max_header_bytes=8192).uvicorn_options()
    assert options["http"].max_connections == 7
    assert options["timeout_keep_alive"] == 2
    assert options["h11_max_incomplete_event_size"] == 8192
    assert guarded_protocol(1.5, 3).header_timeout == 1.5


def test_serve_takes_the_limits_as_flags() -> None:
    args = build_parser(["serve"]).parse_args(
        [
            "serve",
            "--max-connections=50",
            "--header-timeout=3",
            "--keep-alive=2",
            "--rate-limit=5",
            "--rate-burst=10",
            "--max-streams=2",
            "--read-threads=0",
        ]
    )
    given = _limits_of(args)
    assert given["http_limits"].max_connections == 50
    assert given["http_limits"].header_timeout == 3
    assert given["http_limits"].keep_alive == 2
    assert given["limits"] == Limits(rate=5, burst=10, streams=2)
    assert given["read_threads"] == 0
    defaults = _limits_of(build_parser(["serve"]).parse_args(["serve"]))
    assert defaults["limits"] == Limits()
    assert defaults["http_limits"] == HttpLimits()


async def _stalled(port: int) -> socket.socket:
    """A connection that sends half a request header and waits."""
    s = socket.socket()
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
    s.send(b"GET /sagas HTTP/1.1\r\nHost: x\r\n")
    return s


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(100) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.timeout(120)
async def test_serve_closes_stalled_connections_and_keeps_room_for_probes(
    tmp_path: Path,
) -> None:
    limits = HttpLimits(max_connections=4, header_timeout=0.5)
    async with served(tmp_path / "d", http_limits=limits) as (url, info):
        port = int(url.rsplit(":", 1)[1])
        headers = {"Authorization": f"Bearer {info['token']}"}
        stalled = [await _stalled(port) for _ in range(6)]
        await asyncio.sleep(0.05)
        # Beyond the cap, the connections that waited longest were closed for the new ones.
        assert sum(_closed(s) for s in stalled[:2]) == 2
        async with httpx.AsyncClient() as client:
            began = time.perf_counter()
            r = await client.get(f"{url}/healthz", headers=headers)
            assert r.status_code == 200
            assert time.perf_counter() - began < 2
        await asyncio.sleep(0.8)  # past the header timeout: every stalled one is closed
        assert all(_closed(s) for s in stalled)
        for s in stalled:
            s.close()
        # A prompt client is never timed out by the header clock.
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                r = await client.get(f"{url}/healthz", headers=headers)
                assert r.status_code == 200
                await asyncio.sleep(0.3)


@pytest.mark.timeout(120)
async def test_serve_applies_its_rate_limit(tmp_path: Path) -> None:
    async with served(tmp_path / "d", limits=Limits(rate=1, burst=2)) as (url, info):
        headers = {"Authorization": f"Bearer {info['token']}"}
        async with httpx.AsyncClient() as client:
            statuses = [
                (await client.get(f"{url}/sagas", headers=headers)).status_code for _ in range(3)
            ]
            assert statuses == [200, 200, 429]
            assert (await client.get(f"{url}/healthz", headers=headers)).status_code == 200


@pytest.mark.timeout(120)
async def test_serve_turns_a_connection_away_when_every_one_is_busy(tmp_path: Path) -> None:
    limits = HttpLimits(max_connections=2, header_timeout=5)
    async with served(tmp_path / "d", http_limits=limits) as (url, info):
        port = int(url.rsplit(":", 1)[1])
        busy = []
        for _ in range(2):  # whole headers, a body still to come: busy, not stalled
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /sagas/actions/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                + f"Authorization: Bearer {info['token']}\r\n\r\n".encode()
            )
            await writer.drain()
            busy.append(writer)
        await asyncio.sleep(0.1)
        auth_header = f"Authorization: Bearer {info['token']}\r\n".encode()

        async def ask(request_line: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_line + b"\r\nHost: x\r\n" + auth_header + b"\r\n")
            try:
                return await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()

        # Every connection is busy: beyond the cap, a probe still gets in...
        answer = await ask(b"GET /healthz HTTP/1.1")
        assert answer.startswith(b"HTTP/1.1 200"), answer
        # ...and anything else is turned away with a 503.
        answer = await ask(b"GET /sagas HTTP/1.1")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 1" in head
        assert len(body) == int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        assert json.loads(body)["error"] == "not_ready"
        for w in busy:
            w.close()


def test_probes_are_told_by_their_request_line() -> None:
    assert asks_for_probe(b"GET /healthz HTTP/1.1\r\nHost: x")
    assert asks_for_probe(b"HEAD /metrics?x=1 HTTP/1.1\r\n")
    assert not asks_for_probe(b"POST /healthz HTTP/1.1\r\n")
    assert not asks_for_probe(b"GET /sagas HTTP/1.1\r\n")
    assert not asks_for_probe(b"GET /healthz")  # not a whole request line


# -- large pages are rendered in slices --------------------------------------------------


async def test_a_large_page_is_rendered_in_slices_into_the_same_json() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    page: Any = list(range(450))
    head = {"total": 450, "limit": 500, "offset": 0, "filter": {}, "counts": {"RUNNING": 1}}
    response = await page_reply(page, head, lambda n, now: {"n": n, "é": "ü"})
    task.cancel()
    assert json.loads(response.body) == {**head, "items": [{"n": n, "é": "ü"} for n in page]}
    assert response.media_type == "application/json"
    assert ticks >= 450 // PAGE_SLICE - 1  # a turn for others after each slice
    empty = await page_reply([], head, lambda n, now: {})
    assert json.loads(empty.body) == {**head, "items": []}


def test_listen_wider_lets_the_kernel_queue_a_burst() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        listen_wider([server], 64)
        clients = [socket.create_connection(server.getsockname(), timeout=2) for _ in range(20)]
        # Nobody accepted yet: with a queue of 1 the later connects would have timed out.
        accepted = []
        for _ in clients:
            conn, _ = server.accept()
            accepted.append(conn)
        for s in (*clients, *accepted):
            s.close()
