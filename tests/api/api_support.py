"""Shared plumbing of the API tests: a running checkout with the API in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sagakit_checkout.sagas import checkout_definition
from sagakit_checkout.services import Checkout, checkout_engine, migrate, open_checkout

from sagakit import Engine, RetryPolicy, SagaState
from sagakit.api import TokenStore, create_app
from sagakit.api.serve import serve
from sagakit.runtime.engine import ALL_ROLES

PLAIN = {"viewer": "tok-viewer", "operator": "tok-operator", "admin": "tok-admin"}
TOKENS = TokenStore.from_plain({name: (name, token) for name, token in PLAIN.items()})
FAST = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.05)
STOCK = {"sku-1": 1000, "sku-last": 1}


def auth(role: str) -> dict[str, str]:
    """The Authorization header of the test token with ``role``."""
    return {"Authorization": f"Bearer {PLAIN[role]}"}


def order_body(**changes: Any) -> dict[str, Any]:
    """A valid order body (a success unless changed)."""
    body: dict[str, Any] = {
        "sku": "sku-1",
        "qty": 1,
        "amount": 1999,
        "currency": "EUR",
        "customer": "cust-000123",
        "card": "card-ok-1",
        "ship_to": "addr-ok-1",
    }
    body.update(changes)
    return body


@contextlib.asynccontextmanager
async def served(data_dir: Path, **options: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """``sagakit serve`` on a free port in this process; yields (url, its JSON banner)."""
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    out = io.StringIO()
    task = asyncio.create_task(
        serve(
            "127.0.0.1",
            0,
            data_dir,
            out=out,
            json_output=True,
            stop=stop,
            on_ready=ready.set_result,
            log_level="warning",
            **options,
        )
    )
    try:
        url = await asyncio.wait_for(ready, 60)
        info: dict[str, Any] = json.loads(out.getvalue().splitlines()[0])
        assert info["url"] == url
        yield url, info
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@dataclass
class Env:
    """A running engine, its checkout, the app and a client bound to it."""

    engine: Engine
    checkout: Checkout
    client: httpx.AsyncClient
    app: Any

    async def place(self, key: str, role: str = "operator", **changes: Any) -> httpx.Response:
        """POST /orders with ``key``."""
        return await self.client.post(
            "/orders", json=order_body(**changes), headers={**auth(role), "Idempotency-Key": key}
        )

    async def settled(self, key: str, **changes: Any) -> dict[str, Any]:
        """Place an order and wait until its saga is terminal; the 202 body."""
        r = await self.place(key, **changes)
        assert r.status_code == 202, r.text
        body: dict[str, Any] = r.json()
        await self.engine.wait(body["saga_id"], timeout=30)
        return body

    async def manual_case(self, key: str) -> dict[str, Any]:
        """An order whose void and refund are refused and whose shipping fails: manual."""
        body = await self.settled(key, card=f"card-novoid-norefund-{key}-1", ship_to="addr-bad-9")
        inst = await self.engine.get(body["saga_id"])
        assert inst.state is SagaState.FAILED_NEEDS_MANUAL, inst
        return body


@contextlib.asynccontextmanager
async def running_api(
    tmp_path: Path,
    *,
    roles: frozenset[str] = ALL_ROLES,
    **app_options: Any,
) -> AsyncIterator[Env]:
    """The checkout (short timeouts) and the API over it, with an httpx client."""
    checkout = open_checkout(tmp_path, synchronous="NORMAL")
    definition = checkout_definition(timeout=0.5, retry=FAST, forward=FAST)
    engine = checkout_engine(checkout, definition=definition, idle_poll=0.05, roles=roles)
    async with engine:
        await migrate(checkout, initial_stock=STOCK)
        app = create_app(engine, checkout=checkout, tokens=TOKENS, **app_options)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield Env(engine, checkout, client, app)


def sse_events(text: str) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """``(event, data, id)`` of each event of a text/event-stream body ("comment" for ``:``)."""
    out: list[tuple[str, dict[str, Any] | None, str | None]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event, data, event_id = "message", None, None
        for line in block.split("\n"):
            if line.startswith(":"):
                event = "comment"
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("retry: "):
                event = "retry"
        out.append((event, data, event_id))
    return out
