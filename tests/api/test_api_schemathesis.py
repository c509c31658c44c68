"""Schemathesis against /openapi.json, in process, on the ASGI app: no 5xx, whatever it sends.

Schemathesis runs ASGI apps on one event loop thread of its own and runs their
lifespan there, so the app under test opens the checkout's engine in its lifespan (as
``sagakit serve`` does around uvicorn). Bounded: a fixed number of examples per
operation and generation mode, no shrinking, no example database.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import schemathesis
from api_support import FAST, PLAIN, STOCK, TOKENS, order_body
from hypothesis import HealthCheck, Phase, given, settings
from sagakit_checkout.sagas import checkout_definition
from sagakit_checkout.services import checkout_engine, migrate, open_checkout
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi

from sagakit.api import create_app

ADMIN = {"Authorization": f"Bearer {PLAIN['admin']}"}
EXAMPLES = 20


class CheckoutApp:
    """The API over an embedded checkout that its ASGI lifespan opens and closes."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.inner: Any = None
        self.engine: Any = None

    async def _start(self) -> None:
        checkout = open_checkout(self.data_dir, synchronous="NORMAL")
        definition = checkout_definition(timeout=0.5, retry=FAST, forward=FAST)
        self.engine = checkout_engine(checkout, definition=definition, idle_poll=0.05)
        await self.engine.open()
        await migrate(checkout, initial_stock=STOCK)
        self.inner = create_app(self.engine, checkout=checkout, tokens=TOKENS, sse_max_seconds=2.0)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.inner(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.engine.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _known_ids(app: CheckoutApp) -> dict[str, str]:
    """An order placed and settled through the API: its order id, saga id and SKU."""
    with asgi.get_client(app) as client:
        # Unique: Hypothesis generates string constants it finds in the code, so a literal
        # key here was once sent by the fuzzer first, with another body (409).
        headers = {**ADMIN, "Idempotency-Key": f"schemathesis-known-{uuid.uuid4().hex}"}
        response = client.post("/orders", json=order_body(), headers=headers)
        assert response.status_code in (200, 202), (response.status_code, response.text)
        placed = response.json()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            order = client.get(f"/orders/{placed['order_id']}", headers=ADMIN).json()
            if order["terminal"]:
                break
            time.sleep(0.05)
    # A dead letter that exists, written beside the running engine (SQLite allows it).
    with sqlite3.connect(app.data_dir / "payment.db") as conn:
        row = conn.execute(
            "INSERT INTO dead_letters (endpoint, message_id, body, reason, at) "
            "VALUES ('payment', 'm-known', '{}', 'schemathesis', 1.0) RETURNING id"
        ).fetchone()
    return {
        "order_id": placed["order_id"],
        "saga_id": placed["saga_id"],
        "sku": "sku-1",
        "store": "payment",
        "id": str(row[0]),
    }


def _fuzz(
    operation: Any,
    mode: schemathesis.GenerationMode,
    examples: int,
    calls: dict[str, int],
    path_parameters: dict[str, str] | None = None,
) -> None:
    """``examples`` generated requests to ``operation``; none may get a 5xx."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        if path_parameters is not None:
            case.path_parameters = path_parameters
        response = case.call(headers=ADMIN)
        case.validate_response(response, checks=[not_a_server_error])
        key = f"{case.method} {operation.path} {response.status_code}"
        calls[key] = calls.get(key, 0) + 1

    check()


def test_schemathesis_finds_no_server_error(tmp_path: Path) -> None:
    app = CheckoutApp(tmp_path)
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=ADMIN)
        schema.validate()
        operations = [result.ok() for result in schema.get_all_operations()]
        # Every route but /openapi.json itself, which schemathesis leaves out.
        assert len(operations) == 20, " | ".join(o.label for o in operations)
        calls: dict[str, int] = {}
        modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
        for operation in operations:
            for mode in modes:
                _fuzz(operation, mode, EXAMPLES, calls)
        # Path parameters are random above (404s); again with ids that exist.
        known = _known_ids(app)
        for operation in operations:
            names = {p.name for p in operation.path_parameters}
            if names:
                params = {n: known[n] for n in names}
                _fuzz(operation, modes[0], EXAMPLES // 2, calls, params)
        # The fuzzing reached the handlers, not only the validation.
        assert any(k.startswith("POST /orders 202") for k in calls), calls
        assert any(k.startswith("GET /sagas 200") for k in calls), calls
        assert any(k.startswith("POST /sagas 422") for k in calls), calls
        assert any(k.startswith("GET /sagas/{saga_id} 200") for k in calls), calls
        assert any(k.startswith("GET /orders/{order_id}/events 200") for k in calls), calls
        assert any(k.startswith("GET /dead-letters/{store}/{id} 200") for k in calls), calls
    finally:
        asgi.shutdown_lifespans()
