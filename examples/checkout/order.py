"""The order service: the order a customer sees, and every status it went through.

An order is CREATED by the saga's first step and ends COMPLETED (every step done) or
CANCELLED (compensated). Completing it checks the customer's account, and customer
tokens choose what that check finds, so that tests and demos can provoke failures
after the payment was captured:

* ``cust-locked...``: the account record is locked by a concurrent update on the first
  two tries (retryable);
* ``cust-frozen...``: the account was frozen (a fraud review) after the payment: the
  order may not complete (a definite failure; a person decides about the paid order).
 ``order_status_history`` keeps each change with a sequence
number, so the service can show what the customer saw and when. The customer is a
token: no names, e-mail or postal addresses are stored here.

Its SQL is portable: the same statements run on SQLiteStore and PostgresStore.
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
        order_id       TEXT NOT NULL PRIMARY KEY,
        customer_token TEXT NOT NULL,
        sku            TEXT NOT NULL,
        qty            BIGINT NOT NULL CHECK (qty > 0),
        amount         BIGINT NOT NULL CHECK (amount >= 0),
        status         TEXT NOT NULL CHECK (status IN ('CREATED', 'COMPLETED', 'CANCELLED')),
        created_at     DOUBLE PRECISION NOT NULL,
        updated_at     DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE order_status_history (
        order_id TEXT NOT NULL,
        seq      INTEGER NOT NULL,
        status   TEXT NOT NULL,
        at       DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (order_id, seq)
    );
    """,
]
"""Schema steps for ``apply_migrations`` (append, never edit).

Portable SQL, the same text on SQLite and PostgreSQL: ``BIGINT`` for amounts and
quantities (64-bit on both, like SQLite's ``INTEGER``), ``DOUBLE PRECISION`` for epoch
seconds (PostgreSQL's ``REAL`` is 4 bytes: far too coarse for a timestamp), explicit
``NOT NULL`` on primary keys (SQLite would otherwise accept a NULL key).
"""

_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")

LOCKED_TRIES = 2
"""How many first tries of completing a ``cust-locked`` customer's order fail."""


async def order_status(tx: Tx, order_id: str) -> str | None:
    """The order's status, or ``None`` when there is no such order."""
    row = await tx.fetchone("SELECT status FROM orders WHERE order_id = ?", (order_id,))
    return None if row is None else str(row[0])


async def create_order(
    tx: Tx, *, order_id: str, customer: str, sku: str, qty: object, amount: object, now: float
) -> tuple[dict[str, Any], bool]:
    """Create a CREATED order (idempotent by order id); ``(result, created)``.

    Raises :class:`StepFailed` for a customer that is not a token or bad numbers.
    """
    if not _TOKEN.match(customer):
        raise StepFailed("CreateOrder: 'customer' must be a token, never personal data")
    for name, value, least in (("qty", qty, 1), ("amount", amount, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise StepFailed(f"CreateOrder: {name!r} must be an integer >= {least}, got {value!r}")
    created = await tx.execute(
        "INSERT INTO orders (order_id, customer_token, sku, qty, amount, status, created_at, "
        "updated_at) VALUES (?, ?, ?, ?, ?, 'CREATED', ?, ?) ON CONFLICT (order_id) DO NOTHING",
        (order_id, customer, sku, qty, amount, now, now),
    )
    if not created:
        # Idempotent by order id: a second CreateOrder (another key, a replay) is
        # answered with the order that exists.
        return {"order_id": order_id, "status": await order_status(tx, order_id)}, False
    await tx.execute(
        "INSERT INTO order_status_history (order_id, seq, status, at) VALUES (?, 1, 'CREATED', ?)",
        (order_id, now),
    )
    return {"order_id": order_id, "status": "CREATED"}, True


async def complete_order(tx: Tx, order_id: str, *, now: float, attempt: int) -> dict[str, Any]:
    """Complete a CREATED order (idempotent); ``attempt`` is the try of this completion.

    :class:`StepFailed`: no such order or a cancelled one (definite), the customer's
    account frozen (definite) or locked (retryable, the first :data:`LOCKED_TRIES` tries).
    """
    row = await tx.fetchone(
        "SELECT status, customer_token FROM orders WHERE order_id = ?", (order_id,)
    )
    if row is None:
        raise StepFailed(f"no order {order_id}")
    status, customer = str(row[0]), str(row[1])
    if status == "CREATED":
        if customer.startswith("cust-frozen"):
            raise StepFailed(f"the account of customer {customer} is frozen (fraud review)")
        if customer.startswith("cust-locked") and attempt <= LOCKED_TRIES:
            raise StepFailed(
                f"the account of customer {customer} is locked by another update (try {attempt})",
                retryable=True,
            )
        # One conditional UPDATE decides (a concurrent cancel or completion may win).
        settled = await settle_order(tx, order_id, "COMPLETED", now)
        if settled is None:
            raise StepFailed(f"no order {order_id}")
        status = settled
    if status == "CANCELLED":
        raise StepFailed(f"order {order_id} was cancelled; it cannot complete")
    return {"order_id": order_id, "status": "COMPLETED"}


async def settle_order(tx: Tx, order_id: str, status: str, now: float) -> str | None:
    """Move a CREATED order to ``status``; return the order's status afterwards.

    ``None``: no such order. One conditional UPDATE decides, so two transactions
    settling the same order concurrently (PostgreSQL, READ COMMITTED) cannot both
    move it: the second waits for the first's row lock, finds it no longer CREATED,
    and answers from what the first wrote.
    """
    if await move_order(tx, order_id, status, now):
        return status
    return await order_status(tx, order_id)


async def move_order(tx: Tx, order_id: str, status: str, now: float) -> bool:
    """Move a CREATED order to ``status``; True if this transaction moved it."""
    changed = await tx.execute(
        "UPDATE orders SET status = ?, updated_at = ? WHERE order_id = ? AND status = 'CREATED'",
        (status, now, order_id),
    )
    if not changed:
        return False
    # The order's row is locked by the UPDATE above: seq cannot be taken twice.
    await tx.execute(
        "INSERT INTO order_status_history (order_id, seq, status, at) "
        "SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ? FROM order_status_history "
        "WHERE order_id = ?",
        (order_id, status, now, order_id),
    )
    return True


def build_order(store: Any) -> Participant:
    """The order participant on ``store`` (its tables: :data:`MIGRATIONS`)."""
    p = Participant(NAME, store)

    @p.handles("CreateOrder")
    async def create(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        order_id = _text(cmd, "order_id")
        customer = _text(cmd, "customer")
        if not _TOKEN.match(customer):
            raise StepFailed("CreateOrder: 'customer' must be a token, never personal data")
        result, _ = await create_order(
            tx,
            order_id=order_id,
            customer=customer,
            sku=_text(cmd, "sku"),
            qty=cmd.payload.get("qty"),
            amount=cmd.payload.get("amount"),
            now=p.clock(),
        )
        return result

    @p.handles("CompleteOrder")
    async def complete(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        return await complete_order(
            tx, _text(cmd, "order_id"), now=p.clock(), attempt=max(cmd.attempt, 1)
        )

    @p.handles("CancelOrder")
    async def cancel(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        order_id = _text(cmd, "order_id")
        status = await settle_order(tx, order_id, "CANCELLED", p.clock())
        if status is None:
            return {"order_id": order_id, "cancelled": False}
        if status == "COMPLETED":
            raise StepFailed(f"order {order_id} is already completed; it cannot be cancelled")
        return {"order_id": order_id, "cancelled": True}

    return p


def _text(cmd: Envelope, name: str) -> str:
    value = cmd.payload.get(name)
    if not isinstance(value, str) or not value:
        raise StepFailed(f"{cmd.type}: {name!r} must be a non-empty string, got {value!r}")
    return value
