"""Plumbing of the own-transaction tests: sites, your connections per driver, a saga.

A *site* is where one test's databases live: SQLite files in a temporary directory, or
PostgreSQL schemas with a unique prefix (dropped afterwards). Your business tables are
``bookings`` (next to the orchestrator's tables: a saga starts in the transaction that
inserts a booking) and ``rooms`` (next to the hotel participant's tables). On SQLite
they are in the stores' files; on PostgreSQL in the schema ``<prefix>_app``, which is
your connections' search_path, while sagakit's tables are in ``<prefix>_<store>``.

A *driver* opens your connection (or session) the way an application would, and gives
the test its object, a business insert, commit and rollback: sync drivers' methods
return plain values, async drivers' return awaitables (see :func:`maybe`).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sagakit import (
    Engine,
    Envelope,
    MessageKind,
    Participant,
    SagaDefinition,
    SagaInstance,
    SagaState,
    Step,
    StepContext,
    command,
    local,
)
from sagakit.stores.base import SQLStore
from sagakit.stores.sqlite import SQLiteStore

PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

_ids = itertools.count(1)


def _confirm(ctx: StepContext) -> dict[str, Any]:
    return {"confirmed": ctx.business_key}


BOOKING = SagaDefinition(
    "booking",
    [
        Step("hotel", command("hotel", "BookHotel"), command("hotel", "CancelHotel"), timeout=10),
        Step("confirm", local(_confirm)),
    ],
)
"""The saga started in your transaction: a command to the hotel, then a local step."""


async def maybe(value: Any) -> Any:
    """``value``, awaited if it is awaitable (a sync driver's result is plain)."""
    return await value if inspect.isawaitable(value) else value


# -- sites -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Site:
    backend: str  # "sqlite" or "postgres"
    path: Path
    prefix: str

    @property
    def postgres(self) -> bool:
        return self.backend == "postgres"

    def schema(self, store: str) -> str:
        return f"{self.prefix}_{store}"

    @property
    def app_schema(self) -> str:
        return f"{self.prefix}_app"

    def file(self, store: str) -> Path:
        return self.path / f"{store}.db"

    def store(self, name: str) -> SQLStore:
        """A new, unopened sagakit store."""
        if self.postgres:
            from sagakit.stores.postgres import PostgresStore

            return PostgresStore(PG_DSN, name=name, schema=self.schema(name))
        return SQLiteStore(self.file(name), name=name, synchronous="NORMAL")

    @property
    def user_dsn(self) -> str:
        """PostgreSQL: your connections' DSN (your schema on the search_path)."""
        return f"{PG_DSN}?options=-csearch_path%3D{self.app_schema}"

    def url(self, store: str, *, asynchronous: bool = False) -> str:
        """A SQLAlchemy URL of your database (the store's file on SQLite)."""
        if self.postgres:
            return self.user_dsn.replace("postgresql://", "postgresql+psycopg://")
        if asynchronous:
            raise ValueError("no async SQLAlchemy on SQLite (aiosqlite is refused)")
        return f"sqlite:///{self.file(store)}"

    def prepare(self) -> None:
        """Create sagakit's tables (opening the stores once) and your business tables."""

        async def open_stores() -> None:
            for name in ("orchestrator", "hotel"):
                store = self.store(name)
                await store.open()
                await store.close()

        asyncio.run(open_stores())
        if self.postgres:
            import psycopg

            with psycopg.connect(PG_DSN, autocommit=True) as pg:
                pg.execute(f'CREATE SCHEMA "{self.app_schema}"')
                pg.execute(f'CREATE TABLE "{self.app_schema}".bookings (id text PRIMARY KEY)')
                pg.execute(f'CREATE TABLE "{self.app_schema}".rooms (id text PRIMARY KEY)')
            return
        for store, table in (("orchestrator", "bookings"), ("hotel", "rooms")):
            conn = sqlite3.connect(self.file(store))
            with conn:
                conn.execute(f"CREATE TABLE {table} (id TEXT PRIMARY KEY)")
            conn.close()

    def rows(self, table: str) -> list[str]:
        """Your committed business rows (``bookings`` or ``rooms``), sorted."""
        if self.postgres:
            import psycopg

            with psycopg.connect(self.user_dsn) as pg:
                found = pg.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()
            return [r[0] for r in found]
        store = "orchestrator" if table == "bookings" else "hotel"
        conn = sqlite3.connect(self.file(store))
        try:
            return [r[0] for r in conn.execute(f"SELECT id FROM {table} ORDER BY id")]
        finally:
            conn.close()

    def drop(self) -> None:
        if not self.postgres:
            return
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as pg:
            for schema in (self.schema("orchestrator"), self.schema("hotel"), self.app_schema):
                pg.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextmanager
def make_site(backend: str, tmp_path: Path) -> Iterator[Site]:
    if backend == "postgres":
        pytest.importorskip("psycopg", reason="needs the sagakit[postgres] extra")
    site = Site(backend, tmp_path, f"t_own_{uuid.uuid4().hex[:12]}")
    try:
        site.prepare()
        yield site
    finally:
        site.drop()


# -- your connections, per driver ---------------------------------------------------------


@dataclass
class Handle:
    """Your open connection or session: ``obj`` is what sagakit is given."""

    obj: Any
    sync: bool
    insert: Callable[[str], Any]  # a business row in ``bookings``, with your library
    commit: Callable[[], Any]
    rollback: Callable[[], Any]
    search_path: Callable[[], Any]  # PostgreSQL: your connection's search_path now


START_DRIVERS = {
    "sqlite": ["sqlite3", "sqlalchemy-connection", "sqlalchemy-session"],
    "postgres": [
        "psycopg",
        "psycopg-async",
        "sqlalchemy-connection",
        "sqlalchemy-session",
        "sqlalchemy-async-connection",
        "sqlalchemy-async-session",
    ],
}
SYNC_DRIVERS = {"sqlite3", "psycopg", "sqlalchemy-connection", "sqlalchemy-session"}


def driver_params(only_sync: bool = False) -> list[Any]:
    """``(backend, driver)`` pairs for parametrize, PostgreSQL ones marked."""
    params = []
    for backend, drivers in START_DRIVERS.items():
        marks = [pytest.mark.postgres] if backend == "postgres" else []
        for driver in drivers:
            if only_sync and driver not in SYNC_DRIVERS:
                continue
            params.append(pytest.param(backend, driver, marks=marks, id=f"{backend}-{driver}"))
    return params


def _table(store: str) -> str:
    return "bookings" if store == "orchestrator" else "rooms"


def _no_path() -> str:
    return ""


@contextmanager
def open_sync(site: Site, driver: str, store: str = "orchestrator") -> Iterator[Handle]:
    """Your connection to ``store``'s database through a sync driver (no event loop
    needed); ``insert`` writes into the business table next to that store."""
    table = _table(store)
    if driver == "sqlite3":
        conn = sqlite3.connect(site.file(store))
        try:
            yield Handle(
                conn,
                True,
                lambda key: conn.execute(f"INSERT INTO {table} (id) VALUES (?)", (key,)),
                conn.commit,
                conn.rollback,
                _no_path,
            )
        finally:
            conn.close()
    elif driver == "psycopg":
        import psycopg

        with psycopg.connect(site.user_dsn) as pg:
            yield Handle(
                pg,
                True,
                lambda key: pg.execute(f"INSERT INTO {table} (id) VALUES (%s)", (key,)),
                pg.commit,
                pg.rollback,
                lambda: pg.execute("SHOW search_path").fetchone()[0],  # type: ignore[index]
            )
    elif driver in ("sqlalchemy-connection", "sqlalchemy-session"):
        import sqlalchemy as sa
        from sqlalchemy.orm import Session

        engine = sa.create_engine(site.url(store))
        try:
            with engine.connect() if driver == "sqlalchemy-connection" else Session(engine) as c:

                def path() -> str:
                    return str(c.execute(sa.text("SHOW search_path")).scalar())

                yield Handle(
                    c,
                    True,
                    lambda key: c.execute(
                        sa.text(f"INSERT INTO {table} (id) VALUES (:id)"), {"id": key}
                    ),
                    c.commit,
                    c.rollback,
                    path if site.postgres else _no_path,
                )
        finally:
            engine.dispose()
    else:
        raise ValueError(driver)


@asynccontextmanager
async def open_handle(
    site: Site, driver: str, store: str = "orchestrator"
) -> AsyncIterator[Handle]:
    """Your connection to ``store``'s database through any driver (see :func:`open_sync`)."""
    table = _table(store)
    if driver in SYNC_DRIVERS:
        with open_sync(site, driver, store) as handle:
            yield handle
    elif driver == "psycopg-async":
        import psycopg

        pg = await psycopg.AsyncConnection.connect(site.user_dsn)

        async def path() -> str:
            row = await (await pg.execute("SHOW search_path")).fetchone()
            assert row is not None
            return str(row[0])

        try:
            yield Handle(
                pg,
                False,
                lambda key: pg.execute(f"INSERT INTO {table} (id) VALUES (%s)", (key,)),
                pg.commit,
                pg.rollback,
                path,
            )
        finally:
            await pg.close()
    elif driver in ("sqlalchemy-async-connection", "sqlalchemy-async-session"):
        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

        engine = create_async_engine(site.url(store, asynchronous=True))
        opened = (
            engine.connect() if driver == "sqlalchemy-async-connection" else AsyncSession(engine)
        )
        try:
            async with opened as c:

                async def apath() -> str:
                    return str((await c.execute(sa.text("SHOW search_path"))).scalar())

                yield Handle(
                    c,
                    False,
                    lambda key: c.execute(
                        sa.text(f"INSERT INTO {table} (id) VALUES (:id)"), {"id": key}
                    ),
                    c.commit,
                    c.rollback,
                    apath,
                )
        finally:
            await engine.dispose()
    else:
        raise ValueError(driver)


# -- the engine side -------------------------------------------------------------------------


@dataclass
class Hotel:
    """The hotel participant (sagakit's own transactions) and what its handler saw."""

    participant: Participant
    booked: list[str]  # business keys, once per handler call


def hotel(site: Site) -> Hotel:
    booked: list[str] = []
    p = Participant("hotel", site.store("hotel"))

    @p.handles("BookHotel")
    async def book(tx: Any, env: Envelope) -> dict[str, Any]:
        booked.append(env.business_key or "")
        return {"room": env.business_key}

    @p.handles("CancelHotel")
    async def cancel(tx: Any, env: Envelope) -> dict[str, Any]:
        return {}

    return Hotel(p, booked)


def engine_for(site: Site, participants: list[Participant]) -> Engine:
    """An embedded engine on the site's stores (relays, timers, orchestrator, hotel)."""
    return Engine(site.store("orchestrator"), [BOOKING], participants=participants, idle_poll=0.05)


async def saga_state(site: Site, key: str) -> tuple[SagaInstance | None, int]:
    """The committed saga of ``key`` (or None) and the orchestrator's outbox row count."""
    store = site.store("orchestrator")
    await store.open()
    try:
        inst = await store.get_saga_by_key("booking", key)
        return inst, len(await store.outbox_all())
    finally:
        await store.close()


async def finish_with_fresh_engine(site: Site, key: str) -> tuple[SagaInstance, list[str]]:
    """Run a fresh engine until the saga of ``key`` ends; its state and the hotel's calls."""
    h = hotel(site)
    async with engine_for(site, [h.participant]) as engine:
        inst = await engine.store.get_saga_by_key("booking", key)
        assert inst is not None, f"no saga for {key!r}"
        done = await engine.wait(inst.saga_id, timeout=20)
    return done, h.booked


def assert_succeeded_once(done: SagaInstance, booked: list[str], key: str) -> None:
    assert done.state is SagaState.SUCCEEDED, (done.state, done.reason)
    assert booked == [key], f"BookHotel handled {booked.count(key)} times"


# -- commands as the orchestrator sends them -----------------------------------------------


def book_command(key: str, *, type_: str = "BookHotel") -> Envelope:
    saga = f"saga-{next(_ids)}"
    return Envelope(
        message_id=f"{saga}:1:0",
        type=type_,
        kind=MessageKind.COMMAND,
        source="orchestrator",
        destination="hotel",
        correlation_id=saga,
        occurred_at=time.time(),
        payload={"key": key},
        saga_id=saga,
        business_key=key,
        step="hotel",
        attempt=1,
        fence=1,
        idempotency_key=f"{saga}:hotel:action",
        reply_to="orchestrator",
    )
