"""The store contract: every adapter of :mod:`sagakit.stores.base` passes these tests.

Each test takes ``open_store``, a factory run once per adapter; a new adapter adds one
branch to the fixture. Tests that depend on one adapter's extras (SQL, files,
migrations) sit at the end, under their adapter's name.
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from sagakit.core.envelope import Envelope, MessageKind
from sagakit.core.instance import (
    HistoryEntry,
    SagaInstance,
    SagaState,
    StepState,
    StepStatus,
    Timer,
)
from sagakit.errors import ConcurrencyError, ConfigurationError, StoreError
from sagakit.stores.base import SagaOrder, SagaQuery, Store
from sagakit.stores.memory import MemoryStore
from sagakit.stores.postgres import PostgresStore
from sagakit.stores.sqlite import SQLiteStore, split_statements

OpenStore = Callable[[], AbstractAsyncContextManager[Store]]


class Boom(Exception):
    """Raised inside a transaction to force its rollback."""


PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def _conforms(sqlite: SQLiteStore, memory: MemoryStore, postgres: PostgresStore) -> list[Store]:
    # Checked by mypy: the adapters satisfy the Store protocol (and so their Tx, Tx).
    return [sqlite, memory, postgres]


def drop_pg_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        "sqlite-read-threads",
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """``async with open_store() as store``: an opened store, closed on exit.

    For SQLite every call opens the same file again, which is how restarts look; for
    PostgreSQL, the same schema (unique to the test, dropped afterwards). PostgreSQL
    leases run on the caller's clock here, since these tests simulate time.
    """
    kind: str = request.param
    schema = f"sagakit_test_{uuid.uuid4().hex[:12]}"

    def make() -> Store:
        if kind == "memory":
            return MemoryStore()
        if kind == "sqlite":
            return SQLiteStore(tmp_path / "store.db")
        if kind == "sqlite-read-threads":
            # The same contract with the plain reads in worker threads (sagakit serve).
            threaded = SQLiteStore(tmp_path / "store.db")
            threaded.read_in_threads(2)
            return threaded
        return PostgresStore(PG_DSN, schema=schema, lease_clock="caller")

    @asynccontextmanager
    async def opened() -> AsyncIterator[Store]:
        store = make()
        await store.open()
        try:
            yield store
        finally:
            await store.close()

    yield opened
    if kind == "postgres":
        drop_pg_schema(schema)


# -- builders ------------------------------------------------------------------------


def saga(
    saga_id: str = "s1",
    *,
    definition: str = "checkout",
    key: str | None = None,
    state: SagaState = SagaState.RUNNING,
    created_at: float = 100.0,
    version: int = 0,
) -> SagaInstance:
    return SagaInstance(
        saga_id=saga_id,
        definition=definition,
        definition_version=2,
        business_key=key or f"order-{saga_id}",
        correlation_id=f"corr-{saga_id}",
        state=state,
        status="PENDING_PAYMENT",
        data={"total": 4200, "items": [{"sku": "A", "qty": 2}], "note": "ünïcode"},
        steps=[
            StepState(StepStatus.SUCCEEDED, attempt=1, result={"auth": "x1"}, finished_at=101.5),
            StepState(StepStatus.RUNNING, attempt=2, rung=1, next_retry_at=130.25),
        ],
        created_at=created_at,
        updated_at=created_at,
        cursor=1,
        version=version,
        deadline_at=created_at + 600,
        reason=None,
    )


def envelope(message_id: str, *, destination: str = "payments") -> Envelope:
    return Envelope(
        message_id=message_id,
        type="AuthorizePayment",
        kind=MessageKind.COMMAND,
        source="orchestrator",
        correlation_id="corr-1",
        occurred_at=10.5,
        payload={"amount": 4200, "token": "tok-9"},
        destination=destination,
        saga_id="s1",
        step="payment",
        attempt=1,
        fence=3,
        idempotency_key="s1:payment:authorize",
        reply_to="orchestrator",
    )


def entry(saga_id: str, version: int, event: str, **detail: object) -> HistoryEntry:
    return HistoryEntry(
        saga_id=saga_id,
        version=version,
        at=100.0 + version,
        event=event,
        state=SagaState.RUNNING,
        status="PENDING_PAYMENT",
        step="payment" if version else None,
        detail=dict(detail),
        message_id=f"m-{version}" if version else None,
    )


async def insert(store: Store, *instances: SagaInstance) -> None:
    async with store.transaction() as tx:
        for instance in instances:
            await tx.saga_insert(instance)


# -- sagas ---------------------------------------------------------------------------


async def test_saga_round_trips_every_field(open_store: OpenStore) -> None:
    original = saga()
    original.cancel_requested = True
    original.timed_out = True
    original.reason = "card declined"
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.saga_insert(original)
            assert await tx.saga_get("s1") == original  # a transaction sees its own writes
        assert await store.get_saga("s1") == original
        async with store.transaction() as tx:
            assert await tx.saga_get("s1") == original
            assert await tx.saga_get("missing") is None
        assert await store.get_saga("missing") is None


async def test_stored_saga_is_isolated_from_callers_objects(open_store: OpenStore) -> None:
    original = saga()
    async with open_store() as store:
        await insert(store, original)
        original.data["total"] = 1
        original.steps[0].status = StepStatus.FAILED
        loaded = await store.get_saga("s1")
        assert loaded is not None
        assert loaded.data["total"] == 4200
        assert loaded.steps[0].status is StepStatus.SUCCEEDED
        loaded.data["items"].append("x")
        again = await store.get_saga("s1")
        assert again is not None and again.data["items"] == [{"sku": "A", "qty": 2}]


async def test_saga_get_by_key(open_store: OpenStore) -> None:
    async with open_store() as store:
        await insert(store, saga("s1", key="o-1"), saga("s2", definition="refund", key="o-1"))
        async with store.transaction() as tx:
            found = await tx.saga_get_by_key("checkout", "o-1")
            other = await tx.saga_get_by_key("refund", "o-1")
            assert found is not None and found.saga_id == "s1"
            assert other is not None and other.saga_id == "s2"
            assert await tx.saga_get_by_key("checkout", "o-2") is None
            assert await tx.saga_get_by_key("nope", "o-1") is None
            many = await tx.saga_get_by_keys("checkout", ["o-2", "o-1", "o-3"])
            assert {k: i.saga_id for k, i in many.items()} == {"o-1": "s1"}
            assert await tx.saga_get_by_keys("checkout", []) == {}
            both = await tx.saga_get_many(["s2", "ghost", "s1"])
            assert sorted(both) == ["s1", "s2"] and both["s2"].definition == "refund"
            assert await tx.saga_get_many([]) == {}
            assert await tx.inbox_add_many("o", ["m1", "m2", "m1"], now=1.0) == {"m1", "m2"}
            assert await tx.inbox_add_many("o", ["m2", "m3"], now=1.0) == {"m3"}
            assert await tx.inbox_add_many("o", [], now=1.0) == set()
            # The start of a reply batch: record and load in one go (one round trip on
            # PostgreSQL), a write buffered before it included.
            await tx.history_add([entry("s1", 2, "before")])
            fresh, loaded = await tx.inbox_add_and_load("o", ["m3", "m4"], 1.0, ["s1", "gone"])
            assert fresh == {"m4"} and sorted(loaded) == ["s1"]
            assert loaded["s1"].business_key == "o-1"
            assert await tx.inbox_add_and_load("o", [], 1.0, ["s2"]) == (set(), {"s2": both["s2"]})
            assert await tx.inbox_add_and_load("o", ["m5"], 1.0, []) == ({"m5"}, {})
            await tx.idempotency_put("o", "k1", {"ok": True}, now=2.0)
            fresh, records = await tx.inbox_add_and_read("o", ["m5", "m6"], 1.0, ["k1", "k2"])
            assert fresh == {"m6"} and list(records) == ["k1"]
            assert (records["k1"].outcome, records["k1"].at) == ({"ok": True}, 2.0)
            assert await tx.inbox_add_and_read("o", [], 1.0, ["k1", "k1"]) == (set(), records)
            assert await tx.inbox_add_and_read("o", ["m7"], 1.0, []) == ({"m7"}, {})
        assert [h.event for h in await store.history("s1")] == ["before"]


async def test_saga_insert_refuses_duplicate_id_and_business_key(open_store: OpenStore) -> None:
    async with open_store() as store:
        await insert(store, saga("s1", key="o-1"))
        with pytest.raises(ConcurrencyError):
            await insert(store, saga("s1", key="o-other"))
        with pytest.raises(ConcurrencyError):
            await insert(store, saga("s2", key="o-1"))
        # Same business key under another definition is a different saga.
        await insert(store, saga("s3", definition="returns", key="o-1"))
        assert await store.count_sagas() == {SagaState.RUNNING: 2}


async def test_saga_insert_many_inserts_all_or_refuses_before_commit(
    open_store: OpenStore,
) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.saga_insert_many([saga("s1", key="o-1"), saga("s2", key="o-2")])
            await tx.saga_insert_many([])
        # One clash in a batch (here the business key of s1): nothing of the batch
        # commits, and the error is raised by the block at the latest.
        with pytest.raises(ConcurrencyError):
            async with store.transaction() as tx:
                await tx.saga_insert_many([saga("s3", key="o-3"), saga("s4", key="o-1")])
        with pytest.raises(ConcurrencyError):
            async with store.transaction() as tx:
                await tx.saga_insert_many([saga("s1", key="o-new")])
        assert await store.get_saga("s3") is None
        assert await store.count_sagas() == {SagaState.RUNNING: 2}
        # The store is usable afterwards.
        async with store.transaction() as tx:
            await tx.saga_insert_many([saga("s5", key="o-5")])
        assert await store.count_sagas() == {SagaState.RUNNING: 3}


async def test_saga_update_checks_the_version(open_store: OpenStore) -> None:
    async with open_store() as store:
        await insert(store, saga("s1"))
        loaded = await store.get_saga("s1")
        assert loaded is not None
        moved = loaded.copy()
        moved.version = 1
        moved.state = SagaState.COMPENSATING
        moved.status = "REFUNDING"
        moved.data = {"total": 0}
        moved.steps[1].status = StepStatus.COMPENSATED
        moved.updated_at = 150.0
        moved.deadline_at = None
        moved.reason = "out of stock"
        async with store.transaction() as tx:
            await tx.saga_update(moved, expected_version=0)
            assert await tx.saga_get("s1") == moved
        assert await store.get_saga("s1") == moved

        stale = loaded.copy()
        stale.version = 1
        with pytest.raises(ConcurrencyError, match="s1"):
            async with store.transaction() as tx:
                await tx.saga_update(stale, expected_version=0)
        assert await store.get_saga("s1") == moved

        ghost = saga("ghost", version=1)
        with pytest.raises(ConcurrencyError, match="ghost"):
            async with store.transaction() as tx:
                await tx.saga_update(ghost, expected_version=0)


@pytest.mark.fault("F-CONCURRENT-TRANSITION")
async def test_concurrent_transitions_one_wins(open_store: OpenStore) -> None:
    async with open_store() as store:
        await insert(store, saga("s1"))

        async def transition(status: str) -> str:
            loaded = await store.get_saga("s1")
            assert loaded is not None
            await asyncio.sleep(0)  # both read version 0 before either writes
            loaded.version += 1
            loaded.status = status
            try:
                async with store.transaction() as tx:
                    await tx.saga_update(loaded, expected_version=0)
            except ConcurrencyError:
                return "lost"
            return "won"

        outcomes = await asyncio.gather(transition("A"), transition("B"))
        assert sorted(outcomes) == ["lost", "won"]
        final = await store.get_saga("s1")
        assert final is not None and final.version == 1


async def test_a_page_of_hundreds_of_sagas_reads_back_whole_and_in_order(
    open_store: OpenStore,
) -> None:
    # Larger than the slices a threaded SQLite store decodes between two loop turns.
    async with open_store() as store:
        await insert(store, *(saga(f"s{n:03}", created_at=float(n)) for n in range(230)))
        listed = await store.list_sagas(limit=500)
        assert [i.saga_id for i in listed] == [f"s{n:03}" for n in reversed(range(230))]
        assert listed[0] == saga("s229", created_at=229.0)
        page = await store.find_sagas(SagaQuery(definition="checkout"), limit=200, offset=10)
        assert page.total == 230
        assert [i.saga_id for i in page.items] == [f"s{n:03}" for n in reversed(range(20, 220))]


async def test_list_sagas_newest_first_with_filters_and_pages(open_store: OpenStore) -> None:
    async with open_store() as store:
        await insert(
            store,
            saga("a", created_at=1.0),
            saga("b", created_at=3.0, state=SagaState.SUCCEEDED),
            saga("c", created_at=2.0, definition="returns"),
            saga("d", created_at=3.0, state=SagaState.FAILED_NEEDS_MANUAL),  # ties: "b" first
            saga("e", created_at=0.5, state=SagaState.SUCCEEDED, definition="returns"),
        )

        async def ids(
            states: list[SagaState] | None = None,
            definition: str | None = None,
            limit: int = 100,
            offset: int = 0,
        ) -> list[str]:
            found = await store.list_sagas(
                states=states, definition=definition, limit=limit, offset=offset
            )
            return [s.saga_id for s in found]

        assert await ids() == ["d", "b", "c", "a", "e"]
        assert await ids(limit=2) == ["d", "b"]
        assert await ids(limit=2, offset=2) == ["c", "a"]
        assert await ids(limit=2, offset=4) == ["e"]
        assert await ids(offset=10) == []
        assert await ids(limit=0) == []
        assert await ids(states=[SagaState.SUCCEEDED]) == ["b", "e"]
        assert await ids(states=[SagaState.SUCCEEDED, SagaState.FAILED_NEEDS_MANUAL]) == [
            "d",
            "b",
            "e",
        ]
        assert await ids(states=[]) == []
        assert await ids(definition="returns") == ["c", "e"]
        assert await ids(definition="returns", states=[SagaState.RUNNING]) == ["c"]
        assert await ids(definition="unknown") == []
        listed = await store.list_sagas(limit=1)
        assert listed[0] == await store.get_saga("d")


async def test_count_sagas_by_state(open_store: OpenStore) -> None:
    async with open_store() as store:
        assert await store.count_sagas() == {}
        await insert(
            store,
            saga("a"),
            saga("b"),
            saga("c", state=SagaState.TIMED_OUT),
        )
        assert await store.count_sagas() == {SagaState.RUNNING: 2, SagaState.TIMED_OUT: 1}


async def test_count_sagas_follows_every_state_change_and_rollback(open_store: OpenStore) -> None:
    async with open_store() as store:
        await insert(store, saga("a"), saga("b"), saga("c"))
        a = await store.get_saga("a")
        assert a is not None
        a.state, a.version = SagaState.SUCCEEDED, 1
        async with store.transaction() as tx:
            await tx.saga_update(a, expected_version=0)
        same = await store.get_saga("b")
        assert same is not None
        same.status, same.version = "STILL_RUNNING", 1  # a transition that keeps the state
        async with store.transaction() as tx:
            await tx.saga_update(same, expected_version=0)
        assert await store.count_sagas() == {SagaState.RUNNING: 2, SagaState.SUCCEEDED: 1}
        c = await store.get_saga("c")
        assert c is not None
        c.state, c.version = SagaState.COMPENSATING, 1
        with pytest.raises(Boom):
            async with store.transaction() as tx:
                await tx.saga_update(c, expected_version=0)
                await tx.saga_insert(saga("d"))
                raise Boom
        assert await store.count_sagas() == {SagaState.RUNNING: 2, SagaState.SUCCEEDED: 1}
        a.state, a.version = SagaState.RUNNING, 2  # back: SUCCEEDED drops out
        async with store.transaction() as tx:
            await tx.saga_update(a, expected_version=1)
        assert await store.count_sagas() == {SagaState.RUNNING: 3}


async def test_history_keeps_write_order(open_store: OpenStore) -> None:
    async with open_store() as store:
        first = [entry("s1", 0, "started"), entry("s2", 0, "started")]
        second = [entry("s1", 2, "reply", ok=True, nested={"a": [1, 2]}), entry("s1", 1, "sent")]
        async with store.transaction() as tx:
            await tx.history_add(first)
        async with store.transaction() as tx:
            await tx.history_add(second)
            await tx.history_add([])
        assert await store.history("s1") == [first[0], *second]
        assert await store.history("s2") == [first[1]]
        assert await store.history("none") == []


# -- timers --------------------------------------------------------------------------


async def test_timers_set_replace_cancel_and_next_due(open_store: OpenStore) -> None:
    async with open_store() as store:
        assert await store.next_timer_due() is None
        async with store.transaction() as tx:
            await tx.timers_set(
                [Timer("s1", "step", 50.0, "f1"), Timer("s1", "deadline", 90.0, "d")]
            )
            await tx.timers_set([Timer("s2", "step", 70.0, "f1")])
        assert await store.next_timer_due() == 50.0
        async with store.transaction() as tx:
            await tx.timers_set([Timer("s1", "step", 80.0, "f2")])  # replaces, moves later
        assert await store.next_timer_due() == 70.0
        async with store.transaction() as tx:
            await tx.timers_cancel("s2", ["step", "missing"])
            await tx.timers_cancel("nobody", ["step"])
            await tx.timers_cancel("s1", [])
        assert await store.next_timer_due() == 80.0
        async with store.transaction() as tx:
            due = await tx.timers_take_due(1000.0, 10)
        assert due == [Timer("s1", "step", 80.0, "f2"), Timer("s1", "deadline", 90.0, "d")]
        assert await store.next_timer_due() is None


async def test_timers_take_due_order_limit_and_not_due(open_store: OpenStore) -> None:
    timers = [
        Timer("b", "step", 10.0, "x"),
        Timer("a", "step", 10.0, "x"),
        Timer("a", "deadline", 10.0, "x"),
        Timer("c", "step", 5.0, "x"),
        Timer("d", "step", 20.0, "x"),  # not due at 15
    ]
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.timers_set(timers)
        async with store.transaction() as tx:
            assert await tx.timers_take_due(15.0, 0) == []
            first = await tx.timers_take_due(15.0, 2)
            rest = await tx.timers_take_due(15.0, 10)
            assert await tx.timers_take_due(15.0, 10) == []
        # Earliest first; equal due times in (saga_id, name) order.
        assert [(t.saga_id, t.name) for t in first] == [("c", "step"), ("a", "deadline")]
        assert [(t.saga_id, t.name) for t in rest] == [("a", "step"), ("b", "step")]
        assert await store.next_timer_due() == 20.0
        async with store.transaction() as tx:
            assert await tx.timers_take_due(20.0, 10) == [Timer("d", "step", 20.0, "x")]


async def test_rolled_back_timer_changes_leave_timers_in_place(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.timers_set([Timer("s1", "step", 10.0, "f1"), Timer("s2", "step", 20.0, "f1")])
        with pytest.raises(Boom):
            async with store.transaction() as tx:
                taken = await tx.timers_take_due(100.0, 10)
                assert len(taken) == 2
                await tx.timers_set([Timer("s1", "step", 99.0, "f9"), Timer("s3", "x", 1.0, "n")])
                await tx.timers_cancel("s2", ["step"])
                raise Boom
        assert await store.next_timer_due() == 10.0
        async with store.transaction() as tx:
            assert await tx.timers_take_due(100.0, 10) == [
                Timer("s1", "step", 10.0, "f1"),
                Timer("s2", "step", 20.0, "f1"),
            ]


# -- outbox --------------------------------------------------------------------------


async def test_outbox_claim_lease_and_publish(open_store: OpenStore) -> None:
    envs = [envelope(f"m{i}") for i in range(5)]
    async with open_store() as store:
        assert await store.outbox_claim(10, now=0.0, lease=5.0) == []
        async with store.transaction() as tx:
            await tx.outbox_add(envs[:3], now=1.0)
        async with store.transaction() as tx:
            await tx.outbox_add(envs[3:], now=2.0)
            await tx.outbox_add([], now=2.0)
        assert await store.outbox_pending() == 5

        first = await store.outbox_claim(2, now=10.0, lease=5.0)
        assert [r.envelope for r in first] == envs[:2]
        assert first[0].id < first[1].id
        second = await store.outbox_claim(10, now=11.0, lease=5.0)  # claimed rows are skipped
        assert [r.envelope for r in second] == envs[2:]
        assert await store.outbox_claim(10, now=14.9, lease=5.0) == []
        assert await store.outbox_claim(0, now=100.0, lease=5.0) == []

        await store.outbox_mark_published([first[0].id], now=12.0)
        await store.outbox_mark_published([], now=12.0)
        assert await store.outbox_pending() == 4
        # The first relay died: once its lease ends, its unpublished rows come back.
        again = await store.outbox_claim(10, now=15.0, lease=5.0)
        assert [r.envelope for r in again] == [envs[1]]
        assert again[0].id == first[1].id

        await store.outbox_mark_published([r.id for r in second + again], now=16.0)
        assert await store.outbox_pending() == 0
        assert await store.outbox_claim(10, now=1000.0, lease=5.0) == []
        assert await store.outbox_all() == [
            (envs[0], 12.0),
            (envs[1], 16.0),
            (envs[2], 16.0),
            (envs[3], 16.0),
            (envs[4], 16.0),
        ]


async def test_outbox_keeps_unpublished_rows_in_audit(open_store: OpenStore) -> None:
    async with open_store() as store:
        assert await store.outbox_all() == []
        async with store.transaction() as tx:
            await tx.outbox_add([envelope("m1", destination="inventory")], now=1.0)
        assert await store.outbox_all() == [(envelope("m1", destination="inventory"), None)]


# -- inbox ---------------------------------------------------------------------------


async def test_inbox_deduplicates_per_consumer(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            assert await tx.inbox_add("payments", "m1", now=1.0) is True
            assert await tx.inbox_add("payments", "m1", now=1.0) is False  # own write seen
            assert await tx.inbox_add("shipping", "m1", now=1.0) is True
        async with store.transaction() as tx:
            assert await tx.inbox_add("payments", "m1", now=2.0) is False
            assert await tx.inbox_add("payments", "m2", now=5.0) is True
        assert await store.inbox_ids("payments") == {"m1", "m2"}
        assert await store.inbox_ids("shipping") == {"m1"}
        assert await store.inbox_ids("nobody") == set()


async def test_inbox_add_new_records_new_ids_and_fails_the_transaction_on_a_seen_one(
    open_store: OpenStore,
) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.inbox_add_new("payments", ["m1", "m2", "m1"], now=1.0)  # twice: once
        assert await store.inbox_ids("payments") == {"m1", "m2"}
        # A seen id fails the whole transaction (at once in process, at the commit on
        # PostgreSQL): nothing it wrote stays, the new id included.
        with pytest.raises(ConcurrencyError):
            async with store.transaction() as tx:
                await tx.inbox_add_new("payments", ["m3", "m2"], now=2.0)
                await tx.inbox_add("shipping", "s1", now=2.0)
        assert await store.inbox_ids("payments") == {"m1", "m2"}
        assert await store.inbox_ids("shipping") == set()
        async with store.transaction() as tx:  # another consumer's ids are its own
            await tx.inbox_add_new("shipping", ["m1"], now=3.0)
        assert await store.inbox_ids("shipping") == {"m1"}


async def test_inbox_purge(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.inbox_add("payments", "old", now=1.0)
            await tx.inbox_add("shipping", "old", now=2.0)
            await tx.inbox_add("payments", "new", now=10.0)
        assert await store.inbox_purge(older_than=10.0) == 2
        assert await store.inbox_purge(older_than=10.0) == 0
        assert await store.inbox_ids("payments") == {"new"}
        assert await store.inbox_ids("shipping") == set()
        async with store.transaction() as tx:  # a purged id counts as new again
            assert await tx.inbox_add("payments", "old", now=11.0) is True


async def test_inbox_has(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.inbox_add("payments", "m1", now=1.0)
        assert await store.inbox_has("payments", "m1")
        assert not await store.inbox_has("shipping", "m1")
        assert not await store.inbox_has("payments", "m2")


async def test_outbox_purge_deletes_only_rows_published_before_the_cutoff(
    open_store: OpenStore,
) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.outbox_add([envelope(f"m{n}") for n in range(7)], now=1.0)
        rows = await store.outbox_claim(10, now=2.0, lease=5.0)
        await store.outbox_mark_published([r.id for r in rows[:5]], now=3.0)  # old
        await store.outbox_mark_published([rows[5].id], now=20.0)  # recent
        # rows[6] is never published: however old, it must stay for the relay.
        assert await store.outbox_purge(10.0, batch=2) == 5  # three batches: 2, 2, 1
        assert await store.outbox_purge(10.0, batch=2) == 0
        left = await store.outbox_all()
        assert [(e.message_id, at) for e, at in left] == [("m5", 20.0), ("m6", None)]
        assert await store.outbox_pending() == 1


# -- idempotency ---------------------------------------------------------------------


async def test_idempotency_put_get_and_tombstone(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            assert await tx.idempotency_get("payments", "s1:pay:auth") is None
            await tx.idempotency_put("payments", "s1:pay:auth", {"ok": True, "id": [1]}, now=3.0)
            got = await tx.idempotency_get("payments", "s1:pay:auth")
            assert got is not None and got.outcome == {"ok": True, "id": [1]}
            await tx.idempotency_put("payments", "s2:pay:auth", {}, now=4.0, tombstone=True)
        async with store.transaction() as tx:
            record = await tx.idempotency_get("payments", "s1:pay:auth")
            assert record is not None
            assert (record.key, record.outcome, record.tombstone, record.at) == (
                "s1:pay:auth",
                {"ok": True, "id": [1]},
                False,
                3.0,
            )
            tomb = await tx.idempotency_get("payments", "s2:pay:auth")
            assert tomb is not None and tomb.tombstone is True and tomb.outcome == {}
            assert await tx.idempotency_get("refunds", "s1:pay:auth") is None


async def test_idempotency_key_is_written_once(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.idempotency_put("payments", "k", {"ok": True}, now=1.0)
        with pytest.raises(StoreError, match="already recorded"):
            async with store.transaction() as tx:
                await tx.idempotency_put("payments", "k", {"ok": False}, now=2.0, tombstone=True)
        async with store.transaction() as tx:
            await tx.idempotency_put("refunds", "k", {"ok": False}, now=2.0)  # other consumer
            record = await tx.idempotency_get("payments", "k")
            assert record is not None and record.outcome == {"ok": True} and not record.tombstone


async def test_idempotency_get_many_reads_several_keys_at_once(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            assert await tx.idempotency_get_many("payments", []) == {}
            assert await tx.idempotency_get_many("payments", ["a", "b"]) == {}
            await tx.idempotency_put("payments", "a", {"ok": True, "id": [1]}, now=1.0)
            await tx.idempotency_put("payments", "c's", {}, now=2.0, tombstone=True)
            await tx.idempotency_put("refunds", "b", {"ok": True}, now=3.0)  # other consumer
            # What this transaction wrote is read back before commit.
            assert set(await tx.idempotency_get_many("payments", ["a", "c's"])) == {"a", "c's"}
        async with store.transaction() as tx:
            got = await tx.idempotency_get_many("payments", ["a", "b", "c's", "a", "missing"])
        assert sorted(got) == ["a", "c's"]
        assert (got["a"].key, got["a"].outcome, got["a"].tombstone, got["a"].at) == (
            "a",
            {"ok": True, "id": [1]},
            False,
            1.0,
        )
        assert (got["c's"].key, got["c's"].outcome, got["c's"].tombstone, got["c's"].at) == (
            "c's",
            {},
            True,
            2.0,
        )
        async with store.transaction() as tx:
            for key in ("a", "c's"):
                assert got[key] == await tx.idempotency_get("payments", key)
            many = await tx.idempotency_get_many("payments", [f"k{n}" for n in range(2000)])
        assert many == {}


# -- dead letters --------------------------------------------------------------------


async def test_dead_letters_oldest_first_per_endpoint(open_store: OpenStore) -> None:
    async with open_store() as store:
        assert await store.dead_letters() == []
        async with store.transaction() as tx:
            await tx.dead_letter("payments", "m1", '{"bad":', "not JSON", now=1.0)
            await tx.dead_letter("shipping", None, "garbage", "no message id", now=2.0)
            await tx.dead_letter("payments", "m3", "{}", "unknown type", now=3.0)
        letters = await store.dead_letters()
        assert [(d.endpoint, d.message_id, d.body, d.reason, d.at) for d in letters] == [
            ("payments", "m1", '{"bad":', "not JSON", 1.0),
            ("shipping", None, "garbage", "no message id", 2.0),
            ("payments", "m3", "{}", "unknown type", 3.0),
        ]
        assert letters[0].id < letters[1].id < letters[2].id
        assert [d.message_id for d in await store.dead_letters("payments")] == ["m1", "m3"]
        assert await store.dead_letters("nowhere") == []


async def test_a_message_is_parked_once_per_endpoint(open_store: OpenStore) -> None:
    async with open_store() as store:
        for _ in range(2):  # a redelivery after a crash parks it again
            async with store.transaction() as tx:
                await tx.dead_letter("payments", "m1", "{}", "unknown type", now=1.0)
                await tx.dead_letter("shipping", "m1", "{}", "unknown type", now=1.0)
                await tx.dead_letter("payments", None, "garbage", "not JSON", now=1.0)
        letters = await store.dead_letters()
        assert sorted((d.endpoint, d.message_id or "") for d in letters) == [
            ("payments", ""),
            ("payments", ""),
            ("payments", "m1"),
            ("shipping", "m1"),
        ]


async def test_settling_a_dead_letter_keeps_it_with_who_when_and_why(
    open_store: OpenStore,
) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.dead_letter("payments", "m1", "{}", "unknown type", now=1.0)
            await tx.dead_letter("payments", "m2", "{}", "unknown type", now=2.0)
        first, second = await store.dead_letters()
        assert first.open and first.settlement is None
        async with store.transaction() as tx:
            locked = await tx.dead_letter_get(first.id)
            assert locked == first
            assert await tx.dead_letter_settle(first.id, "discarded", "ada", "test data", 5.0)
            # Settled once: a second settlement (a concurrent operator) changes nothing.
            assert not await tx.dead_letter_settle(first.id, "replayed", "bob", "again", 6.0)
            assert not await tx.dead_letter_settle(10**9, "replayed", "bob", "missing", 6.0)
            assert await tx.dead_letter_get(10**9) is None
        settled = await store.get_dead_letter(first.id)
        assert settled is not None and not settled.open
        assert (settled.settlement, settled.settled_by, settled.settled_at) == (
            "discarded",
            "ada",
            5.0,
        )
        assert settled.settle_reason == "test data" and settled.reason == "unknown type"
        assert await store.get_dead_letter(10**9) is None
        # A settled dead letter no longer counts as open, but stays listed.
        assert await store.dead_letter_count() == 1
        assert await store.dead_letter_count(settled=True) == 1
        assert await store.dead_letter_count(settled=None) == 2
        assert [d.id for d in await store.dead_letters(settled=False)] == [second.id]
        assert [d.id for d in await store.dead_letters("payments", settled=True)] == [first.id]
        assert [d.id for d in await store.dead_letters()] == [first.id, second.id]


async def test_a_settlement_rolls_back_with_its_transaction(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.dead_letter("payments", "m1", "{}", "unknown type", now=1.0)
        [letter] = await store.dead_letters()
        with pytest.raises(Boom):
            async with store.transaction() as tx:
                assert await tx.dead_letter_settle(letter.id, "replayed", "ada", "fixed", 2.0)
                await tx.outbox_add([envelope("m1")], now=2.0)
                raise Boom
        assert await store.get_dead_letter(letter.id) == letter
        assert await store.outbox_pending() == 0


async def test_a_settlement_must_be_replayed_or_discarded(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.dead_letter("payments", "m1", "{}", "unknown type", now=1.0)
        [letter] = await store.dead_letters()
        with pytest.raises(StoreError, match="replayed"):
            async with store.transaction() as tx:
                await tx.dead_letter_settle(letter.id, "forgotten", "ada", "?", 2.0)
        assert (await store.get_dead_letter(letter.id)) == letter


async def test_a_replayed_message_that_fails_again_is_parked_again(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.dead_letter("payments", "m1", "{}", "handler bug", now=1.0)
        [letter] = await store.dead_letters()
        async with store.transaction() as tx:
            await tx.dead_letter_settle(letter.id, "replayed", "ada", "handler fixed", 2.0)
        for _ in range(2):  # parked anew, and still once while open
            async with store.transaction() as tx:
                await tx.dead_letter("payments", "m1", "{}", "still broken", now=3.0)
        old, new = await store.dead_letters()
        assert (old.id, old.settlement) == (letter.id, "replayed")
        assert new.open and new.reason == "still broken" and new.message_id == "m1"


async def test_dead_letters_page(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            for n in range(5):
                await tx.dead_letter("payments", f"m{n}", "{}", "unknown type", now=float(n))
        page = await store.dead_letters(limit=2, offset=1)
        assert [d.message_id for d in page] == ["m1", "m2"]
        assert [d.message_id for d in await store.dead_letters(offset=4)] == ["m4"]
        assert await store.dead_letters(limit=0) == []


# -- mailbox queue -------------------------------------------------------------------


async def test_queue_fetch_leases_and_redelivers(open_store: OpenStore) -> None:
    async with open_store() as store:
        await store.queue_push("payments", ["a", "b", "c"], now=1.0)
        await store.queue_push("shipping", ["x"], now=1.0)
        await store.queue_push("payments", [], now=1.0)
        assert await store.queue_depth("payments") == 3
        assert await store.queue_depth() == 4

        first = await store.queue_fetch("payments", 2, now=2.0, lease=10.0)
        assert [(m.body, m.deliveries, m.endpoint, m.enqueued_at) for m in first] == [
            ("a", 1, "payments", 1.0),
            ("b", 1, "payments", 1.0),
        ]
        assert first[0].id < first[1].id
        second = await store.queue_fetch("payments", 10, now=3.0, lease=10.0)
        assert [m.body for m in second] == ["c"]
        assert await store.queue_fetch("payments", 10, now=11.9, lease=10.0) == []
        assert await store.queue_fetch("payments", 0, now=100.0, lease=10.0) == []
        assert await store.next_queue_visible("payments") == 12.0
        assert await store.queue_depth("payments") == 3  # leased messages still wait

        await store.queue_ack([first[1].id])
        await store.queue_ack([])
        # Not acknowledged before the lease ended: handed out again, one more delivery.
        again = await store.queue_fetch("payments", 10, now=12.0, lease=10.0)
        assert [(m.id, m.body, m.deliveries) for m in again] == [(first[0].id, "a", 2)]
        assert await store.queue_depth("payments") == 2

        await store.queue_ack([m.id for m in again + second])
        await store.queue_ack([first[1].id])  # acknowledging twice is harmless
        assert await store.queue_depth("payments") == 0
        assert await store.next_queue_visible("payments") is None
        assert await store.queue_depth() == 1
        shipping = await store.queue_fetch("shipping", 10, now=2.0, lease=1.0)
        assert [m.body for m in shipping] == ["x"]


async def test_queue_retry_and_delayed_push(open_store: OpenStore) -> None:
    async with open_store() as store:
        assert await store.next_queue_visible("payments") is None
        await store.queue_push("payments", ["later"], now=1.0, available_at=50.0)
        await store.queue_push("payments", ["now"], now=1.0)
        assert await store.next_queue_visible("payments") == 1.0
        [now_msg] = await store.queue_fetch("payments", 10, now=2.0, lease=30.0)
        assert now_msg.body == "now"
        assert await store.next_queue_visible("payments") == 32.0

        await store.queue_retry(now_msg.id, available_at=20.0, error="db down")
        assert await store.next_queue_visible("payments") == 20.0
        assert await store.queue_fetch("payments", 10, now=19.0, lease=30.0) == []
        [retried] = await store.queue_fetch("payments", 10, now=20.0, lease=30.0)
        assert (retried.id, retried.body, retried.deliveries) == (now_msg.id, "now", 2)
        await store.queue_ack([retried.id])
        [later] = await store.queue_fetch("payments", 10, now=50.0, lease=30.0)
        assert (later.body, later.deliveries, later.enqueued_at) == ("later", 1, 1.0)
        await store.queue_retry(424242, available_at=1.0, error="gone")  # unknown id: ignored


@pytest.mark.fault("F-PROCESS-RESTART")
async def test_queue_reset_leases_after_restart(open_store: OpenStore) -> None:
    async with open_store() as store:
        await store.queue_push("payments", ["a", "b"], now=1.0)
        await store.queue_push("payments", ["delayed"], now=1.0, available_at=500.0)
        await store.queue_push("shipping", ["x"], now=1.0)
        leased = await store.queue_fetch("payments", 10, now=2.0, lease=300.0)
        assert [m.body for m in leased] == ["a", "b"]
        await store.queue_fetch("shipping", 10, now=2.0, lease=300.0)

        assert await store.queue_reset_leases("payments") == 2
        back = await store.queue_fetch("payments", 10, now=3.0, lease=300.0)
        assert [(m.body, m.deliveries) for m in back] == [("a", 2), ("b", 2)]
        assert await store.queue_reset_leases("nobody") == 0
        # Delayed-but-never-delivered keeps its time; other endpoints keep their leases.
        await store.queue_ack([m.id for m in back])
        assert await store.next_queue_visible("payments") == 500.0
        assert await store.next_queue_visible("shipping") == 302.0


async def test_queue_add_and_remove_inside_a_transaction(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            ids = await tx.queue_add("o.local", ['{"a":"\\"q\\""}', "b"], now=1.0)
            leased = await tx.queue_add("o.local", ["mine"], now=1.0, leased_until=31.0)
            assert await tx.queue_add("o.local", [], now=1.0) == []
        assert len(ids) == 2 and ids[0] < ids[1] < leased[0]
        visible = await store.queue_fetch("o.local", 10, now=2.0, lease=5.0)
        assert [(m.id, m.body, m.deliveries) for m in visible] == [
            (ids[0], '{"a":"\\"q\\""}', 1),
            (ids[1], "b", 1),
        ]
        # The writer's own lease: hidden until it ends, and it counts as a delivery.
        assert await store.next_queue_visible("o.local") == 7.0
        async with store.transaction() as tx:
            await tx.queue_remove([ids[0], ids[1]])
            await tx.queue_remove([])
        assert await store.next_queue_visible("o.local") == 31.0
        assert await store.queue_fetch("o.local", 10, now=30.9, lease=5.0) == []
        assert await store.queue_depth("o.local") == 1
        # A restart hands the writer's leased message to the consumer.
        assert await store.queue_reset_leases("o.local") == 1
        [back] = await store.queue_fetch("o.local", 10, now=3.0, lease=5.0)
        assert (back.id, back.body, back.deliveries) == (leased[0], "mine", 2)


async def test_queue_add_ids_stay_unique_and_ordered_across_transactions(
    open_store: OpenStore,
) -> None:
    # PostgreSQL reserves ids in blocks: more rows than a block, rolled-back ones and
    # rows pushed outside a transaction must still never share an id.
    async with open_store() as store:
        seen: list[int] = []
        with pytest.raises(Boom):
            async with store.transaction() as tx:
                await tx.queue_add("o.local", ["lost"], now=1.0)
                raise Boom
        for n in (3, 300, 1):
            async with store.transaction() as tx:
                ids = await tx.queue_add("o.local", [f"m{i}" for i in range(n)], now=1.0)
            assert ids == sorted(ids) and len(ids) == n
            seen += ids
            await store.queue_push("o.local", ["pushed"], now=1.0)
        fetched = await store.queue_fetch("o.local", 1000, now=2.0, lease=5.0)
        assert len(fetched) == 307 and len({m.id for m in fetched}) == 307
        assert set(seen) <= {m.id for m in fetched}
        assert "lost" not in {m.body for m in fetched}


async def test_queue_add_and_remove_roll_back(open_store: OpenStore) -> None:
    async with open_store() as store:
        await store.queue_push("o.local", ["kept"], now=1.0)
        [kept] = await store.queue_fetch("o.local", 10, now=1.0, lease=0.0)
        with pytest.raises(Boom):
            async with store.transaction() as tx:
                await tx.queue_add("o.local", ["lost"], now=1.0)
                await tx.queue_remove([kept.id])
                raise Boom
        again = await store.queue_fetch("o.local", 10, now=2.0, lease=5.0)
        assert [(m.id, m.body) for m in again] == [(kept.id, "kept")]


# -- transactions --------------------------------------------------------------------


async def test_exception_rolls_back_every_write(open_store: OpenStore) -> None:
    async with open_store() as store:
        await insert(store, saga("existing"))
        async with store.transaction() as tx:
            await tx.timers_set([Timer("existing", "step", 5.0, "f0")])
        existing = await store.get_saga("existing")
        assert existing is not None
        with pytest.raises(Boom):
            async with store.transaction() as tx:
                await tx.saga_insert(saga("new"))
                moved = existing.copy()
                moved.version = 1
                moved.state = SagaState.SUCCEEDED
                await tx.saga_update(moved, expected_version=0)
                await tx.history_add([entry("new", 0, "started")])
                await tx.timers_set([Timer("new", "step", 1.0, "f")])
                await tx.timers_cancel("existing", ["step"])
                await tx.outbox_add([envelope("m1")], now=1.0)
                assert await tx.inbox_add("payments", "m0", now=1.0)
                await tx.idempotency_put("payments", "k", {"ok": True}, now=1.0)
                await tx.dead_letter("payments", "m9", "body", "reason", now=1.0)
                assert await tx.saga_get("new") is not None
                raise Boom
        assert await store.get_saga("new") is None
        assert await store.get_saga("existing") == existing
        assert await store.history("new") == []
        assert await store.next_timer_due() == 5.0
        assert await store.outbox_pending() == 0
        assert await store.outbox_all() == []
        assert await store.inbox_ids("payments") == set()
        assert await store.dead_letters() == []
        async with store.transaction() as tx:
            assert await tx.idempotency_get("payments", "k") is None
            assert await tx.saga_get_by_key("checkout", "order-new") is None
            # The rolled-back key is free again: the retried handler can insert it.
            await tx.saga_insert(saga("new"))
        assert await store.count_sagas() == {SagaState.RUNNING: 2}


async def test_cancellation_rolls_back(open_store: OpenStore) -> None:
    async with open_store() as store:
        started = asyncio.Event()

        async def handler() -> None:
            async with store.transaction() as tx:
                await tx.saga_insert(saga("s1"))
                started.set()
                await asyncio.sleep(10)

        task = asyncio.create_task(handler())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await store.get_saga("s1") is None
        await insert(store, saga("s1"))  # the lock was released


async def test_transaction_is_unusable_after_its_block(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            pass
        with pytest.raises(StoreError, match="transaction has ended"):
            await tx.inbox_add("payments", "m1", now=1.0)
        with pytest.raises(StoreError, match="transaction has ended"):
            await tx.saga_insert(saga())
        assert await store.inbox_ids("payments") == set()


async def test_transactions_are_serialised(open_store: OpenStore) -> None:
    async with open_store() as store:
        if isinstance(store, PostgresStore):
            pytest.skip(
                "PostgreSQL runs transactions concurrently; row locks order them "
                "(see test_postgres_store.py)"
            )
        order: list[str] = []

        async def work(name: str) -> None:
            async with store.transaction() as tx:
                order.append(f"{name}:begin")
                await asyncio.sleep(0.01)
                await tx.inbox_add("c", name, now=1.0)
                order.append(f"{name}:end")

        await asyncio.gather(work("a"), work("b"))
        assert order == ["a:begin", "a:end", "b:begin", "b:end"]
        assert await store.inbox_ids("c") == {"a", "b"}


async def test_nested_transaction_in_one_task_fails_instead_of_deadlocking(
    open_store: OpenStore,
) -> None:
    async with open_store() as store:
        async with store.transaction():
            with pytest.raises(StoreError, match="already in a transaction"):
                async with store.transaction():
                    pass
            with pytest.raises(StoreError, match="already in a transaction"):
                await store.queue_push("e", ["x"], now=1.0)
        await store.queue_push("e", ["x"], now=1.0)


async def test_closed_store_refuses_work(open_store: OpenStore) -> None:
    async with open_store() as store:
        pass
    with pytest.raises(StoreError, match="not open"):
        await store.get_saga("s1")
    with pytest.raises(StoreError, match="not open"):
        async with store.transaction():
            pass
    with pytest.raises(StoreError, match="not open"):
        await store.queue_push("e", ["x"], now=1.0)


# -- operators' reads ----------------------------------------------------------------


def placed(
    saga_id: str,
    created_at: float,
    *,
    definition: str = "checkout",
    version: int = 2,
    cursor: int = 1,
    state: SagaState = SagaState.RUNNING,
) -> SagaInstance:
    inst = saga(saga_id, definition=definition, state=state, created_at=created_at)
    inst.definition_version, inst.cursor = version, cursor
    return inst


async def test_find_sagas_filters_counts_and_pages_in_the_store(open_store: OpenStore) -> None:
    async with open_store() as store:
        await insert(
            store,
            placed("a", 10.0, version=1, cursor=0),
            placed("b", 20.0, version=2, cursor=1, state=SagaState.SUCCEEDED),
            placed("c", 30.0, version=2, cursor=2),
            placed("d", 30.0, definition="returns", version=1, cursor=1),  # tie: "c" first
            placed("e", 40.0, version=2, cursor=1, state=SagaState.FAILED_NEEDS_MANUAL),
            placed("f", 5.0, definition="returns", version=2, cursor=0),
        )

        async def found(limit: int = 100, offset: int = 0, **criteria: object) -> tuple[int, str]:
            page = await store.find_sagas(SagaQuery(**criteria), limit=limit, offset=offset)  # type: ignore[arg-type]
            return page.total, "".join(i.saga_id for i in page.items)

        assert await found() == (6, "edcbaf")
        assert await found(limit=2, offset=1) == (6, "dc")
        assert await found(offset=9) == (6, "")
        assert await found(limit=0) == (6, "")
        assert await found(states=(SagaState.RUNNING,)) == (4, "dcaf")
        assert await found(states=()) == (0, "")
        assert await found(definition="checkout") == (4, "ecba")
        assert await found(definition="checkout", version=2) == (3, "ecb")
        assert await found(version=1) == (2, "da")
        # A step is a position in one definition version: (definition, version, cursor).
        assert await found(positions=(("checkout", 2, 1),)) == (2, "eb")
        assert await found(positions=(("checkout", 2, 1), ("returns", 2, 0))) == (3, "ebf")
        assert await found(positions=()) == (0, "")
        assert await found(created_from=20.0, created_until=30.0) == (3, "dcb")
        assert await found(created_until=9.99) == (1, "f")
        assert await found(saga_ids=("a", "e", "zz")) == (2, "ea")
        assert await found(saga_ids=()) == (0, "")
        combined = {
            "states": (SagaState.RUNNING, SagaState.SUCCEEDED),
            "definition": "checkout",
            "version": 2,
            "positions": (("checkout", 2, 1), ("checkout", 2, 2)),
            "created_from": 15.0,
        }
        assert await found(**combined) == (2, "cb")
        assert await found(limit=1, offset=1, **combined) == (2, "b")
        page = await store.find_sagas(SagaQuery(saga_ids=("c",)))
        assert page.items == [await store.get_saga("c")]


async def test_find_sagas_by_last_change_and_reason_in_any_order(open_store: OpenStore) -> None:
    reasons = {
        "a": "Payment VOID refused by the provider",
        "b": "stock: 100% of sku_1 gone",
        "c": None,
        "d": "void refused, then refund refused",
        "e": "recalled SKU, Ñandú line",
    }
    changed = {"a": 50.0, "b": 20.0, "c": 40.0, "d": 20.0, "e": 10.0}
    created = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 3.0, "e": 4.0}
    instances = []
    for saga_id, reason in reasons.items():
        inst = placed(saga_id, created[saga_id], state=SagaState.FAILED_NEEDS_MANUAL)
        inst.updated_at, inst.reason = changed[saga_id], reason
        instances.append(inst)
    async with open_store() as store:
        await insert(store, *instances)

        async def found(
            order: SagaOrder = SagaOrder.NEWEST,
            limit: int = 100,
            offset: int = 0,
            **criteria: object,
        ) -> tuple[int, str]:
            query = SagaQuery(**criteria)  # type: ignore[arg-type]
            page = await store.find_sagas(query, limit=limit, offset=offset, order=order)
            every = [i for i in instances if query.matches(i)]
            assert page.total == len(every), "the in-memory reference counts the same"
            return page.total, "".join(i.saga_id for i in page.items)

        # Ties keep insertion order in the page's direction ("c" before "d" ascending).
        assert await found() == (5, "edcba")
        assert await found(SagaOrder.OLDEST) == (5, "abcde")
        assert await found(SagaOrder.CHANGED_FIRST) == (5, "ebdca")
        assert await found(SagaOrder.CHANGED_LAST) == (5, "acdbe")
        assert await found(SagaOrder.CHANGED_FIRST, limit=2, offset=1) == (5, "bd")
        assert await found(updated_until=20.0) == (3, "edb")
        assert await found(SagaOrder.CHANGED_FIRST, updated_from=20.0, updated_until=40.0) == (
            3,
            "bdc",
        )
        # A substring of the reason, whatever the case; LIKE's wildcards are plain text.
        assert await found(SagaOrder.OLDEST, reason_contains="void REFUSED") == (2, "ad")
        assert await found(reason_contains="100%") == (1, "b")
        assert await found(reason_contains="%") == (1, "b")
        assert await found(reason_contains="sku_") == (1, "b")
        assert await found(reason_contains="_") == (1, "b")
        assert await found(reason_contains="Ñandú") == (1, "e")
        assert await found(reason_contains="nothing like it") == (0, "")
        assert await found(reason_contains="") == (5, "edcba")  # no text: no criterion
        combined = {"reason_contains": "refused", "updated_until": 30.0, "definition": "checkout"}
        assert await found(SagaOrder.CHANGED_FIRST, **combined) == (1, "d")


async def test_get_saga_by_key_reads_without_a_transaction(open_store: OpenStore) -> None:
    async with open_store() as store:
        await insert(store, saga("s1", key="o-1"), saga("s2", definition="refund", key="o-1"))
        async with store.transaction() as tx:
            await tx.saga_insert(saga("s3", key="o-3"))
            # A plain read: it does not wait for the open transaction (no deadlock).
            found = await store.get_saga_by_key("checkout", "o-1")
        assert found == await store.get_saga("s1")
        assert (await store.get_saga_by_key("refund", "o-1")) == await store.get_saga("s2")
        assert await store.get_saga_by_key("checkout", "o-3") == await store.get_saga("s3")
        assert await store.get_saga_by_key("checkout", "o-2") is None


async def test_outbox_of_saga_and_oldest_pending(open_store: OpenStore) -> None:
    async with open_store() as store:
        assert await store.outbox_oldest_pending() is None
        other = replace(envelope("m2"), saga_id="s2")
        # A payload that mentions the id is not the envelope's saga id.
        decoy = replace(envelope("m3"), saga_id=None, payload={"saga_id": "s1"})
        async with store.transaction() as tx:
            await tx.outbox_add([envelope("m1")], now=5.0)
            await tx.outbox_add([other, decoy], now=6.0)
            await tx.outbox_add([envelope("m4")], now=7.0)
        assert await store.outbox_oldest_pending() == 5.0
        [first] = await store.outbox_claim(1, now=8.0, lease=5.0)
        await store.outbox_mark_published([first.id], now=9.0)
        assert await store.outbox_oldest_pending() == 6.0
        assert await store.outbox_of_saga("s1") == [(envelope("m1"), 9.0), (envelope("m4"), None)]
        assert await store.outbox_of_saga("s2") == [(other, None)]
        assert await store.outbox_of_saga("nope") == []
        # Python writes NaN as a bare word: not strict JSON, and still stored and found.
        odd = replace(envelope("m5"), saga_id="s3", payload={"ratio": float("nan")})
        async with store.transaction() as tx:
            await tx.outbox_add([odd], now=7.5)
        [(found, _)] = await store.outbox_of_saga("s3")
        assert found.message_id == "m5" and math.isnan(found.payload["ratio"])
        rest = await store.outbox_claim(10, now=8.0, lease=5.0)
        await store.outbox_mark_published([r.id for r in rest], now=9.0)
        assert await store.outbox_oldest_pending() is None


async def test_dead_letter_count(open_store: OpenStore) -> None:
    async with open_store() as store:
        assert await store.dead_letter_count() == 0
        async with store.transaction() as tx:
            await tx.dead_letter("payments", "m1", "{}", "unknown type", now=1.0)
            await tx.dead_letter("shipping", None, "garbage", "not JSON", now=2.0)
            await tx.dead_letter("payments", "m3", "{}", "unknown type", now=3.0)
        assert await store.dead_letter_count() == 3
        assert await store.dead_letter_count("payments") == 2
        assert await store.dead_letter_count("nowhere") == 0
        assert await store.dead_letter_count(settled=True) == 0


# -- inputs set aside for a missing definition version, counts per version ---------------


async def test_set_aside_is_claimed_oldest_first_and_taken_once(open_store: OpenStore) -> None:
    async with open_store() as store:
        assert await store.set_aside_counts() == {}
        async with store.transaction() as tx:
            await tx.set_aside_add("s1", "trip", 1, "reply", '{"m":1}', now=1.0)
            await tx.set_aside_add("s2", "trip", 2, "timer", '{"t":1}', now=2.0)
            await tx.set_aside_add("s1", "trip", 1, "local", '{"m":2}', now=3.0)
        with pytest.raises(Boom):
            async with store.transaction() as tx:
                await tx.set_aside_add("s3", "trip", 1, "reply", "{}", now=4.0)
                raise Boom
        assert await store.set_aside_counts() == {("trip", 1): 2, ("trip", 2): 1}
        of_s1 = await store.set_aside_of_saga("s1")
        assert [(r.kind, r.body, r.at, r.waiting_for) for r in of_s1] == [
            ("reply", '{"m":1}', 1.0, "trip@1"),
            ("local", '{"m":2}', 3.0, "trip@1"),
        ]
        assert of_s1[0].id < of_s1[1].id
        assert await store.set_aside_of_saga("nobody") == []

        claimed = await store.set_aside_claim([("trip", 1), ("other", 7)], 10, now=10.0, lease=5.0)
        assert claimed == of_s1  # only the version asked for, oldest first
        # Leased: not handed out again until the lease ends, then handed out again.
        assert await store.set_aside_claim([("trip", 1)], 10, now=12.0, lease=5.0) == []
        again = await store.set_aside_claim([("trip", 1)], 1, now=15.0, lease=5.0)
        assert [r.id for r in again] == [of_s1[0].id]
        assert await store.set_aside_claim([], 10, now=99.0, lease=5.0) == []

        with pytest.raises(Boom):
            async with store.transaction() as tx:
                assert await tx.set_aside_take([r.id for r in of_s1]) == {r.id for r in of_s1}
                raise Boom
        assert await store.set_aside_of_saga("s1") == of_s1  # the rollback kept them
        async with store.transaction() as tx:
            assert await tx.set_aside_take([of_s1[0].id, 424242]) == {of_s1[0].id}
            assert await tx.set_aside_take([of_s1[0].id]) == set()
            assert await tx.set_aside_take([]) == set()
        assert await store.set_aside_of_saga("s1") == of_s1[1:]
        assert await store.set_aside_counts() == {("trip", 1): 1, ("trip", 2): 1}


async def test_set_aside_inputs_survive_a_restart(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.set_aside_add("s1", "trip", 1, "reply", "{}", now=1.0)
        before = await store.set_aside_of_saga("s1")
    async with open_store() as store:
        if not isinstance(store, MemoryStore):  # a new MemoryStore starts empty
            assert await store.set_aside_of_saga("s1") == before
            assert await store.set_aside_counts() == {("trip", 1): 1}


async def test_set_aside_take_by_two_transactions_applies_once(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.set_aside_add("s1", "trip", 1, "reply", "{}", now=1.0)
        (row,) = await store.set_aside_of_saga("s1")
        first_took = asyncio.Event()
        results: list[set[int]] = []

        async def take(wait: bool) -> None:
            async with store.transaction() as tx:
                results.append(await tx.set_aside_take([row.id]))
                if wait:
                    first_took.set()
                    await asyncio.sleep(0.05)  # hold the row while the other one asks

        async def second() -> None:
            await first_took.wait()
            await take(False)

        await asyncio.gather(take(True), second())
        assert results == [{row.id}, set()]
        assert await store.set_aside_counts() == {}


async def test_count_sagas_by_version(open_store: OpenStore) -> None:
    async with open_store() as store:
        assert await store.count_sagas_by_version() == {}
        await insert(
            store,
            replace(saga("a"), definition_version=1),
            replace(saga("b", state=SagaState.SUCCEEDED), definition_version=1),
            replace(saga("c", state=SagaState.SUCCEEDED), definition_version=1),
            saga("d"),
            saga("e", definition="refund"),
        )
        assert await store.count_sagas_by_version() == {
            ("checkout", 1, SagaState.RUNNING): 1,
            ("checkout", 1, SagaState.SUCCEEDED): 2,
            ("checkout", 2, SagaState.RUNNING): 1,
            ("refund", 2, SagaState.RUNNING): 1,
        }


# -- SQLite only ---------------------------------------------------------------------


async def test_sqlite_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "svc.db"
    store = SQLiteStore(path)
    await store.open()
    await insert(store, saga("s1"))
    async with store.transaction() as tx:
        await tx.history_add([entry("s1", 0, "started")])
        await tx.timers_set([Timer("s1", "step", 9.0, "f")])
        await tx.outbox_add([envelope("m1")], now=1.0)
        await tx.inbox_add("payments", "m0", now=1.0)
    await store.queue_push("payments", ["body"], now=1.0)
    await store.close()
    await store.close()  # closing twice is harmless

    reopened = SQLiteStore(str(path))
    await reopened.open()
    try:
        assert await reopened.get_saga("s1") == saga("s1")
        assert await reopened.history("s1") == [entry("s1", 0, "started")]
        assert await reopened.next_timer_due() == 9.0
        assert await reopened.outbox_pending() == 1
        assert await reopened.inbox_ids("payments") == {"m0"}
        assert await reopened.queue_depth("payments") == 1
    finally:
        await reopened.close()
    await store.open()  # the same object opens again too
    try:
        assert await store.get_saga("s1") == saga("s1")
    finally:
        await store.close()


async def test_sqlite_engine_migrations_are_applied_once(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "svc.db")
    await store.open()
    async with store.transaction() as tx:
        before = await tx.fetchall("SELECT namespace, step, applied_at FROM schema_migrations")
        mode = await tx.fetchone("PRAGMA journal_mode")
    await store.close()
    assert [(ns, step) for ns, step, _ in before] == [("sagakit", n) for n in (1, 2, 3, 4, 5, 6, 7)]
    assert mode == ("wal",)
    await store.open()
    async with store.transaction() as tx:
        assert (
            await tx.fetchall("SELECT namespace, step, applied_at FROM schema_migrations") == before
        )
    await store.close()


async def test_sqlite_listing_migration_fills_the_saga_id_of_older_outbox_rows(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "svc.db")
    await store.open()
    odd = replace(envelope("m2"), saga_id="s2", payload={"ratio": float("nan")})
    async with store.transaction() as tx:
        await tx.outbox_add([envelope("m1"), odd], now=1.0)
        # Back to the schema before step 3, with these rows written then.
        for statement in (
            "DROP INDEX outbox_saga_idx",
            "DROP INDEX sagas_definition_created_idx",
            "ALTER TABLE outbox DROP COLUMN saga_id",
            "DELETE FROM schema_migrations WHERE namespace = 'sagakit' AND step = 3",
        ):
            await tx.execute(statement)
    await store.close()
    await store.open()  # step 3 again
    assert [e.message_id for e, _ in await store.outbox_of_saga("s1")] == ["m1"]
    assert await store.outbox_of_saga("s2") == []  # SQLite cannot parse NaN: left out
    assert await store.outbox_pending() == 2
    await store.close()


BUSINESS_STEPS = [
    """
    CREATE TABLE payments (id TEXT PRIMARY KEY, amount INTEGER NOT NULL CHECK (amount >= 0));
    -- a comment; with a semicolon
    INSERT INTO payments VALUES ('seed;1', 0);
    """,
    """
    CREATE TABLE ledger (payment_id TEXT, amount INTEGER);
    CREATE TRIGGER payments_ledger AFTER INSERT ON payments BEGIN
        INSERT INTO ledger VALUES (new.id, new.amount);
    END;
    """,
]


async def test_sqlite_apply_migrations_for_a_namespace(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "svc.db", name="payments")
    await store.open()
    try:
        await store.apply_migrations("payments", BUSINESS_STEPS[:1])
        await store.apply_migrations("payments", BUSINESS_STEPS[:1])  # already applied
        await store.apply_migrations("payments", BUSINESS_STEPS)  # only step 2 runs
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO payments VALUES (?, ?)", ("p1", 4200))
        async with store.transaction() as tx:
            assert await tx.fetchall("SELECT * FROM payments ORDER BY id") == [
                ("p1", 4200),
                ("seed;1", 0),
            ]
            assert await tx.fetchall("SELECT * FROM ledger") == [("p1", 4200)]
            steps = await tx.fetchall(
                "SELECT namespace, step FROM schema_migrations ORDER BY namespace, step"
            )
        assert steps == [
            ("payments", 1),
            ("payments", 2),
            *[("sagakit", n) for n in (1, 2, 3, 4, 5, 6, 7)],
        ]
        with pytest.raises(ConfigurationError):
            await store.apply_migrations("payments", "CREATE TABLE x (a)")
    finally:
        await store.close()


async def test_sqlite_failed_migration_step_leaves_nothing(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "svc.db")
    await store.open()
    broken = "CREATE TABLE half (a); INSERT INTO no_such_table VALUES (1);"
    try:
        with pytest.raises(StoreError, match="step 2 of 'shop'") as info:
            await store.apply_migrations("shop", ["CREATE TABLE first (a);", broken])
        assert isinstance(info.value.__cause__, sqlite3.Error)
        async with store.transaction() as tx:
            tables = {r[0] for r in await tx.fetchall("SELECT name FROM sqlite_master")}
            steps = await tx.fetchall("SELECT step FROM schema_migrations WHERE namespace='shop'")
        assert "first" in tables and "half" not in tables
        assert steps == [(1,)]
        # Fixed and run again: continues at step 2.
        await store.apply_migrations("shop", ["CREATE TABLE first (a);", "CREATE TABLE half (a);"])
        async with store.transaction() as tx:
            assert await tx.fetchone("SELECT count(*) FROM half") == (0,)
    finally:
        await store.close()


async def test_sqlite_business_sql_commits_and_rolls_back_with_the_inbox(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "svc.db")
    await store.open()
    try:
        await store.apply_migrations(
            "inventory", ["CREATE TABLE stock (sku TEXT PRIMARY KEY, available INTEGER NOT NULL)"]
        )
        async with store.transaction() as tx:
            assert await tx.execute("INSERT INTO stock VALUES ('A', 5), ('B', 1)") == 2
        with pytest.raises(Boom):
            async with store.transaction() as tx:
                await tx.inbox_add("inventory", "m1", now=1.0)
                changed = await tx.execute(
                    "UPDATE stock SET available = available - ? WHERE sku = ?", (2, "A")
                )
                assert changed == 1
                assert await tx.fetchone("SELECT available FROM stock WHERE sku = 'A'") == (3,)
                raise Boom
        async with store.transaction() as tx:
            assert await tx.fetchone("SELECT available FROM stock WHERE sku = ?", ("A",)) == (5,)
            assert await tx.fetchone("SELECT available FROM stock WHERE sku = 'Z'") is None
        assert await store.inbox_ids("inventory") == set()

        with pytest.raises(StoreError, match="no_such_table") as info:
            async with store.transaction() as tx:
                await tx.execute("INSERT INTO no_such_table VALUES (1)")
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    finally:
        await store.close()


async def test_sqlite_readers_see_only_committed_data(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "svc.db")
    await store.open()
    try:
        async with store.transaction() as tx:
            await tx.saga_insert(saga("s1"))
            # The reader connection does not wait for the writer and sees no dirty row.
            assert await store.get_saga("s1") is None
        assert await store.get_saga("s1") is not None
    finally:
        await store.close()


@pytest.mark.parametrize(("setting", "pragma"), [("FULL", 2), ("normal", 1), ("EXTRA", 3)])
async def test_sqlite_synchronous_setting_is_applied(
    tmp_path: Path, setting: str, pragma: int
) -> None:
    store = SQLiteStore(tmp_path / "svc.db", synchronous=setting)
    await store.open()
    try:
        async with store.transaction() as tx:
            assert await tx.fetchone("PRAGMA synchronous") == (pragma,)
    finally:
        await store.close()


@pytest.mark.parametrize("bad", ["OFF", "fast", ""])
def test_sqlite_synchronous_setting_is_validated(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigurationError, match="synchronous"):
        SQLiteStore(tmp_path / "svc.db", synchronous=bad)


def test_sqlite_needs_a_file() -> None:
    with pytest.raises(ConfigurationError, match="MemoryStore"):
        SQLiteStore(":memory:")


async def test_sqlite_unopenable_path_is_a_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "missing-dir" / "svc.db")
    with pytest.raises(StoreError, match="could not open") as info:
        await store.open()
    assert isinstance(info.value.__cause__, sqlite3.Error)


def test_split_statements() -> None:
    script = """
    CREATE TABLE t (a TEXT); -- trailing comment; still fine
    INSERT INTO t VALUES ('x;y');
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END;
    SELECT 1
    """
    assert [s.split()[0] for s in split_statements(script)] == [
        "CREATE",
        "--",
        "CREATE",
        "SELECT",
    ]
    assert split_statements("") == []
    assert split_statements("  ;  ") == []


# -- MemoryStore only ----------------------------------------------------------------


async def test_memory_store_runs_the_sql_of_a_participant_s_own_tables() -> None:
    store = MemoryStore("payments")
    await store.open()
    await store.apply_migrations("payments", ["CREATE TABLE cards (id TEXT PRIMARY KEY)"])
    async with store.transaction() as tx:
        assert await tx.execute("INSERT INTO cards VALUES (?)", ("c-1",)) == 1
        assert await tx.fetchall("SELECT id FROM cards") == [("c-1",)]
    with pytest.raises(Boom):
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO cards VALUES (?)", ("c-2",))
            raise Boom
    async with store.transaction() as tx:
        assert await tx.fetchone("SELECT count(*) FROM cards") == (1,)
    await store.close()


async def test_memory_stores_are_private_to_each_other() -> None:
    one, two = MemoryStore("one"), MemoryStore("two")
    await one.open()
    await two.open()
    await insert(one, saga("s1"))
    assert await two.get_saga("s1") is None
    with pytest.raises(ConfigurationError, match="event loop"):
        one.read_in_threads(2)
    await one.close()
    await two.close()


async def test_memory_store_keeps_data_across_close_and_open() -> None:
    store = MemoryStore()
    await store.open()
    await insert(store, saga("s1"))
    await store.close()
    await store.open()
    assert await store.get_saga("s1") == saga("s1")
