"""The SQLite store itself: its connections, its writer lock, its migrations and its
transactions (see :mod:`sagakit.stores.sqlite` for how it works)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from typing import Any, NoReturn, TypeVar

from sagakit.errors import ConfigurationError, StoreError
from sagakit.stores.sqlite.reads import SQLiteStatements
from sagakit.stores.sqlite.sql import (
    _engine_migrations,
    _fail,
    _queries,
    _rollback,
    split_statements,
)
from sagakit.stores.sqlite.tx import SQLiteTx, _Transaction

__all__ = ["ENGINE_NAMESPACE", "SYNCHRONOUS_MODES", "SQLiteStore"]

ENGINE_NAMESPACE = "sagakit"
"""The ``schema_migrations`` namespace of sagakit's own tables."""

SYNCHRONOUS_MODES = ("FULL", "NORMAL", "EXTRA")
"""Accepted ``synchronous`` settings. OFF is refused: a power cut could lose commits."""

_T = TypeVar("_T")


class SQLiteStore(SQLiteStatements):
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
    _mark = "?"
    _no_limit = -1

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
            self._set_journal(writer)
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

    def _set_journal(self, writer: sqlite3.Connection) -> None:
        """Switch the file to WAL (readers beside the writer) and set ``synchronous``."""
        mode = writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(
                f"SQLite store {self.name!r} cannot use WAL mode on {self.path!r} (got "
                f"{mode!r}); put the database on a local file system"
            )
        writer.execute(f"PRAGMA synchronous={self.synchronous}")

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
            if writer is not None:
                self._closing(writer)
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

    def _closing(self, writer: sqlite3.Connection) -> None:
        """Called under the writer lock just before the connections close: a file
        keeps its rows by itself."""

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
