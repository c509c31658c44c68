"""The hybrid checkout: orchestrated across services, choreographed inside shipping.

The orchestrator runs :mod:`.sagas`' checkout, except that its shipping step sends
``RequestShipment``. Inside the shipping domain three services react to each other::

    RequestShipment (command) -> shipping: ShipmentRequested
    ShipmentRequested -> labels: LabelPrinted | LabelFailed
    LabelPrinted -> carrier: CarrierBooked | CarrierBookingFailed
    CarrierBooked | LabelFailed | CarrierBookingFailed -> shipping: the reply

The shipping service answers the command only when the domain's flow ends: its handler
keeps the command (reply_to, idempotency key, attempt) in ``shipping_requests`` and
returns ``DEFER``; the handler of ``CarrierBooked`` writes the reply with
``Participant.answer``, in the same transaction that records the booking. A retry of
the command while the flow runs finds the request and defers again (keeping the newest
try, so a failure answers the try in flight); no second flow starts. A retry after the
answer gets the recorded answer from the runtime.

``CancelShipment`` may arrive mid-flow (the step timed out and is compensated): the
request becomes CANCELLED and ``ShipmentCancelled`` tells labels and carrier. A carrier
that hears it before the label leaves a tombstone and never books; one that already
booked cancels the booking; either way it says so with ``CarrierBookingCancelled``. A
``CarrierBooked`` that reaches a cancelled request is recorded and ignored, and the
runtime's tombstone keeps the command from being answered after its undo.

The compensation is answered only once the carrier confirmed (the handler of
``CancelShipment`` defers, like the request's): a ``ShipmentCancelled`` the carrier never
heard would otherwise leave a booking alive under a cancelled shipment, with nobody
waiting for anything. Unconfirmed, the orchestrator's compensation times out and tries
again, and each try tells labels and carrier again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagakit import (
    Engine,
    Envelope,
    Participant,
    Rung,
    SagaDefinition,
    Step,
    StepFailed,
    command,
)
from sagakit.core.envelope import failure, success
from sagakit.flows import FlowSpec
from sagakit.runtime.participant import DEFER, HandlerResult, MessageSchemas
from sagakit.stores.base import Tx
from sagakit.stores.memory import MemoryStore
from sagakit.stores.sqlite import SQLiteStore

from . import shipping
from .events import REGISTRY
from .sagas import PERSONAL, checkout_definition
from .services import Checkout, migrate, open_checkout
from .shipping_domain import (
    CARRIER_MIGRATIONS,
    CARRIER_NAMESPACE,
    LABELS_MIGRATIONS,
    LABELS_NAMESPACE,
    SHIPPING_FLOW,
    carrier_service,
    labels_service,
)

HYBRID = "checkout-hybrid"
"""The hybrid saga's definition name."""
SHIPPING_TIMEOUT = 4.0
"""Seconds the orchestrator waits per try of ``RequestShipment`` (three hops inside)."""

NAMESPACE = "checkout.shipping.hybrid"
MIGRATIONS = [
    """
    CREATE TABLE shipping_requests (
        order_id   TEXT NOT NULL PRIMARY KEY,
        status     TEXT NOT NULL CHECK (status IN ('REQUESTED', 'BOOKED', 'FAILED', 'CANCELLED')),
        command    TEXT NOT NULL,
        ship_to    TEXT NOT NULL,
        sku        TEXT NOT NULL,
        qty        BIGINT NOT NULL,
        carrier    TEXT NOT NULL,
        reason     TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
    # The CancelShipment waiting for the carrier's confirmation (NULL: none waits), and
    # what the request was when it was cancelled (the answer says it).
    """
    ALTER TABLE shipping_requests ADD COLUMN cancel_command TEXT;
    ALTER TABLE shipping_requests ADD COLUMN cancelled_from TEXT;
    """,
]


def hybrid_definition(**kwargs: Any) -> SagaDefinition:
    """The orchestrated checkout with ``RequestShipment`` as its shipping command."""
    base = checkout_definition(**kwargs)
    steps = []
    for s in base.steps:
        if s.name == "create_shipment":
            payload = getattr(s.action, "payload", None)
            # The cancel waits for the carrier's confirmation: two hops inside too.
            ladder = [Rung(r.action, r.retry, max(r.timeout, SHIPPING_TIMEOUT)) for r in s.ladder]
            s = Step(
                s.name,
                command("shipping", "RequestShipment", payload),
                ladder,
                kind=s.kind,
                retry=s.retry,
                timeout=max(s.timeout, SHIPPING_TIMEOUT),
                status=s.status,
            )
        steps.append(s)
    return SagaDefinition(
        HYBRID,
        steps,
        version=1,
        deadline=base.deadline,
        started_status=base.started_status,
        personal=PERSONAL,
    )


def shipping_front(store: Any, *, schemas: MessageSchemas | None) -> Participant:
    """The shipping service: takes the orchestrator's command, answers when booked."""
    p = Participant(shipping.NAME, store, schemas=schemas)

    async def request(tx: Tx, oid: str) -> tuple[str, str, str, str] | None:
        row = await tx.fetchone(
            "SELECT status, command, carrier, reason FROM shipping_requests WHERE order_id = ?",
            (oid,),
        )
        return None if row is None else (str(row[0]), str(row[1]), str(row[2]), str(row[3]))

    async def move(tx: Tx, oid: str, status: str, **cols: str) -> None:
        sets = "".join(f", {c} = ?" for c in cols)
        await tx.execute(
            f"UPDATE shipping_requests SET status = ?, updated_at = ?{sets} WHERE order_id = ?",
            (status, p.clock(), *cols.values(), oid),
        )

    @p.handles("RequestShipment")
    async def requested(tx: Tx, cmd: Envelope) -> HandlerResult:
        pl, oid = cmd.payload, cmd.payload["order_id"]
        row = await request(tx, oid)
        if row is None:
            await tx.execute(
                "INSERT INTO shipping_requests (order_id, status, command, ship_to, sku, qty, "
                "carrier, reason, updated_at) VALUES (?, 'REQUESTED', ?, ?, ?, ?, '', '', ?)",
                (oid, cmd.to_json(), pl["ship_to"], pl["sku"], pl["qty"], p.clock()),
            )
            line = {k: pl[k] for k in ("order_id", "ship_to", "sku", "qty")}
            await p.emit(tx, "ShipmentRequested", line, cause=cmd, now=p.clock())
            return DEFER
        status, _, carrier, reason = row
        if status == "REQUESTED":  # a retry while the flow runs: answer the newest try
            await move(tx, oid, status, command=cmd.to_json())
            return DEFER
        if status == "BOOKED":
            return {"carrier": carrier}
        raise StepFailed(reason or f"the shipment of order {oid} was {status.lower()}")

    async def waiting_cancel(tx: Tx, oid: str) -> tuple[str, str] | None:
        """The CancelShipment that waits for the carrier, and what the request was."""
        row = await tx.fetchone(
            "SELECT cancel_command, cancelled_from FROM shipping_requests "
            "WHERE order_id = ? AND status = 'CANCELLED' AND cancel_command IS NOT NULL",
            (oid,),
        )
        return None if row is None else (str(row[0]), str(row[1]))

    @p.handles("CancelShipment")
    async def cancel(tx: Tx, cmd: Envelope) -> HandlerResult:
        oid = cmd.payload["order_id"]
        row = await request(tx, oid)
        if row is None:  # the cancel overtook the request; the runtime refuses it later
            return {"cancelled": False}
        waiting = await waiting_cancel(tx, oid)
        if row[0] not in ("REQUESTED", "BOOKED") and waiting is None:
            return {"cancelled": False}
        if waiting is None:
            await move(tx, oid, "CANCELLED", reason="cancelled by the checkout")
            await shipping.cancel_shipment(tx, oid, now=p.clock())
        # First try, or a retry while the carrier has not confirmed (its copy may be
        # lost): tell labels and carrier (again), answer the newest try when it confirms.
        await tx.execute(
            "UPDATE shipping_requests SET cancel_command = ?, cancelled_from = ? "
            "WHERE order_id = ?",
            (cmd.to_json(), row[0] if waiting is None else waiting[1], oid),
        )
        reason = {"order_id": oid, "reason": "cancelled by the checkout"}
        await p.emit(tx, "ShipmentCancelled", reason, cause=cmd, now=p.clock())
        return DEFER

    @p.on_event("CarrierBookingCancelled")
    async def carrier_cancelled(tx: Tx, ev: Envelope) -> None:
        oid = ev.payload["order_id"]
        waiting = await waiting_cancel(tx, oid)
        if waiting is None:
            return  # confirmed before (a confirmation of an earlier try)
        await tx.execute(
            "UPDATE shipping_requests SET cancel_command = NULL WHERE order_id = ?", (oid,)
        )
        answer = success({"cancelled": True, "was": waiting[1]})
        await p.answer(tx, Envelope.from_json(waiting[0]), answer, p.clock())

    @p.on_event("CarrierBooked")
    async def booked(tx: Tx, ev: Envelope) -> None:
        oid, carrier = ev.payload["order_id"], ev.payload["carrier"]
        row = await request(tx, oid)
        if row is None or row[0] != "REQUESTED":
            return  # cancelled meanwhile: the carrier heard ShipmentCancelled too
        await move(tx, oid, "BOOKED", carrier=carrier)
        await tx.execute(
            "INSERT INTO shipments (order_id, status, carrier, address_token, sku, qty, "
            "created_at, updated_at) SELECT order_id, 'CREATED', ?, ship_to, sku, qty, ?, ? "
            "FROM shipping_requests WHERE order_id = ?",
            (carrier, p.clock(), p.clock(), oid),
        )
        await p.answer(tx, Envelope.from_json(row[1]), success({"carrier": carrier}), p.clock())

    async def refused(tx: Tx, ev: Envelope) -> None:
        oid, reason = ev.payload["order_id"], ev.payload["reason"]
        row = await request(tx, oid)
        if row is None or row[0] != "REQUESTED":
            return
        await move(tx, oid, "FAILED", reason=reason)
        await p.answer(tx, Envelope.from_json(row[1]), failure(reason), p.clock())

    for fact in ("LabelFailed", "CarrierBookingFailed"):
        p.on_event(fact)(refused)
    return p


@dataclass(slots=True)
class Hybrid:
    """The hybrid checkout: the orchestrated checkout's stores plus labels and carrier."""

    checkout: Checkout
    labels_store: Any
    carrier_store: Any
    participants: list[Participant]

    def engine(self, *, definition: SagaDefinition | None = None, **kwargs: Any) -> Engine:
        """An embedded engine running the hybrid saga; tables migrated before start."""
        engine = Engine(
            self.checkout.orchestrator_store,
            [definition or hybrid_definition()],
            participants=self.participants,
            **kwargs,
        )
        engine.before_start(lambda: migrate_hybrid(self))
        return engine


def build_hybrid(
    checkout: Checkout, labels_store: Any, carrier_store: Any, *, carrier_down_fraction: float = 0.0
) -> Hybrid:
    """The participants: order, payment and inventory as orchestrated, the shipping
    domain choreographed; every message validated against the checkout's schemas."""
    for p in (checkout.order, checkout.payment, checkout.inventory):
        p.schemas = REGISTRY
    parts = [
        checkout.order,
        checkout.payment,
        checkout.inventory,
        shipping_front(checkout.shipping_store, schemas=REGISTRY),
        labels_service(labels_store, schemas=REGISTRY),
        carrier_service(
            carrier_store, schemas=REGISTRY, carrier_down_fraction=carrier_down_fraction
        ),
    ]
    return Hybrid(checkout, labels_store, carrier_store, parts)


def open_hybrid(
    data_dir: str | Path, *, synchronous: str = "FULL", carrier_down_fraction: float = 0.0
) -> Hybrid:
    """The hybrid checkout on SQLite files in ``data_dir`` (``carrier_down_fraction``:
    the share of booking tries that find the carrier down)."""
    d = Path(data_dir)
    checkout = open_checkout(d, synchronous=synchronous)
    return build_hybrid(
        checkout,
        SQLiteStore(d / "labels.db", name="labels", synchronous=synchronous),
        SQLiteStore(d / "carrier.db", name="carrier", synchronous=synchronous),
        carrier_down_fraction=carrier_down_fraction,
    )


async def migrate_hybrid(h: Hybrid) -> None:
    """The checkout's tables, the shipping requests, labels and carrier bookings."""
    await migrate(h.checkout)
    await h.checkout.shipping_store.apply_migrations(NAMESPACE, MIGRATIONS)
    await h.labels_store.apply_migrations(LABELS_NAMESPACE, LABELS_MIGRATIONS)
    await h.carrier_store.apply_migrations(CARRIER_NAMESPACE, CARRIER_MIGRATIONS)


def shipping_flow() -> tuple[FlowSpec, list[Participant]]:
    """The shipping domain's flow and participants (throwaway stores), for ``sagakit flows``."""
    parts = [
        shipping_front(MemoryStore("shipping"), schemas=REGISTRY),
        labels_service(MemoryStore("labels"), schemas=REGISTRY),
        carrier_service(MemoryStore("carrier"), schemas=REGISTRY),
    ]
    return SHIPPING_FLOW, parts
