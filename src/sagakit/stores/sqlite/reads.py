"""The SQLite store's statements that run on their own, outside a transaction: the
plain reads (on the reader connection, or in read threads for a server) and the few
writes that need no transaction of their own (relay claims, mailbox updates, on the
writer). :class:`SQLiteStatements` is part of
:class:`~sagakit.stores.sqlite.SQLiteStore`."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from sagakit.core.envelope import Envelope
from sagakit.core.instance import SagaState
from sagakit.errors import ConfigurationError
from sagakit.stores.base import (
    OutboxRow,
    SagaOrder,
    SagaPage,
    SagaQuery,
    SetAside,
)
from sagakit.stores.rows import dumps as _dumps
from sagakit.stores.rows import (
    saga_find_statements,
    set_aside_from_row,
)
from sagakit.stores.rows import saga_from_row as _saga_from_row
from sagakit.stores.shared import SharedStatements
from sagakit.stores.sqlite.sql import _fail, _rollback

_T = TypeVar("_T")

DECODE_SLICE = 25
"""Rows decoded between two turns of the event loop when reads run in threads."""


class SQLiteStatements(SharedStatements):
    """The reads and the single-statement writes of :class:`~sagakit.stores.sqlite.SQLiteStore`."""

    name: str
    path: str
    busy_timeout_ms: int
    _q: dict[str, str]
    _reader: sqlite3.Connection | None
    _read_threads: int
    _read_pool: ThreadPoolExecutor | None
    _thread_reader: threading.local
    _thread_readers: list[sqlite3.Connection]
    _thread_lock: threading.Lock
    _decode_turn: asyncio.Lock

    if TYPE_CHECKING:

        def _not_open(self) -> NoReturn: ...

        async def _acquire(self) -> sqlite3.Connection: ...

        def _release(self) -> None: ...

        async def _write(
            self, what: str, sql: str, params: Sequence[Any]
        ) -> tuple[int, list[Any]]: ...

    @staticmethod
    def _array(values: Sequence[Any]) -> Any:
        """A list as one parameter: JSON text, read by ``json_each`` in the query."""
        return _dumps(list(values))

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

    async def _read(
        self, what: str, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> list[Any]:
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

    async def find_sagas(
        self,
        query: SagaQuery,
        *,
        limit: int = 100,
        offset: int = 0,
        order: SagaOrder = SagaOrder.NEWEST,
    ) -> SagaPage:
        """The sagas ``query`` selects, in ``order``, and how many it selects in all."""
        page_sql, count_sql, params = saga_find_statements(self._q, query, "?", order)
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

    async def count_sagas(self) -> dict[SagaState, int]:
        """How many instances are in each state (states with none are left out)."""
        return {SagaState(s): n for s, n in await self._read("count sagas", self._q["saga_count"])}

    # -- inputs set aside for a missing definition version ------------------------------
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
        return [set_aside_from_row(r) for r in rows]

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
