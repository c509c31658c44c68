"""Participants in your own transaction, for every supported transaction factory.

``Participant(name, store, transaction=factory)`` handles each batch in a transaction
of the factory's: the inbox record, the idempotency record, the handler's business
row written with your library and the reply commit together, or not at all. Each
factory (sqlite3 connect callable and SQLAlchemy sessionmaker / Engine on SQLite;
psycopg connect callables and pools, SQLAlchemy sessionmaker / Engine /
async_sessionmaker / AsyncEngine on PostgreSQL) is shown a handler that fails after
its business write (nothing of it stays), then succeeds (everything is there), then
a duplicate delivery (handled once), and runs a whole saga with the engine.

``Participant.answer`` (a deferred answer) is written in your transaction too, for
every connection driver: rolled back, nothing; committed, the record, the reply and
your ledger row.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from own_tx_support import (
    Site,
    book_command,
    driver_params,
    engine_for,
    make_site,
    maybe,
    open_handle,
)

from sagakit import (
    ConfigurationError,
    Envelope,
    OwnTx,
    Participant,
    SagaState,
    StoreError,
)
from sagakit.runtime.participant import DEFER
from sagakit.stores.base import SQLStore
from sagakit.stores.memory import MemoryStore
from sagakit.stores.sqlite import SQLiteStore
from sagakit.transports.base import Delivery, Settle

_handles = itertools.count(1)

FACTORIES = {
    "sqlite": ["sqlite3-connect", "sqlalchemy-sessionmaker", "sqlalchemy-engine"],
    "postgres": [
        "psycopg-connect",
        "psycopg-async-connect",
        "psycopg-pool",
        "psycopg-async-pool",
        "sqlalchemy-sessionmaker",
        "sqlalchemy-engine",
        "sqlalchemy-async-sessionmaker",
        "sqlalchemy-async-engine",
    ],
}


def factory_params() -> list[Any]:
    params = []
    for backend, kinds in FACTORIES.items():
        marks = [pytest.mark.postgres] if backend == "postgres" else []
        for kind in kinds:
            params.append(pytest.param(backend, kind, marks=marks, id=f"{backend}-{kind}"))
    return params


@pytest.fixture
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    with make_site(request.node.callspec.params["backend"], tmp_path) as s:
        yield s


@functools.cache
def room_model() -> Any:
    """An ORM class on the ``rooms`` table (what a SQLAlchemy handler adds)."""
    import sqlalchemy as sa
    from sqlalchemy.orm import DeclarativeBase

    class Base(DeclarativeBase):
        pass

    class Room(Base):
        __tablename__ = "rooms"
        id = sa.Column(sa.String, primary_key=True)

    return Room


@dataclass
class Factory:
    """A transaction factory and how a handler writes your business row with it."""

    factory: object
    write: Callable[[OwnTx, str], Any]  # may return an awaitable


@asynccontextmanager
async def make_factory(site: Site, kind: str) -> AsyncIterator[Factory]:
    qmark = "INSERT INTO rooms (id) VALUES (?)"
    pyformat = "INSERT INTO rooms (id) VALUES (%s)"
    if kind == "sqlite3-connect":
        yield Factory(
            functools.partial(sqlite3.connect, site.file("hotel")),
            lambda tx, key: tx.connection.execute(qmark, (key,)),
        )
    elif kind in ("psycopg-connect", "psycopg-async-connect"):
        import psycopg

        if kind == "psycopg-connect":
            yield Factory(
                functools.partial(psycopg.connect, site.user_dsn),
                lambda tx, key: tx.connection.execute(pyformat, (key,)),
            )
        else:
            yield Factory(
                functools.partial(psycopg.AsyncConnection.connect, site.user_dsn),
                lambda tx, key: tx.connection.execute(pyformat, (key,)),
            )
    elif kind == "psycopg-pool":
        from psycopg_pool import ConnectionPool

        with ConnectionPool(site.user_dsn, min_size=1, max_size=2) as pool:
            yield Factory(pool, lambda tx, key: tx.connection.execute(pyformat, (key,)))
    elif kind == "psycopg-async-pool":
        from psycopg_pool import AsyncConnectionPool

        async with AsyncConnectionPool(site.user_dsn, min_size=1, max_size=2) as apool:
            yield Factory(apool, lambda tx, key: tx.connection.execute(pyformat, (key,)))
    elif kind in ("sqlalchemy-sessionmaker", "sqlalchemy-engine"):
        import sqlalchemy as sa
        from sqlalchemy.orm import sessionmaker

        engine = sa.create_engine(site.url("hotel"))
        try:
            if kind == "sqlalchemy-engine":
                insert = sa.text("INSERT INTO rooms (id) VALUES (:id)")
                yield Factory(engine, lambda tx, key: tx.connection.execute(insert, {"id": key}))
            else:

                def add(tx: OwnTx, key: str) -> None:
                    tx.session.add(room_model()(id=key))
                    tx.session.flush()  # the INSERT reaches the database before any failure

                yield Factory(sessionmaker(engine), add)
        finally:
            engine.dispose()
    elif kind in ("sqlalchemy-async-sessionmaker", "sqlalchemy-async-engine"):
        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

        aengine = create_async_engine(site.url("hotel", asynchronous=True))
        try:
            if kind == "sqlalchemy-async-engine":
                insert = sa.text("INSERT INTO rooms (id) VALUES (:id)")
                yield Factory(aengine, lambda tx, key: tx.connection.execute(insert, {"id": key}))
            else:

                async def aadd(tx: OwnTx, key: str) -> None:
                    tx.session.add(room_model()(id=key))
                    await tx.session.flush()

                yield Factory(async_sessionmaker(aengine), aadd)
        finally:
            await aengine.dispose()
    else:
        raise ValueError(kind)


async def deliver(p: Participant, env: Envelope, deliveries: int = 1) -> Settle:
    """Deliver ``env`` once, as a transport would; how the participant settled it."""
    (settle,) = await p([Delivery(next(_handles), env.to_json(), deliveries)])
    return settle


@dataclass
class Seen:
    """What the sagakit store holds of one command (read with sagakit's own Tx)."""

    inbox: bool
    record: dict[str, Any] | None
    replies: list[dict[str, Any]]


async def seen(store: SQLStore, env: Envelope) -> Seen:
    assert env.idempotency_key is not None
    async with store.transaction() as tx:
        record = await tx.idempotency_get("hotel", env.idempotency_key)
    replies = [e.payload for e, _ in await store.outbox_all() if e.causation_id == env.message_id]
    return Seen(
        await store.inbox_has("hotel", env.message_id),
        None if record is None else record.outcome,
        replies,
    )


@pytest.mark.parametrize(("backend", "kind"), factory_params())
async def test_everything_commits_together_or_not_at_all(
    site: Site, backend: str, kind: str
) -> None:
    store = site.store("hotel")
    await store.open()
    try:
        async with make_factory(site, kind) as made:
            p = Participant("hotel", store, transaction=made.factory)
            calls: list[str] = []
            fail = [True]

            @p.handles("BookHotel")
            async def book(tx: Any, env: Envelope) -> dict[str, Any]:
                assert isinstance(tx, OwnTx)
                calls.append(env.message_id)
                await maybe(made.write(tx, env.business_key or ""))
                if fail[0]:
                    raise RuntimeError("the handler failed after its business write")
                return {"room": env.business_key}

            env = book_command("r-1")
            failed = await deliver(p, env)
            assert not failed.ack and "after its business write" in failed.error  # retried later
            assert site.rows("rooms") == []
            assert await seen(store, env) == Seen(False, None, [])

            fail[0] = False
            assert (await deliver(p, env, deliveries=2)).ack
            assert site.rows("rooms") == ["r-1"]
            after = await seen(store, env)
            assert after.inbox
            assert after.record is not None and after.record["ok"]
            assert [r["result"] for r in after.replies] == [{"room": "r-1"}]

            assert (await deliver(p, env, deliveries=3)).ack  # a duplicate: handled once
            assert len(calls) == 2
            assert site.rows("rooms") == ["r-1"]
            assert len((await seen(store, env)).replies) == 1
    finally:
        await store.close()


@pytest.mark.parametrize(("backend", "kind"), factory_params())
async def test_a_saga_runs_through_a_participant_in_your_transactions(
    site: Site, backend: str, kind: str
) -> None:
    async with make_factory(site, kind) as made:
        p = Participant("hotel", site.store("hotel"), transaction=made.factory)

        @p.handles("BookHotel")
        async def book(tx: Any, env: Envelope) -> dict[str, Any]:
            await maybe(made.write(tx, env.business_key or ""))
            return {"room": env.business_key}

        @p.handles("CancelHotel")
        async def cancel(tx: Any, env: Envelope) -> dict[str, Any]:
            return {}

        async with engine_for(site, [p]) as engine:
            inst = await engine.start("booking", "s-1", {})
            done = await engine.wait(inst.saga_id, timeout=20)
    assert done.state is SagaState.SUCCEEDED, done.reason
    assert done.steps[0].result == {"room": "s-1"}
    assert site.rows("rooms") == ["s-1"]


@pytest.mark.parametrize(("backend", "driver"), driver_params())
async def test_a_deferred_answer_is_written_in_your_transaction(
    site: Site, backend: str, driver: str
) -> None:
    store = site.store("hotel")
    await store.open()
    try:
        p = Participant("hotel", store)
        waiting: list[Envelope] = []

        @p.handles("BookHotel")
        async def book(tx: Any, env: Envelope) -> Any:
            waiting.append(env)
            return DEFER  # a person confirms the booking later, in a web request

        env = book_command("d-1")
        assert (await deliver(p, env)).ack
        assert await seen(store, env) == Seen(True, None, [])
        (command,) = waiting

        async def answer(obj: Any) -> bool:
            result = {"room": "d-1"}
            if driver in (
                "psycopg-async",
                "sqlalchemy-async-connection",
                "sqlalchemy-async-session",
            ):
                return await p.answer(obj, command, result, time.time())
            return p.answer_sync(obj, command, result, time.time())

        async with open_handle(site, driver, "hotel") as h:
            await maybe(h.insert("d-1"))  # your ledger row
            assert await answer(h.obj)
            await maybe(h.rollback())
        assert site.rows("rooms") == []
        assert await seen(store, env) == Seen(True, None, [])

        async with open_handle(site, driver, "hotel") as h:
            await maybe(h.insert("d-1"))
            assert await answer(h.obj)
            await maybe(h.commit())
        assert site.rows("rooms") == ["d-1"]
        after = await seen(store, env)
        assert after.record is not None and after.record["result"] == {"room": "d-1"}
        assert [r["result"] for r in after.replies] == [{"room": "d-1"}]

        async with open_handle(site, driver, "hotel") as h:
            assert not await answer(h.obj)  # answered once
            await maybe(h.commit())
        assert len((await seen(store, env)).replies) == 1
    finally:
        await store.close()


# -- refusals ------------------------------------------------------------------------------


def test_a_factory_is_needed_not_a_connection(tmp_path: Path) -> None:
    with make_site("sqlite", tmp_path) as site:
        conn = sqlite3.connect(site.file("hotel"))
        try:
            with pytest.raises(ConfigurationError, match="factory of transactions"):
                Participant("hotel", site.store("hotel"), transaction=conn)
        finally:
            conn.close()
        with pytest.raises(ConfigurationError, match="cannot use"):
            Participant("hotel", site.store("hotel"), transaction=42)
        with pytest.raises(ConfigurationError, match="is a MemoryStore: its database is in memory"):
            Participant("hotel", MemoryStore("hotel"), transaction=lambda: None)


async def test_a_factory_returning_something_else_is_refused(tmp_path: Path) -> None:
    store = hotel_store(tmp_path)
    await store.open()
    try:
        p = Participant("hotel", store, transaction=lambda: "not a connection")

        @p.handles("BookHotel")
        async def book(tx: Any, env: Envelope) -> dict[str, Any]:
            return {}

        with pytest.raises(ConfigurationError, match="must return a new sqlite3 or psycopg"):
            async with p.transaction():
                pass
    finally:
        await store.close()


async def test_the_tx_ends_with_the_transaction(tmp_path: Path) -> None:
    store = hotel_store(tmp_path)
    await store.open()
    try:
        p = Participant("hotel", store, transaction=functools.partial(sqlite3.connect, store.path))
        async with p.transaction() as tx:
            assert isinstance(tx, OwnTx) and tx.session is None
            assert await tx.inbox_add("hotel", "m-1", time.time())
        with pytest.raises(StoreError, match="has ended"):
            await tx.inbox_add("hotel", "m-2", time.time())
        assert await store.inbox_has("hotel", "m-1")
    finally:
        await store.close()


def hotel_store(path: Path) -> SQLiteStore:
    return SQLiteStore(path / "hotel.db", name="hotel", synchronous="NORMAL")
