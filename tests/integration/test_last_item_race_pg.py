"""The last-item race on PostgreSQL: concurrent reservations of the last unit, one winner.

PostgreSQL under READ COMMITTED (its default) runs the handlers' transactions side by
side. Here many ``ReserveInventory`` commands for one SKU with one unit in stock are
handled at once by the real inventory participant (``sagakit_checkout.inventory``: its
handlers, the participant runtime's inbox and idempotency records, each command in its
own store transaction on its own pooled connection, spread over two replicas of the
service), round after round. Exactly one order may win each round; the others fail for
good with "out of stock", and the stock equation holds.

``sagakit check checkout`` explores the same race in every interleaving on SQLite
(``sagakit.testing.races``, the race ``last-item``), which is what catches a reservation
written as read-then-write in the mutation suite; this test is the real thing, on the
database production runs, and the mutation suite runs it too (``--proofs race``).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sagakit_checkout import inventory
from sagakit_checkout.races import reserve

from sagakit.core.envelope import Envelope, Outcome
from sagakit.runtime.participant import Participant
from sagakit.stores.postgres import PostgresStore
from sagakit.testing import races

pytestmark = pytest.mark.postgres

PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

ROUNDS = 20
CONTENDERS = 8  # orders racing for the last unit in each round
REPLICAS = 2  # inventory processes: stores (connection pools) on the same schema


def _unreachable() -> str | None:
    """Why PostgreSQL cannot be used here, or None when it answers."""
    import psycopg

    try:
        with psycopg.connect(PG_DSN, connect_timeout=3):
            return None
    except psycopg.OperationalError as exc:
        return str(exc).strip() or type(exc).__name__


@pytest.fixture
def schema() -> Iterator[str]:
    """A schema unique to the test, dropped afterwards."""
    pytest.importorskip("psycopg", reason="needs the sagakit[postgres] extra")
    why = _unreachable()
    if why is not None:
        pytest.skip(f"PostgreSQL is not reachable at {PG_DSN}: {why}")
    import psycopg
    from psycopg import sql

    name = f"sagakit_test_race_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


async def deliver(participant: Participant, command: Envelope) -> Outcome:
    """Handle ``command`` as the consumer does (one transaction, delivered again if it
    fails: PostgreSQL resolves conflicts by failing one side) and return the answer the
    participant recorded for it."""
    outcome = await races.deliver(participant, command, now=participant.clock(), deliveries=5)
    assert outcome is not None, f"no answer recorded for {command.business_key}"
    return outcome


async def stock_of(store: PostgresStore, sku: str) -> dict[str, int]:
    async with store.transaction() as tx:
        row = await tx.fetchone(
            "SELECT initial, available, reserved, shipped FROM stock WHERE sku = ?", (sku,)
        )
    assert row is not None, sku
    return dict(zip(("initial", "available", "reserved", "shipped"), map(int, row), strict=True))


async def reservations_of(store: PostgresStore, sku: str) -> list[tuple[Any, ...]]:
    async with store.transaction() as tx:
        return await tx.fetchall(
            "SELECT order_id, qty, status FROM reservations WHERE sku = ? ORDER BY order_id",
            (sku,),
        )


@pytest.mark.fault("F-LAST-ITEM")
async def test_concurrent_reservations_of_the_last_unit_have_one_winner(schema: str) -> None:
    stores = [
        PostgresStore(
            PG_DSN,
            name=inventory.NAME,
            schema=schema,
            min_size=CONTENDERS // REPLICAS,
            max_size=CONTENDERS // REPLICAS + 1,
        )
        for _ in range(REPLICAS)
    ]
    for store in stores:
        await store.open()
    try:
        await stores[0].apply_migrations(inventory.NAMESPACE, inventory.MIGRATIONS)
        replicas = [inventory.build_inventory(store) for store in stores]
        async with stores[0].transaction() as tx:
            isolation = await tx.fetchone("SHOW transaction_isolation")
        assert isolation is not None and isolation[0] == "read committed", isolation

        for n in range(ROUNDS):
            sku = f"sku-last-{n}"
            await inventory.seed_stock(stores[0], {sku: 1})
            orders = [f"order-{n}-{i}" for i in range(CONTENDERS)]
            outcomes = await asyncio.gather(
                *(
                    deliver(replicas[i % REPLICAS], reserve(order, sku=sku))
                    for i, order in enumerate(orders)
                )
            )
            winners = [o for o, out in zip(orders, outcomes, strict=True) if out.ok]
            stock = await stock_of(stores[0], sku)
            held = await reservations_of(stores[0], sku)
            where = f"round {n}: winners {winners}, stock {stock}, reservations {held}"
            assert len(winners) == 1, where
            losers = [out for out in outcomes if not out.ok]
            assert all(
                out.reason == inventory.OUT_OF_STOCK and not out.retryable for out in losers
            ), (where, losers)
            assert stock == {"initial": 1, "available": 0, "reserved": 1, "shipped": 0}, where
            assert held == [(winners[0], 1, "RESERVED")], where

        # Across every round: no stock ever negative, every unit accounted for.
        async with stores[0].transaction() as tx:
            broken = await tx.fetchall(
                "SELECT sku, initial, available, reserved, shipped FROM stock "
                "WHERE available < 0 OR reserved < 0 "
                "OR initial <> available + reserved + shipped"
            )
        assert broken == []
    finally:
        for store in stores:
            await store.close()
