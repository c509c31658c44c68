"""The order service: the order a customer sees, and every status it went through.

An order is CREATED by the saga's first step and ends COMPLETED (every step done) or
CANCELLED (compensated). ``order_status_history`` keeps each change with a sequence
number, so the service can show what the customer saw and when. The customer is a
token: no names, e-mail or postal addresses are stored here.
"""

from __future__ import annotations

import re
from typing import Any

from sagakit import Envelope, Participant, StepFailed
from sagakit.stores.base import Tx

NAME = "order"
"""The participant's endpoint name."""

NAMESPACE = "checkout.order"
"""The ``schema_migrations`` namespace of the order tables."""

MIGRATIONS: list[str] = [
    """
    CREATE TABLE orders (
        order_id       TEXT PRIMARY KEY,
        customer_token TEXT NOT NULL,
        sku            TEXT NOT NULL,
        qty            INTEGER NOT NULL CHECK (qty > 0),
        amount         INTEGER NOT NULL CHECK (amount >= 0),
        status         TEXT NOT NULL CHECK (status IN ('CREATED', 'COMPLETED', 'CANCELLED')),
        created_at     REAL NOT NULL,
        updated_at     REAL NOT NULL
    );
    CREATE TABLE order_status_history (
        order_id TEXT NOT NULL,
        seq      INTEGER NOT NULL,
        status   TEXT NOT NULL,
        at       REAL NOT NULL,
        PRIMARY KEY (order_id, seq)
    );
    """,
]
"""Schema steps for :meth:`SQLiteStore.apply_migrations` (append, never edit)."""

_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")


def build_order(store: Any) -> Participant:
    """The order participant on ``store`` (its tables: :data:`MIGRATIONS`)."""
    p = Participant(NAME, store)

    async def set_status(tx: Tx, order_id: str, status: str) -> None:
        now = p.clock()
        await tx.execute(
            "UPDATE orders SET status = ?, updated_at = ? WHERE order_id = ?",
            (status, now, order_id),
        )
        await tx.execute(
            "INSERT INTO order_status_history (order_id, seq, status, at) "
            "SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ? FROM order_status_history "
            "WHERE order_id = ?",
            (order_id, status, now, order_id),
        )

    async def status_of(tx: Tx, order_id: str) -> str | None:
        row = await tx.fetchone("SELECT status FROM orders WHERE order_id = ?", (order_id,))
        return None if row is None else str(row[0])

    @p.handles("CreateOrder")
    async def create(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        order_id = _text(cmd, "order_id")
        customer = _text(cmd, "customer")
        if not _TOKEN.match(customer):
            raise StepFailed("CreateOrder: 'customer' must be a token, never personal data")
        sku = _text(cmd, "sku")
        qty, amount = cmd.payload.get("qty"), cmd.payload.get("amount")
        for name, value, least in (("qty", qty, 1), ("amount", amount, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise StepFailed(
                    f"CreateOrder: {name!r} must be an integer >= {least}, got {value!r}"
                )
        existing = await status_of(tx, order_id)
        if existing is not None:
            # Idempotent by order id: a second CreateOrder (another key, a replay) is
            # answered with the order that exists.
            return {"order_id": order_id, "status": existing}
        now = p.clock()
        await tx.execute(
            "INSERT INTO orders (order_id, customer_token, sku, qty, amount, status, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, 'CREATED', ?, ?)",
            (order_id, customer, sku, qty, amount, now, now),
        )
        await tx.execute(
            "INSERT INTO order_status_history (order_id, seq, status, at) "
            "VALUES (?, 1, 'CREATED', ?)",
            (order_id, now),
        )
        return {"order_id": order_id, "status": "CREATED"}

    @p.handles("CompleteOrder")
    async def complete(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        order_id = _text(cmd, "order_id")
        status = await status_of(tx, order_id)
        if status is None:
            raise StepFailed(f"no order {order_id}")
        if status == "CANCELLED":
            raise StepFailed(f"order {order_id} was cancelled; it cannot complete")
        if status == "CREATED":
            await set_status(tx, order_id, "COMPLETED")
        return {"order_id": order_id, "status": "COMPLETED"}

    @p.handles("CancelOrder")
    async def cancel(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        order_id = _text(cmd, "order_id")
        status = await status_of(tx, order_id)
        if status is None:
            return {"order_id": order_id, "cancelled": False}
        if status == "COMPLETED":
            raise StepFailed(f"order {order_id} is already completed; it cannot be cancelled")
        if status == "CREATED":
            await set_status(tx, order_id, "CANCELLED")
        return {"order_id": order_id, "cancelled": True}

    return p


def _text(cmd: Envelope, name: str) -> str:
    value = cmd.payload.get(name)
    if not isinstance(value, str) or not value:
        raise StepFailed(f"{cmd.type}: {name!r} must be a non-empty string, got {value!r}")
    return value
