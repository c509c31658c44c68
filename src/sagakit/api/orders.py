"""Customer-facing routes: place an order, read its status, follow it as events.

Plus the read-only ledgers of the reference services (payments, stock, shipments),
for people checking what really happened to money and goods.

``POST /orders`` needs an ``Idempotency-Key`` header (as in the IETF
``Idempotency-Key`` draft): the same key with the same body answers 200 with the order
it created, the same key with another body is refused with 409, a new key creates an
order and answers 202 (the checkout runs on after the answer).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from sagakit.api.auth import Role
from sagakit.api.http import (
    ApiContext,
    Endpoint,
    OrderStarter,
    Reply,
    json_reply,
    one,
    principal,
    query_lists,
    read_json,
)
from sagakit.api.problems import ApiError, FieldProblem, invalid, not_found
from sagakit.api.records import payments, shipments, stock
from sagakit.api.validation import parse_order, parse_paging
from sagakit.api.views import order_final, order_view, status_path
from sagakit.errors import PersonalDataRefused

log = logging.getLogger("sagakit.api.audit")

_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "description": "A unique key per order (1-255 visible ASCII characters); repeat it to "
    "retry safely.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
}
LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "Resume after this event id (sent by EventSource on reconnect).",
    "schema": {"type": "string"},
}


def _order_id_param(name: str = "order_id", where: str = "path") -> dict[str, object]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
    }


PAGING = (
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
)


def start_saga(ctx: ApiContext) -> OrderStarter:
    """The default order starter: the ``order_definition`` saga, keyed by the order id."""

    async def start(order_id: str, data: dict[str, Any]) -> tuple[str, str]:
        inst = await ctx.engine.start(ctx.order_definition, order_id, data)
        history = await ctx.engine.store.history(inst.saga_id)
        return inst.saga_id, status_path(history)[-1]["status"] if history else inst.status

    return start


def endpoints(ctx: ApiContext) -> list[Endpoint]:
    """The order and ledger routes (only when the app runs the reference checkout)."""
    if ctx.checkout is None:
        return []
    checkout = ctx.checkout
    engine = ctx.engine

    async def place(request: Request) -> Response:
        who = principal(request)
        key = request.headers.get("idempotency-key")
        if key is None or not _KEY.match(key):
            raise ApiError(
                400,
                "POST /orders needs an Idempotency-Key header: 1-255 visible ASCII characters, "
                "unique per order (repeat it to retry safely)",
                code="idempotency_key_required",
            )
        order = parse_order(await read_json(request, ctx.max_body))
        body_hash = order.body_hash()
        order_id, stored, created = await ctx.records.claim(key, body_hash, who.name)
        if stored != body_hash:
            raise ApiError(
                409,
                f"Idempotency-Key {key!r} was already used for order {order_id} with another "
                "body; use a new key for a new order",
                code="idempotency_key_reused",
            )
        # Idempotent by order id: a retry after a crash between the key's commit and the
        # start starts it now, any other retry finds the saga that exists.
        start = ctx.start_order or start_saga(ctx)
        try:
            saga_id, status = await start(order_id, order.saga_data())
        except PersonalDataRefused as exc:
            # The checkout definition's own rules (a SKU that is a card number): a 422
            # naming the field, as the checks above would; never the value.
            field = exc.where.removeprefix("data.")
            raise invalid([FieldProblem(field, str(exc))], "the order") from None
        body = {"order_id": order_id, "saga_id": saga_id, "status": status}
        headers = {"Location": f"/orders/{order_id}"}
        if not created:
            return json_reply(body, 200, headers)
        log.info(
            "order %s placed by %s",
            order_id,
            who.name,
            extra={"saga_id": saga_id, "actor": who.name, "action": "place_order"},
        )
        await ctx.records.audit(
            who,
            "place_order",
            saga_id=saga_id,
            reason=None,
            outcome="accepted",
            detail={"order_id": order_id},
        )
        return json_reply(body, 202, headers)

    async def saga_of(request: Request) -> tuple[str, str]:
        order_id = request.path_params["order_id"]
        inst = await ctx.records.order_saga(order_id)
        if inst is None:
            raise not_found(f"no order {order_id!r}")
        return order_id, inst.saga_id

    async def get_order(request: Request) -> Response:
        order_id, saga_id = await saga_of(request)
        return json_reply(order_view(order_id, saga_id, await engine.store.history(saga_id)))

    async def events(request: Request) -> Response:
        order_id, saga_id = await saga_of(request)
        last = request.headers.get("last-event-id", "0").strip()
        start = int(last) if last.isascii() and last.isdigit() and len(last) < 10 else 0
        stream = _status_events(ctx, order_id, saga_id, start)
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def paging(request: Request) -> tuple[str | None, int, int]:
        query = query_lists(request)
        limit, offset, problems = parse_paging(query, default=100)
        order_id = one(query, "order_id")
        if order_id is not None and len(order_id) > 200:
            problems.append(FieldProblem("order_id", "must be at most 200 characters"))
        if problems:
            raise invalid(problems, "the query")
        return order_id, limit, offset

    async def list_payments(request: Request) -> Response:
        order_id, limit, offset = paging(request)
        rows = await payments(checkout, order_id, limit, offset)
        return json_reply({"items": rows, "limit": limit, "offset": offset})

    async def get_stock(request: Request) -> Response:
        sku = request.path_params["sku"]
        row = await stock(checkout, sku)
        if row is None:
            raise not_found(f"no SKU {sku!r} in the inventory")
        return json_reply(row)

    async def list_shipments(request: Request) -> Response:
        order_id, limit, offset = paging(request)
        rows = await shipments(checkout, order_id, limit, offset)
        return json_reply({"items": rows, "limit": limit, "offset": offset})

    ledger_query = (_order_id_param("order_id", "query"), *PAGING)
    return [
        Endpoint(
            "POST",
            "/orders",
            Role.OPERATOR,
            place,
            "placeOrder",
            "Place an order",
            "orders",
            {
                202: Reply("A new order; its checkout saga has started.", "OrderAccepted"),
                200: Reply("The order this Idempotency-Key created before.", "OrderAccepted"),
            },
            params=(IDEMPOTENCY_KEY,),
            body="OrderRequest",
            errors=(409,),
            description="Tokens only: values that look like names, e-mail addresses or card "
            "numbers are refused with 422.",
        ),
        Endpoint(
            "GET",
            "/orders/{order_id}",
            Role.VIEWER,
            get_order,
            "getOrder",
            "An order's status and the statuses before it",
            "orders",
            {200: Reply("The order as its customer sees it.", "OrderStatus")},
            params=(_order_id_param(),),
            errors=(404,),
        ),
        Endpoint(
            "GET",
            "/orders/{order_id}/events",
            Role.VIEWER,
            events,
            "orderEvents",
            "Follow an order's status as server-sent events",
            "orders",
            {
                200: Reply(
                    "`status` events (data: an OrderStatusEvent), heartbeat comments, and "
                    "an `end` event when the order is final.",
                    None,
                    "text/event-stream",
                )
            },
            params=(_order_id_param(), LAST_EVENT_ID),
            errors=(404,),
        ),
        Endpoint(
            "GET",
            "/payments",
            Role.VIEWER,
            list_payments,
            "listPayments",
            "The payment service's ledger",
            "ledgers",
            {200: Reply("Ledger rows, newest first.", "PaymentPage")},
            params=ledger_query,
            errors=(422,),
        ),
        Endpoint(
            "GET",
            "/inventory/{sku}",
            Role.VIEWER,
            get_stock,
            "getStock",
            "One SKU's stock and its reservations",
            "ledgers",
            {200: Reply("The stock buckets of the SKU.", "Stock")},
            params=(
                {
                    "name": "sku",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1},
                },
            ),
            errors=(404,),
        ),
        Endpoint(
            "GET",
            "/shipments",
            Role.VIEWER,
            list_shipments,
            "listShipments",
            "The shipping service's shipments",
            "ledgers",
            {200: Reply("Shipments, newest first.", "ShipmentPage")},
            params=ledger_query,
            errors=(422,),
        ),
    ]


def _sse(event: str, data: object, event_id: int | None = None) -> str:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return "\n".join(lines) + "\n\n"


async def _status_events(
    ctx: ApiContext, order_id: str, saga_id: str, start: int
) -> AsyncIterator[str]:
    """Each new status as an event (id = its position), heartbeats, ``end`` when final.

    Final is :func:`~sagakit.api.views.order_final`: an order waiting for a person
    (NEEDS_ATTENTION) is not, so its stream stays open, with heartbeats, until that
    person's decision moves it on to a final status. Only committed history rows are
    read, so no event is ahead of the truth; positions only grow, so no client sees a
    status older than one it was sent.
    """
    store = ctx.engine.store
    channel = f"sagas:{store.name}"
    began = last_beat = time.monotonic()
    sent = start
    yield "retry: 2000\n\n"
    while True:
        history = await store.history(saga_id)
        path = status_path(history)
        final = bool(history) and order_final(history[-1].state)
        for position in range(sent, len(path)):
            item = path[position]
            data = {"order_id": order_id, "saga_id": saga_id, **item, "seq": position + 1}
            yield _sse(
                "status", {**data, "terminal": final and position == len(path) - 1}, position + 1
            )
        sent = max(sent, len(path))
        if final:
            yield _sse(
                "end",
                {
                    "order_id": order_id,
                    "status": path[-1]["status"],
                    "state": history[-1].state.value,
                },
            )
            return
        now = time.monotonic()
        if now - began >= ctx.sse_max_seconds:
            return  # the client reconnects with Last-Event-ID and misses nothing
        if now - last_beat >= ctx.sse_heartbeat:
            yield ": heartbeat\n\n"
            last_beat = now
        # Woken by this process's commits; the timeout covers other processes' commits.
        await ctx.engine.wakeups.wait(channel, ctx.sse_poll)
        await asyncio.sleep(0.02)  # a busy engine notifies constantly: read at most ~50/s
