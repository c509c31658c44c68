"""PostgresStore beyond the shared contract: schemas, migrations, business SQL, row locks,
SKIP LOCKED claims, the database lease clock, notifications and error translation.

Every test that talks to the server is marked ``postgres`` and works in its own
uniquely named schema, dropped afterwards (``SAGAKIT_TEST_POSTGRES_DSN`` overrides the
server). The pure helpers (``?`` translation, error table) need no server.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import psycopg
import psycopg.errors
import pytest

from sagakit.core.envelope import Envelope, MessageKind
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState, StepState, Timer
from sagakit.errors import ConcurrencyError, ConfigurationError, StoreError
from sagakit.stores import postgres
from sagakit.stores.base import SQLStore
from sagakit.stores.postgres import PostgresStore, qmark_to_psycopg, translate_error

PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

MakeStore = Callable[..., PostgresStore]


class Boom(Exception):
    """Raised inside a transaction to force its rollback."""


def _conforms(store: PostgresStore) -> SQLStore:
    # Checked by mypy: a store participants can run their migrations on.
    return store


@pytest.fixture
def make_store() -> Iterator[MakeStore]:
    """``make_store(schema="a", **options)``: an unopened store in a schema unique to the test."""
    prefix = f"sagakit_test_{uuid.uuid4().hex[:10]}"
    used: set[str] = set()

    def make(schema: str = "main", **options: Any) -> PostgresStore:
        used.add(f"{prefix}_{schema}")
        return PostgresStore(PG_DSN, schema=f"{prefix}_{schema}", **options)

    yield make
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for schema in used:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@asynccontextmanager
async def opened(store: PostgresStore) -> AsyncIterator[PostgresStore]:
    """Open a store for the block, close it afterwards."""
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def saga(saga_id: str = "s1", *, version: int = 0) -> SagaInstance:
    return SagaInstance(
        saga_id=saga_id,
        definition="checkout",
        definition_version=1,
        business_key=f"order-{saga_id}",
        correlation_id=f"corr-{saga_id}",
        state=SagaState.RUNNING,
        status="PENDING_PAYMENT",
        data={"total": 4200},
        steps=[StepState()],
        created_at=100.0,
        updated_at=100.0,
        version=version,
    )


def moved(instance: SagaInstance, status: str) -> SagaInstance:
    new = instance.copy()
    new.version += 1
    new.status = status
    return new


def envelope(message_id: str) -> Envelope:
    return Envelope(
        message_id=message_id,
        type="AuthorizePayment",
        kind=MessageKind.COMMAND,
        source="orchestrator",
        correlation_id="corr-1",
        occurred_at=10.5,
        payload={"amount": 4200},
        destination="payments",
        saga_id="s1",
    )


def history(saga_id: str, event: str) -> HistoryEntry:
    return HistoryEntry(saga_id, 1, 100.0, event, SagaState.RUNNING, "PENDING_PAYMENT")


# -- pure helpers (no server) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("qmark", "psycopg_form"),
    [
        ("SELECT 1", "SELECT 1"),
        ("SELECT ? + ?", "SELECT %s + %s"),
        ("SELECT '?', \"a?\", ?", "SELECT '?', \"a?\", %s"),
        ("SELECT 'it''s ?', ?", "SELECT 'it''s ?', %s"),
        ("SELECT E'\\' ?', ?", "SELECT E'\\' ?', %s"),
        ("SELECT date'2024-01-01', ?", "SELECT date'2024-01-01', %s"),
        ("SELECT 1 -- why? because\n, ?", "SELECT 1 -- why? because\n, %s"),
        ("SELECT /* a /* nested? */ b? */ ?", "SELECT /* a /* nested? */ b? */ %s"),
        ("SELECT $$ ? $$, $fn$ '? $fn$, ?", "SELECT $$ ? $$, $fn$ '? $fn$, %s"),
        ("SELECT a$b$ FROM t WHERE c = ?", "SELECT a$b$ FROM t WHERE c = %s"),
        ("SELECT 'a%' LIKE ?, 5 % ?", "SELECT 'a%%' LIKE %s, 5 %% %s"),
        ("SELECT '100%'", "SELECT '100%%'"),
    ],
)
def test_qmark_parameters_become_psycopg_placeholders(qmark: str, psycopg_form: str) -> None:
    assert qmark_to_psycopg(qmark) == psycopg_form


def test_numbered_qmark_parameters_are_refused() -> None:
    with pytest.raises(StoreError, match="numbered parameter '\\?1'"):
        qmark_to_psycopg("SELECT ?1")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (psycopg.errors.UniqueViolation("dup"), ConcurrencyError),
        (psycopg.errors.SerializationFailure("ser"), ConcurrencyError),
        (psycopg.errors.DeadlockDetected("dead"), ConcurrencyError),
        (psycopg.errors.LockNotAvailable("nowait"), ConcurrencyError),
        (psycopg.errors.UndefinedTable("no table"), StoreError),
        (psycopg.errors.InFailedSqlTransaction("aborted"), StoreError),
        (psycopg.OperationalError("server closed the connection"), StoreError),
        (psycopg.ProgrammingError("bad placeholder"), StoreError),
    ],
)
def test_driver_errors_are_translated(error: psycopg.Error, expected: type[StoreError]) -> None:
    translated = translate_error("payments", "do it", error)
    assert type(translated) is expected
    assert "'payments' could not do it" in str(translated)
    if isinstance(error, psycopg.errors.InFailedSqlTransaction):
        assert "can only roll back" in str(translated)


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        postgres.driver, "_MISSING_DRIVER", ImportError("No module named 'psycopg'")
    )
    with pytest.raises(ConfigurationError, match=r"sagakit\[postgres\]"):
        PostgresStore(PG_DSN)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_size": 1}, "max_size >= 2"),
        ({"min_size": 5, "max_size": 4}, "min_size <= max_size"),
        ({"schema": "x" * 64}, "63 bytes"),
        ({"name": "n" * 60}, "notification channel"),
        ({"lease_clock": "local"}, "lease_clock"),
    ],
)
def test_configuration_is_validated(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        PostgresStore(PG_DSN, **options)


# -- lifecycle, schemas and migrations -------------------------------------------------


@pytest.mark.postgres
async def test_reopening_a_schema_sees_its_data(make_store: MakeStore) -> None:
    store = make_store()
    async with opened(store):
        async with store.transaction() as tx:
            await tx.saga_insert(saga("s1"))
            await tx.timers_set([Timer("s1", "step", 9.0, "f")])
            await tx.outbox_add([envelope("m1")], now=1.0)
            await tx.inbox_add("payments", "m0", now=1.0)
        await store.queue_push("payments", ["body"], now=1.0)
    await store.close()  # closing twice is harmless

    async with opened(make_store()) as reopened:
        assert await reopened.get_saga("s1") == saga("s1")
        assert await reopened.next_timer_due() == 9.0
        assert await reopened.outbox_pending() == 1
        assert await reopened.inbox_ids("payments") == {"m0"}
        assert await reopened.queue_depth("payments") == 1
    async with opened(store):  # the same object opens again too
        assert await store.get_saga("s1") == saga("s1")


@pytest.mark.postgres
async def test_engine_migrations_are_applied_once_even_by_concurrent_opens(
    make_store: MakeStore,
) -> None:
    stores = [make_store() for _ in range(6)]
    # Six processes starting together on a new schema: the advisory lock orders them.
    await asyncio.gather(*(s.open() for s in stores))
    try:
        async with stores[0].transaction() as tx:
            before = await tx.fetchall("SELECT namespace, step, applied_at FROM schema_migrations")
        steps = [(ns, step) for ns, step, _ in before]
        assert steps == [("sagakit", n) for n in (1, 2, 3, 4, 5, 6, 7)]
    finally:
        for s in stores:
            await s.close()
    async with opened(stores[0]) as store, store.transaction() as tx:
        again = await tx.fetchall("SELECT namespace, step, applied_at FROM schema_migrations")
        assert again == before


@pytest.mark.postgres
async def test_listing_migration_fills_the_saga_id_of_older_outbox_rows(
    make_store: MakeStore,
) -> None:
    odd = replace(envelope("m2"), saga_id="s2", payload={"r": float("nan")})
    async with opened(make_store()) as store, store.transaction() as tx:
        await tx.outbox_add([envelope("m1"), odd, envelope("m3")], now=1.0)
        # Back to the schema before step 2, with these rows written then.
        await tx.execute("DROP INDEX sagas_definition_created_idx")
        await tx.execute("ALTER TABLE outbox DROP COLUMN saga_id")
        await tx.execute("DELETE FROM schema_migrations WHERE namespace = 'sagakit' AND step = 2")
    # Step 2 again: the NaN body fails the set-based update, so it goes row by row.
    async with opened(make_store()) as store:
        assert [e.message_id for e, _ in await store.outbox_of_saga("s1")] == ["m1", "m3"]
        assert await store.outbox_of_saga("s2") == []  # not JSON to PostgreSQL: left out
        assert await store.outbox_pending() == 3


BUSINESS_STEPS = [
    """
    CREATE TABLE payments (id text PRIMARY KEY, amount integer NOT NULL CHECK (amount >= 0));
    -- a comment; with a semicolon and a percent: 100%
    INSERT INTO payments VALUES ('seed;1', 0);
    """,
    """
    CREATE TABLE ledger (payment_id text, amount integer);
    CREATE FUNCTION payments_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO ledger VALUES (new.id, new.amount);  -- lands in the same schema
        RETURN new;
    END;
    $$;
    CREATE TRIGGER payments_ledger AFTER INSERT ON payments
        FOR EACH ROW EXECUTE FUNCTION payments_ledger();
    """,
]


@pytest.mark.postgres
async def test_apply_migrations_for_a_namespace(make_store: MakeStore) -> None:
    async with opened(make_store(name="payments")) as store:
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
            ("sagakit", 1),
            ("sagakit", 2),
            ("sagakit", 3),
            ("sagakit", 4),
            ("sagakit", 5),
            ("sagakit", 6),
            ("sagakit", 7),
        ]
        with pytest.raises(ConfigurationError):
            await store.apply_migrations("payments", "CREATE TABLE x (a int)")


@pytest.mark.postgres
async def test_failed_migration_step_leaves_nothing(make_store: MakeStore) -> None:
    broken = "CREATE TABLE half (a int); INSERT INTO no_such_table VALUES (1);"
    async with opened(make_store()) as store:
        with pytest.raises(StoreError, match="step 2 of 'shop'") as info:
            await store.apply_migrations("shop", ["CREATE TABLE first (a int);", broken])
        assert isinstance(info.value.__cause__, psycopg.errors.UndefinedTable)
        async with store.transaction() as tx:
            assert await tx.fetchone("SELECT to_regclass('first') IS NOT NULL") == (True,)
            assert await tx.fetchone("SELECT to_regclass('half') IS NULL") == (True,)
            steps = await tx.fetchall("SELECT step FROM schema_migrations WHERE namespace='shop'")
        assert steps == [(1,)]
        await store.apply_migrations(
            "shop", ["CREATE TABLE first (a int);", "CREATE TABLE half ()"]
        )
        async with store.transaction() as tx:
            assert await tx.fetchone("SELECT count(*) FROM half") == (0,)


@pytest.mark.postgres
async def test_each_store_sees_only_its_own_schema(make_store: MakeStore) -> None:
    async with (
        opened(make_store("pay", name="payments")) as pay,
        opened(make_store("ship", name="shipping")) as ship,
    ):
        await pay.apply_migrations("payments", ["CREATE TABLE payments (id text)"])
        async with pay.transaction() as tx:
            await tx.saga_insert(saga("s1"))
            assert await tx.fetchone("SELECT current_schemas(false)") == ([pay.schema],)
        assert await ship.get_saga("s1") is None
        assert await ship.count_sagas() == {}
        with pytest.raises(StoreError, match="payments"):
            async with ship.transaction() as tx:
                await tx.fetchall("SELECT * FROM payments")


@pytest.mark.postgres
async def test_unreachable_server_is_a_store_error() -> None:
    store = PostgresStore("postgresql://postgres:secret@127.0.0.1:1/test", schema="x")
    with pytest.raises(StoreError, match="could not connect") as info:
        await store.open()
    assert "secret" not in str(info.value)
    assert isinstance(info.value.__cause__, psycopg.OperationalError)


@pytest.mark.postgres
async def test_database_clock_offset_is_measured(make_store: MakeStore) -> None:
    async with opened(make_store()) as store:
        assert abs(await store.sync_clock()) < 1.0  # same host
        async with store.transaction() as tx:
            row = await tx.fetchone("SELECT extract(epoch FROM clock_timestamp())::float8")
        assert row is not None and abs(row[0] - store.clock()) < 1.0


# -- business SQL --------------------------------------------------------------------


@pytest.mark.postgres
async def test_business_sql_with_qmarks_commits_and_rolls_back_with_the_inbox(
    make_store: MakeStore,
) -> None:
    async with opened(make_store()) as store:
        await store.apply_migrations(
            "inventory", ["CREATE TABLE stock (sku text PRIMARY KEY, available integer NOT NULL)"]
        )
        async with store.transaction() as tx:
            assert await tx.execute("INSERT INTO stock VALUES ('A', 5), ('B', 1)") == 2
            assert await tx.execute("INSERT INTO stock VALUES (?, ?)", ("C?", 0)) == 1
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
            rows = await tx.fetchall(
                "SELECT sku, '?' AS q, '50%' FROM stock WHERE sku LIKE ? ORDER BY sku", ("%?",)
            )
            assert rows == [("C?", "?", "50%")]
            assert await tx.fetchall("UPDATE stock SET available = 9 WHERE sku = 'Z'") == []
        assert await store.inbox_ids("inventory") == set()

        with pytest.raises(StoreError, match="no_such_table") as info:
            async with store.transaction() as tx:
                await tx.execute("INSERT INTO no_such_table VALUES (1)")
        assert isinstance(info.value.__cause__, psycopg.errors.UndefinedTable)
        with pytest.raises(ConcurrencyError, match="unique") as dup:
            async with store.transaction() as tx:
                await tx.execute("INSERT INTO stock VALUES (?, ?)", ("A", 1))
        assert isinstance(dup.value.__cause__, psycopg.errors.UniqueViolation)


@pytest.mark.postgres
async def test_a_statement_after_a_failed_one_says_the_transaction_is_aborted(
    make_store: MakeStore,
) -> None:
    async with opened(make_store()) as store:
        with pytest.raises(StoreError, match="can only roll back"):
            async with store.transaction() as tx:
                with pytest.raises(StoreError):
                    await tx.execute("SELECT * FROM no_such_table")
                await tx.inbox_add("c", "m1", now=1.0)
        assert await store.inbox_ids("c") == set()


@pytest.mark.postgres
async def test_expected_refusals_leave_the_transaction_usable(make_store: MakeStore) -> None:
    async with opened(make_store()) as store:
        async with store.transaction() as tx:
            await tx.saga_insert(saga("s1"))
            with pytest.raises(ConcurrencyError, match="s1 already exists"):
                await tx.saga_insert(saga("s1"))
            await tx.idempotency_put("payments", "k", {"ok": True}, now=1.0)
            with pytest.raises(StoreError, match="already recorded"):
                await tx.idempotency_put("payments", "k", {"ok": False}, now=1.0)
            await tx.dead_letter("payments", "m1", "{}", "bad", now=1.0)
            await tx.dead_letter("payments", "m1", "{}", "bad", now=1.0)
            await tx.inbox_add("payments", "m2", now=1.0)
        assert await store.get_saga("s1") == saga("s1")
        assert len(await store.dead_letters()) == 1
        assert await store.inbox_ids("payments") == {"m2"}


@pytest.mark.postgres
@pytest.mark.parametrize("pipeline", [True, False], ids=["pipeline", "plain"])
async def test_a_failed_queued_write_fails_the_commit_and_is_named(
    make_store: MakeStore, pipeline: bool
) -> None:
    async with opened(make_store()) as store:
        store._use_pipeline = pipeline
        await store.apply_migrations(
            "audit", ["ALTER TABLE saga_history ADD CONSTRAINT no_boom CHECK (event <> 'boom')"]
        )
        with pytest.raises(StoreError, match="append 1 history row") as info:
            async with store.transaction() as tx:
                await tx.saga_insert(saga("s1"))
                await tx.history_add([history("s1", "boom")])  # queued: fails at commit
                await tx.outbox_add([envelope("m1")], now=1.0)
        assert isinstance(info.value.__cause__, psycopg.errors.CheckViolation)
        assert await store.get_saga("s1") is None
        assert await store.outbox_pending() == 0
        # A bad write, then an error in the block: the block's error wins (writes wait
        # for the next read or the commit, so this one was never sent).
        with pytest.raises(Boom):
            async with store.transaction() as tx:
                await tx.history_add([history("s1", "boom")])
                raise Boom
        # The connection went back to the pool clean: the next transaction works.
        async with store.transaction() as tx:
            await tx.saga_insert(saga("s1"))
            await tx.history_add([history("s1", "started")])
        assert [h.event for h in await store.history("s1")] == ["started"]


@pytest.mark.postgres
@pytest.mark.fault("F-DB-CONNECTION-LOST")
async def test_a_connection_lost_at_commit_reports_an_unknown_outcome(
    make_store: MakeStore,
) -> None:
    async with opened(make_store(min_size=1, max_size=2)) as store:
        with pytest.raises(StoreError, match="unknown") as info:
            async with store.transaction() as tx:
                await tx.saga_insert(saga("s1"))
                pid = await tx.fetchone("SELECT pg_backend_pid()")
                assert pid is not None
                with psycopg.connect(PG_DSN, autocommit=True) as killer:
                    killer.execute("SELECT pg_terminate_backend(%s)", pid)
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
        # The broken connection is not reused.
        for _ in range(3):
            async with store.transaction() as tx:
                await tx.inbox_add("c", uuid.uuid4().hex, now=1.0)
        assert await store.get_saga("s1") is None


# -- concurrency -----------------------------------------------------------------------


@pytest.mark.postgres
async def test_readers_see_only_committed_data(make_store: MakeStore) -> None:
    async with opened(make_store()) as store:
        async with store.transaction() as tx:
            await tx.saga_insert(saga("s1"))
            assert await store.get_saga("s1") is None
        assert await store.get_saga("s1") is not None


@pytest.mark.postgres
async def test_transactions_of_different_tasks_run_concurrently(make_store: MakeStore) -> None:
    async with opened(make_store()) as store:
        both_wrote, both_looked = asyncio.Barrier(2), asyncio.Barrier(2)

        async def work(name: str) -> None:
            async with store.transaction() as tx:
                await tx.inbox_add("c", name, now=1.0)
                await asyncio.wait_for(both_wrote.wait(), 5)  # would time out if serialised
                assert await store.inbox_ids("c") == set()  # neither sees the other's write
                await both_looked.wait()

        await asyncio.gather(work("a"), work("b"))
        assert await store.inbox_ids("c") == {"a", "b"}


@pytest.mark.postgres
async def test_saga_get_locks_the_row_until_commit(make_store: MakeStore) -> None:
    async with opened(make_store()) as store:
        async with store.transaction() as tx:
            await tx.saga_insert(saga("s1"))
        locked = asyncio.Event()
        order: list[str] = []

        async def first() -> None:
            async with store.transaction() as tx:
                loaded = await tx.saga_get("s1")
                assert loaded is not None
                locked.set()
                await asyncio.sleep(0.2)
                await tx.saga_update(moved(loaded, "FIRST"), expected_version=0)
                order.append("first commits")

        async def second() -> int:
            await locked.wait()
            async with store.transaction() as tx:
                loaded = await tx.saga_get("s1")  # waits for first's commit
                order.append("second loaded")
                assert loaded is not None
                await tx.saga_update(moved(loaded, "SECOND"), expected_version=loaded.version)
                return loaded.version

        _, seen = await asyncio.gather(first(), second())
        assert order == ["first commits", "second loaded"]
        assert seen == 1
        final = await store.get_saga("s1")
        assert final is not None and (final.version, final.status) == (2, "SECOND")


@pytest.mark.postgres
@pytest.mark.fault("F-CONCURRENT-TRANSITION")
async def test_concurrent_updates_of_one_saga_one_wins(make_store: MakeStore) -> None:
    async with opened(make_store()) as store:
        async with store.transaction() as tx:
            await tx.saga_insert(saga("s1"))
        both_read = asyncio.Barrier(2)

        async def transition(status: str) -> str:
            try:
                async with store.transaction() as tx:
                    loaded = await store.get_saga("s1")  # no lock: both read version 0
                    assert loaded is not None
                    await both_read.wait()
                    await tx.saga_update(moved(loaded, status), expected_version=0)
                    await asyncio.sleep(0.05)  # hold the row lock while the other waits
            except ConcurrencyError as exc:
                assert "it is at version 1" in str(exc)
                return "lost"
            return "won"

        assert sorted(await asyncio.gather(transition("A"), transition("B"))) == ["lost", "won"]
        final = await store.get_saga("s1")
        assert final is not None and final.version == 1


@pytest.mark.postgres
async def test_a_deadlock_is_a_concurrency_error(make_store: MakeStore) -> None:
    async with opened(make_store()) as store:
        async with store.transaction() as tx:
            await tx.saga_insert(saga("a"))
            await tx.saga_insert(saga("b"))
        both_locked = asyncio.Barrier(2)

        async def lock(first: str, then: str) -> str:
            try:
                async with store.transaction() as tx:
                    await tx.saga_get(first)
                    await both_locked.wait()
                    await tx.saga_get(then)
            except ConcurrencyError as exc:
                assert isinstance(exc.__cause__, psycopg.errors.DeadlockDetected)
                return "victim"
            return "done"

        outcomes = await asyncio.gather(lock("a", "b"), lock("b", "a"))
        assert sorted(outcomes) == ["done", "victim"]


@pytest.mark.postgres
@pytest.mark.fault("F-CONCURRENT-TRANSITION")
async def test_concurrent_outbox_claims_never_share_a_row(make_store: MakeStore) -> None:
    async with opened(make_store(max_size=10)) as store:
        async with store.transaction() as tx:
            await tx.outbox_add([envelope(f"m{i}") for i in range(300)], now=1.0)

        async def relay() -> list[int]:
            mine: list[int] = []
            while rows := await store.outbox_claim(7, now=0.0, lease=60.0):
                mine.extend(r.id for r in rows)
                await store.outbox_mark_published([r.id for r in rows], now=2.0)
            return mine

        claimed = await asyncio.gather(*(relay() for _ in range(8)))
        every = [row_id for ids in claimed for row_id in ids]
        assert len(every) == len(set(every)) == 300
        assert await store.outbox_pending() == 0


@pytest.mark.postgres
@pytest.mark.fault("F-CLOCK-JUMP")
async def test_outbox_leases_run_on_the_database_clock(make_store: MakeStore) -> None:
    async with opened(make_store()) as store:
        assert store.lease_clock == "database"
        async with store.transaction() as tx:
            await tx.outbox_add([envelope("m1"), envelope("m2")], now=1.0)
        [first, _] = await store.outbox_claim(10, now=0.0, lease=0.3)
        # A relay whose clock is far ahead cannot take the rows before the lease ends.
        assert await store.outbox_claim(10, now=1e12, lease=0.3) == []
        await store.outbox_mark_published([first.id], now=5.0)
        await asyncio.sleep(0.4)
        [again] = await store.outbox_claim(10, now=0.0, lease=0.3)
        assert again.envelope.message_id == "m2"


@pytest.mark.postgres
@pytest.mark.fault("F-CONCURRENT-TRANSITION", "F-STALE-TIMER")
async def test_concurrent_timer_takers_never_share_a_timer(make_store: MakeStore) -> None:
    async with opened(make_store()) as store:
        async with store.transaction() as tx:
            await tx.timers_set([Timer(f"s{i:03}", "step", float(i), "f") for i in range(200)])

        async def worker() -> list[str]:
            mine: list[str] = []
            while True:
                async with store.transaction() as tx:
                    taken = await tx.timers_take_due(1000.0, 5)
                    await asyncio.sleep(0.005)  # keep the transaction open: others overlap
                if not taken:
                    return mine
                mine.extend(t.saga_id for t in taken)

        taken = await asyncio.gather(*(worker() for _ in range(8)))
        every = [saga_id for ids in taken for saga_id in ids]
        assert len(every) == len(set(every)) == 200
        assert await store.next_timer_due() is None


@pytest.mark.postgres
async def test_taken_timers_are_skipped_not_waited_for(make_store: MakeStore) -> None:
    async with opened(make_store()) as store:
        async with store.transaction() as tx:
            await tx.timers_set([Timer("a", "step", 1.0, "f"), Timer("b", "step", 2.0, "f")])
        holding = asyncio.Event()
        release = asyncio.Event()

        async def slow_worker() -> None:
            async with store.transaction() as tx:
                assert len(await tx.timers_take_due(10.0, 1)) == 1
                holding.set()
                await release.wait()
                raise Boom  # rolls back: its timer comes back

        task = asyncio.create_task(slow_worker())
        await holding.wait()
        async with store.transaction() as tx:
            other = await asyncio.wait_for(tx.timers_take_due(10.0, 10), 2)
        assert other == [Timer("b", "step", 2.0, "f")]
        release.set()
        with pytest.raises(Boom):
            await task
        async with store.transaction() as tx:
            assert await tx.timers_take_due(10.0, 10) == [Timer("a", "step", 1.0, "f")]


@pytest.mark.postgres
async def test_concurrent_queue_fetches_never_share_a_message(make_store: MakeStore) -> None:
    async with opened(make_store()) as store:
        await store.queue_push("payments", [f"b{i}" for i in range(100)], now=1.0)

        async def consumer() -> list[str]:
            mine: list[str] = []
            while batch := await store.queue_fetch("payments", 3, now=2.0, lease=60.0):
                mine.extend(m.body for m in batch)
                await store.queue_ack([m.id for m in batch])
            return mine

        got = await asyncio.gather(*(consumer() for _ in range(6)))
        bodies = [b for part in got for b in part]
        assert sorted(bodies) == sorted(f"b{i}" for i in range(100))


# -- notifications ---------------------------------------------------------------------


async def next_note(notes: AsyncGenerator[tuple[str, str], None]) -> tuple[str, str]:
    return await asyncio.wait_for(anext(notes), 5)


@pytest.mark.postgres
async def test_commits_notify_listeners_and_rollbacks_do_not(make_store: MakeStore) -> None:
    async with opened(make_store(name="orders")) as store:
        notes = store.listen()
        try:
            # First, one wake-up per channel: whatever was sent before listening is lost.
            assert {await next_note(notes) for _ in range(3)} == {
                ("sagakit_outbox_orders", ""),
                ("sagakit_timers_orders", ""),
                ("sagakit_queue_orders", ""),
            }
            with pytest.raises(Boom):
                async with store.transaction() as tx:
                    await tx.outbox_add([envelope("lost")], now=1.0)
                    raise Boom
            async with store.transaction() as tx:
                await tx.timers_set([Timer("s1", "step", 5.0, "f")])
                await tx.timers_set([Timer("s2", "step", 2.5, "f"), Timer("s3", "step", 9.0, "f")])
            # Notifications arrive in commit order: none came from the rollback. The
            # timers one names the earliest due time the transaction set.
            assert await next_note(notes) == (store.timers_channel, "2.5")
            async with store.transaction() as tx:
                await tx.outbox_add([envelope("m1"), envelope("m2")], now=1.0)
                await tx.inbox_add("c", "m0", now=1.0)
            assert await next_note(notes) == (store.outbox_channel, "")
            await store.queue_push("payments", ["x"], now=1.0)
            assert await next_note(notes) == (store.queue_channel, "payments")
        finally:
            await notes.aclose()


@pytest.mark.postgres
@pytest.mark.fault("F-DB-CONNECTION-LOST")
async def test_listen_reconnects_and_wakes_everyone(make_store: MakeStore) -> None:
    name = f"l{uuid.uuid4().hex[:12]}"
    async with opened(make_store(name=name)) as store:
        notes = store.listen(store.outbox_channel, retry_every=0.05)
        try:
            assert await next_note(notes) == (store.outbox_channel, "")
            with psycopg.connect(PG_DSN, autocommit=True) as admin:
                killed = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s",
                    (f"sagakit {name} listen",),
                ).fetchall()
            assert killed == [(True,)]
            # Reconnected: notifications may have been missed, so it wakes the waiter.
            assert await next_note(notes) == (store.outbox_channel, "")
            async with store.transaction() as tx:
                await tx.outbox_add([envelope("m1")], now=1.0)
            assert await next_note(notes) == (store.outbox_channel, "")
        finally:
            await notes.aclose()


@pytest.mark.postgres
async def test_notify_can_be_turned_off(make_store: MakeStore) -> None:
    async with opened(make_store(notify=False)) as store:
        notes = store.listen(store.outbox_channel)
        try:
            assert await next_note(notes) == (store.outbox_channel, "")
            async with store.transaction() as tx:
                await tx.outbox_add([envelope("m1")], now=1.0)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(notes), 0.3)
        finally:
            await notes.aclose()


async def test_outbox_purge_skips_rows_another_transaction_holds(make_store: MakeStore) -> None:
    async with opened(make_store(max_size=4)) as store:
        async with store.transaction() as tx:
            await tx.outbox_add([envelope(f"m{i}") for i in range(5)], now=1.0)
        rows = await store.outbox_claim(10, now=1.0, lease=60.0)
        await store.outbox_mark_published([r.id for r in rows], now=2.0)
        async with store.transaction() as tx:
            await tx.fetchone("SELECT id FROM outbox WHERE message_id = ? FOR UPDATE", ("m0",))
            # Another task purges meanwhile: it neither waits for the lock nor fails.
            purge = asyncio.create_task(store.outbox_purge(10.0, batch=2))
            assert await asyncio.wait_for(purge, timeout=5.0) == 4
        assert [e.message_id for e, _ in await store.outbox_all()] == ["m0"]
        assert await store.outbox_purge(10.0) == 1


@pytest.mark.postgres
async def test_saga_counts_stay_exact_through_bulk_sql_folds_and_concurrent_writers(
    make_store: MakeStore,
) -> None:
    async with opened(make_store()) as store:
        async with store.transaction() as tx:
            await tx.saga_insert(saga("s1"))
            # Any writer of the table is counted (triggers), bulk statements included.
            await tx.execute(
                "INSERT INTO sagas (saga_id, definition, definition_version, business_key, "
                "state, status, version, cursor, correlation_id, created_at, updated_at, "
                "data, steps) SELECT 'bulk-' || i, 'checkout', 1, 'k-' || i, 'SUCCEEDED', "
                "'COMPLETED', 0, 0, 'c', 1.0, 1.0, '{}', '[]' FROM generate_series(1, 700) i"
            )
        assert await store.count_sagas() == {SagaState.RUNNING: 1, SagaState.SUCCEEDED: 700}

        async def finish(i: int) -> None:
            async with store.transaction() as tx:
                await tx.saga_insert(saga(f"c{i}"))
            async with store.transaction() as tx:
                loaded = await tx.saga_get(f"c{i}")
                assert loaded is not None
                loaded.state, loaded.version = SagaState.COMPENSATED, 1
                await tx.saga_update(loaded, expected_version=0)

        await asyncio.gather(*(finish(i) for i in range(300)))
        store.COUNT_DELTAS_FOLD_AT = 10
        expected = {SagaState.RUNNING: 1, SagaState.SUCCEEDED: 700, SagaState.COMPENSATED: 300}
        assert await store.count_sagas() == expected  # sums, then folds
        assert await store.count_sagas() == expected  # reads the folded rows
        async with store.transaction() as tx:
            assert await tx.fetchone("SELECT count(*) FROM saga_counts") == (3,)
            await tx.execute("DELETE FROM sagas WHERE saga_id LIKE 'bulk-%'")
        assert await store.count_sagas() == {SagaState.RUNNING: 1, SagaState.COMPENSATED: 300}


@pytest.mark.postgres
async def test_a_stale_update_sent_without_waiting_fails_before_anything_commits(
    make_store: MakeStore,
) -> None:
    async with opened(make_store()) as store:
        async with store.transaction() as tx:
            await tx.saga_insert(saga("s1"))
            await tx.saga_insert(saga("s2"))
        loaded = await store.get_saga("s1")
        assert loaded is not None
        # Raised at commit: the queued writes after it are rolled back with it.
        with pytest.raises(ConcurrencyError, match="expected version 5, but it is at version 0"):
            async with store.transaction() as tx:
                await tx.saga_update(moved(loaded, "STALE"), expected_version=5)
                await tx.timers_set([Timer("s1", "t", 9.0, "f")])
        assert await store.next_timer_due() is None
        # Raised by the next statement that waits for an answer.
        with pytest.raises(ConcurrencyError, match="ghost"):
            async with store.transaction() as tx:
                await tx.saga_update(moved(saga("ghost"), "X"), expected_version=0)
                await tx.saga_get("s2")
        # Several in flight: the good ones apply together.
        other = await store.get_saga("s2")
        assert other is not None
        async with store.transaction() as tx:
            await tx.saga_update(moved(loaded, "A"), expected_version=0)
            await tx.saga_update(moved(other, "B"), expected_version=0)
        assert [(await store.get_saga(i)) for i in ("s1", "s2")] == [
            moved(loaded, "A"),
            moved(other, "B"),
        ]


async def other_relay(store: PostgresStore, mark_at: float | None = None) -> list[str]:
    """What a second relay gets (and marks, with ``mark_at``) while the first holds rows."""
    async with store.outbox_locked(10, now=1.0, lease=5.0) as batch:
        if mark_at is not None:
            await batch.mark_published([r.id for r in batch.rows], now=mark_at)
        return [r.envelope.message_id for r in batch.rows]


@pytest.mark.postgres
async def test_a_locked_outbox_batch_is_held_marked_or_released(make_store: MakeStore) -> None:
    async with opened(make_store(max_size=4)) as store:
        async with store.transaction() as tx:
            await tx.outbox_add([envelope(f"m{i}") for i in range(4)], now=1.0)
        # A row leased by outbox_claim is not handed out until its lease ends.
        [leased] = await store.outbox_claim(1, now=1.0, lease=60.0)
        with pytest.raises(RuntimeError):
            async with store.outbox_locked(10, now=1.0, lease=5.0) as batch:
                assert [r.envelope.message_id for r in batch.rows] == ["m1", "m2", "m3"]
                # Another relay (task) meanwhile skips the locked rows instead of waiting.
                assert await asyncio.create_task(other_relay(store)) == []
                raise RuntimeError("the relay died mid-publish")
        # Rolled back: the rows are free at once (no lease to wait for).
        async with store.outbox_locked(2, now=1.0, lease=5.0) as batch:
            assert [r.envelope.message_id for r in batch.rows] == ["m1", "m2"]
            await batch.mark_published([r.id for r in batch.rows], now=2.0)
            await batch.dead_letter("nowhere", "m2", "{}", "unroutable: test", now=2.0)
        assert await store.outbox_pending() == 2  # m0 (leased) and m3
        assert [d.message_id for d in await store.dead_letters()] == ["m2"]
        published = {e.message_id: at for e, at in await store.outbox_all()}
        assert published == {"m0": None, "m1": 2.0, "m2": 2.0, "m3": None}
        assert leased.envelope.message_id == "m0"


@pytest.mark.postgres
@pytest.mark.fault("F-PROCESS-RESTART")
async def test_a_relay_stopped_inside_its_batch_loses_it_to_another(make_store: MakeStore) -> None:
    async with opened(make_store(max_size=4)) as store:
        async with store.transaction() as tx:
            await tx.outbox_add([envelope("m0")], now=1.0)
        with pytest.raises(StoreError):
            async with store.outbox_locked(10, now=1.0, lease=0.2) as batch:
                assert len(batch.rows) == 1
                await asyncio.sleep(1.0)  # "stopped" longer than its lease
                # The server ended the session: another relay already has the row.
                assert await asyncio.create_task(other_relay(store, mark_at=2.0)) == ["m0"]
                await batch.mark_published([r.id for r in batch.rows], now=3.0)
        assert [at for _, at in await store.outbox_all()] == [2.0]


@pytest.mark.postgres
@pytest.mark.parametrize("n", [3, 20], ids=["row-by-row", "arrays"])
async def test_buffered_writes_apply_and_refuse_alike_in_both_forms(
    make_store: MakeStore, n: int
) -> None:
    """Few rows go out one statement each, many as one statement with arrays."""
    ids = [f"s{i:02d}" for i in range(n)]
    async with opened(make_store()) as store:
        async with store.transaction() as tx:
            await tx.saga_insert_many([saga(i) for i in ids])
            await tx.history_add([history(i, "started") for i in ids])
            # Whole-number times among floats: one array of mixed ints and floats.
            await tx.timers_set(
                [
                    Timer(i, "deadline", 50 + k if k % 2 else 50.5 + k, "f")
                    for k, i in enumerate(ids)
                ]
            )
            await tx.outbox_add([envelope(f"m-{i}") for i in ids], now=1.0)
        async with store.transaction() as tx:
            loaded = await tx.saga_get_many(ids)
            for i in ids:
                await tx.saga_update(moved(loaded[i], "PENDING_INVENTORY"), 0)
            await tx.timers_cancel(ids[0], ["deadline"])
        assert {(await store.get_saga(i) or saga()).version for i in ids} == {1}
        assert [h.event for h in await store.history(ids[-1])] == ["started"]
        assert await store.outbox_pending() == n
        async with store.transaction() as tx:
            due = await tx.timers_take_due(1000.0, 100)
        assert [t.saga_id for t in due] == ids[1:]
        # One stale update among many: the whole transaction is refused, naming it.
        with pytest.raises(ConcurrencyError, match=f"saga {ids[-1]} was not updated"):
            async with store.transaction() as tx:
                loaded = await tx.saga_get_many(ids)
                for i in ids[:-1]:
                    await tx.saga_update(moved(loaded[i], "COMPLETING"), 1)
                await tx.saga_update(moved(loaded[ids[-1]], "COMPLETING"), 0)
        assert {(await store.get_saga(i) or saga()).status for i in ids} == {"PENDING_INVENTORY"}
        # A saga that exists already among many new ones: refused, nothing inserted.
        with pytest.raises(ConcurrencyError, match=f"saga {ids[0]} already exists"):
            async with store.transaction() as tx:
                await tx.saga_insert_many([saga(f"new{i}") for i in range(n)] + [saga(ids[0])])
        assert await store.get_saga("new0") is None


@pytest.mark.postgres
async def test_a_relay_into_its_own_store_claims_instead_of_locking(make_store: MakeStore) -> None:
    """The embedded transport writes into stores: never inside the relay's transaction."""
    from sagakit.runtime.relay import Relay
    from sagakit.transports.embedded import EmbeddedTransport

    async with opened(make_store()) as store:
        async with store.transaction() as tx:
            await tx.outbox_add([replace(envelope("m0"), destination="payments")], now=1.0)
        relay = Relay(store, EmbeddedTransport({"payments": store}))
        assert await relay.relay_once() == 1
        assert await store.outbox_pending() == 0
        assert await store.queue_depth("payments") == 1


@pytest.mark.postgres
async def test_the_last_writes_check_themselves_and_their_commit(make_store: MakeStore) -> None:
    """The writes sent with COMMIT fail the transaction when a saga is not written:
    nothing of it commits, and the refusal names the saga and why (sagakit_refuse)."""
    async with opened(make_store()) as store:
        async with store.transaction() as tx:
            await tx.saga_insert(saga("s1"))
        taken = replace(saga("other"), business_key="order-s1")
        with pytest.raises(
            ConcurrencyError, match="a checkout saga already exists for business key 'order-s1'"
        ):
            async with store.transaction() as tx:
                await tx.saga_insert_many([saga("s2"), taken])
                await tx.history_add([history("s2", "started")])
        with pytest.raises(
            ConcurrencyError,
            match="saga ghost was not updated: expected version 0, but it does not exist",
        ):
            async with store.transaction() as tx:
                await tx.saga_update(moved(saga("ghost"), "X"), expected_version=0)
                await tx.outbox_add([envelope("m-ghost")], now=1.0)
                await tx.timers_set([Timer("s1", "t", 9.0, "f")])
        assert await store.get_saga("s2") is None and await store.history("s2") == []
        assert await store.outbox_pending() == 0 and await store.next_timer_due() is None
        # The connection went back to the pool clean: the next transaction works.
        async with store.transaction() as tx:
            loaded = await tx.saga_get("s1")
            assert loaded is not None
            await tx.saga_update(moved(loaded, "PAID"), expected_version=0)
        assert (await store.get_saga("s1") or saga()).status == "PAID"


@pytest.mark.postgres
async def test_a_transaction_that_only_writes_is_one_statement_without_begin(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BEGIN waits for the first statement: a transaction whose writes are all buffered
    sends them as one statement in autocommit, atomic on its own; one that reads sends
    BEGIN with its first statement and COMMIT at the end, as always."""
    sent: list[str] = []
    execute = psycopg.AsyncCursor.execute

    async def spy(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        words = str(query).split(None, 1)
        if words:  # not the pool's check of an idle connection (an empty query)
            sent.append(words[0])
        return await execute(self, query, *args, **kwargs)

    async with opened(make_store()) as store:
        monkeypatch.setattr(psycopg.AsyncCursor, "execute", spy)
        async with store.transaction() as tx:
            await tx.saga_insert_many([saga("s1")])
            await tx.outbox_add([envelope("m1")], now=1.0)
        assert sent == ["WITH"]
        sent.clear()
        # Refused as one statement: nothing of it stays, the error names the saga.
        with pytest.raises(ConcurrencyError, match="saga s1 was not updated"):
            async with store.transaction() as tx:
                await tx.saga_update(moved(saga("s1"), "X"), expected_version=7)
                await tx.outbox_add([envelope("m2")], now=1.0)
        assert sent[0] == "WITH" and "BEGIN" not in sent and "ROLLBACK" not in sent
        assert await store.outbox_pending() == 1
        sent.clear()
        async with store.transaction() as tx:
            loaded = await tx.saga_get("s1")
            assert loaded is not None
            await tx.saga_update(moved(loaded, "PAID"), expected_version=0)
        assert sent[0] == "BEGIN" and sent[-1] == "COMMIT"
        sent.clear()
        async with store.transaction():  # nothing at all: nothing sent
            pass
        with pytest.raises(Boom):
            async with store.transaction() as tx:
                await tx.outbox_add([envelope("m3")], now=1.0)
                raise Boom
        assert sent == [] and await store.outbox_pending() == 1
        monkeypatch.undo()
        assert (await store.get_saga("s1") or saga()).status == "PAID"


@pytest.mark.postgres
async def test_timer_loops_are_told_only_of_a_timer_sooner_than_the_last_one(
    make_store: MakeStore,
) -> None:
    async with opened(make_store(name="trips")) as store:
        notes = store.listen()
        try:
            assert {await next_note(notes) for _ in range(3)} == {
                ("sagakit_outbox_trips", ""),
                ("sagakit_timers_trips", ""),
                ("sagakit_queue_trips", ""),
            }
            ahead = time.time() + 3600
            for n, due in enumerate((ahead, ahead + 60, ahead + 30, ahead - 60)):
                async with store.transaction() as tx:
                    await tx.timers_set([Timer(f"s{n}", "step", due, "f")])
            async with store.transaction() as tx:
                await tx.outbox_add([envelope("m1")], now=1.0)  # a marker: commit order
            # Told of the first, then only of the one due before it; the two later ones
            # are found by the loops when they look at the first (or sooner).
            assert await next_note(notes) == (store.timers_channel, repr(ahead))
            assert await next_note(notes) == (store.timers_channel, repr(ahead - 60))
            assert await next_note(notes) == (store.outbox_channel, "")
        finally:
            await notes.aclose()


@pytest.mark.postgres
async def test_a_buffered_idempotency_key_recorded_meanwhile_is_refused(
    make_store: MakeStore,
) -> None:
    async with opened(make_store()) as store:
        async with store.transaction() as tx:
            await tx.idempotency_put("payments", "k1", {"ok": True}, now=1.0)
        # Refused by the statement sent with COMMIT: nothing of the transaction stays.
        with pytest.raises(StoreError, match="idempotency key 'k1' of consumer 'payments'"):
            async with store.transaction() as tx:
                await tx.idempotency_put("payments", "k1", {"ok": False}, now=2.0)
                await tx.outbox_add([envelope("m-1")], now=2.0)
        assert await store.outbox_pending() == 0
        # Refused by the next statement that waits for an answer.
        with pytest.raises(StoreError, match="'k1' of consumer 'payments' is already recorded"):
            async with store.transaction() as tx:
                await tx.idempotency_put("payments", "k1", {"ok": False}, now=2.0)
                await tx.inbox_add("payments", "m-2", now=2.0)
        assert await store.inbox_ids("payments") == set()
        # Two transactions recording one key at once: the second waits, then is refused.
        both = asyncio.Barrier(2)

        async def record(outcome: str) -> str:
            try:
                async with store.transaction() as tx:
                    await tx.idempotency_put("payments", "k2", {"ok": outcome}, now=3.0)
                    await both.wait()
            except StoreError:
                return "refused"
            return "recorded"

        assert sorted(await asyncio.gather(record("a"), record("b"))) == ["recorded", "refused"]
