"""The four checkout services as event handlers: the choreography's business code.

Each handler runs in one local transaction with the inbox record (the runtime dedups
by message id), and in it: reads the aggregate it owns (the payment ledger, the
reservation, the shipment, the order), decides whether the fact still applies, does
the business writes with the same functions the orchestrated command handlers use,
emits the next fact and records what it did in its ``choreography_log`` (applied or
ignored, and why). A fact that is late, repeated under another id or contradicts what
the aggregate already did is recorded and ignored, never applied blindly: a
``PaymentFailed`` after ``PaymentAuthorized`` does not cancel the order.

A dependency that does not answer (the card provider, the carrier) is tried a few
times in the handler with the same idempotency key; then :class:`TryAgain` rolls the
transaction back and the runtime delivers the fact again later (parked after too
many deliveries, where the tracker's SLA check sees the saga stall). The card
provider is asked first what it did under the key (a call whose every answer was lost
may have happened): an effect it reports is recorded and the flow goes on; "nothing"
means trying again is safe; no answer to the question either means nobody can tell,
and the failure fact hands the order to a person (a void whose outcome is unknown is
never followed by a refund). After the capture, a step that keeps failing hands the
order to a person the same way: there is no undoing a paid order.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sagakit import Envelope, Participant, StepFailed
from sagakit.runtime.participant import MessageSchemas
from sagakit.stores.base import Tx

from . import inventory, order, payment, shipping
from .provider import FakeCardProvider, ProviderTimeout, ProviderUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)

NAMESPACE = "checkout.choreography"
MIGRATIONS: list[str] = [
    """
    CREATE TABLE choreography_log (
        message_id TEXT NOT NULL PRIMARY KEY,
        order_id   TEXT NOT NULL,
        event      TEXT NOT NULL,
        verdict    TEXT NOT NULL CHECK (verdict IN ('applied', 'ignored')),
        note       TEXT NOT NULL,
        at         DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX choreography_log_order_idx ON choreography_log (order_id, event);
    """,
]
"""Every service's record of the facts it handled (same table in each service's store)."""

TRIES = 3
"""Tries of a provider or carrier call inside one handler (``flaky`` fails two)."""


class TryAgain(Exception):
    """A dependency did not answer: roll back; the fact is delivered again later."""


async def note(tx: Tx, ev: Envelope, verdict: str, what: str, now: float) -> None:
    """Record how this service handled ``ev`` (and log it, tokens only)."""
    log.debug(
        "%s %s: %s",
        verdict,
        ev.type,
        what,
        extra={"saga_id": ev.correlation_id, "step": ev.type, "message_id": ev.message_id},
    )
    await tx.execute(
        "INSERT INTO choreography_log (message_id, order_id, event, verdict, note, at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (ev.message_id, ev.payload["order_id"], ev.type, verdict, what, now),
    )


async def _tries(call: Callable[[], Awaitable[T]]) -> T:
    for attempt in range(1, TRIES + 1):
        try:
            return await call()
        except StepFailed as exc:
            if not exc.retryable:
                raise
            if attempt == TRIES:
                raise TryAgain(exc.reason) from exc
    raise AssertionError("unreachable")


def _key(order_id: str, op: str) -> str:
    return f"{order_id}:{op}"


def order_reactions(store: Any, *, schemas: MessageSchemas | None) -> Participant:
    """The order service: cancels on a final payment answer, completes on the commit."""
    p = Participant(order.NAME, store, schemas=schemas)

    @p.on_event("PaymentAuthorized")
    async def authorized(tx: Tx, ev: Envelope) -> None:
        status = await order.order_status(tx, ev.payload["order_id"])
        if status != "CREATED":
            await note(tx, ev, "ignored", f"order is {status}", p.clock())
        else:
            await note(tx, ev, "applied", "payment authorized", p.clock())

    async def cancel(tx: Tx, ev: Envelope) -> None:
        oid, now = ev.payload["order_id"], p.clock()
        if ev.type == "PaymentFailed":
            authorized = await tx.fetchone(
                "SELECT 1 FROM choreography_log WHERE order_id = ? "
                "AND event = 'PaymentAuthorized' AND verdict = 'applied'",
                (oid,),
            )
            if authorized is not None:
                why = "the payment was authorized: a failure after it does not undo it"
                return await note(tx, ev, "ignored", why, now)
        if not await order.move_order(tx, oid, "CANCELLED", now):
            status = await order.order_status(tx, oid)
            return await note(tx, ev, "ignored", f"order is {status}", now)
        reason = ev.payload["reason"]
        await p.emit(tx, "OrderCancelled", {"order_id": oid, "reason": reason}, cause=ev, now=now)
        await note(tx, ev, "applied", "OrderCancelled", now)

    for fact in ("PaymentFailed", "PaymentVoided", "PaymentRefunded"):
        p.on_event(fact)(cancel)

    @p.on_event("InventoryCommitted")
    async def complete(tx: Tx, ev: Envelope) -> None:
        oid, now = ev.payload["order_id"], p.clock()
        status = await order.order_status(tx, oid)
        if status != "CREATED":
            return await note(tx, ev, "ignored", f"order is {status}", now)
        for attempt in range(1, TRIES + 1):
            try:
                await order.complete_order(tx, oid, now=now, attempt=attempt)
            except StepFailed as exc:
                if exc.retryable and attempt < TRIES:
                    continue
                # Paid and shipped: nothing to undo, a person decides.
                fact, payload = "OrderCompletionFailed", {"order_id": oid, "reason": exc.reason}
            else:
                fact, payload = "OrderCompleted", {"order_id": oid}
            await p.emit(tx, fact, payload, cause=ev, now=now)
            return await note(tx, ev, "applied", fact, now)

    return p


def payment_reactions(
    store: Any, provider: FakeCardProvider, *, schemas: MessageSchemas | None
) -> Participant:
    """The payment service: authorizes, captures once shipped, releases on a failure."""
    p = Participant(payment.NAME, store, schemas=schemas)
    ops = payment.PaymentOps(provider, lambda: p.clock())

    async def emit(tx: Tx, ev: Envelope, fact: str, **payload: Any) -> None:
        oid, now = ev.payload["order_id"], p.clock()
        await p.emit(tx, fact, {"order_id": oid, **payload}, cause=ev, now=now)
        await note(tx, ev, "applied", fact, now)

    async def ask(tx: Tx, oid: str, op: str, unanswered: TryAgain) -> payment.LedgerRow | None:
        """Every try of ``op`` went unanswered: what did the provider do under its key?

        The effect, recorded; ``None`` when the provider does not answer the question
        either (the outcome stays unknown: a person's). Nothing done re-raises
        ``unanswered``: trying again later is safe.
        """
        try:
            row = await ops.learn(tx, oid, op, _key(oid, op))
        except (ProviderTimeout, ProviderUnavailable):
            return None
        if row is None:
            raise unanswered
        return row

    @p.on_event("OrderCreated")
    async def authorize(tx: Tx, ev: Envelope) -> None:
        pl, oid = ev.payload, ev.payload["order_id"]
        rows = await payment.ledger(tx, oid)
        if rows:
            return await note(tx, ev, "ignored", f"ledger has {sorted(rows)}", p.clock())
        try:
            res = await _tries(
                lambda: ops.authorize(
                    tx,
                    oid,
                    amount=pl["amount"],
                    currency=pl["currency"],
                    card=pl["card"],
                    key=_key(oid, "authorize"),
                )
            )
        except StepFailed as exc:
            return await emit(tx, ev, "PaymentFailed", reason=exc.reason)
        line = {k: pl[k] for k in ("sku", "qty", "ship_to")}
        await emit(
            tx,
            ev,
            "PaymentAuthorized",
            authorization=res["authorization"],
            amount=res["amount"],
            **line,
        )

    @p.on_event("ShipmentCreated")
    async def capture(tx: Tx, ev: Envelope) -> None:
        oid = ev.payload["order_id"]
        rows = await payment.ledger(tx, oid)
        if "authorize" not in rows or rows.keys() & {"capture", "void", "refund"}:
            return await note(tx, ev, "ignored", f"ledger has {sorted(rows)}", p.clock())
        try:
            res = await _tries(lambda: ops.capture(tx, oid, key=_key(oid, "capture")))
        except StepFailed as exc:
            return await emit(tx, ev, "PaymentCaptureFailed", reason=exc.reason)
        except TryAgain as exc:
            row = await ask(tx, oid, "capture", exc)
            if row is None:
                why = f"the capture's outcome is unknown (the provider does not answer): {exc}"
                return await emit(tx, ev, "PaymentCaptureFailed", reason=why)
            res = {"captured": row.amount}
        await emit(tx, ev, "PaymentCaptured", captured=res["captured"])

    async def release(tx: Tx, ev: Envelope) -> None:
        oid, reason = ev.payload["order_id"], ev.payload["reason"]
        rows = await payment.ledger(tx, oid)
        if "authorize" not in rows or rows.keys() & {"void", "refund"}:
            return await note(tx, ev, "ignored", f"ledger has {sorted(rows)}", p.clock())
        auth_key = _key(oid, "authorize")
        if "capture" not in rows:
            try:
                res = await _tries(
                    lambda: ops.void(tx, oid, key=_key(oid, "void"), compensates=auth_key)
                )
                return await emit(tx, ev, "PaymentVoided", voided=res["voided"], reason=reason)
            except StepFailed as exc:  # refused for good: a refund releases the hold
                reason = f"{reason}; void refused: {exc.reason}"
            except TryAgain as exc:
                row = await ask(tx, oid, "void", exc)
                if row is None:
                    # The void may have happened: never move on to a refund on a guess.
                    why = f"{reason}; the void's outcome is unknown (the provider does not answer)"
                    return await emit(tx, ev, "PaymentReleaseFailed", reason=why)
                return await emit(tx, ev, "PaymentVoided", voided=row.amount, reason=reason)
        try:
            res = await _tries(
                lambda: ops.refund(tx, oid, key=_key(oid, "refund"), compensates=auth_key)
            )
        except StepFailed as exc:
            return await emit(tx, ev, "PaymentReleaseFailed", reason=f"{reason}; {exc.reason}")
        await emit(tx, ev, "PaymentRefunded", refunded=res["refunded"], reason=reason)

    for fact in ("InventoryFailed", "InventoryReleased"):
        p.on_event(fact)(release)
    return p


def inventory_reactions(
    store: Any,
    *,
    schemas: MessageSchemas | None,
    reservation_ttl: float = inventory.RESERVATION_TTL,
) -> Participant:
    """The inventory service: reserves once paid, releases on a failed shipment, commits
    once the money is captured."""
    p = Participant(inventory.NAME, store, schemas=schemas)

    async def emit(tx: Tx, ev: Envelope, fact: str, **payload: Any) -> None:
        oid, now = ev.payload["order_id"], p.clock()
        await p.emit(tx, fact, {"order_id": oid, **payload}, cause=ev, now=now)
        await note(tx, ev, "applied", fact, now)

    @p.on_event("PaymentAuthorized")
    async def reserve(tx: Tx, ev: Envelope) -> None:
        pl, oid = ev.payload, ev.payload["order_id"]
        existing = await inventory.reservation(tx, oid)
        if existing is not None:
            return await note(tx, ev, "ignored", f"reservation is {existing[2]}", p.clock())
        try:
            await inventory.reserve(
                tx, oid, pl["sku"], pl["qty"], now=p.clock(), ttl=reservation_ttl
            )
        except StepFailed as exc:
            return await emit(tx, ev, "InventoryFailed", reason=exc.reason)
        await emit(tx, ev, "InventoryReserved", sku=pl["sku"], qty=pl["qty"], ship_to=pl["ship_to"])

    @p.on_event("ShipmentFailed")
    async def release(tx: Tx, ev: Envelope) -> None:
        oid = ev.payload["order_id"]
        existing = await inventory.reservation(tx, oid)
        if existing is None or existing[2] not in ("RESERVED", "EXPIRED"):
            held = "none" if existing is None else existing[2]
            return await note(tx, ev, "ignored", f"reservation is {held}", p.clock())
        res = await inventory.release(tx, oid, now=p.clock())  # EXPIRED: 0 units, still done
        await emit(
            tx, ev, "InventoryReleased", released=res["released"], reason=ev.payload["reason"]
        )

    @p.on_event("PaymentCaptured")
    async def commit(tx: Tx, ev: Envelope) -> None:
        oid = ev.payload["order_id"]
        existing = await inventory.reservation(tx, oid)
        if existing is not None and existing[2] == "COMMITTED":
            return await note(tx, ev, "ignored", "reservation is COMMITTED", p.clock())
        for attempt in range(1, TRIES + 1):
            try:
                res = await inventory.commit(tx, oid, now=p.clock(), attempt=attempt)
            except StepFailed as exc:
                if exc.retryable and attempt < TRIES:
                    continue
                # The money is taken: no undoing, a person decides.
                return await emit(tx, ev, "InventoryCommitFailed", reason=exc.reason)
            return await emit(tx, ev, "InventoryCommitted", sku=res["sku"], shipped=res["shipped"])

    return p


def shipping_reactions(
    store: Any, *, schemas: MessageSchemas | None, carrier_down_fraction: float = 0.0
) -> Participant:
    """The shipping service: books the shipment once the goods are reserved."""
    p = Participant(shipping.NAME, store, schemas=schemas)

    @p.on_event("InventoryReserved")
    async def ship(tx: Tx, ev: Envelope) -> None:
        pl, oid, now = ev.payload, ev.payload["order_id"], p.clock()
        row = await tx.fetchone("SELECT status FROM shipments WHERE order_id = ?", (oid,))
        if row is not None:
            return await note(tx, ev, "ignored", f"shipment is {row[0]}", now)
        for attempt in range(1, TRIES + 1):
            try:
                res = await shipping.create_shipment(
                    tx,
                    oid,
                    address=pl["ship_to"],
                    sku=pl["sku"],
                    qty=pl["qty"],
                    attempt=attempt,
                    carrier_down_fraction=carrier_down_fraction,
                    now=now,
                )
            except StepFailed as exc:
                if exc.retryable and attempt < TRIES:
                    continue
                if exc.retryable:
                    raise TryAgain(exc.reason) from exc
                fact, payload = "ShipmentFailed", {"order_id": oid, "reason": exc.reason}
            else:
                fact, payload = "ShipmentCreated", {"order_id": oid, "carrier": res["carrier"]}
            await p.emit(tx, fact, payload, cause=ev, now=now)
            return await note(tx, ev, "applied", fact, now)

    return p
