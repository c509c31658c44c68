"""The orchestrator's copies of the sagas it committed (runtime/saga_cache.py): a
transition that uses one skips the load, and a stale one (another process moved the
saga) fails the transaction instead of deciding from the past. Two orchestrators on
one database stand for two processes; SQLite (one file) and PostgreSQL (one schema)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from sagakit import SagaDefinition, SagaState, Step, StepContext, command
from sagakit.core.definition import SagaView
from sagakit.core.envelope import Envelope, reply_to, success
from sagakit.errors import ConcurrencyError
from sagakit.runtime.orchestrator import Orchestrator
from sagakit.runtime.saga_cache import SagaCache
from sagakit.stores.base import Store
from sagakit.stores.postgres import PostgresStore
from sagakit.stores.sqlite import SQLiteStore

PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def pack(ctx: StepContext) -> dict[str, str]:
    return {"parcel": ctx.business_key}


def ship(ctx: StepContext) -> dict[str, str]:
    return {"label": "L-1"}


TRIP = SagaDefinition("trip", steps=[Step("pack", pack), Step("ship", ship)])


def nights(v: SagaView) -> dict[str, int]:
    return {"nights": v.data["nights"]}


# A first command built from the data: a start without "nights" cannot even be decided.
STAY = SagaDefinition("stay", steps=[Step("hotel", command("hotel", "BookHotel", nights))])


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def two_stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[], AsyncIterator[tuple[Store, Store]]]:
    """Two store objects on one database: what two processes hold."""
    schema = f"sagakit_copies_{uuid.uuid4().hex[:12]}"

    def make() -> Store:
        if request.param == "sqlite":
            return SQLiteStore(tmp_path / "trip.db")
        return PostgresStore(PG_DSN, schema=schema)

    @asynccontextmanager
    async def opened() -> AsyncIterator[tuple[Store, Store]]:
        a, b = make(), make()
        await a.open()
        await b.open()
        try:
            yield a, b
        finally:
            await a.close()
            await b.close()
            if request.param == "postgres":
                import psycopg

                with psycopg.connect(PG_DSN, autocommit=True) as conn:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    return opened  # type: ignore[return-value]


async def command_for(store: Store, saga_id: str, step: str) -> Envelope:
    (command,) = [e for e, _ in await store.outbox_of_saga(saga_id) if e.step == step]
    return command


def answer(command: Envelope, result: dict[str, str]) -> Envelope:
    return reply_to(command, success(result), source="orchestrator.local", now=2.0)


async def apply(o: Orchestrator, reply: Envelope) -> None:
    async with o.transaction() as tx:
        await o.process_batch(tx, [reply], now=2.0)


async def test_a_copy_saves_the_load_and_a_stale_one_fails_the_transaction(
    two_stores: Callable[[], AsyncIterator[tuple[Store, Store]]],
) -> None:
    async with two_stores() as (store_a, store_b):  # type: ignore[attr-defined]
        a, b = Orchestrator(store_a, [TRIP]), Orchestrator(store_b, [TRIP])
        inst, created = await a.start("trip", "t-1")
        assert created and a.cache.take([inst.saga_id]) is not None  # a's copy: v1
        pack_cmd = await command_for(store_a, inst.saga_id, "pack")

        # b (another process) applies pack's result: the saga moves to ship, a's copy
        # stays at the version before.
        await apply(b, answer(pack_cmd, {"parcel": "t-1"}))
        ship_cmd = await command_for(store_a, inst.saga_id, "ship")

        # ship's result reaches a. Its stale copy would see a reply for a step not yet
        # sent and ignore it; the commit's version check refuses that instead of
        # recording the reply as handled.
        with pytest.raises(ConcurrencyError):
            await apply(a, answer(ship_cmd, {"label": "L-1"}))
        assert a.cache.take([inst.saga_id]) is None  # the stale copy is gone
        assert await store_a.inbox_ids("orchestrator") == {pack_cmd.message_id + "/reply"}

        # Tried again (what the consumer does), it loads the saga and applies the reply.
        await apply(a, answer(ship_cmd, {"label": "L-1"}))
        done = await store_a.get_saga(inst.saga_id)
        assert done is not None and done.state is SagaState.SUCCEEDED
        assert done.steps[1].result == {"label": "L-1"}

        # A duplicate of a reply handled elsewhere, met with a copy: the inbox refuses it
        # and nothing is applied twice.
        c = Orchestrator(store_a, [TRIP])
        other, _ = await c.start("trip", "t-2")
        pack2 = await command_for(store_a, other.saga_id, "pack")
        await apply(b, answer(pack2, {"parcel": "t-2"}))
        with pytest.raises(ConcurrencyError):
            await apply(c, answer(pack2, {"parcel": "t-2"}))
        await apply(c, answer(pack2, {"parcel": "t-2"}))  # loaded: a duplicate, skipped
        history = [h.event for h in await store_a.history(other.saga_id)]
        assert history.count("step.succeeded") == 1


async def test_a_start_of_a_taken_business_key_looks_it_up_and_returns_the_saga(
    two_stores: Callable[[], AsyncIterator[tuple[Store, Store]]],
) -> None:
    async with two_stores() as (store_a, store_b):  # type: ignore[attr-defined]
        a, b = Orchestrator(store_a, [TRIP]), Orchestrator(store_b, [TRIP])
        first, created = await a.start("trip", "t-1")
        again, created_again = await b.start("trip", "t-1")
        assert created and not created_again and again.saga_id == first.saga_id
        batch = await b.start_many([("trip", "t-1", {}), ("trip", "t-3", {}), ("trip", "t-3", {})])
        assert [c for _, c in batch] == [False, True, False]
        assert batch[0][0].saga_id == first.saga_id and batch[1][0] == batch[2][0]
        assert (await store_a.count_sagas()).get(SagaState.RUNNING) == 2

        # Started again with data its first step could not use: the saga started before
        # is the answer, as it was when every start looked its key up first.
        stays = Orchestrator(store_a, [STAY])
        stay, _ = await stays.start("stay", "s-1", {"nights": 2})
        again, created_again = await stays.start("stay", "s-1", {})
        assert again.saga_id == stay.saga_id and not created_again
        with pytest.raises(KeyError, match="nights"):  # a new key: the request's own error
            await stays.start("stay", "s-2", {})


def test_the_cache_keeps_what_a_load_would_read_and_forgets_the_oldest() -> None:
    cache = SagaCache(capacity=2)
    from sagakit.core.instance import SagaInstance

    def saga(saga_id: str, state: SagaState = SagaState.RUNNING) -> SagaInstance:
        return SagaInstance(
            saga_id=saga_id,
            definition="trip",
            definition_version=1,
            business_key=saga_id,
            correlation_id="c",
            state=state,
            status="",
            data={"items": (1, 2), 7: "seven"},  # what JSON turns into a list and "7"
            steps=[],
            created_at=1.0,
            updated_at=1.0,
        )

    cache.committed([saga("s1"), saga("s2")])
    copy = cache.take(["s1"])
    assert copy is not None and copy["s1"].data == {"items": [1, 2], "7": "seven"}
    cache.committed([saga("s3")])  # s2 was used least recently
    assert cache.take(["s2"]) is None and cache.take(["s1", "s3"]) is not None
    assert cache.take(["s1", "nope"]) is None  # all or nothing
    cache.committed([saga("s1", SagaState.SUCCEEDED)])  # an ended saga leaves
    assert cache.take(["s1"]) is None and len(cache) == 1
    cache.forget(["s3"])
    assert len(cache) == 0
    # A transaction of more sagas than batch_limit leaves no copies (and drops any).
    small = SagaCache(batch_limit=2)
    small.committed([saga("s1")])
    small.committed([saga("s1"), saga("s2"), saga("s3")])
    assert len(small) == 0
    with pytest.raises(ValueError, match="capacity"):
        SagaCache(capacity=-1)
    with pytest.raises(ValueError, match="batch_limit"):
        SagaCache(batch_limit=0)


@pytest.mark.postgres
async def test_wait_sees_a_saga_that_another_process_finished() -> None:
    """Engine.wait skips its first read for a saga its process committed last: the
    saga finished by another process is still seen, by the next poll."""
    from sagakit import Engine

    schema = f"sagakit_copies_{uuid.uuid4().hex[:12]}"
    starter = Engine(PostgresStore(PG_DSN, schema=schema), [TRIP])
    worker = Engine(PostgresStore(PG_DSN, schema=schema), [TRIP])
    await starter.store.open()  # opened, not running: its steps wait for the worker
    try:
        inst = await starter.start("trip", "t-1")
        assert starter.orchestrator.cache.peek(inst.saga_id) is not None
        async with worker:
            done = await starter.wait(inst.saga_id, timeout=20)
        assert done.state is SagaState.SUCCEEDED
    finally:
        await starter.store.close()
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
