"""Starting sagas in your own transaction, for every supported driver, both ways.

Each driver (sqlite3; psycopg sync and async; SQLAlchemy Connection, Session,
AsyncConnection and AsyncSession, on SQLite and on PostgreSQL where the driver
applies) inserts a booking row with its own library and starts the booking saga in the
same transaction, then:

* rolls back: no saga, no outbox row, no booking;
* commits with an engine running in the process: the first command is delivered once
  and the saga runs to its end;
* commits with no engine anywhere (a crash between the commit and the publish): a fresh
  engine started afterwards publishes the command, once.

The sync drivers do it once more in a test without any event loop (``start_in_sync``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from own_tx_support import (
    BOOKING,
    Site,
    assert_succeeded_once,
    driver_params,
    engine_for,
    finish_with_fresh_engine,
    hotel,
    make_site,
    maybe,
    open_handle,
    open_sync,
    saga_state,
)

from sagakit import (
    ConfigurationError,
    Engine,
    SagaDefinition,
    SagaState,
    Step,
    StepContext,
    local,
    start_in,
    start_in_sync,
)
from sagakit.stores.sqlite import SQLiteStore


@pytest.fixture
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    with make_site(request.node.callspec.params["backend"], tmp_path) as s:
        yield s


@pytest.fixture
def sqlite_site(tmp_path: Path) -> Iterator[Site]:
    with make_site("sqlite", tmp_path) as s:
        yield s


@pytest.fixture
def pg_site(tmp_path: Path) -> Iterator[Site]:
    with make_site("postgres", tmp_path) as s:
        yield s


def schema_of(site: Site) -> str | None:
    return site.schema("orchestrator") if site.postgres else None


@pytest.mark.parametrize(("backend", "driver"), driver_params())
async def test_rollback_leaves_nothing(site: Site, backend: str, driver: str) -> None:
    async with open_handle(site, driver) as h:
        before = await maybe(h.search_path())
        await maybe(h.insert("b-1"))
        (inst,) = await start_in(
            h.obj, [BOOKING], [("booking", "b-1", {"nights": 2})], schema=schema_of(site)
        )
        assert inst.business_key == "b-1" and inst.state is SagaState.RUNNING
        # Your search_path is yours again once sagakit has written its rows.
        assert await maybe(h.search_path()) == before
        await maybe(h.rollback())
    assert site.rows("bookings") == []
    assert await saga_state(site, "b-1") == (None, 0)


@pytest.mark.parametrize(("backend", "driver"), driver_params())
async def test_commit_with_a_running_engine_delivers_the_first_command_once(
    site: Site, backend: str, driver: str
) -> None:
    h_hotel = hotel(site)
    async with engine_for(site, [h_hotel.participant]) as engine:
        async with open_handle(site, driver) as h:
            await maybe(h.insert("b-2"))
            inst = await engine.start("booking", "b-2", {"nights": 1}, tx=h.obj)
            # Not committed: nothing of it is visible, nothing is published.
            assert await engine.store.get_saga(inst.saga_id) is None
            if site.postgres:
                # (Not on SQLite: an open write transaction there holds the file's only
                # write lock, and the engine's loops would wait for it, blocking.)
                await asyncio.sleep(0.2)
                assert h_hotel.booked == []
            await maybe(h.commit())
        done = await engine.wait(inst.saga_id, timeout=20)
        outbox = await engine.store.outbox_of_saga(inst.saga_id)
    assert_succeeded_once(done, h_hotel.booked, "b-2")
    assert done.steps[1].result == {"confirmed": "b-2"}
    assert site.rows("bookings") == ["b-2"]
    assert all(published is not None for _, published in outbox)


@pytest.mark.parametrize(("backend", "driver"), driver_params())
async def test_commit_without_an_engine_is_published_later_once(
    site: Site, backend: str, driver: str
) -> None:
    async with open_handle(site, driver) as h:
        await maybe(h.insert("b-3"))
        (first,) = await start_in(
            h.obj, [BOOKING], [("booking", "b-3", {})], schema=schema_of(site)
        )
        await maybe(h.commit())
    # The process "crashed" here: committed, published by nobody.
    inst, outbox_rows = await saga_state(site, "b-3")
    assert inst is not None and inst.saga_id == first.saga_id
    assert outbox_rows == 1
    # Starting it again (a retried request) finds the same saga and writes nothing.
    async with open_handle(site, driver) as h:
        (again,) = await start_in(
            h.obj, [BOOKING], [("booking", "b-3", {})], schema=schema_of(site)
        )
        await maybe(h.commit())
    assert again.saga_id == first.saga_id
    assert (await saga_state(site, "b-3"))[1] == 1
    done, booked = await finish_with_fresh_engine(site, "b-3")
    assert_succeeded_once(done, booked, "b-3")
    assert site.rows("bookings") == ["b-3"]


@pytest.mark.parametrize(("backend", "driver"), driver_params(only_sync=True))
def test_sync_start_needs_no_event_loop(site: Site, backend: str, driver: str) -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    with open_sync(site, driver) as h:
        h.insert("b-4")
        (inst,) = start_in_sync(h.obj, [BOOKING], [("booking", "b-4", {})], schema=schema_of(site))
        h.rollback()
        h.insert("b-5")
        (kept,) = start_in_sync(h.obj, [BOOKING], [("booking", "b-5", {})], schema=schema_of(site))
        h.commit()
    assert inst.business_key == "b-4"
    assert site.rows("bookings") == ["b-5"]
    assert asyncio.run(saga_state(site, "b-4")) == (None, 1)  # b-5's command only
    done, booked = asyncio.run(finish_with_fresh_engine(site, "b-5"))
    assert done.saga_id == kept.saga_id
    assert_succeeded_once(done, booked, "b-5")


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_a_first_local_step_goes_through_the_outbox(site: Site, backend: str) -> None:
    ran: list[str] = []

    def note(ctx: StepContext) -> dict[str, Any]:
        ran.append(ctx.business_key)
        return {}

    errand = SagaDefinition("errand", [Step("note", local(note))])
    driver = "sqlite3" if backend == "sqlite" else "psycopg"
    async with Engine(site.store("orchestrator"), [errand], idle_poll=0.05) as engine:
        assert engine.orchestrator.direct_local  # the embedded engine's shortcut is on
        async with open_handle(site, driver) as h:
            inst = await engine.start("errand", "e-1", {}, tx=h.obj)
            await maybe(h.commit())
        done = await engine.wait(inst.saga_id, timeout=20)
        outbox = await engine.store.outbox_of_saga(inst.saga_id)
    assert done.state is SagaState.SUCCEEDED
    assert ran == ["e-1"]
    assert [e.destination for e, _ in outbox] == ["orchestrator.local"]


# -- refusals ------------------------------------------------------------------------------


def test_sqlite_autocommit_connection_is_refused(tmp_path: Path) -> None:
    with make_site("sqlite", tmp_path) as site:
        conn = sqlite3.connect(site.file("orchestrator"), isolation_level=None)
        try:
            with pytest.raises(ConfigurationError, match="autocommit"):
                start_in_sync(conn, [BOOKING], [("booking", "a-1", {})])
            conn.execute("BEGIN")  # inside a transaction of yours it is fine
            start_in_sync(conn, [BOOKING], [("booking", "a-1", {})])
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        assert asyncio.run(saga_state(site, "a-1")) == (None, 0)


def test_sqlalchemy_autocommit_connection_is_refused(tmp_path: Path) -> None:
    import sqlalchemy as sa

    with make_site("sqlite", tmp_path) as site:
        engine = sa.create_engine(site.url("orchestrator"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn, pytest.raises(ConfigurationError, match="autocommit"):
                start_in_sync(conn, [BOOKING], [("booking", "a-2", {})])
        finally:
            engine.dispose()
        assert asyncio.run(saga_state(site, "a-2")) == (None, 0)


@pytest.mark.postgres
def test_psycopg_autocommit_connection_is_refused(tmp_path: Path) -> None:
    import psycopg

    with make_site("postgres", tmp_path) as site:
        schema = site.schema("orchestrator")
        with psycopg.connect(site.user_dsn, autocommit=True) as pg:
            with pytest.raises(ConfigurationError, match="autocommit"):
                start_in_sync(pg, [BOOKING], [("booking", "a-3", {})], schema=schema)
            with pg.transaction():  # an explicit transaction in autocommit mode is fine
                pg.execute("INSERT INTO bookings VALUES ('a-3')")
                start_in_sync(pg, [BOOKING], [("booking", "a-3", {})], schema=schema)
        inst, outbox_rows = asyncio.run(saga_state(site, "a-3"))
        assert inst is not None and outbox_rows == 1
        assert site.rows("bookings") == ["a-3"]


@pytest.mark.postgres
def test_a_schema_without_sagakit_tables_is_refused_and_your_transaction_goes_on(
    tmp_path: Path,
) -> None:
    import psycopg

    with make_site("postgres", tmp_path) as site, psycopg.connect(site.user_dsn) as pg:
        pg.execute("INSERT INTO bookings VALUES ('s-1')")
        path = pg.execute("SHOW search_path").fetchone()
        with pytest.raises(ConfigurationError, match="no sagakit tables"):
            start_in_sync(pg, [BOOKING], [("booking", "s-1", {})], schema=site.app_schema)
        assert pg.execute("SHOW search_path").fetchone() == path
        pg.commit()
        assert site.rows("bookings") == ["s-1"]


async def test_a_connection_to_another_file_is_refused(sqlite_site: Site) -> None:
    site = sqlite_site
    engine = Engine(SQLiteStore(site.file("orchestrator"), name="orchestrator"), [BOOKING])
    conn = sqlite3.connect(site.file("hotel"))
    mem = sqlite3.connect(":memory:")
    try:
        with pytest.raises(ConfigurationError, match="must go into the store's file"):
            await engine.start("booking", "f-1", {}, tx=conn)
        with pytest.raises(ConfigurationError, match="in-memory"):
            await engine.start("booking", "f-1", {}, tx=mem)
    finally:
        conn.close()
        mem.close()


def test_a_database_without_sagakit_tables_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "plain.db")
    try:
        with pytest.raises(ConfigurationError, match="no sagakit tables"):
            start_in_sync(conn, [BOOKING], [("booking", "t-1", {})])
    finally:
        conn.close()


@pytest.mark.postgres
async def test_the_sync_function_refuses_async_connections(pg_site: Site) -> None:
    import psycopg

    pg = await psycopg.AsyncConnection.connect(pg_site.user_dsn)
    try:
        with pytest.raises(ConfigurationError, match=r"await start_in"):
            start_in_sync(pg, [BOOKING], [("booking", "x-1", {})])
    finally:
        await pg.close()


def test_something_else_than_a_connection_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"sqlite3\.Connection, a psycopg Connection"):
        start_in_sync(object(), [BOOKING], [("booking", "x-2", {})])


def test_your_row_factory_does_not_matter(tmp_path: Path) -> None:
    with make_site("sqlite", tmp_path) as site:
        conn = sqlite3.connect(site.file("orchestrator"))
        conn.row_factory = lambda cursor, row: {"row": row}
        try:
            conn.execute("INSERT INTO bookings VALUES ('r-1')")
            (inst,) = start_in_sync(conn, [BOOKING], [("booking", "r-1", {})])
            (again,) = start_in_sync(conn, [BOOKING], [("booking", "r-1", {})])
            assert again.saga_id == inst.saga_id
            conn.commit()
        finally:
            conn.close()
        found, outbox_rows = asyncio.run(saga_state(site, "r-1"))
        assert found is not None and found.saga_id == inst.saga_id and outbox_rows == 1


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_sagakits_own_tx_works_too(site: Site, backend: str) -> None:
    h_hotel = hotel(site)
    # sagakit's Tx sees the store's schema: your table is qualified on PostgreSQL.
    insert = (
        f'INSERT INTO "{site.app_schema}".bookings' if site.postgres else "INSERT INTO bookings"
    )
    insert += " (id) VALUES (?)"
    async with engine_for(site, [h_hotel.participant]) as engine:
        with pytest.raises(RuntimeError, match="changed my mind"):
            async with engine.store.transaction() as tx:
                await tx.execute(insert, ("o-1",))
                await engine.start("booking", "o-1", {}, tx=tx)
                raise RuntimeError("changed my mind")
        async with engine.store.transaction() as tx:
            await tx.execute(insert, ("o-2",))
            inst = await engine.start("booking", "o-2", {}, tx=tx)
        done = await engine.wait(inst.saga_id, timeout=20)
        assert await engine.store.get_saga_by_key("booking", "o-1") is None
    assert_succeeded_once(done, h_hotel.booked, "o-2")
    assert site.rows("bookings") == ["o-2"]


def test_the_canary_picks_versions_as_the_workers_would(tmp_path: Path) -> None:
    v2 = SagaDefinition("booking", BOOKING.steps, version=2)
    requests: list[tuple[str, str, dict[str, Any]]] = [("booking", f"c-{n}", {}) for n in range(40)]
    with make_site("sqlite", tmp_path) as site:
        conn = sqlite3.connect(site.file("orchestrator"))
        try:
            started = start_in_sync(conn, [BOOKING, v2], requests, canary={"booking": 0.5})
            conn.commit()
        finally:
            conn.close()

    async def by_an_engine() -> list[int]:
        store = SQLiteStore(tmp_path / "engine.db", name="orchestrator")
        async with Engine(store, [BOOKING, v2], roles=set(), canary={"booking": 0.5}) as engine:
            return [i.definition_version for i in await engine.start_many(requests)]

    versions = [i.definition_version for i in started]
    assert versions == asyncio.run(by_an_engine())
    assert set(versions) == {1, 2}
