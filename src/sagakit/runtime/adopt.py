"""Writing sagakit's rows through your connection, inside your transaction.

The mechanics of :mod:`sagakit.runtime.own_tx`: what your object is (a sqlite3 or
psycopg connection, a SQLAlchemy connection or session) down to its driver connection,
whether sagakit may write through it (an open transaction, the store's file or
schema), and a sagakit :class:`~sagakit.stores.base.Tx` over it that never commits:
:class:`~sagakit.stores.sqlite.SQLiteTx` over the sqlite3 connection, or
:class:`~sagakit.stores.postgres.PostgresTx` over a psycopg cursor (sync or async),
with the store's schema first on the transaction's search_path while it works.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard, cast

from sagakit.errors import ConfigurationError, StoreError
from sagakit.stores.base import Store, Tx
from sagakit.stores.sqlite import SQLiteStore, SQLiteTx

if TYPE_CHECKING:
    from sagakit.stores.postgres import PostgresStore, PostgresTx

__all__ = [
    "PSYCOPG",
    "PSYCOPG_ASYNC",
    "SQLITE",
    "Found",
    "OwnTx",
    "Target",
    "adopt",
    "adopt_found",
    "driver_kind",
    "is_async",
    "is_tx",
    "module_root",
    "resolve",
    "type_name",
]

SQLITE, PSYCOPG, PSYCOPG_ASYNC = "sqlite3", "psycopg", "psycopg (async)"
"""The driver connections sagakit writes through."""

_SUPPORTED = (
    "a sqlite3.Connection, a psycopg Connection or AsyncConnection, a SQLAlchemy "
    "Connection, Session, AsyncConnection or AsyncSession, or a sagakit Tx"
)


class OwnTx:
    """The Tx a participant's handler gets when it runs in your transaction.

    It is a full sagakit :class:`~sagakit.stores.base.Tx` (SQLite's or PostgreSQL's),
    writing through your connection, plus your objects. sagakit commits (or rolls back)
    after the handler: never commit nor roll back in it yourself::

        async def book(tx: Tx, env: Envelope) -> dict[str, str]:
            assert isinstance(tx, OwnTx)
            tx.session.add(Booking(id=env.business_key))  # committed with the reply
            return {"booking": env.business_key}
    """

    __slots__ = ()

    connection: Any
    """Your connection: a SQLAlchemy ``Connection``/``AsyncConnection`` (the session's,
    with a sessionmaker), a psycopg ``Connection``/``AsyncConnection`` or a
    ``sqlite3.Connection``."""
    session: Any
    """Your SQLAlchemy ``Session``/``AsyncSession`` when the factory makes sessions,
    else None."""


class _OwnSQLiteTx(SQLiteTx, OwnTx):
    __slots__ = ("connection", "session")


@functools.cache
def _own_postgres_tx() -> type[PostgresTx]:
    # Built on first use: importing sagakit must not import the PostgreSQL driver.
    from sagakit.stores.postgres import PostgresTx

    class _OwnPostgresTx(PostgresTx, OwnTx):
        __slots__ = ("connection", "session")

    return _OwnPostgresTx


def is_tx(obj: object) -> TypeGuard[Tx]:
    """Whether ``obj`` is a sagakit Tx already (rather than a connection to adopt)."""
    return isinstance(obj, SQLiteTx | OwnTx) or callable(getattr(obj, "saga_insert_many", None))


# -- what your object is ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    """Your object, down to the driver connection sagakit writes through."""

    kind: str  # SQLITE, PSYCOPG or PSYCOPG_ASYNC
    driver: Any  # sqlite3.Connection, psycopg.Connection or psycopg.AsyncConnection
    connection: Any  # OwnTx.connection
    session: Any  # OwnTx.session


def module_root(obj: object) -> str:
    return type(obj).__module__.split(".")[0]


def type_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


async def resolve(obj: object) -> Found:
    if isinstance(obj, sqlite3.Connection):
        return Found(SQLITE, obj, obj, None)
    root = module_root(obj)
    if root == "psycopg":
        return Found(driver_kind(obj, obj), obj, obj, None)
    if root == "sqlalchemy":
        return await _resolve_sqlalchemy(obj)
    raise ConfigurationError(
        f"cannot write sagakit's rows through a {type_name(obj)}; give {_SUPPORTED}"
    )


async def _resolve_sqlalchemy(obj: Any) -> Found:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

    session: Any = None
    if isinstance(obj, Session):
        session, obj = obj, obj.connection()  # begins the session's transaction if needed
    if isinstance(obj, Connection):
        if not obj.in_transaction():
            obj.begin()  # yours to commit, as if your first statement had begun it
        driver = obj.connection.driver_connection
        return Found(driver_kind(driver, obj), driver, obj, session)
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    if isinstance(obj, AsyncSession):
        session, obj = obj, await obj.connection()
    if isinstance(obj, AsyncConnection):
        if not obj.in_transaction():
            await obj.begin()
        raw = await obj.get_raw_connection()
        driver = raw.driver_connection
        return Found(driver_kind(driver, obj), driver, obj, session)
    raise ConfigurationError(
        f"cannot write sagakit's rows through a {type_name(obj)}; give {_SUPPORTED}"
    )


def driver_kind(driver: object, via: object) -> str:
    if isinstance(driver, sqlite3.Connection):
        return SQLITE
    root = module_root(driver)
    if root == "psycopg":
        import psycopg

        if isinstance(driver, psycopg.AsyncConnection):
            return PSYCOPG_ASYNC
        if isinstance(driver, psycopg.Connection):
            return PSYCOPG
    if root == "aiosqlite":
        raise ConfigurationError(
            "SQLite through aiosqlite (sqlite+aiosqlite) is not supported: give a sync "
            "SQLAlchemy Connection or Session on sqlite:// (or a sqlite3.Connection); "
            "SQLite's work is synchronous anyway"
        )
    raise ConfigurationError(
        f"{type_name(via)} runs on the driver {type_name(driver)}; sagakit writes through sqlite3 "
        "(sqlite://) or psycopg 3 (postgresql+psycopg://, sync or async)"
    )


def is_async(obj: object) -> bool:
    """Whether ``obj`` is an async connection or session (refused by the sync functions)."""
    if module_root(obj) == "psycopg":
        import psycopg

        return isinstance(obj, psycopg.AsyncConnection)
    return type(obj).__module__.startswith("sqlalchemy.ext.asyncio")


# -- where sagakit's rows go ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """The store whose tables your connection writes into, as far as it can be checked."""

    name: str
    dialect: str | None  # "sqlite", "postgresql", None: whatever the connection is on
    path: str | None = None  # SQLite: the store's file
    schema: str | None = None  # PostgreSQL
    store: Any = None  # the PostgresStore whose settings (channels, notify) the Tx uses

    @classmethod
    def of(cls, store: Store) -> Target:
        dialect = getattr(store, "dialect", "")
        if isinstance(store, SQLiteStore):
            return cls(store.name, "sqlite", path=store.path)
        if dialect == "postgresql":
            return cls(store.name, dialect, schema=getattr(store, "schema", None), store=store)
        return cls(store.name, dialect)

    def check(self, kind: str) -> None:
        wanted = "sqlite" if kind == SQLITE else "postgresql"
        if self.dialect not in (None, wanted):
            what = f"a {self.dialect} store" if self.dialect else "not an SQL store"
            raise ConfigurationError(
                f"store {self.name!r} is {what}: a {kind} connection cannot write into it"
                + ("" if self.dialect else "; only the store's own Tx can")
            )

    def postgres(self) -> PostgresStore:
        if self.store is not None:
            return cast("PostgresStore", self.store)
        from sagakit.stores.postgres import PostgresStore

        # Never opened: it only names the channels and the schema the Tx works with.
        return PostgresStore("", name=self.name, schema=self.schema)


# -- adopting your transaction -------------------------------------------------------------


@contextlib.asynccontextmanager
async def adopt(conn: object, store: Store) -> AsyncIterator[Tx]:
    """Your open transaction on ``conn``, as a sagakit Tx of ``store`` (see the module doc).

    Whatever the block writes through the Tx is in your transaction when the block ends
    (PostgreSQL sends its buffered writes then); you commit or roll back. A sagakit Tx
    is handed back as it is.
    """
    if is_tx(conn):
        yield conn
        return
    async with adopt_found(await resolve(conn), Target.of(store)) as tx:
        yield tx


@contextlib.asynccontextmanager
async def adopt_found(found: Found, target: Target, *, own: bool = False) -> AsyncIterator[Tx]:
    target.check(found.kind)
    if found.kind == SQLITE:
        conn: sqlite3.Connection = found.driver
        _sqlite_prepare(conn, target)
        cls = _OwnSQLiteTx if own else SQLiteTx
        tx = cls.on_connection(_plain(conn), target.name)
        if isinstance(tx, _OwnSQLiteTx):
            tx.connection, tx.session = found.connection, found.session
        try:
            yield tx
        finally:
            tx._conn = None  # ended: later use raises, as after a store's block
        return
    _psycopg_ready(found.driver)
    cursor = _PgCursor(found.driver, sync=found.kind == PSYCOPG)
    pg = target.postgres()
    caller_path = await _enter_schema(cursor, pg.schema, target.name)
    pg_cls = _own_postgres_tx() if own else _postgres_tx()
    ptx = pg_cls(cast(Any, cursor), None, pg)
    if own:
        own_tx = cast(Any, ptx)
        own_tx.connection, own_tx.session = found.connection, found.session
    try:
        yield ptx
        await ptx.flush_for_owner()
    except BaseException:
        await _leave_schema(cursor, caller_path, quietly=True)
        raise
    await _leave_schema(cursor, caller_path)


def _postgres_tx() -> type[PostgresTx]:
    from sagakit.stores.postgres import PostgresTx

    return PostgresTx


# -- SQLite ------------------------------------------------------------------------------


def _sqlite_prepare(conn: sqlite3.Connection, target: Target) -> None:
    """Check the file and the tables, and make sure a transaction is open."""
    plain = _plain(conn)
    main = next((r[2] for r in plain.execute("PRAGMA database_list") if r[1] == "main"), "")
    if not main:
        raise ConfigurationError(
            "this sqlite3 connection is on an in-memory database, which has no sagakit "
            f"tables: connect to the file of store {target.name!r}"
        )
    if target.path is not None and not _same_file(main, target.path):
        raise ConfigurationError(
            f"this sqlite3 connection is on {main!r}, but store {target.name!r} is the file "
            f"{target.path!r}: sagakit's rows must go into the store's file"
        )
    found = plain.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'")
    if found.fetchone() is None:
        raise ConfigurationError(
            f"{main!r} has no sagakit tables: open the store {target.name!r} on it once "
            "(any sagakit process on it does) before writing sagakit's rows in your transaction"
        )
    if conn.in_transaction:
        return
    if getattr(conn, "autocommit", None) is True or conn.isolation_level is None:
        raise ConfigurationError(
            "this sqlite3 connection is in autocommit mode and no transaction is open: "
            "sagakit's rows would commit on their own, apart from yours. Begin one first "
            "(conn.execute('BEGIN IMMEDIATE')) or connect without isolation_level=None"
        )
    # Legacy transaction control would begin one at your next write anyway; IMMEDIATE
    # takes the write lock now, so a busy file is waited for (busy timeout), not failed.
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise StoreError(f"SQLite: could not begin your transaction on {main!r}: {exc}") from exc


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


class _PlainRows:
    """A sqlite3 connection whose statements return plain tuples, whatever your
    ``row_factory`` (SQLiteTx reads rows by position)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        cursor = self._conn.cursor()
        cursor.row_factory = None
        return cursor.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        cursor = self._conn.cursor()
        cursor.row_factory = None
        return cursor.executemany(sql, rows)


def _plain(conn: sqlite3.Connection) -> sqlite3.Connection:
    return conn if conn.row_factory is None else cast(sqlite3.Connection, _PlainRows(conn))


# -- PostgreSQL ------------------------------------------------------------------------


def _psycopg_ready(conn: Any) -> None:
    """Refuse a connection on which sagakit's rows would not be in your transaction."""
    from psycopg.pq import TransactionStatus

    status = conn.info.transaction_status
    if status == TransactionStatus.INTRANS:
        return
    if status == TransactionStatus.IDLE:
        if conn.autocommit:
            raise ConfigurationError(
                "this psycopg connection is in autocommit mode and no transaction is open: "
                "sagakit's rows would commit on their own, apart from yours. Open one "
                "(`with conn.transaction():`) or use a connection with autocommit=False"
            )
        return  # psycopg begins one with the first statement; you commit it
    if status == TransactionStatus.INERROR:
        raise ConfigurationError(
            "your transaction failed already (an earlier statement raised): roll it back"
        )
    raise ConfigurationError(f"this psycopg connection is not usable now ({status.name})")


# The caller's search_path is read before it is changed (OFFSET 0 keeps the subquery a
# subquery); to_regclass tells whether the store's tables are where they should be.
_ENTER_SCHEMA = (
    "SELECT old, set_config('search_path', CASE WHEN old = '' THEN %s ELSE %s || ', ' || old"
    " END, true), to_regclass(%s) FROM (SELECT current_setting('search_path') AS old"
    " OFFSET 0) AS caller"
)
_LEAVE_SCHEMA = "SELECT set_config('search_path', %s, true)"


async def _enter_schema(cursor: _PgCursor, schema: str | None, store: str) -> str | None:
    """Put ``schema`` first on the transaction's search_path; return the caller's value."""
    if schema is None:
        await cursor.execute("SELECT to_regclass('outbox')", ())
        row = await cursor.fetchone()
        if row is None or row[0] is None:
            raise ConfigurationError(
                f"no sagakit tables of store {store!r} on this connection's search_path: "
                "give the store's schema, and open the store once (its tables are created then)"
            )
        return None
    quoted = '"' + schema.replace('"', '""') + '"'
    await cursor.execute(_ENTER_SCHEMA, (quoted, quoted, f"{quoted}.outbox"))
    row = await cursor.fetchone()
    assert row is not None
    if row[2] is None:
        await _leave_schema(cursor, row[0])
        raise ConfigurationError(
            f"schema {schema!r} has no sagakit tables of store {store!r}: open the store once "
            "(any sagakit process on it does) before writing sagakit's rows in your transaction"
        )
    return cast(str, row[0])


async def _leave_schema(
    cursor: _PgCursor, caller_path: str | None, *, quietly: bool = False
) -> None:
    if caller_path is None:
        return
    import psycopg

    try:
        await cursor.execute(_LEAVE_SCHEMA, (caller_path,))
    except psycopg.Error:
        if not quietly:
            raise
        # The transaction failed: it can only roll back, which restores the path anyway.


class _PgCursor:
    """What :class:`~sagakit.stores.postgres.PostgresTx` uses of a psycopg cursor, over
    your connection, sync or async.

    Rows come back as tuples whatever your row factory, and nothing is prepared on the
    server (your connection's prepared statements stay yours). A sync connection's
    calls complete inside ``await`` without suspending, so :func:`run_sync` can drive them.
    """

    __slots__ = ("_conn", "_cur", "_sync")

    def __init__(self, conn: Any, *, sync: bool) -> None:
        from psycopg.rows import tuple_row

        self._conn = conn
        self._sync = sync
        self._cur: Any = conn.cursor(row_factory=tuple_row)

    @property
    def connection(self) -> _PgCursor:
        return self  # PostgresTx asks ``cursor.connection.cursor()`` for a sibling

    def cursor(self) -> _PgCursor:
        return _PgCursor(self._conn, sync=self._sync)

    async def execute(self, query: Any, params: Any = None) -> _PgCursor:
        if self._sync:
            self._cur.execute(query, params, prepare=False)
        else:
            await self._cur.execute(query, params, prepare=False)
        return self

    async def fetchone(self) -> tuple[Any, ...] | None:
        if self._sync:
            return cast("tuple[Any, ...] | None", self._cur.fetchone())
        return cast("tuple[Any, ...] | None", await self._cur.fetchone())

    async def fetchall(self) -> list[tuple[Any, ...]]:
        if self._sync:
            return cast("list[tuple[Any, ...]]", self._cur.fetchall())
        return cast("list[tuple[Any, ...]]", await self._cur.fetchall())

    @property
    def description(self) -> Any:
        return self._cur.description

    @property
    def rowcount(self) -> int:
        return cast(int, self._cur.rowcount)
