"""The shipping domain's own services for the hybrid checkout: labels and carrier.

They react to the shipping service's facts (see :mod:`.hybrid`)::

    ShipmentRequested -> labels: LabelPrinted | LabelFailed (a bad address)
    LabelPrinted -> carrier: CarrierBooked | CarrierBookingFailed (no route)
    ShipmentCancelled -> labels: the label is voided; carrier: the booking is cancelled,
                         or, if the cancel came first, a tombstone so it never books;
                         either way CarrierBookingCancelled (shipping answers the cancel)

Each keeps its own table in its own store. :func:`check_bookings` adds the domain's
ledger to the demo's invariants: a carrier booking must not outlive its shipment.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sagakit import Envelope, Participant
from sagakit.flows import START, FlowSpec, Publishes
from sagakit.runtime.participant import MessageSchemas
from sagakit.stores.base import Tx

from . import shipping
from .invariants import InvariantReport
from .reactions import TRIES, TryAgain

LABELS_NAMESPACE = "checkout.labels"
LABELS_MIGRATIONS = [
    """
    CREATE TABLE labels (
        order_id   TEXT NOT NULL PRIMARY KEY,
        label      TEXT NOT NULL,
        status     TEXT NOT NULL CHECK (status IN ('PRINTED', 'REFUSED', 'VOIDED')),
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
]
CARRIER_NAMESPACE = "checkout.carrier"
CARRIER_MIGRATIONS = [
    """
    CREATE TABLE carrier_bookings (
        order_id   TEXT NOT NULL PRIMARY KEY,
        status     TEXT NOT NULL CHECK (status IN ('BOOKED', 'CANCELLED', 'REFUSED')),
        carrier    TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
]

SHIPPING_FLOW = FlowSpec(
    name="shipping-domain",
    declarations=(
        Publishes("shipping", START, ("ShipmentRequested", "ShipmentCancelled")),
        Publishes("labels", "ShipmentRequested", ("LabelPrinted", "LabelFailed")),
        Publishes("carrier", "LabelPrinted", ("CarrierBooked", "CarrierBookingFailed")),
        Publishes("shipping", "CarrierBooked"),
        Publishes("shipping", "LabelFailed"),
        Publishes("shipping", "CarrierBookingFailed"),
        Publishes("labels", "ShipmentCancelled"),
        Publishes("carrier", "ShipmentCancelled", ("CarrierBookingCancelled",)),
        Publishes("shipping", "CarrierBookingCancelled"),
    ),
)
"""Who publishes what inside the shipping domain (``sagakit flows --flow ...:shipping_flow``)."""


def labels_service(store: Any, *, schemas: MessageSchemas | None) -> Participant:
    """Prints the label (refuses a bad address); voids it when the shipment is cancelled."""
    p = Participant("labels", store, schemas=schemas)

    @p.on_event("ShipmentRequested")
    async def label(tx: Tx, ev: Envelope) -> None:
        oid, address = ev.payload["order_id"], ev.payload["ship_to"]
        if await tx.fetchone("SELECT 1 FROM labels WHERE order_id = ?", (oid,)):
            return  # printed before, or voided first (a cancel overtook the request)
        refused = address.startswith("addr-bad")
        await tx.execute(
            "INSERT INTO labels (order_id, label, status, updated_at) VALUES (?, ?, ?, ?)",
            (oid, f"lbl-{oid}", "REFUSED" if refused else "PRINTED", p.clock()),
        )
        if refused:
            payload = {"order_id": oid, "reason": "bad address"}
            await p.emit(tx, "LabelFailed", payload, cause=ev, now=p.clock())
        else:
            payload = {"order_id": oid, "label": f"lbl-{oid}", "ship_to": address}
            await p.emit(tx, "LabelPrinted", payload, cause=ev, now=p.clock())

    @p.on_event("ShipmentCancelled")
    async def void(tx: Tx, ev: Envelope) -> None:
        oid = ev.payload["order_id"]
        await tx.execute(
            "INSERT INTO labels (order_id, label, status, updated_at) "
            "VALUES (?, '', 'VOIDED', ?) ON CONFLICT (order_id) DO UPDATE SET "
            "status = 'VOIDED', updated_at = excluded.updated_at "
            "WHERE labels.status = 'PRINTED'",
            (oid, p.clock()),
        )

    return p


def carrier_service(
    store: Any, *, schemas: MessageSchemas | None, carrier_down_fraction: float = 0.0
) -> Participant:
    """Books a carrier for a printed label; cancels (or refuses, if first) on a cancel."""
    p = Participant("carrier", store, schemas=schemas)

    @p.on_event("LabelPrinted")
    async def book(tx: Tx, ev: Envelope) -> None:
        oid, address = ev.payload["order_id"], ev.payload["ship_to"]
        if await tx.fetchone("SELECT 1 FROM carrier_bookings WHERE order_id = ?", (oid,)):
            return  # booked before, or cancelled first: never book after the undo
        if address.startswith("addr-noroute"):
            await _booking(tx, oid, "REFUSED", "", p.clock())
            payload = {"order_id": oid, "reason": "no carrier serves this address"}
            await p.emit(tx, "CarrierBookingFailed", payload, cause=ev, now=p.clock())
            return
        for attempt in range(1, TRIES + 1):
            flaky = address.startswith("addr-flaky") and attempt <= shipping.FLAKY_ATTEMPTS
            if not (flaky or shipping.carrier_down(oid, attempt, carrier_down_fraction)):
                break
        else:
            raise TryAgain(f"carrier down ({TRIES} tries)")
        digest = hashlib.blake2b(oid.encode(), digest_size=1).digest()[0]
        carrier = shipping.CARRIERS[digest % 2]
        await _booking(tx, oid, "BOOKED", carrier, p.clock())
        payload = {"order_id": oid, "carrier": carrier, "label": ev.payload["label"]}
        await p.emit(tx, "CarrierBooked", payload, cause=ev, now=p.clock())

    @p.on_event("ShipmentCancelled")
    async def cancel(tx: Tx, ev: Envelope) -> None:
        oid = ev.payload["order_id"]
        await tx.execute(
            "INSERT INTO carrier_bookings (order_id, status, carrier, updated_at) "
            "VALUES (?, 'CANCELLED', '', ?) ON CONFLICT (order_id) DO UPDATE SET "
            "status = 'CANCELLED', updated_at = excluded.updated_at "
            "WHERE carrier_bookings.status = 'BOOKED'",
            (oid, p.clock()),
        )
        # Shipping answers the checkout's cancel only on this: no booking survives it.
        await p.emit(tx, "CarrierBookingCancelled", {"order_id": oid}, cause=ev, now=p.clock())

    return p


async def _booking(tx: Tx, oid: str, status: str, carrier: str, now: float) -> None:
    await tx.execute(
        "INSERT INTO carrier_bookings (order_id, status, carrier, updated_at) VALUES (?, ?, ?, ?)",
        (oid, status, carrier, now),
    )


async def check_bookings(report: InvariantReport, shipping_store: Any, carrier_store: Any) -> None:
    """Every BOOKED carrier booking has a CREATED shipment, and the other way round."""
    async with shipping_store.transaction() as tx:
        shipments = dict(await tx.fetchall("SELECT order_id, status FROM shipments"))
    async with carrier_store.transaction() as tx:
        bookings = dict(await tx.fetchall("SELECT order_id, status FROM carrier_bookings"))
    for oid in sorted(set(shipments) | set(bookings)):
        booked, shipped = bookings.get(oid) == "BOOKED", shipments.get(oid) == "CREATED"
        if booked != shipped:
            report.fail(
                "stock",
                f"order {oid}: carrier booking {bookings.get(oid, 'none')} but shipment "
                f"{shipments.get(oid, 'none')} (a booking must not outlive its shipment)",
            )
