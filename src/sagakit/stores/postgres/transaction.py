"""The ``async with`` of a PostgreSQL transaction (:class:`_Transaction`: a pooled
connection in pipeline mode, BEGIN, then COMMIT or ROLLBACK) and the relay's locked
batch (:class:`LockedOutbox`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sagakit.errors import StoreError
from sagakit.stores.base import OutboxRow
from sagakit.stores.postgres.driver import log, psycopg, translate_error
from sagakit.stores.postgres.tx import PostgresTx

if TYPE_CHECKING:
    from sagakit.stores.postgres.driver import _Conn, _Pool
    from sagakit.stores.postgres.store import PostgresStore

__all__ = ["LockedOutbox"]

_IDLE_STATUS = 0  # psycopg.pq.TransactionStatus.IDLE (the driver may be missing here)


class LockedOutbox:
    """A relay's batch from :meth:`PostgresStore.outbox_locked`: its rows, locked."""

    __slots__ = ("_tx", "rows")

    def __init__(self, tx: PostgresTx, rows: list[OutboxRow]) -> None:
        self._tx = tx
        self.rows = rows
        """The rows to publish, oldest first."""

    async def mark_published(self, ids: Sequence[int], now: float) -> None:
        """Mark rows published; committed when the block ends without an error."""
        if ids:
            await self._tx._send(
                f"mark {len(ids)} outbox row(s) published",
                self._tx._q["outbox_mark_published"],
                (now, list(ids)),
            )

    async def dead_letter(
        self, endpoint: str, message_id: str | None, body: str, reason: str, now: float
    ) -> None:
        """Park a message that cannot be routed, in the same transaction."""
        await self._tx.dead_letter(endpoint, message_id, body, reason, now)


class _Transaction(AbstractAsyncContextManager[PostgresTx]):
    """``async with``: a pooled connection in pipeline mode, BEGIN; COMMIT or ROLLBACK.

    BEGIN and pipeline mode wait for the transaction's first statement (a plain BEGIN:
    one with options is sent at once). A transaction that sends nothing before its end
    sends its buffered writes as one statement in autocommit, which is atomic on its
    own (see :meth:`PostgresTxBuffer._send_commit`).
    """

    __slots__ = ("_begin", "_conn", "_pool", "_stack", "_store", "_task", "_tx")

    def __init__(self, store: PostgresStore, begin: str = "BEGIN") -> None:
        self._store = store
        self._begin = begin
        self._tx: PostgresTx | None = None
        self._pool: _Pool | None = None
        self._conn: _Conn | None = None
        self._stack = AsyncExitStack()
        self._task: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> PostgresTx:
        store = self._store
        self._task = store._enter_task()
        try:
            self._pool = store._pool or store._not_open()
            try:
                conn = self._conn = await self._pool.getconn()
            except psycopg.Error as exc:
                raise translate_error(store.name, "get a connection from the pool", exc) from exc
            tx = self._tx = PostgresTx(conn.cursor(), None, store)
            tx._opener = self._open
            if self._begin != "BEGIN":  # its options must apply to every statement
                await tx._live()
        except BaseException:
            await self._release()
            raise
        return tx

    async def _open(self) -> None:
        """Enter pipeline mode and queue BEGIN: it travels with the first statement."""
        store, conn, tx = self._store, self._conn, self._tx
        assert conn is not None and tx is not None and tx._cur is not None
        try:
            if store._use_pipeline:
                tx._pipeline = await self._stack.enter_async_context(conn.pipeline())
            await tx._cur.execute(self._begin)
        except psycopg.Error as exc:
            raise translate_error(store.name, "begin a transaction", exc) from exc

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tx = self._tx
        assert tx is not None and tx._cur is not None, "transaction exited without entering"
        cursor = tx._cur
        try:
            if exc_type is None:
                try:
                    await tx._send_commit()
                    # Leaving pipeline mode syncs: the queued writes, the notifications
                    # and the COMMIT travel together and are answered together.
                    await self._stack.aclose()
                    if tx._timers_due is not None:
                        self._store._timers_told_of(tx._timers_due)
                except StoreError as alone_exc:  # the writes sent alone, in autocommit
                    if self._conn is not None and self._conn.broken:
                        raise StoreError(
                            f"{alone_exc}; the connection was lost, so whether the "
                            "transaction committed is unknown"
                        ) from alone_exc
                    raise
                except psycopg.Error as commit_exc:
                    # A lost connection may have lost the answer, not the commit.
                    outcome = (
                        "commit: the connection was lost, so whether it committed is unknown"
                        if self._conn is None or self._conn.broken
                        else "commit (nothing was written)"
                    )
                    raise tx._fail(outcome, commit_exc) from commit_exc
            elif tx._opener is not None:  # nothing was sent: nothing to roll back
                tx._opener = None
            else:
                try:
                    await cursor.execute("ROLLBACK")
                    await self._stack.aclose()
                except psycopg.Error as rollback_exc:
                    # A queued write failed first; the block's own error is what matters.
                    log.debug("store %r: ignored while rolling back: %s", tx._name, rollback_exc)
        finally:
            tx._cur = None
            await self._release()

    async def _release(self) -> None:
        """Leave pipeline mode, make sure no transaction is left open, return the connection."""
        store, pool, conn = self._store, self._pool, self._conn
        try:
            if conn is not None:
                try:
                    await self._stack.aclose()
                except psycopg.Error as exc:
                    log.debug("store %r: ignored leaving pipeline mode: %s", store.name, exc)
                if not conn.closed and conn.info.transaction_status != _IDLE_STATUS:
                    try:
                        await conn.execute("ROLLBACK")
                    except psycopg.Error:
                        await conn.close()  # unusable: the pool replaces it
        finally:
            store._leave_task(self._task)
            if conn is not None and pool is not None:
                await pool.putconn(conn)  # a closed pool closes it
