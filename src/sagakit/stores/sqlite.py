"""The SQLite store: the embedded default, one database file per service.

WAL journal mode lets one writer and any number of readers work at once. The store
keeps two connections: a *writer*, used by transactions and by the few writes that
run on their own (relay claims, mailbox updates), serialised by an ``asyncio.Lock``
held for the whole ``async with store.transaction()`` block; and a *reader* for the
plain read methods, which never waits for the writer.

Calls run on the event loop's thread, with no hop to a worker thread: a statement
takes microseconds, and the price is that a commit holds the loop for its fsync. A
server may move the plain reads' SQL to worker threads (:meth:`SQLiteStore.read_in_threads`,
each thread with its own reader connection) and decode large pages in slices, so that
a page of hundreds of sagas does not hold the loop; transactions stay on the loop.
Every statement lives in ``stores/sql/sqlite_queries.sql``, the schema in
``stores/sql/sqlite_NNNN_*.sql`` (applied by :meth:`SQLiteStore.open`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from types import TracebackType
from typing import Any, NoReturn, TypeVar

from sagakit.core.envelope import Envelope
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState, Timer
from sagakit.errors import ConcurrencyError, ConfigurationError, StoreError
from sagakit.stores.base import (
    DeadLetter,
    IdempotencyRecord,
    ItemByItem,
    OutboxRow,
    QueuedMessage,
    SagaPage,
    SagaQuery,
    SetAside,
)
from sagakit.stores.rows import (
    check_settlement,
    dead_letter_from_row,
    dead_letter_where,
    saga_find_statements,
    saga_insert_params,
    saga_update_params,
)
from sagakit.stores.rows import dumps as _dumps
from sagakit.stores.rows import history_from_row as _history_from_row
from sagakit.stores.rows import history_params as _history_params
from sagakit.stores.rows import loads as _loads
from sagakit.stores.rows import saga_from_row as _saga_from_row

__all__ = ["ENGINE_NAMESPACE", "SYNCHRONOUS_MODES", "SQLiteStore", "SQLiteTx", "split_statements"]

ENGINE_NAMESPACE = "sagakit"
"""The ``schema_migrations`` namespace of sagakit's own tables."""

SYNCHRONOUS_MODES = ("FULL", "NORMAL", "EXTRA")
"""Accepted ``synchronous`` settings. OFF is refused: a power cut could lose commits."""

_T = TypeVar("_T")

DECODE_SLICE = 25
"""Rows decoded between two turns of the event loop when reads run in threads."""

_MIGRATION_FILE = re.compile(r"sqlite_(\d{4})_\w+\.sql")


@cache
def _queries() -> dict[str, str]:
    text = _sql_dir().joinpath("sqlite_queries.sql").read_text(encoding="utf-8")
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", text, flags=re.MULTILINE)[1:]:
        name, _, sql = block.partition("\n")
        queries[name.strip()] = sql.strip()
    return queries


@cache
def _engine_migrations() -> tuple[str, ...]:
    found = sorted(
        (int(match[1]), entry.name)
        for entry in _sql_dir().iterdir()
        if (match := _MIGRATION_FILE.fullmatch(entry.name))
    )
    # Step numbers are positions in the sequence, so the files must number 1..n.
    if [number for number, _ in found] != list(range(1, len(found) + 1)):
        raise ConfigurationError(f"sagakit's SQLite migrations are not numbered 1..n: {found}")
    return tuple(_sql_dir().joinpath(name).read_text(encoding="utf-8") for _, name in found)


def _sql_dir() -> Traversable:
    return resources.files("sagakit.stores").joinpath("sql")


def split_statements(script: str) -> list[str]:
    """Split an SQL script into single statements (triggers and quoted ``;`` included).

    ``sqlite3.executescript`` would commit any open transaction first, so migrations run
    statement by statement inside their own transaction instead.
    """
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        # complete_statement knows about string literals, comments and BEGIN...END of
        # triggers: a ";" inside them does not end the statement.
        if sqlite3.complete_statement(pending):
            statement = pending.strip()
            if statement != ";":
                statements.append(statement)
            pending = ""
    if pending.strip(" \n\t;"):
        statements.append(pending.strip())  # unterminated: let SQLite report it
    return statements


def _fail(store: str, what: str, exc: sqlite3.Error) -> StoreError:
    code = getattr(exc, "sqlite_errorname", None)
    detail = f"{exc} ({code})" if code else str(exc)
    return StoreError(f"SQLite store {store!r} could not {what}: {detail}")


def _finished() -> NoReturn:
    raise StoreError(
        "this transaction has ended; use the Tx only inside its `async with "
        "store.transaction()` block"
    )


def _rollback(conn: sqlite3.Connection, store: str) -> None:
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise _fail(store, "roll back a failed transaction", exc) from exc


# -- row codecs ----------------------------------------------------------------------


# -- transaction ---------------------------------------------------------------------


class SQLiteTx(ItemByItem):
    """One transaction on the store's writer connection (see :class:`~sagakit.stores.base.Tx`).

    Obtained from :meth:`SQLiteStore.transaction`; every method raises
    :class:`~sagakit.errors.StoreError` once the block has ended.
    """

    __slots__ = ("_conn", "_q", "_store")

    def __init__(self, conn: sqlite3.Connection, queries: dict[str, str], store: str) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._q = queries
        self._store = store

    @classmethod
    def on_connection(cls, conn: sqlite3.Connection, store: str = "store") -> SQLiteTx:
        """A Tx writing through ``conn``, a connection to the store's file whose
        transaction its owner began and ends: this Tx never commits nor rolls back
        (see :mod:`sagakit.runtime.own_tx`)."""
        return cls(conn, _queries(), store)

    # The four helpers below are the only places that touch the connection: they refuse
    # to run after the block ended and translate driver errors into StoreError.
    def _run(self, what: str, sql: str, params: Sequence[Any]) -> sqlite3.Cursor:
        conn = self._conn or _finished()
        try:
            return conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise _fail(self._store, what, exc) from exc

    def _one(self, what: str, sql: str, params: Sequence[Any]) -> Any:
        conn = self._conn or _finished()
        try:
            return conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise _fail(self._store, what, exc) from exc

    def _all(self, what: str, sql: str, params: Sequence[Any]) -> list[Any]:
        conn = self._conn or _finished()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _fail(self._store, what, exc) from exc

    def _many(self, what: str, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        conn = self._conn or _finished()
        try:
            conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise _fail(self._store, what, exc) from exc

    # -- business data ----------------------------------------------------------------
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; return the number of rows it changed."""
        return self._run(f"execute {sql[:200]!r}", sql, params).rowcount

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query; return every row."""
        return self._all(f"run query {sql[:200]!r}", sql, params)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """Run a query; return the first row or ``None``."""
        row: tuple[Any, ...] | None = self._one(f"run query {sql[:200]!r}", sql, params)
        return row

    # -- inbox, idempotency, outbox, dead letters ------------------------------------
    async def inbox_add(self, consumer: str, message_id: str, now: float) -> bool:
        """Record that ``consumer`` handled ``message_id``; False if it already had."""
        cursor = self._run(
            f"record message {message_id} in the inbox",
            self._q["inbox_add"],
            (consumer, message_id, now),
        )
        return cursor.rowcount == 1

    async def inbox_add_many(
        self, consumer: str, message_ids: Sequence[str], now: float
    ) -> set[str]:
        """Record several ids in one statement; return those not handled before."""
        if not message_ids:
            return set()
        rows = self._all(
            f"record {len(message_ids)} message(s) in the inbox",
            self._q["inbox_add_many"],
            (consumer, now, _dumps(list(message_ids))),
        )
        return {r[0] for r in rows}

    async def idempotency_get(self, consumer: str, key: str) -> IdempotencyRecord | None:
        """The outcome ``consumer`` recorded for ``key``, if any."""
        row = self._one(
            f"read idempotency key {key!r}", self._q["idempotency_get"], (consumer, key)
        )
        if row is None:
            return None
        return IdempotencyRecord(key=key, outcome=_loads(row[0]), tombstone=bool(row[1]), at=row[2])

    async def idempotency_get_many(
        self, consumer: str, keys: Sequence[str]
    ) -> dict[str, IdempotencyRecord]:
        """The outcomes ``consumer`` recorded for any of ``keys``, in one statement."""
        if not keys:
            return {}
        rows = self._all(
            f"read {len(keys)} idempotency key(s)",
            self._q["idempotency_get_many"],
            (consumer, _dumps(list(keys))),
        )
        return {
            r[0]: IdempotencyRecord(key=r[0], outcome=_loads(r[1]), tombstone=bool(r[2]), at=r[3])
            for r in rows
        }

    async def idempotency_put(
        self,
        consumer: str,
        key: str,
        outcome: dict[str, Any],
        now: float,
        *,
        tombstone: bool = False,
    ) -> None:
        """Record the outcome for ``key``; a key is written once (a second put is an error)."""
        try:
            self._run(
                f"record idempotency key {key!r}",
                self._q["idempotency_put"],
                (consumer, key, _dumps(outcome), int(tombstone), now),
            )
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise StoreError(
                    f"idempotency key {key!r} of consumer {consumer!r} is already recorded; "
                    "read it with idempotency_get before writing"
                ) from exc.__cause__
            raise

    async def outbox_add(self, envelopes: Sequence[Envelope], now: float) -> None:
        """Queue messages to be published after commit."""
        rows = [(e.message_id, e.destination, e.saga_id, e.to_json(), now) for e in envelopes]
        self._many(f"add {len(rows)} message(s) to the outbox", self._q["outbox_add"], rows)

    async def dead_letter(
        self, endpoint: str, message_id: str | None, body: str, reason: str, now: float
    ) -> None:
        """Park a message that cannot be handled, with the reason (once while open)."""
        self._run(
            f"park message {message_id} as a dead letter",
            self._q["dead_letter_add"],
            (endpoint, message_id, body, reason, now),
        )

    async def dead_letter_get(self, id: int) -> DeadLetter | None:
        """A dead letter by id (the transaction holds SQLite's only write lock)."""
        row = self._one(f"read dead letter {id}", self._q["dead_letter_get"], (id,))
        return None if row is None else dead_letter_from_row(row)

    async def dead_letter_settle(
        self, id: int, settlement: str, actor: str, reason: str, now: float
    ) -> bool:
        """Settle an open dead letter; False if it does not exist or was settled already."""
        check_settlement(settlement)
        cursor = self._run(
            f"settle dead letter {id} as {settlement}",
            self._q["dead_letter_settle"],
            (settlement, actor, now, reason, id),
        )
        return cursor.rowcount == 1

    # -- sagas ------------------------------------------------------------------------
    async def saga_get(self, saga_id: str) -> SagaInstance | None:
        """Load an instance; the transaction already holds SQLite's only write lock."""
        row = self._one(f"load saga {saga_id}", self._q["saga_get"], (saga_id,))
        return None if row is None else _saga_from_row(row)

    async def saga_get_many(self, saga_ids: Sequence[str]) -> dict[str, SagaInstance]:
        """Load several instances in one statement (missing ones are left out)."""
        if not saga_ids:
            return {}
        rows = self._all(
            f"load {len(saga_ids)} saga(s)", self._q["saga_get_many"], (_dumps(list(saga_ids)),)
        )
        return {r[0]: _saga_from_row(r) for r in rows}

    async def saga_get_by_key(self, definition: str, business_key: str) -> SagaInstance | None:
        """The instance of ``definition`` (any version) started for ``business_key``."""
        row = self._one(
            f"load the {definition} saga of {business_key!r}",
            self._q["saga_get_by_key"],
            (definition, business_key),
        )
        return None if row is None else _saga_from_row(row)

    async def saga_insert(self, instance: SagaInstance) -> None:
        """Insert a new instance; ``ConcurrencyError`` if its id or (definition, key) exists."""
        try:
            self._run(
                f"insert saga {instance.saga_id}",
                self._q["saga_insert"],
                _saga_insert_params(instance),
            )
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, sqlite3.IntegrityError) and "sagas.saga_id" in str(cause):
                raise ConcurrencyError(f"saga {instance.saga_id} already exists") from cause
            if isinstance(cause, sqlite3.IntegrityError) and "sagas.business_key" in str(cause):
                raise ConcurrencyError(
                    f"a {instance.definition} saga already exists for business key "
                    f"{instance.business_key!r}"
                ) from cause
            raise

    async def saga_update(self, instance: SagaInstance, expected_version: int) -> None:
        """Write ``instance`` if the stored version is still ``expected_version``.

        Raises :class:`~sagakit.errors.ConcurrencyError` otherwise: another worker
        applied a transition first, and this one must be recomputed.
        """
        what = f"update saga {instance.saga_id}"
        params = _saga_update_params(instance, expected_version)
        if self._run(what, self._q["saga_update"], params).rowcount == 1:
            return
        # Only the losing path pays for the second query that explains the loss.
        row = self._one(what, self._q["saga_get"], (instance.saga_id,))
        found = "it does not exist" if row is None else f"it is at version {row[6]}"
        raise ConcurrencyError(
            f"saga {instance.saga_id} was not updated: expected version {expected_version}, "
            f"but {found}; reload it and recompute the transition"
        )

    async def history_add(self, entries: Sequence[HistoryEntry]) -> None:
        """Append history rows (never updated, never deleted)."""
        rows = _history_params(entries)
        self._many(f"append {len(rows)} history row(s)", self._q["history_add"], rows)

    async def timers_set(self, timers: Sequence[Timer]) -> None:
        """Set timers; one with the same (saga_id, name) is replaced."""
        rows = [(t.saga_id, t.name, t.due_at, t.fence) for t in timers]
        self._many(f"set {len(rows)} timer(s)", self._q["timer_set"], rows)

    async def timers_cancel(self, saga_id: str, names: Sequence[str]) -> None:
        """Delete the named timers of one saga (missing ones are ignored)."""
        rows = [(saga_id, name) for name in names]
        self._many(f"cancel timers of saga {saga_id}", self._q["timer_cancel"], rows)

    async def timers_take_due(self, now: float, limit: int) -> list[Timer]:
        """Remove and return up to ``limit`` timers due at ``now``, earliest first.

        Taken inside the transaction that applies them: if it rolls back, they stay.
        """
        if limit <= 0:
            return []
        rows = self._all("take due timers", self._q["timers_take_due"], (now, limit))
        rows.sort(key=lambda r: (r[2], r[0], r[1]))
        # float(): RETURNING may report a whole REAL as an int.
        return [Timer(saga_id=r[0], name=r[1], due_at=float(r[2]), fence=r[3]) for r in rows]

    # -- inputs set aside for a missing definition version ------------------------------
    async def set_aside_add(
        self,
        saga_id: str,
        definition: str,
        definition_version: int,
        kind: str,
        body: str,
        now: float,
    ) -> None:
        """Set aside an input of ``saga_id`` until a process with the version applies it."""
        self._run(
            f"set aside a {kind} of saga {saga_id}",
            self._q["set_aside_add"],
            (saga_id, definition, definition_version, kind, body, now),
        )

    async def set_aside_take(self, ids: Sequence[int]) -> set[int]:
        """Delete set-aside inputs in this transaction; return the ids still there."""
        if not ids:
            return set()
        rows = self._all(
            f"take {len(ids)} input(s) set aside", self._q["set_aside_take"], (_dumps(list(ids)),)
        )
        return {r[0] for r in rows}

    # -- mailbox queue, inside the transaction ---------------------------------------
    async def queue_add(
        self,
        endpoint: str,
        bodies: Sequence[str],
        now: float,
        *,
        leased_until: float | None = None,
    ) -> list[int]:
        """Append messages to ``endpoint``'s mailbox on commit; return their ids, in order.

        With ``leased_until`` they count as handed out once and stay hidden until then.
        """
        at, deliveries = (now, 0) if leased_until is None else (leased_until, 1)
        sql, what = self._q["queue_add"], f"add {len(bodies)} message(s) to {endpoint!r}"
        # One execute per row: executemany does not report the ids (lastrowid).
        return [
            self._run(what, sql, (endpoint, body, now, at, deliveries)).lastrowid or 0
            for body in bodies
        ]

    async def queue_remove(self, ids: Sequence[int]) -> None:
        """Remove mailbox messages in this transaction: acknowledged with their effect."""
        if ids:
            self._run(
                f"remove {len(ids)} message(s) from the mailbox",
                self._q["queue_ack"],
                (_dumps(list(ids)),),
            )


class _Transaction(AbstractAsyncContextManager[SQLiteTx]):
    """``async with``: BEGIN IMMEDIATE under the writer lock; COMMIT, or ROLLBACK on error."""

    __slots__ = ("_store", "_tx")

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self._tx: SQLiteTx | None = None

    async def __aenter__(self) -> SQLiteTx:
        store = self._store
        conn = await store._acquire()
        try:
            # IMMEDIATE takes the write lock now rather than at the first write, so two
            # processes on one file wait (busy_timeout) instead of failing mid-transaction.
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            store._release()
            raise _fail(store.name, "begin a transaction", exc) from exc
        self._tx = SQLiteTx(conn, store._q, store.name)
        return self._tx

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        store, tx = self._store, self._tx
        assert tx is not None and tx._conn is not None, "transaction exited without entering"
        conn, tx._conn = tx._conn, None
        try:
            if exc_type is not None:
                _rollback(conn, store.name)
                return
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as commit_exc:
                _rollback(conn, store.name)
                raise _fail(store.name, "commit (nothing was written)", commit_exc) from commit_exc
        finally:
            store._release()


# -- store ---------------------------------------------------------------------------


class SQLiteStore:
    """A :class:`~sagakit.stores.base.Store` in one SQLite file (WAL mode).

    ``synchronous`` is FULL by default: a commit survives a power cut. NORMAL keeps
    commits across a process crash (``kill -9``) but may lose the last ones on power
    loss, for a much higher commit rate. ``busy_timeout_ms`` is how long a statement
    waits for another process holding the file's write lock.

    Call :meth:`open` before use (it applies pending migrations) and :meth:`close`
    after; a closed store can be opened again on the same file.
    """

    dialect = "sqlite"
    """The SQL dialect of business tables, for the rare migration that differs."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str = "store",
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
    ) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:"):
            raise ConfigurationError(
                "SQLiteStore needs a database file (its reader and writer connections must "
                "share it); use MemoryStore for a store without a file"
            )
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ConfigurationError(
                f"synchronous={synchronous!r} is not supported; use one of {SYNCHRONOUS_MODES} "
                "(FULL survives power loss, NORMAL survives process crashes)"
            )
        if busy_timeout_ms < 0:
            raise ConfigurationError(f"busy_timeout_ms must be >= 0, got {busy_timeout_ms}")
        self.name = name
        self.synchronous = mode
        self.busy_timeout_ms = busy_timeout_ms
        self._q = _queries()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_threads = 0
        self._read_pool: ThreadPoolExecutor | None = None
        self._thread_reader = threading.local()
        self._thread_readers: list[sqlite3.Connection] = []
        self._thread_lock = threading.Lock()
        self._lock = asyncio.Lock()
        self._decode_turn = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, name={self.name!r})"

    # -- lifecycle --------------------------------------------------------------------
    async def open(self) -> None:
        """Connect, switch to WAL and apply sagakit's pending migrations."""
        if self._writer is not None:
            return
        # A fresh lock per open, so a store can be reopened under another event loop.
        self._lock = asyncio.Lock()
        self._decode_turn = asyncio.Lock()
        self._create_owner_only()
        writer = self._connect()
        reader: sqlite3.Connection | None = None
        try:
            mode = writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"SQLite store {self.name!r} cannot use WAL mode on {self.path!r} (got "
                    f"{mode!r}); put the database on a local file system"
                )
            writer.execute(f"PRAGMA synchronous={self.synchronous}")
            writer.execute(self._q["schema_migrations_create"])
            self._migrate(writer, ENGINE_NAMESPACE, _engine_migrations())
            reader = self._connect()
            # A guard: the reader must never write behind the writer lock's back.
            reader.execute("PRAGMA query_only=ON")
        except BaseException as exc:
            writer.close()
            if reader is not None:
                reader.close()
            if isinstance(exc, sqlite3.Error):
                raise _fail(self.name, f"open {self.path!r}", exc) from exc
            raise
        self._writer, self._reader = writer, reader

    def _create_owner_only(self) -> None:
        """Create a new database file readable and writable by its owner only (0600).

        The file is created empty here, with its mode, before SQLite opens it (an empty
        file is an empty database); SQLite gives its ``-wal``, ``-shm`` and ``-journal``
        files the database file's mode. No umask: it is process-wide. An existing file
        keeps its mode.
        """
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:  # it exists, or e.g. no such directory: sqlite3.connect reports it
            return
        os.close(fd)

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: the driver issues no implicit BEGIN; transactions are
            # explicit. A large statement cache keeps every query of the hot path prepared.
            conn = sqlite3.connect(self.path, isolation_level=None, cached_statements=512)
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        except sqlite3.Error as exc:
            raise _fail(self.name, f"open {self.path!r}", exc) from exc
        return conn

    async def close(self) -> None:
        """Close both connections (waits for a running transaction to end)."""
        if self._writer is None:
            return
        await self._acquire()
        try:
            writer, reader = self._writer, self._reader
            self._writer = self._reader = None
            pool, self._read_pool = self._read_pool, None
            if pool is not None:
                # Reads take milliseconds; wait for them before closing their connections.
                await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)
            with self._thread_lock:
                readers, self._thread_readers = self._thread_readers, []
            self._thread_reader = threading.local()
            try:
                for conn in readers:
                    conn.close()
                if reader is not None:
                    reader.close()
                if writer is not None:
                    writer.close()
            except sqlite3.Error as exc:
                raise _fail(self.name, "close", exc) from exc
        finally:
            self._release()

    async def apply_migrations(self, namespace: str, steps: Sequence[str]) -> None:
        """Apply the SQL scripts of ``steps`` not yet applied for ``namespace``, in order.

        Step *n* is ``steps[n - 1]``: append new steps, never edit or reorder applied
        ones. Each step runs in its own transaction together with its record in
        ``schema_migrations``, so a step that fails leaves nothing behind and is tried
        again next time. Scripts must not contain BEGIN/COMMIT themselves.
        Participant services call this after :meth:`open` for their business tables.
        """
        if not namespace:
            raise ConfigurationError("apply_migrations needs a non-empty namespace")
        if isinstance(steps, str):
            raise ConfigurationError(
                "apply_migrations takes a sequence of SQL scripts (one per step), not one string"
            )
        conn = await self._acquire()
        try:
            self._migrate(conn, namespace, steps)
        finally:
            self._release()

    def _migrate(self, conn: sqlite3.Connection, namespace: str, steps: Sequence[str]) -> None:
        q = self._q
        try:
            done = {row[0] for row in conn.execute(q["migration_steps"], (namespace,))}
        except sqlite3.Error as exc:
            raise _fail(self.name, f"read applied migrations of {namespace!r}", exc) from exc
        for number, script in enumerate(steps, start=1):
            if number in done:
                continue
            try:
                conn.execute("BEGIN IMMEDIATE")
                # Another process may have applied it since the read above.
                if conn.execute(q["migration_applied"], (namespace, number)).fetchone() is None:
                    for statement in split_statements(script):
                        conn.execute(statement)
                    conn.execute(q["migration_record"], (namespace, number, time.time()))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn, self.name)
                raise _fail(
                    self.name,
                    f"apply migration step {number} of {namespace!r} (rolled back; fix the "
                    "script and open again)",
                    exc,
                ) from exc

    # -- the writer lock ----------------------------------------------------------------
    async def _acquire(self) -> sqlite3.Connection:
        if self._writer is None:
            self._not_open()
        task = asyncio.current_task()
        if self._owner is not None and self._owner is task:
            raise StoreError(
                f"store {self.name!r} is already in a transaction in this task; waiting for "
                "it would deadlock (use the open Tx instead of the store or a second transaction)"
            )
        await self._lock.acquire()
        if self._writer is None:  # closed while waiting
            self._lock.release()
            self._not_open()
        self._owner = task
        return self._writer

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    @contextlib.asynccontextmanager
    async def writer_turn(self) -> AsyncIterator[None]:
        """Hold the writer lock for the block, without a transaction of the store's own.

        For a transaction on another connection to this file (a participant in the
        user's own transaction): this process's store writes then wait on the lock,
        instead of blocking the event loop on SQLite's file lock until it ends.
        """
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    def _not_open(self) -> NoReturn:
        raise StoreError(f"SQLite store {self.name!r} is not open; call `await store.open()` first")

    def transaction(self) -> AbstractAsyncContextManager[SQLiteTx]:
        """A transaction: commits when the block exits normally, rolls back on error."""
        return _Transaction(self)

    def snapshot(self) -> AbstractAsyncContextManager[SQLiteTx]:
        """A transaction whose reads all see one state of the database: any transaction
        of this store does (they run one at a time on its writer connection)."""
        return _Transaction(self)

    async def _write(self, what: str, sql: str, params: Sequence[Any]) -> tuple[int, list[Any]]:
        """One statement on the writer as its own (autocommit) transaction.

        Returns the number of rows changed and the rows of a RETURNING clause. Reading
        them to the end completes the statement, which is when SQLite commits it.
        """
        conn = await self._acquire()
        try:
            cursor = conn.execute(sql, params)
            rows = cursor.fetchall()
            return cursor.rowcount, rows
        except sqlite3.Error as exc:
            raise _fail(self.name, what, exc) from exc
        finally:
            self._release()

    # -- reads ------------------------------------------------------------------------
    def read_in_threads(self, threads: int) -> None:
        """Run the plain reads' SQL in ``threads`` worker threads (0: on the event loop).

        Each worker thread reads through a connection of its own (WAL lets readers run
        next to the writer); SQLite lets other threads run while it executes a query.
        Decoding the rows is Python work that would only contend for the GIL in a
        thread, so it stays on the loop, in slices of :data:`DECODE_SLICE` rows with a
        turn for other tasks in between, and one large page at a time: a burst of
        pages of 500 sagas never holds the loop for more than a slice. A server
        (``sagakit serve``) turns this on; an engine on its own keeps reads on the
        loop, where a read costs no thread hop. Transactions and writes stay on the
        loop in every case.
        """
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ConfigurationError(f"read threads must be an integer >= 0, got {threads!r}")
        self._read_threads = threads

    async def _read(self, what: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        rows: list[Any] = await self._reading(
            what, lambda conn: conn.execute(sql, params).fetchall()
        )
        return rows

    async def _decoded(self, rows: list[Any], decode: Callable[[Any], _T]) -> list[_T]:
        """``[decode(row) for row in rows]``; with read threads, a large page is decoded
        in slices (one page at a time) with a turn for other tasks after each slice."""
        if not self._read_threads or len(rows) <= DECODE_SLICE:
            return [decode(r) for r in rows]
        out: list[_T] = []
        async with self._decode_turn:
            for start in range(0, len(rows), DECODE_SLICE):
                out.extend(decode(r) for r in rows[start : start + DECODE_SLICE])
                await asyncio.sleep(0)
        return out

    async def _reading(self, what: str, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """``work(reader connection)``: here with the store's reader, or in a worker
        thread with that thread's own reader (see :meth:`read_in_threads`)."""
        conn = self._reader or self._not_open()
        if not self._read_threads:
            try:
                return work(conn)
            except sqlite3.Error as exc:
                raise _fail(self.name, what, exc) from exc
        if self._read_pool is None:
            self._read_pool = ThreadPoolExecutor(
                self._read_threads, thread_name_prefix=f"sqlite-read-{self.name}"
            )
        pool = self._read_pool
        return await asyncio.get_running_loop().run_in_executor(pool, self._in_thread, what, work)

    def _in_thread(self, what: str, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """In a read thread: ``work`` on this thread's reader (connected on first use)."""
        conn: sqlite3.Connection | None = getattr(self._thread_reader, "conn", None)
        try:
            if conn is None:
                # Closed by close() from the loop's thread once this pool has stopped.
                conn = sqlite3.connect(
                    self.path, isolation_level=None, cached_statements=512, check_same_thread=False
                )
                conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
                conn.execute("PRAGMA query_only=ON")
                with self._thread_lock:
                    self._thread_readers.append(conn)
                self._thread_reader.conn = conn
            return work(conn)
        except sqlite3.Error as exc:
            raise _fail(self.name, what, exc) from exc

    async def get_saga(self, saga_id: str) -> SagaInstance | None:
        """An instance by id (no lock)."""
        rows = await self._read(f"read saga {saga_id}", self._q["saga_get"], (saga_id,))
        return _saga_from_row(rows[0]) if rows else None

    async def list_sagas(
        self,
        *,
        states: Sequence[SagaState] | None = None,
        definition: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[SagaInstance]:
        """Instances, newest first (ties in insertion order), optionally filtered."""
        state_list = None if states is None else _dumps([s.value for s in states])
        params = (state_list, definition, max(limit, 0), max(offset, 0))
        rows = await self._read("list sagas", self._q["saga_list"], params)
        return await self._decoded(rows, _saga_from_row)

    async def find_sagas(self, query: SagaQuery, *, limit: int = 100, offset: int = 0) -> SagaPage:
        """The sagas ``query`` selects, newest first, and how many it selects in all."""
        page_sql, count_sql, params = saga_find_statements(self._q, query, "?")
        page_params = (*params, max(limit, 0), max(offset, 0))

        def find(conn: sqlite3.Connection) -> tuple[int, list[Any]]:
            # One read transaction: the total and the page see the same snapshot.
            conn.execute("BEGIN")
            try:
                (total,) = conn.execute(count_sql, params).fetchone()
                rows = conn.execute(page_sql, page_params).fetchall()
            finally:
                conn.execute("COMMIT")
            return total, rows

        total, rows = await self._reading("find sagas", find)
        return SagaPage(total, await self._decoded(rows, _saga_from_row))

    async def get_saga_by_key(self, definition: str, business_key: str) -> SagaInstance | None:
        """The instance of ``definition`` started for ``business_key`` (reader, no lock)."""
        rows = await self._read(
            f"read the {definition} saga of {business_key!r}",
            self._q["saga_get_by_key"],
            (definition, business_key),
        )
        return _saga_from_row(rows[0]) if rows else None

    async def count_sagas(self) -> dict[SagaState, int]:
        """How many instances are in each state (states with none are left out)."""
        return {SagaState(s): n for s, n in await self._read("count sagas", self._q["saga_count"])}

    async def history(self, saga_id: str) -> list[HistoryEntry]:
        """A saga's history in the order it was written."""
        rows = await self._read(
            f"read the history of saga {saga_id}", self._q["history"], (saga_id,)
        )
        return await self._decoded(rows, _history_from_row)

    async def next_timer_due(self) -> float | None:
        """When the earliest timer is due, or ``None`` when there is none."""
        due: float | None = (await self._read("read the next timer", self._q["timer_next_due"]))[0][
            0
        ]
        return due

    async def count_sagas_by_version(self) -> dict[tuple[str, int, SagaState], int]:
        """How many instances there are per (definition, version, state) (a scan)."""
        rows = await self._read("count sagas by version", self._q["saga_count_by_version"])
        return {(d, v, SagaState(s)): n for d, v, s, n in rows}

    # -- inputs set aside for a missing definition version ------------------------------
    async def set_aside_counts(self) -> dict[tuple[str, int], int]:
        """How many inputs wait per (definition, version)."""
        rows = await self._read("count the inputs set aside", self._q["set_aside_counts"])
        return {(d, v): n for d, v, n in rows}

    async def set_aside_claim(
        self, versions: Sequence[tuple[str, int]], limit: int, now: float, lease: float
    ) -> list[SetAside]:
        """Claim up to ``limit`` inputs waiting for any of ``versions``, oldest first."""
        if limit <= 0 or not versions:
            return []
        _, rows = await self._write(
            "claim inputs set aside",
            self._q["set_aside_claim"],
            (now + lease, _dumps([list(v) for v in versions]), now, limit),
        )
        rows.sort()
        return [_set_aside_from_row(r) for r in rows]

    async def set_aside_of_saga(self, saga_id: str) -> list[SetAside]:
        """The inputs of ``saga_id`` set aside, oldest first."""
        rows = await self._read(
            f"read the inputs of saga {saga_id} set aside", self._q["set_aside_of_saga"], (saga_id,)
        )
        return [_set_aside_from_row(r) for r in rows]

    # -- outbox relay -----------------------------------------------------------------
    async def outbox_claim(self, limit: int, now: float, lease: float) -> list[OutboxRow]:
        """Claim up to ``limit`` unpublished rows for ``lease`` seconds, oldest first.

        A claimed row is not handed to another relay until its lease expires, so a
        relay that dies mid-publish only delays its rows. Callers publish, wait for the
        acknowledgement, then :meth:`outbox_mark_published`.
        """
        if limit <= 0:
            return []
        _, rows = await self._write(
            "claim outbox rows", self._q["outbox_claim"], (now + lease, now, limit)
        )
        rows.sort()
        return [OutboxRow(id=r[0], envelope=Envelope.from_json(r[1])) for r in rows]

    async def outbox_mark_published(self, ids: Sequence[int], now: float) -> None:
        """Mark rows as published (acknowledged by the transport)."""
        if ids:
            await self._write(
                f"mark {len(ids)} outbox row(s) published",
                self._q["outbox_mark_published"],
                (now, _dumps(list(ids))),
            )

    async def outbox_pending(self) -> int:
        """How many rows are not yet published."""
        count: int = (await self._read("count pending outbox rows", self._q["outbox_pending"]))[0][
            0
        ]
        return count

    async def outbox_all(self) -> list[tuple[Envelope, float | None]]:
        """Every outbox row with its published time (for audits and invariant checks)."""
        rows = await self._read("read the outbox", self._q["outbox_all"])
        return [(Envelope.from_json(body), published) for body, published in rows]

    async def outbox_of_saga(self, saga_id: str) -> list[tuple[Envelope, float | None]]:
        """The outbox rows whose envelope carries ``saga_id``, in write order (indexed)."""
        rows = await self._read(
            f"read the outbox of saga {saga_id}", self._q["outbox_of_saga"], (saga_id,)
        )
        return [(Envelope.from_json(body), published) for body, published in rows]

    async def outbox_purge(self, published_before: float, *, batch: int = 1000) -> int:
        """Delete rows published before ``published_before``, ``batch`` rows per write
        transaction (the writer is free between two); return how many."""
        purged = 0
        while True:
            n, _ = await self._write(
                "purge published outbox rows", self._q["outbox_purge"], (published_before, batch)
            )
            purged += n
            if n < batch:
                return purged

    async def outbox_oldest_pending(self) -> float | None:
        """``created_at`` of the oldest unpublished row, or ``None`` when all are published."""
        rows = await self._read(
            "read the oldest pending outbox row", self._q["outbox_oldest_pending"]
        )
        return float(rows[0][0]) if rows else None

    # -- inbox ------------------------------------------------------------------------
    async def inbox_ids(self, consumer: str) -> set[str]:
        """Message ids ``consumer`` has handled (for audits and invariant checks)."""
        rows = await self._read(
            f"read the inbox of {consumer!r}", self._q["inbox_ids"], (consumer,)
        )
        return {r[0] for r in rows}

    async def inbox_has(self, consumer: str, message_id: str) -> bool:
        """Whether ``consumer`` recorded ``message_id`` as handled."""
        rows = await self._read(
            f"look up {message_id} in the inbox of {consumer!r}",
            self._q["inbox_has"],
            (consumer, message_id),
        )
        return bool(rows)

    async def inbox_purge(self, older_than: float) -> int:
        """Delete inbox rows recorded before ``older_than``; return how many."""
        purged, _ = await self._write("purge the inbox", self._q["inbox_purge"], (older_than,))
        return purged

    # -- mailbox queue (embedded transport) -------------------------------------------
    async def queue_push(
        self, endpoint: str, bodies: Sequence[str], now: float, available_at: float | None = None
    ) -> None:
        """Append raw messages to ``endpoint``'s mailbox, visible from ``available_at``."""
        if not bodies:
            return
        at = now if available_at is None else available_at
        rows = [(endpoint, body, now, at) for body in bodies]
        conn = await self._acquire()
        try:
            if len(rows) == 1:
                conn.execute(self._q["queue_push"], rows[0])
            else:
                # Without an explicit transaction executemany would commit once per row.
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(self._q["queue_push"], rows)
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn, self.name)
            raise _fail(self.name, f"push {len(rows)} message(s) to {endpoint!r}", exc) from exc
        finally:
            self._release()

    async def queue_fetch(
        self, endpoint: str, limit: int, now: float, lease: float
    ) -> list[QueuedMessage]:
        """Hand out up to ``limit`` visible messages, oldest first, hidden for ``lease`` s.

        Each counts one more delivery. A message not acknowledged before its lease
        ends is handed out again (at-least-once).
        """
        if limit <= 0:
            return []
        _, rows = await self._write(
            f"fetch from the mailbox of {endpoint!r}",
            self._q["queue_fetch"],
            (now + lease, endpoint, now, limit),
        )
        rows.sort()
        return [
            # float(): UPDATE ... RETURNING reports a whole REAL as an int.
            QueuedMessage(
                id=r[0], endpoint=r[1], body=r[2], deliveries=r[3], enqueued_at=float(r[4])
            )
            for r in rows
        ]

    async def queue_ack(self, ids: Sequence[int]) -> None:
        """Remove handled messages from the mailbox."""
        if ids:
            await self._write(
                f"acknowledge {len(ids)} message(s)", self._q["queue_ack"], (_dumps(list(ids)),)
            )

    async def queue_retry(self, id: int, available_at: float, error: str) -> None:
        """Make a message visible again at ``available_at`` (a failed delivery)."""
        await self._write(
            f"reschedule message {id}", self._q["queue_retry"], (available_at, error, id)
        )

    async def queue_reset_leases(self, endpoint: str) -> int:
        """Make every leased message of ``endpoint`` visible now (the sole consumer restarted).

        A message counts as leased once it was handed out; messages delayed at push
        time and never delivered keep their delay.
        """
        reset, _ = await self._write(
            f"reset the leases of {endpoint!r}", self._q["queue_reset_leases"], (endpoint,)
        )
        return reset

    async def queue_depth(self, endpoint: str | None = None) -> int:
        """How many messages wait in a mailbox (all mailboxes when ``endpoint`` is None)."""
        if endpoint is None:
            rows = await self._read("count queued messages", self._q["queue_depth"])
        else:
            rows = await self._read(
                f"count the mailbox of {endpoint!r}", self._q["queue_depth_of"], (endpoint,)
            )
        depth: int = rows[0][0]
        return depth

    async def next_queue_visible(self, endpoint: str) -> float | None:
        """When the next hidden or delayed message of ``endpoint`` becomes visible.

        This is the smallest ``available_at`` of the mailbox, which is in the past when
        a message is visible already; ``None`` when the mailbox is empty.
        """
        rows = await self._read(
            f"read the mailbox of {endpoint!r}", self._q["queue_next_visible"], (endpoint,)
        )
        at: float | None = rows[0][0]
        return at

    async def dead_letters(
        self,
        endpoint: str | None = None,
        *,
        settled: bool | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[DeadLetter]:
        """Dead letters, oldest first, optionally of one endpoint, open or settled, a page."""
        where, params = dead_letter_where(endpoint, settled, "?")
        rows = await self._read(
            "read dead letters",
            self._q["dead_letters_page"].replace("{where}", where),
            (*params, -1 if limit is None else max(limit, 0), max(offset, 0)),
        )
        return await self._decoded(rows, dead_letter_from_row)

    async def dead_letter_count(
        self, endpoint: str | None = None, *, settled: bool | None = False
    ) -> int:
        """How many dead letters there are (by default the open ones), without reading them."""
        where, params = dead_letter_where(endpoint, settled, "?")
        rows = await self._read(
            "count dead letters", self._q["dead_letter_count"].replace("{where}", where), params
        )
        count: int = rows[0][0]
        return count

    async def get_dead_letter(self, id: int) -> DeadLetter | None:
        """A dead letter by id, settled or not."""
        rows = await self._read(f"read dead letter {id}", self._q["dead_letter_get"], (id,))
        return dead_letter_from_row(rows[0]) if rows else None


def _saga_insert_params(i: SagaInstance) -> tuple[Any, ...]:
    return saga_insert_params(i, int)


def _set_aside_from_row(r: Sequence[Any]) -> SetAside:
    # float(): RETURNING may report a whole REAL as an int.
    return SetAside(r[0], r[1], r[2], r[3], r[4], r[5], float(r[6]))


def _saga_update_params(i: SagaInstance, expected_version: int) -> tuple[Any, ...]:
    return saga_update_params(i, expected_version, int)
