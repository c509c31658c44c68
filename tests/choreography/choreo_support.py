"""Shared plumbing of the choreography tests: orders, waiting, direct deliveries."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sagakit import Envelope, MessageKind, Participant, SagaInstance
from sagakit.stores.sqlite import SQLiteStore
from sagakit.transports.base import Delivery

_handles = itertools.count(1)


def order_data(
    *,
    customer: str = "cust-000001",
    sku: str = "sku-01",
    qty: int = 1,
    amount: int = 1500,
    card: str = "card-ok-1",
    ship_to: str = "addr-ok-1",
) -> dict[str, Any]:
    """The data of one order, as the demo places them."""
    return {
        "customer": customer,
        "sku": sku,
        "qty": qty,
        "amount": amount,
        "currency": "EUR",
        "card": card,
        "ship_to": ship_to,
    }


async def wait_terminal(
    store: Any, keys: Iterable[str], definition: str, timeout: float = 20.0
) -> dict[str, SagaInstance]:
    """Wait until the sagas (or views) of ``keys`` are terminal; return them by key."""
    wanted = set(keys)
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, SagaInstance] = {}
        for key in wanted:
            async with store.transaction() as tx:
                inst = await tx.saga_get_by_key(definition, key)
            if inst is not None and inst.terminal:
                found[key] = inst
        if len(found) == len(wanted):
            return found
        if time.monotonic() > deadline:
            missing = sorted(wanted - set(found))
            raise TimeoutError(f"not terminal after {timeout}s: {missing}")
        await asyncio.sleep(0.05)


async def quiet(stores: Iterable[Any], settle: float = 0.3, limit: float = 15.0) -> None:
    """Wait until no outbox row is pending and no mailbox holds a message."""
    stores = list(stores)
    end = time.monotonic() + limit
    calm: float | None = None
    while time.monotonic() < end:
        busy = 0
        for s in stores:
            busy += await s.outbox_pending() + await s.queue_depth()
        if busy:
            calm = None
        elif calm is None:
            calm = time.monotonic()
        elif time.monotonic() - calm >= settle:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the system did not go quiet")


def event(
    type_: str,
    payload: dict[str, Any],
    *,
    message_id: str,
    correlation_id: str = "o-1",
    causation_id: str | None = None,
    source: str = "test",
    version: int = 1,
    occurred_at: float | None = None,
) -> Envelope:
    """An event envelope as a producer's relay would publish it (no destination)."""
    return Envelope(
        message_id=message_id,
        type=type_,
        version=version,
        kind=MessageKind.EVENT,
        source=source,
        correlation_id=correlation_id,
        causation_id=causation_id,
        saga_id=correlation_id,
        business_key=payload.get("order_id", correlation_id),
        occurred_at=time.time() if occurred_at is None else occurred_at,
        payload=payload,
    )


async def deliver(p: Participant, env: Envelope, deliveries: int = 1) -> None:
    """Hand ``env`` to ``p`` as its transport would; it must be settled (handled or parked)."""
    settles = await p([Delivery(next(_handles), env.to_json(), deliveries)])
    assert settles[0].ack, f"{env.type} was not acknowledged: {settles[0].error}"


async def rows(store: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Business rows, read in a short transaction."""
    async with store.transaction() as tx:
        return list(await tx.fetchall(sql, params))


PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


class Backend:
    """Where a test's stores live: SQLite files in ``path`` or PostgreSQL schemas."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind, self.path = kind, path
        self.prefix = f"c_{uuid.uuid4().hex[:12]}"
        self.names: list[str] = []

    def store(self, name: str) -> Any:
        """A new (unopened) store for service ``name``."""
        self.names.append(name)
        if self.kind == "postgres":
            from sagakit.stores.postgres import PostgresStore

            return PostgresStore(PG_DSN, name=name, schema=f"{self.prefix}_{name}")
        return SQLiteStore(self.path / f"{name}.db", name=name, synchronous="NORMAL")

    def drop(self) -> None:
        """Drop the PostgreSQL schemas (files go with the temporary directory)."""
        if self.kind != "postgres":
            return
        import psycopg
        from psycopg import sql

        with psycopg.connect(PG_DSN, autocommit=True) as pg:
            for name in self.names:
                schema = sql.Identifier(f"{self.prefix}_{name}")
                pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(schema))
