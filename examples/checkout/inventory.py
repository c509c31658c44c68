"""The inventory service: stock per SKU and one reservation per order.

Stock moves between three buckets, so that ``initial = available + reserved + shipped``
holds after every transaction: a reservation moves units from *available* to
*reserved*, a release moves them back, a commit (the goods leave) moves them from
*reserved* to *shipped*. The reservation itself is one conditional UPDATE, so two
orders racing for the last item cannot both win, whatever the isolation level.

Reservations expire: each carries ``expires_at`` (creation + a TTL longer than the
checkout's deadline), and :func:`expire_reservations` returns the units of RESERVED
reservations past it to *available* (status EXPIRED). A saga that died or stalled
therefore cannot hold stock forever. Releasing an expired reservation is a no-op
success; committing one fails for good (its units may have gone to another order), so
a saga past its pivot then goes to a person.

The commit is where the warehouse picks the goods, and SKU tokens choose how its
system answers, so that tests and demos can provoke failures after the pivot:

* ``sku-wh-flaky...``: the warehouse confirms the pick only from the third try on
  (tries 1 and 2 fail, retryable);
* ``sku-wh-down...``: the warehouse never confirms (every try fails, retryable);
* ``sku-recalled...``: the SKU was recalled after the sale: the pick is refused for
  good (the goods may not leave; a person decides about the paid order).

The SQL is portable (SQLiteStore and PostgresStore run the same statements) and never
relies on transactions running one at a time: on PostgreSQL (READ COMMITTED) a
handler and the sweeper may work on one reservation concurrently, so every status
change is a conditional UPDATE whose row count decides what happens next.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sagakit import Envelope, Participant, StepFailed
from sagakit.stores.base import Tx

NAME = "inventory"
"""The participant's endpoint name."""

NAMESPACE = "checkout.inventory"
"""The ``schema_migrations`` namespace of the inventory tables."""

MIGRATIONS: list[str] = [
    """
    CREATE TABLE stock (
        sku       TEXT NOT NULL PRIMARY KEY,
        initial   BIGINT NOT NULL CHECK (initial >= 0),
        available BIGINT NOT NULL CHECK (available >= 0),
        reserved  BIGINT NOT NULL CHECK (reserved >= 0),
        shipped   BIGINT NOT NULL CHECK (shipped >= 0)
    );
    CREATE TABLE reservations (
        order_id   TEXT NOT NULL PRIMARY KEY,
        sku        TEXT NOT NULL,
        qty        BIGINT NOT NULL CHECK (qty > 0),
        status     TEXT NOT NULL
                   CHECK (status IN ('RESERVED', 'RELEASED', 'COMMITTED', 'EXPIRED')),
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX reservations_sku_status_idx ON reservations (sku, status);
    CREATE INDEX reservations_expiry_idx ON reservations (status, expires_at);
    """,
]
"""Schema steps for ``apply_migrations`` (append, never edit).

Portable SQL, the same text on SQLite and PostgreSQL: ``BIGINT`` counts,
``DOUBLE PRECISION`` epoch seconds, explicit ``NOT NULL`` on primary keys. A later step
that must change a CHECK constraint needs dialect-specific text (SQLite rebuilds the
table, PostgreSQL alters the constraint): choose it by the store's ``dialect`` then.
"""

OUT_OF_STOCK = "out of stock"

FLAKY_PICKS = 2
"""How many first tries of a commit a ``sku-wh-flaky`` warehouse fails."""

RESERVATION_TTL = 900.0
"""Seconds a reservation holds its units unless committed or released first.

Longer than the checkout saga's deadline (``sagas.DEADLINE``, 120 s): a saga that is
still within its SLA never loses its reservation to the sweeper.
"""


async def seed_stock(store: Any, stock: Mapping[str, int]) -> None:
    """Create stock rows (idempotent: a SKU that already exists keeps its numbers).

    Run after the inventory migrations. Seeding twice never doubles the stock, which is
    what makes a restart that seeds again safe.
    """
    for sku, qty in stock.items():
        if not isinstance(qty, int) or isinstance(qty, bool) or qty < 0:
            raise ValueError(f"stock of {sku!r} must be an integer >= 0, got {qty!r}")
    async with store.transaction() as tx:
        for sku, qty in stock.items():
            await tx.execute(
                "INSERT INTO stock (sku, initial, available, reserved, shipped) "
                "VALUES (?, ?, ?, 0, 0) ON CONFLICT (sku) DO NOTHING",
                (sku, qty, qty),
            )


async def expire_reservations(store: Any, now: float) -> int:
    """Return the units of RESERVED reservations that expired by ``now`` to stock.

    Each becomes EXPIRED and its units move from *reserved* back to *available*, in one
    transaction, so the stock equation holds throughout. Returns how many expired.
    Safe to run at any time and from any process: a reservation that is committed or
    released concurrently is skipped by the conditional UPDATE.
    """
    expired = 0
    async with store.transaction() as tx:
        due = await tx.fetchall(
            "SELECT order_id, sku, qty FROM reservations "
            "WHERE status = 'RESERVED' AND expires_at <= ? ORDER BY expires_at",
            (now,),
        )
        for order_id, sku, qty in due:
            changed = await tx.execute(
                "UPDATE reservations SET status = 'EXPIRED', updated_at = ? "
                "WHERE order_id = ? AND status = 'RESERVED'",
                (now, order_id),
            )
            if changed:
                await tx.execute(
                    "UPDATE stock SET available = available + ?, reserved = reserved - ? "
                    "WHERE sku = ?",
                    (qty, qty, sku),
                )
                expired += 1
    return expired


async def reservation(tx: Tx, order_id: str) -> tuple[str, int, str] | None:
    """The order's reservation as ``(sku, qty, status)``, or ``None``."""
    row = await tx.fetchone(
        "SELECT sku, qty, status FROM reservations WHERE order_id = ?", (order_id,)
    )
    return None if row is None else (str(row[0]), int(row[1]), str(row[2]))


async def reserve(
    tx: Tx, order_id: str, sku: str, qty: int, *, now: float, ttl: float = RESERVATION_TTL
) -> dict[str, Any]:
    """Reserve ``qty`` of ``sku`` for the order (once); :class:`StepFailed` if impossible."""
    existing = await reservation(tx, order_id)
    if existing is not None:
        if existing[2] in ("RELEASED", "EXPIRED"):
            raise StepFailed(
                f"the reservation of order {order_id} was already {existing[2].lower()}"
            )
        return {"sku": existing[0], "reserved": existing[1]}
    # One conditional statement: the check and the decrement cannot be separated by
    # another transaction, so the last unit goes to exactly one order. (Two
    # transactions reserving for the same order concurrently both get here; the
    # second one's INSERT below then fails on the primary key and rolls back.)
    changed = await tx.execute(
        "UPDATE stock SET available = available - ?, reserved = reserved + ? "
        "WHERE sku = ? AND available >= ?",
        (qty, qty, sku, qty),
    )
    if changed == 0:
        if await tx.fetchone("SELECT 1 FROM stock WHERE sku = ?", (sku,)) is None:
            raise StepFailed(f"unknown sku {sku}")
        raise StepFailed(OUT_OF_STOCK)
    await tx.execute(
        "INSERT INTO reservations "
        "(order_id, sku, qty, status, created_at, updated_at, expires_at) "
        "VALUES (?, ?, ?, 'RESERVED', ?, ?, ?)",
        (order_id, sku, qty, now, now, now + ttl),
    )
    return {"sku": sku, "reserved": qty}


async def _settle(tx: Tx, order_id: str, status: str, now: float) -> bool:
    """RESERVED -> ``status``; False if the reservation is no longer RESERVED.

    False means another transaction (the sweeper, or a handler in another process)
    settled it since it was read; the caller reads it again and answers from that.
    """
    changed = await tx.execute(
        "UPDATE reservations SET status = ?, updated_at = ? "
        "WHERE order_id = ? AND status = 'RESERVED'",
        (status, now, order_id),
    )
    return changed > 0


async def release(tx: Tx, order_id: str, *, now: float) -> dict[str, Any]:
    """Give a RESERVED reservation's units back; nothing held is a no-op success."""
    while True:
        existing = await reservation(tx, order_id)
        if existing is None or existing[2] in ("RELEASED", "EXPIRED"):
            # Nothing held: never reserved, released before, or expired (its units
            # are back in stock already).
            return {"released": 0}
        sku, qty, status = existing
        if status == "COMMITTED":
            raise StepFailed(f"the goods of order {order_id} have left the warehouse")
        if await _settle(tx, order_id, "RELEASED", now):
            break
        # Settled by another transaction since the read: decide on what it is now.
    await tx.execute(
        "UPDATE stock SET available = available + ?, reserved = reserved - ? WHERE sku = ?",
        (qty, qty, sku),
    )
    return {"released": qty}


def check_pick(sku: str, attempt: int) -> None:
    """The warehouse's answer to try ``attempt`` of picking ``sku`` (see the module
    docstring); raises :class:`StepFailed` when it does not confirm."""
    if sku.startswith("sku-recalled"):
        raise StepFailed(f"{sku} was recalled: the warehouse refuses to release the goods")
    if sku.startswith("sku-wh-down") or (sku.startswith("sku-wh-flaky") and attempt <= FLAKY_PICKS):
        raise StepFailed(
            f"the warehouse did not confirm the pick of {sku} (try {attempt})", retryable=True
        )


async def commit(tx: Tx, order_id: str, *, now: float, attempt: int = 1) -> dict[str, Any]:
    """The goods leave: RESERVED units become shipped; fails for good once expired.

    ``attempt`` is the try of this commit (the warehouse's answer may depend on it:
    :func:`check_pick`).
    """
    while True:
        existing = await reservation(tx, order_id)
        if existing is None:
            raise StepFailed(f"order {order_id} has no reservation to commit")
        sku, qty, status = existing
        if status == "COMMITTED":
            return {"sku": sku, "shipped": qty}  # a repeat (e.g. under another key)
        if status == "RELEASED":
            raise StepFailed(f"the reservation of order {order_id} was released")
        if status == "EXPIRED":
            # Its units went back to stock and may be sold to another order by now:
            # a definite failure (past the pivot, a person decides what to do).
            raise StepFailed(f"the reservation of order {order_id} expired")
        # A RESERVED reservation past its expires_at that the sweeper has not
        # reached still holds its units: committing it takes nobody's stock.
        check_pick(sku, attempt)
        if await _settle(tx, order_id, "COMMITTED", now):
            break
        # Settled by another transaction since the read: decide on what it is now.
    await tx.execute(
        "UPDATE stock SET reserved = reserved - ?, shipped = shipped + ? WHERE sku = ?",
        (qty, qty, sku),
    )
    return {"sku": sku, "shipped": qty}


def build_inventory(store: Any, *, reservation_ttl: float = RESERVATION_TTL) -> Participant:
    """The inventory participant on ``store`` (its tables: :data:`MIGRATIONS`).

    ``reservation_ttl`` is how long a reservation holds its units (see
    :func:`expire_reservations`).
    """
    if not reservation_ttl > 0:
        raise ValueError(f"reservation_ttl must be > 0 seconds, got {reservation_ttl!r}")
    p = Participant(NAME, store)

    @p.handles("ReserveInventory")
    async def reserve_handler(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        order_id = _text(cmd, "order_id")
        sku = _text(cmd, "sku")
        qty = cmd.payload.get("qty")
        if not isinstance(qty, int) or isinstance(qty, bool) or qty <= 0:
            raise StepFailed(f"ReserveInventory: 'qty' must be a positive integer, got {qty!r}")
        return await reserve(tx, order_id, sku, qty, now=p.clock(), ttl=reservation_ttl)

    @p.handles("ReleaseInventory")
    async def release_handler(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        return await release(tx, _text(cmd, "order_id"), now=p.clock())

    @p.handles("CommitReservation")
    async def commit_handler(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        return await commit(tx, _text(cmd, "order_id"), now=p.clock(), attempt=max(cmd.attempt, 1))

    return p


def _text(cmd: Envelope, name: str) -> str:
    value = cmd.payload.get(name)
    if not isinstance(value, str) or not value:
        raise StepFailed(f"{cmd.type}: {name!r} must be a non-empty string, got {value!r}")
    return value
