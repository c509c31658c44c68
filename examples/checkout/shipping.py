"""The shipping service: one shipment per order, booked with a (fake) carrier.

Address tokens choose the failures, so tests can provoke each one:

* ``addr-bad...`` is rejected ("bad address"), a definitive answer;
* ``addr-flaky...`` finds the carrier down on attempts 1 and 2 (retryable);
* any other address finds the carrier down for a configurable fraction of
  (order, attempt) pairs, decided by a hash so that a replay fails the same way.

The payload carries an address *token*, never an address. The SQL is portable: the same
statements run on SQLiteStore and PostgresStore.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from sagakit import Envelope, Participant, StepFailed
from sagakit.stores.base import Tx

NAME = "shipping"
"""The participant's endpoint name."""

NAMESPACE = "checkout.shipping"
"""The ``schema_migrations`` namespace of the shipping tables."""

MIGRATIONS: list[str] = [
    """
    CREATE TABLE shipments (
        order_id      TEXT NOT NULL PRIMARY KEY,
        status        TEXT NOT NULL CHECK (status IN ('CREATED', 'CANCELLED')),
        carrier       TEXT NOT NULL,
        address_token TEXT NOT NULL,
        sku           TEXT NOT NULL,
        qty           BIGINT NOT NULL,
        created_at    DOUBLE PRECISION NOT NULL,
        updated_at    DOUBLE PRECISION NOT NULL
    );
    """,
]
"""Schema steps for ``apply_migrations`` (append, never edit).

Portable SQL, the same text on SQLite and PostgreSQL: ``BIGINT`` quantities,
``DOUBLE PRECISION`` epoch seconds, an explicit ``NOT NULL`` primary key.
"""

CARRIERS = ("carrier-a", "carrier-b")
FLAKY_ATTEMPTS = 2
"""How many first attempts an ``addr-flaky`` address fails."""

_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")


def carrier_down(order_id: str, attempt: int, fraction: float) -> bool:
    """True when the carrier is "down" for this (order, attempt): a stable hash, no RNG."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{order_id}:{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def build_shipping(store: Any, *, carrier_down_fraction: float = 0.0) -> Participant:
    """The shipping participant on ``store`` (its tables: :data:`MIGRATIONS`).

    ``carrier_down_fraction`` (0..1) is the share of (order, attempt) pairs for which
    the carrier is down, for load and chaos runs.
    """
    if not 0.0 <= carrier_down_fraction <= 1.0:
        raise ValueError(
            f"carrier_down_fraction must be within [0, 1], got {carrier_down_fraction}"
        )
    p = Participant(NAME, store)

    @p.handles("CreateShipment")
    async def create(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        order_id = _text(cmd, "order_id")
        address = _text(cmd, "ship_to")
        sku = _text(cmd, "sku")
        qty = cmd.payload.get("qty")
        if not _TOKEN.match(address):
            raise StepFailed("CreateShipment: 'ship_to' must be an address token, never an address")
        if not isinstance(qty, int) or isinstance(qty, bool) or qty <= 0:
            raise StepFailed(f"CreateShipment: 'qty' must be a positive integer, got {qty!r}")
        return await create_shipment(
            tx,
            order_id,
            address=address,
            sku=sku,
            qty=qty,
            attempt=max(cmd.attempt, 1),
            carrier_down_fraction=carrier_down_fraction,
            now=p.clock(),
        )

    @p.handles("CancelShipment")
    async def cancel(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        return {"cancelled": await cancel_shipment(tx, _text(cmd, "order_id"), now=p.clock())}

    return p


async def create_shipment(
    tx: Tx,
    order_id: str,
    *,
    address: str,
    sku: str,
    qty: int,
    attempt: int,
    carrier_down_fraction: float,
    now: float,
) -> dict[str, Any]:
    """Book the order's shipment (once); try ``attempt`` of the carrier.

    :class:`StepFailed`: a bad address (definite), the carrier down (retryable), or a
    shipment that was cancelled before.
    """
    row = await tx.fetchone("SELECT status, carrier FROM shipments WHERE order_id = ?", (order_id,))
    if row is not None:
        if row[0] == "CANCELLED":
            raise StepFailed(f"the shipment of order {order_id} was cancelled")
        return {"carrier": row[1]}
    if address.startswith("addr-bad"):
        raise StepFailed("bad address")
    flaky = address.startswith("addr-flaky") and attempt <= FLAKY_ATTEMPTS
    if flaky or carrier_down(order_id, attempt, carrier_down_fraction):
        raise StepFailed(f"carrier down (attempt {attempt})", retryable=True)
    carrier = CARRIERS[hashlib.blake2b(order_id.encode(), digest_size=1).digest()[0] % 2]
    await tx.execute(
        "INSERT INTO shipments (order_id, status, carrier, address_token, sku, qty, "
        "created_at, updated_at) VALUES (?, 'CREATED', ?, ?, ?, ?, ?, ?)",
        (order_id, carrier, address, sku, qty, now, now),
    )
    return {"carrier": carrier}


async def cancel_shipment(tx: Tx, order_id: str, *, now: float) -> bool:
    """Cancel a CREATED shipment; True if one was cancelled now."""
    changed = await tx.execute(
        "UPDATE shipments SET status = 'CANCELLED', updated_at = ? "
        "WHERE order_id = ? AND status = 'CREATED'",
        (now, order_id),
    )
    return changed == 1


def _text(cmd: Envelope, name: str) -> str:
    value = cmd.payload.get(name)
    if not isinstance(value, str) or not value:
        raise StepFailed(f"{cmd.type}: {name!r} must be a non-empty string, got {value!r}")
    return value
