"""``SQLStore.snapshot()``: every read of the block sees one state of the database, even
while another transaction commits (PostgreSQL's plain transactions are READ COMMITTED,
where two SELECTs of one transaction may see different commits); and it only reads.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from sagakit.errors import StoreError
from sagakit.stores.base import SQLStore
from sagakit.stores.sqlite import SQLiteStore

PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TABLE = ["CREATE TABLE ledger (id BIGINT NOT NULL PRIMARY KEY, amount BIGINT NOT NULL)"]

Opened = Callable[[], AbstractAsyncContextManager[SQLStore]]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Opened:
    schema = f"sagakit_snap_{uuid.uuid4().hex[:12]}"

    @asynccontextmanager
    async def opened() -> AsyncIterator[SQLStore]:
        store: SQLStore
        if request.param == "sqlite":
            store = SQLiteStore(tmp_path / "snap.db", name="snap")
        else:
            from sagakit.stores.postgres import PostgresStore

            store = PostgresStore(PG_DSN, schema=schema, name="snap")
        await store.open()
        try:
            await store.apply_migrations("snap", TABLE)
            yield store
        finally:
            if request.param == "postgres":
                async with store.transaction() as tx:
                    await tx.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await store.close()

    return opened


async def test_every_read_of_a_snapshot_sees_one_state(sql_store: Opened) -> None:
    async with sql_store() as store:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO ledger (id, amount) VALUES (1, 100)")

        async def pay() -> None:
            async with store.transaction() as tx:
                await tx.execute("INSERT INTO ledger (id, amount) VALUES (2, -40)")

        writer: asyncio.Task[None] | None = None
        async with store.snapshot() as snap:
            first = await snap.fetchall("SELECT count(*), sum(amount) FROM ledger")
            # Another transaction commits meanwhile (on SQLite it waits for the block).
            writer = asyncio.create_task(pay())
            await asyncio.sleep(0.2)
            second = await snap.fetchall("SELECT count(*), sum(amount) FROM ledger")
        await writer
        assert [tuple(r) for r in first] == [tuple(r) for r in second] == [(1, 100)]
        async with store.snapshot() as snap:
            after = await snap.fetchall("SELECT count(*), sum(amount) FROM ledger")
        assert [tuple(r) for r in after] == [(2, 60)]


@pytest.mark.postgres
async def test_a_postgres_snapshot_refuses_to_write(tmp_path: Path) -> None:
    from sagakit.stores.postgres import PostgresStore

    schema = f"sagakit_snap_{uuid.uuid4().hex[:12]}"
    store = PostgresStore(PG_DSN, schema=schema, name="snap")
    await store.open()
    try:
        await store.apply_migrations("snap", TABLE)
        with pytest.raises(StoreError, match="read-only"):
            async with store.snapshot() as snap:
                await snap.execute("INSERT INTO ledger (id, amount) VALUES (3, 1)")
    finally:
        async with store.transaction() as tx:
            await tx.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await store.close()
