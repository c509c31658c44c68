"""Your own transaction: sagakit's rows commit with yours, or not at all.

Two directions, one mechanism (sagakit writes its rows through *your* connection,
inside *your* transaction, and never commits nor rolls it back):

* **Starting sagas.** ``await engine.start(definition, key, data, tx=conn)``, or without
  any engine in the process (a web process that only starts sagas; workers elsewhere
  drive them) :func:`start_in` and, for sync connections and no event loop,
  :func:`start_in_sync`. The saga row, its history, its timers and its first commands
  (outbox rows, local steps' included) are written in your transaction: roll it back
  and nothing of the saga exists; commit it and a relay publishes the commands, once
  (PostgreSQL: a ``pg_notify`` sent in your transaction wakes the relays exactly when
  it commits). Idempotent by business key, like ``Engine.start``.
* **Participants.** ``Participant(name, store, transaction=factory)`` handles every
  batch of commands in a transaction of your ``factory``, so the inbox record, the
  idempotency record, your handler's writes made with your own library and the reply
  commit together. The handler is given an :class:`OwnTx`: ``tx.session`` (SQLAlchemy)
  or ``tx.connection`` is your object. ``Participant.answer`` (a deferred answer) also
  takes your connection or session, e.g. in a web request.

Connections (``conn``): ``sqlite3.Connection``; psycopg 3 ``Connection`` and
``AsyncConnection``; SQLAlchemy ``Connection``, ``Session``, ``AsyncConnection`` and
``AsyncSession`` over sqlite3 (``sqlite://``, sync only: aiosqlite is refused) or
psycopg (``postgresql+psycopg://``, sync or async); a sagakit Tx of the store.
Factories (``transaction=``): a SQLAlchemy ``sessionmaker``, ``async_sessionmaker``,
``Engine`` or ``AsyncEngine``; a psycopg_pool ``ConnectionPool`` or
``AsyncConnectionPool``; a callable returning a *new* sqlite3 or psycopg connection
(or an awaitable of one), which sagakit commits and closes.

Your transaction must be open, or about to be: a connection in autocommit mode with no
transaction open is refused (sagakit's rows would commit on their own). A sqlite3
connection in its default mode with none open yet gets ``BEGIN IMMEDIATE``, and a
non-autocommit psycopg connection begins implicitly, as for your own first statement.

Where sagakit's rows go: the store's tables must be in the database you write to.
SQLite: your connection is on the store's file (checked). PostgreSQL: the store's
``schema`` is put first on your transaction's ``search_path`` (``set_config(...,
true)``) while sagakit works in it, then your value is restored; for a participant
that is the whole transaction, handler included, so an unqualified table name of yours
that is also one of sagakit's (``outbox``, ``inbox``, ``sagas``...) resolves to
sagakit's: qualify it. The store must have been opened once (its tables created).
"""

from __future__ import annotations

import contextlib
import inspect
import sqlite3
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from typing import Any, TypeVar, cast

from sagakit.core.definition import SagaDefinition
from sagakit.core.instance import SagaInstance
from sagakit.errors import ConfigurationError
from sagakit.runtime.adopt import (
    PSYCOPG,
    PSYCOPG_ASYNC,
    OwnTx,
    Target,
    adopt,
    adopt_found,
    driver_kind,
    is_async,
    is_tx,
    module_root,
    resolve,
    type_name,
)
from sagakit.runtime.orchestrator import Orchestrator
from sagakit.stores.base import Store, Tx
from sagakit.stores.memory import MemoryStore
from sagakit.stores.sqlite import SQLiteStore

__all__ = [
    "OwnTransactions",
    "OwnTx",
    "StartRequest",
    "adopt",
    "is_tx",
    "refuse_async",
    "run_sync",
    "start_in",
    "start_in_sync",
    "start_with",
]

StartRequest = tuple[str, str, Mapping[str, Any]]
"""``(definition name, business key, data)``."""

_T = TypeVar("_T")


# -- starting sagas ---------------------------------------------------------------------


async def start_with(
    orchestrator: Orchestrator,
    conn: object,
    requests: Sequence[StartRequest],
    *,
    version: int | None = None,
    correlation_id: str | None = None,
) -> list[SagaInstance]:
    """``Engine.start_many(..., tx=conn)``: start sagas of ``orchestrator`` in ``conn``'s
    transaction (a sagakit Tx of its store, or yours on the store's database)."""
    async with adopt(conn, orchestrator.store) as tx:
        started = await orchestrator.start_in(
            tx, requests, version=version, correlation_id=correlation_id
        )
    return [inst for inst, _ in started]


async def start_in(
    conn: object,
    definitions: Sequence[SagaDefinition],
    requests: Sequence[StartRequest],
    *,
    schema: str | None = None,
    store_name: str = "orchestrator",
    canary: Mapping[str, float] | None = None,
    version: int | None = None,
    correlation_id: str | None = None,
) -> list[SagaInstance]:
    """Start sagas in your transaction on ``conn``, without an engine in this process.

    ``requests``: ``(definition name, business key, data)`` triples, started on the
    latest of ``definitions`` with that name (or ``version``; ``canary`` shares as the
    workers' ``Engine`` would). Returns the instances, the existing one for a business
    key started before (idempotent, as ``Engine.start``). Nothing is committed: you
    commit ``conn``'s transaction, and then the relays publish the first commands.

    ``conn`` is on the orchestrator store's database: its SQLite file, or on PostgreSQL
    the database holding ``schema`` (the store's; ``None``: the tables are on your
    search_path). ``store_name`` is the store's name (it names the channel
    ``sagakit_outbox_<name>`` that wakes the relays). See :mod:`sagakit.runtime.own_tx`.
    """
    orchestrator = _orchestrator(definitions, store_name, canary)
    if is_tx(conn):
        started = await orchestrator.start_in(
            conn, requests, version=version, correlation_id=correlation_id
        )
        return [inst for inst, _ in started]
    target = Target(store_name, None, schema=schema)
    async with adopt_found(await resolve(conn), target) as tx:
        started = await orchestrator.start_in(
            tx, requests, version=version, correlation_id=correlation_id
        )
    return [inst for inst, _ in started]


def start_in_sync(
    conn: object,
    definitions: Sequence[SagaDefinition],
    requests: Sequence[StartRequest],
    *,
    schema: str | None = None,
    store_name: str = "orchestrator",
    canary: Mapping[str, float] | None = None,
    version: int | None = None,
    correlation_id: str | None = None,
) -> list[SagaInstance]:
    """:func:`start_in` for a sync connection or session, with no event loop needed
    (Flask, Django, a sync FastAPI route). Async ones are refused: await :func:`start_in`."""
    refuse_async(conn, "start_in_sync", "await start_in(...)")
    return run_sync(
        start_in(
            conn,
            definitions,
            requests,
            schema=schema,
            store_name=store_name,
            canary=canary,
            version=version,
            correlation_id=correlation_id,
        ),
        "start_in_sync",
    )


def _orchestrator(
    definitions: Sequence[SagaDefinition], store_name: str, canary: Mapping[str, float] | None
) -> Orchestrator:
    # It only decides the starts; what it decides is written into your transaction, so
    # its own store is never opened nor used.
    kw: dict[str, Any] = {} if canary is None else {"canary": canary}
    return Orchestrator(MemoryStore(name=store_name), definitions, **kw)


# -- sync connections without an event loop ------------------------------------------------


def refuse_async(conn: object, what: str, instead: str) -> None:
    """Raise if ``conn`` is an async connection or session (``what`` is sync-only)."""
    if is_async(conn):
        raise ConfigurationError(
            f"{what} takes a sync connection or session; for a {type_name(conn)} use `{instead}`"
        )


def run_sync(coro: Coroutine[Any, Any, _T], what: str) -> _T:
    """Run ``coro`` to its end without an event loop.

    Works for sagakit's code over a sync connection, which never suspends (every
    ``await`` completes at once); anything that would wait for an event loop is refused.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(_T, done.value)
    coro.close()
    raise ConfigurationError(
        f"{what} had to wait for an event loop: it only runs sync connections and sessions "
        "(use the async function for async ones)"
    )


# -- participants' transactions -----------------------------------------------------------

_SESSIONMAKER = "sessionmaker"
_ASYNC_SESSIONMAKER = "async_sessionmaker"
_ENGINE = "Engine"
_ASYNC_ENGINE = "AsyncEngine"
_POOL = "ConnectionPool"
_ASYNC_POOL = "AsyncConnectionPool"
_CONNECT = "connect"

_FACTORIES = (
    "a SQLAlchemy sessionmaker, async_sessionmaker, Engine or AsyncEngine, a psycopg_pool "
    "ConnectionPool or AsyncConnectionPool, or a callable returning a new sqlite3 or "
    "psycopg connection"
)


def _factory_kind(factory: object) -> str:
    root = module_root(factory)
    if root == "sqlalchemy":
        from sqlalchemy.engine import Engine
        from sqlalchemy.orm import sessionmaker

        if isinstance(factory, sessionmaker):
            return _SESSIONMAKER
        if isinstance(factory, Engine):
            return _ENGINE
        from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

        if isinstance(factory, async_sessionmaker):
            return _ASYNC_SESSIONMAKER
        if isinstance(factory, AsyncEngine):
            return _ASYNC_ENGINE
    elif root == "psycopg_pool":
        from psycopg_pool import AsyncConnectionPool, ConnectionPool

        if isinstance(factory, AsyncConnectionPool):
            return _ASYNC_POOL
        if isinstance(factory, ConnectionPool):
            return _POOL
    elif (
        callable(factory)
        and not isinstance(factory, type | sqlite3.Connection)  # a Connection is callable
        and root != "psycopg"
    ):
        return _CONNECT
    if isinstance(factory, sqlite3.Connection) or root in ("sqlalchemy", "psycopg"):
        raise ConfigurationError(
            f"transaction= takes a factory of transactions, not a {type_name(factory)}: give "
            f"{_FACTORIES}"
        )
    raise ConfigurationError(f"transaction= cannot use a {type_name(factory)}; give {_FACTORIES}")


class OwnTransactions:
    """A participant's transactions, opened with your ``factory`` (see the module doc).

    Calling it gives an ``async with`` block yielding a Tx that is an :class:`OwnTx`: your library's
    transaction begins, sagakit writes through it, and it commits when the block ends
    without an error (rolled back otherwise). On SQLite the store's writer lock is held
    for the block, so this process's other writes to the file wait for it on the event
    loop instead of blocking it.
    """

    def __init__(self, factory: object, store: Store) -> None:
        self.factory = factory
        self.kind = _factory_kind(factory)
        self.store = store
        self._target = Target.of(store)
        if self._target.dialect not in ("sqlite", "postgresql"):
            raise ConfigurationError(
                f"store {store.name!r} is not an SQL store: a participant runs in your "
                "transaction only on a SQLite or PostgreSQL store"
            )
        if isinstance(store, MemoryStore):
            raise ConfigurationError(
                f"store {store.name!r} is a MemoryStore: its database is in memory, where the "
                "connection your transactions run on cannot reach it; use a SQLiteStore on a "
                "file (or a PostgresStore)"
            )

    def __repr__(self) -> str:
        return f"OwnTransactions({self.kind}, store={self.store.name!r})"

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[Tx]:
        turn: contextlib.AbstractAsyncContextManager[None] = (
            self.store.writer_turn()
            if isinstance(self.store, SQLiteStore)
            else contextlib.nullcontext()
        )
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(turn)
            yours = await stack.enter_async_context(_open(self.kind, self.factory))
            # An OwnTx too (tx.session, tx.connection).
            yield await stack.enter_async_context(
                adopt_found(await resolve(yours), self._target, own=True)
            )


@contextlib.asynccontextmanager
async def _open(kind: str, factory: Any) -> AsyncIterator[Any]:
    """Your library's transaction: committed if the block ends without an error."""
    if kind == _SESSIONMAKER:
        with factory() as session, session.begin():
            yield session
    elif kind == _ASYNC_SESSIONMAKER:
        async with factory() as session, session.begin():
            yield session
    elif kind == _ENGINE:
        with factory.begin() as conn:
            yield conn
    elif kind == _ASYNC_ENGINE:
        async with factory.begin() as conn:
            yield conn
    elif kind == _POOL:
        with factory.connection() as conn, conn.transaction():
            yield conn
    elif kind == _ASYNC_POOL:
        async with factory.connection() as conn, conn.transaction():
            yield conn
    else:
        made = factory()
        if inspect.isawaitable(made):
            made = await made
        async with _owned(made) as conn:
            yield conn


@contextlib.asynccontextmanager
async def _owned(conn: Any) -> AsyncIterator[Any]:
    """A new connection from your callable: one transaction on it, then closed."""
    if isinstance(conn, sqlite3.Connection):
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
        finally:
            conn.close()
        return
    kind = driver_kind(conn, conn) if module_root(conn) == "psycopg" else ""
    if kind == PSYCOPG:
        try:
            with conn.transaction():
                yield conn
        finally:
            conn.close()
    elif kind == PSYCOPG_ASYNC:
        try:
            async with conn.transaction():
                yield conn
        finally:
            await conn.close()
    else:
        raise ConfigurationError(
            f"the transaction factory returned a {type_name(conn)}; a callable factory must "
            "return a new sqlite3 or psycopg connection"
        )
