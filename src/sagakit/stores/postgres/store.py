"""The PostgreSQL store, :class:`PostgresStore`: its settings, the connection pool,
opening and closing, transactions, the database clock and notifications. Its reads and
relay methods are in :mod:`~sagakit.stores.postgres.reads`, its migrations in
:mod:`~sagakit.stores.postgres.migrations`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import weakref
from collections.abc import AsyncGenerator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from sagakit.errors import ConfigurationError, StoreError
from sagakit.stores.postgres.driver import (
    _Params,
    log,
    psycopg,
    psycopg_pool,
    require_driver,
    sql,
    translate_error,
)
from sagakit.stores.postgres.migrations import ENGINE_NAMESPACE, PostgresMigrations
from sagakit.stores.postgres.queries import _engine_migrations, _queries
from sagakit.stores.postgres.reads import PostgresStatements
from sagakit.stores.postgres.transaction import _Transaction

if TYPE_CHECKING:
    from sagakit.stores.postgres.driver import _Conn, _Pool
    from sagakit.stores.postgres.tx import PostgresTx

__all__ = ["PostgresStore"]

_MAX_IDENTIFIER = 63  # bytes; PostgreSQL truncates longer names (NAMEDATALEN - 1)

# Mailbox ids reserved per statement (see PostgresStore._queue_ids): a batch of local
# steps takes up to 256, so a block serves several batches before the next round trip.
_QUEUE_ID_BLOCK = 2048


def _safe_dsn(dsn: str) -> str:
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparsable DSN>"
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "password")


# When each pooled connection was last given back (monotonic seconds). Weak keys: the
# pool closes and drops connections on its own.
_RETURNED_AT: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

# A connection given back this recently is lent again without a round trip to check it:
# the check would double the round trips of a busy engine (one per transaction and per
# read). A restart within this window costs one failed transaction (a StoreError, which
# every loop retries); the pool discards the broken connection when it comes back.
_CHECK_IDLE_AFTER = 1.0


@functools.cache
def _pool_class() -> type[_Pool]:
    """The pool, remembering when each connection came back (see :func:`_check_if_idle`).

    Stamped in ``putconn`` rather than in a ``reset`` hook: given one, the pool hands
    every returned connection to its worker task, a task switch and two queue handoffs
    per transaction.
    """

    class _StampingPool(psycopg_pool.AsyncConnectionPool[Any]):
        async def putconn(self, conn: Any) -> None:
            _RETURNED_AT[conn] = time.monotonic()
            await super().putconn(conn)

    return _StampingPool


async def _check_if_idle(conn: Any) -> None:
    """The pool's ``check`` hook: ping a connection only if it sat idle for a while."""
    returned = _RETURNED_AT.get(conn)
    if returned is not None and time.monotonic() - returned < _CHECK_IDLE_AFTER:
        return
    await psycopg_pool.AsyncConnectionPool.check_connection(conn)


class PostgresStore(PostgresStatements, PostgresMigrations):
    """A :class:`~sagakit.stores.base.Store` in a PostgreSQL database (or one schema of it).

    ``schema`` is this service's own schema: created if missing, and the only one on
    the ``search_path`` of every pooled connection. ``None`` uses the server's default
    search path. ``min_size``/``max_size`` bound the pool; a transaction holds one
    connection for its whole block. ``lease_clock`` says whose clock outbox leases use
    (``"database"``, the default, or ``"caller"`` for simulated clocks); ``notify=False``
    turns off the NOTIFY sent by commits that add outbox rows or timers.

    Call :meth:`open` before use (it applies pending migrations) and :meth:`close`
    after; a closed store can be opened again.
    """

    dialect = "postgresql"
    """The SQL dialect of business tables, for the rare migration that differs."""
    _mark = "%s"
    _no_limit = None

    def __init__(
        self,
        dsn: str,
        *,
        name: str = "store",
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        lease_clock: Literal["database", "caller"] = "database",
        idle_tx_timeout: float = 15.0,
        notify: bool = True,
    ) -> None:
        require_driver()
        if schema is not None and not 0 < len(schema.encode()) <= _MAX_IDENTIFIER:
            raise ConfigurationError(
                f"schema {schema!r} must be 1 to {_MAX_IDENTIFIER} bytes long (PostgreSQL "
                "truncates longer names)"
            )
        if len(f"sagakit_outbox_{name}".encode()) > _MAX_IDENTIFIER:
            raise ConfigurationError(
                f"store name {name!r} is too long for a notification channel "
                f"(sagakit_outbox_<name> must fit in {_MAX_IDENTIFIER} bytes)"
            )
        if not 0 <= min_size <= max_size or max_size < 2:
            raise ConfigurationError(
                f"need 0 <= min_size <= max_size and max_size >= 2 (a transaction holds one "
                f"connection, a read or a claim needs another); got {min_size}, {max_size}"
            )
        if lease_clock not in ("database", "caller"):
            raise ConfigurationError(
                f"lease_clock={lease_clock!r}: use 'database' (relays on many hosts) or "
                "'caller' (simulated clocks)"
            )
        self.dsn = dsn
        self.name = name
        self.schema = schema
        self.min_size = min_size
        self.max_size = max_size
        self.idle_tx_timeout = idle_tx_timeout
        self.lease_clock = lease_clock
        self.notify = notify
        self.outbox_channel = f"sagakit_outbox_{name}"
        self.timers_channel = f"sagakit_timers_{name}"
        self.queue_channel = f"sagakit_queue_{name}"
        self.aside_channel = f"sagakit_aside_{name}"
        """Notified by commits that set inputs aside (not among :meth:`listen`'s defaults)."""
        self._q = _queries()
        self._pool: _Pool | None = None
        self._use_pipeline = psycopg.Pipeline.is_supported()
        self._tasks_in_tx: set[asyncio.Task[Any]] = set()
        self._clock_offset = 0.0
        self._spare_queue_ids: list[int] = []
        # The earliest timer a commit of this store told the timer loops of (NOTIFY on
        # timers_channel); while it is ahead, they will look again by then anyway.
        self._timers_told = 0.0

    def _timers_news(self, due: float) -> bool:
        """Whether a commit that sets a timer due at ``due`` should notify the timer loops.

        Not if a commit of this store told them of one due no later that is still ahead:
        each loop looks at the timers again by then (and at least every idle poll), and
        finds this one. A step's timeout is set at every step, each later than the one
        before: without this every step's commit sent a notification that woke every
        listening process for nothing. Clocks: ``due`` is the orchestrator's; compared
        with the wall clock, a simulated clock behind it always notifies.
        """
        return not (time.time() < self._timers_told <= due)

    def _timers_told_of(self, due: float) -> None:
        """A commit told the timer loops of a timer due at ``due`` (see :meth:`_timers_news`)."""
        if self._timers_news(due):
            self._timers_told = due

    def __repr__(self) -> str:
        return f"PostgresStore({_safe_dsn(self.dsn)!r}, name={self.name!r}, schema={self.schema!r})"

    # -- lifecycle --------------------------------------------------------------------
    async def open(self) -> None:
        """Create the schema if missing, apply pending migrations, open the pool.

        Migrations run under a transaction-level advisory lock, so processes that
        start together apply each step once; an up-to-date database costs one query.
        """
        if self._pool is not None:
            return
        try:
            conn = await psycopg.AsyncConnection.connect(self.dsn, **self._connect_args("open"))
        except psycopg.Error as exc:
            raise translate_error(self.name, f"connect to {_safe_dsn(self.dsn)}", exc) from exc
        try:
            await self._configure(conn)
            await self._migrate(conn, ENGINE_NAMESPACE, _engine_migrations(), bootstrap=True)
            await self._measure_clock(conn)
        except psycopg.Error as exc:
            raise translate_error(self.name, "prepare the database", exc) from exc
        finally:
            await conn.close()
        pool: _Pool = _pool_class()(
            self.dsn,
            min_size=self.min_size,
            max_size=self.max_size,
            kwargs=self._connect_args("pool"),
            configure=self._configure,
            # A server restart kills every idle connection: check before lending one
            # that sat idle for a while (see _check_if_idle).
            check=_check_if_idle,
            name=f"sagakit-{self.name}",
            open=False,
        )
        try:
            await pool.open(wait=True)
        except psycopg.Error as exc:
            await pool.close()
            raise translate_error(self.name, "open the connection pool", exc) from exc
        if self._pool is not None:  # a concurrent open() of this store finished first
            await pool.close()
            return
        self._pool = pool

    def _connect_args(self, role: str) -> dict[str, Any]:
        # No server-side prepared statements: after an aborted pipeline psycopg's cache
        # can name a statement the server already dropped ("_pg3_N does not exist").
        args: dict[str, Any] = {"autocommit": True, "prepare_threshold": None}
        # Names the connections in pg_stat_activity, unless the DSN names them already.
        if "application_name" not in psycopg.conninfo.conninfo_to_dict(self.dsn):
            args["application_name"] = f"sagakit {self.name} {role}"[:_MAX_IDENTIFIER]
        return args

    async def _configure(self, conn: _Conn) -> None:
        # A process frozen (SIGSTOP, a GC pause, a dead client) inside a transaction
        # must not hold saga and inbox locks forever: the server ends its session.
        await conn.execute(
            f"SET idle_in_transaction_session_timeout = {int(self.idle_tx_timeout * 1000)}"
        )
        if self.schema is not None:
            await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))

    async def _queue_ids(self, tx: PostgresTx, n: int) -> list[int]:
        """``n`` fresh mailbox ids, ascending, from the block this store reserved.

        A block of :data:`_QUEUE_ID_BLOCK` (or ``n``) is reserved with one statement
        when the spare ones run out: nextval is not transactional, so the ids stay
        reserved whatever becomes of ``tx``, and values a process never used are gaps.
        """
        spare = self._spare_queue_ids
        if len(spare) < n:
            rows = await tx._all(
                "reserve mailbox ids", self._q["queue_ids"], (max(n, _QUEUE_ID_BLOCK),)
            )
            # Another transaction of this process may have refilled meanwhile.
            spare.extend(r[0] for r in rows)
            spare.sort()
        ids = spare[:n]
        del spare[:n]
        return ids

    async def close(self) -> None:
        """Close the pool (connections still lent out close when they come back)."""
        self._spare_queue_ids = []  # the next open may be a different database
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # -- clock ------------------------------------------------------------------------
    async def _measure_clock(self, conn: _Conn) -> None:
        before = time.time()
        cursor = await conn.execute(self._q["database_time"])
        row = await cursor.fetchone()
        after = time.time()
        assert row is not None
        self._clock_offset = float(row[0]) - (before + after) / 2

    async def sync_clock(self) -> float:
        """Measure the offset to the server's clock again; return it in seconds."""
        pool = self._pool or self._not_open()
        try:
            async with pool.connection() as conn:
                await self._measure_clock(conn)
        except psycopg.Error as exc:
            raise translate_error(self.name, "read the database clock", exc) from exc
        return self._clock_offset

    def clock(self) -> float:
        """The database server's time, in epoch seconds, without a round trip.

        The local clock plus the offset measured at :meth:`open` (or
        :meth:`sync_clock`), accurate to about half a round trip. Hand it to the
        runtime (``clock=store.clock``) so every process computes and compares timer
        due times and leases on the same clock.
        """
        return time.time() + self._clock_offset

    # -- notifications ----------------------------------------------------------------
    async def listen(
        self, *channels: str, health_every: float = 30.0, retry_every: float = 1.0
    ) -> AsyncGenerator[tuple[str, str], None]:
        """Yield ``(channel, payload)`` for each notification, until the caller stops.

        Listens on ``channels`` (default: this store's outbox, timers and queue
        channels) over a dedicated connection, not a pooled one. Right after
        connecting, and after every reconnection, it yields each channel once with an
        empty payload: notifications sent while nobody listened are lost, so the
        waiter must look for work. The connection is checked every ``health_every``
        seconds; a lost one is reopened every ``retry_every`` seconds until it works.
        Close the iterator (``aclose``, or leave the ``async for``) to stop.
        """
        channels = channels or (self.outbox_channel, self.timers_channel, self.queue_channel)
        while True:
            conn: _Conn | None = None
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.dsn, **self._connect_args("listen")
                )
                for channel in channels:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                for channel in channels:
                    yield channel, ""
                while True:
                    async with contextlib.aclosing(conn.notifies(timeout=health_every)) as notes:
                        async for note in notes:
                            yield note.channel, note.payload
                    await conn.execute("SELECT 1")
            except psycopg.Error as exc:
                log.warning(
                    "store %r: listening for notifications failed (%s); retrying in %.1fs",
                    self.name,
                    exc,
                    retry_every,
                )
            finally:
                if conn is not None:
                    await conn.close()
            await asyncio.sleep(retry_every)

    # -- connections ------------------------------------------------------------------
    def _not_open(self) -> NoReturn:
        raise StoreError(
            f"PostgreSQL store {self.name!r} is not open; call `await store.open()` first"
        )

    def _check_no_tx(self) -> None:
        task = asyncio.current_task()
        if task is not None and task in self._tasks_in_tx:
            raise StoreError(
                f"store {self.name!r} is already in a transaction in this task; a second "
                "connection could wait on the first one's locks forever (use the open Tx "
                "instead of the store or a second transaction)"
            )

    def _enter_task(self) -> asyncio.Task[Any] | None:
        if self._pool is None:
            self._not_open()
        self._check_no_tx()
        task = asyncio.current_task()
        if task is not None:
            self._tasks_in_tx.add(task)
        return task

    def _leave_task(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._tasks_in_tx.discard(task)

    def transaction(self) -> AbstractAsyncContextManager[PostgresTx]:
        """A transaction: commits when the block exits normally, rolls back on error."""
        return _Transaction(self)

    def snapshot(self) -> AbstractAsyncContextManager[PostgresTx]:
        """A read-only transaction whose reads all see one snapshot (REPEATABLE READ,
        READ ONLY): under the default READ COMMITTED, two SELECTs of one transaction
        may see different commits."""
        return _Transaction(self, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    async def _read(self, what: str, query: str, params: _Params = ()) -> list[tuple[Any, ...]]:
        pool = self._pool or self._not_open()
        try:
            async with pool.connection() as conn:
                cursor = await conn.execute(query, params)
                return await cursor.fetchall()
        except psycopg.Error as exc:
            raise translate_error(self.name, what, exc) from exc

    async def _write(self, what: str, query: str, params: _Params) -> tuple[int, list[Any]]:
        """One statement as its own transaction (autocommit); rows changed and returned."""
        pool = self._pool or self._not_open()
        self._check_no_tx()
        try:
            async with pool.connection() as conn:
                cursor = await conn.execute(query, params)
                rows = await cursor.fetchall() if cursor.description is not None else []
                return cursor.rowcount, rows
        except psycopg.Error as exc:
            raise translate_error(self.name, what, exc) from exc
