"""Plumbing of the console's browser tests: a checkout engine with some orders placed, the console
served on 127.0.0.1 by uvicorn in the test's own event loop, and Debian's headless
Chromium driven through Playwright (never a browser Playwright downloads itself).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from playwright.async_api import APIRequestContext, Browser, async_playwright
from sagakit_checkout.sagas import CHECKOUT
from sagakit_checkout.services import checkout_engine, migrate, open_checkout
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from sagakit import Engine, SagaInstance
from sagakit.console import console_routes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

BASE = {"customer": "cust-000001", "qty": 1, "amount": 4200, "currency": "EUR"}
ORDERS = {
    "order-ok-1": {"sku": "sku-1", "card": "card-ok-1", "ship_to": "addr-ok-1"},
    "order-ok-2": {"sku": "sku-1", "card": "card-ok-2", "ship_to": "addr-ok-2"},
    "order-slow-3": {"sku": "sku-1", "card": "card-slow-3", "ship_to": "addr-flaky-3"},
    "order-declined-4": {"sku": "sku-1", "card": "card-decline-4", "ship_to": "addr-ok-4"},
    "order-manual-5": {
        "sku": "sku-1",
        "card": "card-novoid-norefund-1",
        "ship_to": "addr-bad-1",
    },
}
"""Three succeed, one is compensated (declined), one ends FAILED_NEEDS_MANUAL."""


def order_data(key: str) -> dict[str, object]:
    """The saga data of one of the orders above."""
    return {**BASE, **ORDERS[key]}


@dataclass
class Console:
    """A running console over a checkout engine."""

    url: str
    engine: Engine
    sagas: dict[str, SagaInstance]


@asynccontextmanager
async def running_console(data_dir: Path, *, can_act: bool = True) -> AsyncIterator[Console]:
    """The checkout with :data:`ORDERS` settled, and the console served under /console."""
    checkout = open_checkout(data_dir, synchronous="NORMAL")
    async with checkout_engine(checkout) as engine:
        await migrate(checkout, initial_stock={"sku-1": 50})
        placed = {k: await engine.start(CHECKOUT, k, order_data(k)) for k in ORDERS}
        sagas = {k: await engine.wait(s.saga_id, 60) for k, s in placed.items()}

        async with console_url(engine, can_act=can_act) as url:
            yield Console(url, engine, sagas)


@asynccontextmanager
async def console_url(engine: Engine, *, can_act: bool = True) -> AsyncIterator[str]:
    """The console of ``engine`` served by uvicorn on a free port; yields its URL."""

    def may_act(_: Request) -> bool:
        return can_act

    routes = console_routes(engine, actor=lambda _: "tester", can_act=may_act, poll_interval=0.1)
    app = Starlette(routes=[Mount("/console", routes=routes)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_config=None, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}/console"
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `bash .ci/browser` (installs Debian's chromium)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def http_client(base_url: str) -> AsyncIterator[APIRequestContext]:
    """A cookie-keeping HTTP client (Playwright's, no browser) for the console's routes."""
    async with async_playwright() as pw:
        client = await pw.request.new_context(base_url=base_url)
        try:
            yield client
        finally:
            await client.dispose()
