"""The orders service: holds stock for an order, then places it (the pivot).

``ReserveStock`` holds the order's units of a SKU (a conditional UPDATE: orders racing
for the last units cannot both win) and ``ReleaseStock`` gives them back (its
compensation). ``PlaceOrder`` takes the payment and turns the hold into a sale: the
point of no return. From then on the customer is owed a confirmation e-mail and an
SMS, and nothing is undone. ``GetOrder`` answers the engine's status query when it
does not know whether ``PlaceOrder`` happened.

The card is a token whose name decides the fake payment's answer, as the reference
checkout's does: ``card-declined-...`` is declined (the order is not placed and the
hold is released), any other card pays.
"""

from __future__ import annotations

from typing import Any

from sagakit import Envelope, Service, StepFailed, now
from sagakit.stores.base import Tx

MIGRATIONS = [
    """
    CREATE TABLE stock (
        sku   TEXT NOT NULL PRIMARY KEY,
        total BIGINT NOT NULL CHECK (total >= 0),
        held  BIGINT NOT NULL CHECK (held >= 0),
        sold  BIGINT NOT NULL CHECK (sold >= 0),
        CHECK (held + sold <= total)
    );
    CREATE TABLE reservations (
        order_id   TEXT NOT NULL PRIMARY KEY,
        sku        TEXT NOT NULL,
        qty        BIGINT NOT NULL CHECK (qty > 0),
        status     TEXT NOT NULL CHECK (status IN ('HELD', 'RELEASED', 'SOLD')),
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE orders (
        order_id  TEXT NOT NULL PRIMARY KEY,
        customer  TEXT NOT NULL,
        sku       TEXT NOT NULL,
        qty       BIGINT NOT NULL,
        amount    BIGINT NOT NULL,
        status    TEXT NOT NULL CHECK (status IN ('PLACED')),
        placed_at DOUBLE PRECISION NOT NULL
    );
    """,
]

DECLINED = "card-declined-"
"""Cards whose token starts with this are declined by the fake payment."""


def orders_service() -> Service:
    """The ``orders`` service."""
    orders = Service("orders", migrations=MIGRATIONS)

    @orders.handles("ReserveStock")
    async def reserve_stock(tx: Tx, env: Envelope) -> dict[str, Any]:
        order, sku, qty = env.payload["order"], env.payload["sku"], int(env.payload["qty"])
        held = await tx.fetchone("SELECT status FROM reservations WHERE order_id = ?", (order,))
        if held is not None:
            # The order's hold exists already (a person's retry of the step): it is
            # the answer, never a second hold.
            if held[0] == "RELEASED":
                raise StepFailed(f"the hold of {order} was released")
            return {"sku": sku, "qty": qty}
        taken = await tx.execute(
            "UPDATE stock SET held = held + ? WHERE sku = ? AND held + sold + ? <= total",
            (qty, sku, qty),
        )
        if not taken:
            raise StepFailed(f"{sku} is sold out")  # a final answer: the saga is undone
        await tx.execute(
            "INSERT INTO reservations (order_id, sku, qty, status, updated_at) "
            "VALUES (?, ?, ?, 'HELD', ?)",
            (order, sku, qty, now()),
        )
        return {"sku": sku, "qty": qty}

    @orders.handles("ReleaseStock")
    async def release_stock(tx: Tx, env: Envelope) -> dict[str, Any]:
        order = env.payload["order"]
        row = await tx.fetchone(
            "SELECT sku, qty, status FROM reservations WHERE order_id = ?", (order,)
        )
        if row is None or row[2] != "HELD":
            # Nothing held (the hold never came, or was released), or the order was
            # placed: a sale is not undone by releasing its stock.
            return {"released": False, "why": "nothing held" if row is None else row[2]}
        await tx.execute(
            "UPDATE reservations SET status = 'RELEASED', updated_at = ? "
            "WHERE order_id = ? AND status = 'HELD'",
            (now(), order),
        )
        await tx.execute("UPDATE stock SET held = held - ? WHERE sku = ?", (row[1], row[0]))
        return {"released": True}

    @orders.handles("PlaceOrder")
    async def place_order(tx: Tx, env: Envelope) -> dict[str, Any]:
        p = env.payload
        order = p["order"]
        placed = await tx.fetchone("SELECT placed_at FROM orders WHERE order_id = ?", (order,))
        if placed is not None:
            return {"order": order, "placed_at": float(placed[0])}
        row = await tx.fetchone(
            "SELECT sku, qty FROM reservations WHERE order_id = ? AND status = 'HELD'", (order,)
        )
        if row is None:
            # The hold was released (a person undid the saga while this was on its
            # way): no stock, no sale.
            raise StepFailed(f"no stock is held for {order}")
        if str(p["card"]).startswith(DECLINED):
            raise StepFailed("card declined")  # a final answer: the hold is released
        at = now()
        await tx.execute(
            "INSERT INTO orders (order_id, customer, sku, qty, amount, status, placed_at) "
            "VALUES (?, ?, ?, ?, ?, 'PLACED', ?)",
            (order, p["customer"], row[0], row[1], int(p["amount"]), at),
        )
        await tx.execute(
            "UPDATE reservations SET status = 'SOLD', updated_at = ? WHERE order_id = ?",
            (at, order),
        )
        await tx.execute(
            "UPDATE stock SET held = held - ?, sold = sold + ? WHERE sku = ?",
            (row[1], row[1], row[0]),
        )
        return {"order": order, "placed_at": at}

    @orders.handles("GetOrder")
    async def get_order(tx: Tx, env: Envelope) -> dict[str, Any]:
        """The status query of the pivot: ``done`` with the order, or ``not_found`` (the
        engine then sends ``PlaceOrder`` again with the same key: a placement that
        failed for good gives its recorded answer again)."""
        order = env.payload["order"]
        placed = await tx.fetchone("SELECT placed_at FROM orders WHERE order_id = ?", (order,))
        if placed is None:
            return {"state": "not_found"}
        return {"state": "done", "result": {"order": order, "placed_at": float(placed[0])}}

    return orders
