"""The PostgreSQL store's methods that run outside a caller's transaction: the reads
(listing, finding and counting sagas, inputs set aside), the outbox relay's claims and
locked batches, and the embedded mailbox queue.
:class:`PostgresStatements` is part of :class:`~sagakit.stores.postgres.PostgresStore`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, NoReturn

from sagakit.core.envelope import Envelope
from sagakit.core.instance import SagaState
from sagakit.stores.base import OutboxRow, SagaOrder, SagaPage, SagaQuery, SetAside
from sagakit.stores.postgres.driver import psycopg, translate_error
from sagakit.stores.postgres.transaction import LockedOutbox
from sagakit.stores.rows import saga_find_statements, set_aside_from_row
from sagakit.stores.rows import saga_from_row as _saga_from_row
from sagakit.stores.shared import SharedStatements

if TYPE_CHECKING:
    from sagakit.stores.postgres.driver import _Pool
    from sagakit.stores.postgres.tx import PostgresTx


class PostgresStatements(SharedStatements):
    """The reads, relay and mailbox methods of :class:`~sagakit.stores.postgres.PostgresStore`."""

    lease_clock: str
    notify: bool
    queue_channel: str
    _pool: _Pool | None

    if TYPE_CHECKING:

        def _not_open(self) -> NoReturn: ...

        def transaction(self) -> AbstractAsyncContextManager[PostgresTx]: ...

    # -- reads ------------------------------------------------------------------------
    async def find_sagas(
        self,
        query: SagaQuery,
        *,
        limit: int = 100,
        offset: int = 0,
        order: SagaOrder = SagaOrder.NEWEST,
    ) -> SagaPage:
        """The sagas ``query`` selects, in ``order``, and how many it selects in all."""
        page_sql, count_sql, params = saga_find_statements(self._q, query, "%s", order)
        pool = self._pool or self._not_open()
        try:
            async with pool.connection() as conn, conn.transaction():
                # One snapshot for the total and the page.
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                cursor = await conn.execute(count_sql, params)
                counted = await cursor.fetchone()
                cursor = await conn.execute(page_sql, (*params, max(limit, 0), max(offset, 0)))
                rows = await cursor.fetchall()
        except psycopg.Error as exc:
            raise translate_error(self.name, "find sagas", exc) from exc
        total = int(counted[0]) if counted is not None else 0
        return SagaPage(total, [_saga_from_row(r) for r in rows])

    async def count_sagas(self) -> dict[SagaState, int]:
        """How many instances are in each state (states with none are left out).

        Exact, without scanning ``sagas``: the sum of the per-state deltas that
        triggers append in every transaction that changes a saga's state. When many
        have piled up, they are folded into one row per state (see
        :meth:`fold_saga_counts`).
        """
        rows = await self._read("count sagas", self._q["saga_count"])
        if sum(r[2] for r in rows) > self.COUNT_DELTAS_FOLD_AT:
            await self.fold_saga_counts()
        return {SagaState(s): n for s, n, _ in rows if n > 0}

    COUNT_DELTAS_FOLD_AT = 512
    """How many count deltas :meth:`count_sagas` sums before it folds them."""

    async def fold_saga_counts(self) -> None:
        """Fold the appended per-state count deltas into one row per state.

        Keeps :meth:`count_sagas` a read of a few rows; safe to run at any time, from
        any number of processes (the engine's housekeeping runs it too).
        """
        await self._write("fold the saga counts", self._q["saga_counts_fold"], ())

    # -- inputs set aside for a missing definition version ------------------------------
    async def set_aside_claim(
        self, versions: Sequence[tuple[str, int]], limit: int, now: float, lease: float
    ) -> list[SetAside]:
        """Claim up to ``limit`` inputs waiting for any of ``versions``, oldest first.

        On the caller's clock (see the query); rows another claim holds are skipped.
        """
        if limit <= 0 or not versions:
            return []
        _, rows = await self._write(
            "claim inputs set aside",
            self._q["set_aside_claim"],
            {
                "until": now + lease,
                "names": [d for d, _ in versions],
                "versions": [v for _, v in versions],
                "now": now,
                "limit": limit,
            },
        )
        rows.sort()
        return [set_aside_from_row(r) for r in rows]

    # -- outbox relay -----------------------------------------------------------------
    async def outbox_claim(self, limit: int, now: float, lease: float) -> list[OutboxRow]:
        """Claim up to ``limit`` unpublished rows for ``lease`` seconds, oldest first.

        ``FOR UPDATE SKIP LOCKED`` in one statement (its own transaction): concurrent
        relays never claim the same row and never wait for each other. With
        ``lease_clock="database"`` the lease is stamped and checked on the server's
        clock and ``now`` is not used. Callers publish, wait for the acknowledgement,
        then :meth:`outbox_mark_published`.
        """
        if limit <= 0:
            return []
        params: tuple[Any, ...]
        if self.lease_clock == "database":
            query, params = self._q["outbox_claim_db_clock"], (lease, limit)
        else:
            query, params = self._q["outbox_claim_caller_clock"], (now + lease, now, limit)
        _, rows = await self._write("claim outbox rows", query, params)
        rows.sort()
        return [OutboxRow(id=r[0], envelope=Envelope.from_json(r[1])) for r in rows]

    @contextlib.asynccontextmanager
    async def outbox_locked(
        self, limit: int, now: float, lease: float
    ) -> AsyncIterator[LockedOutbox]:
        """The relay's batch, locked in a transaction that also marks it published.

        Up to ``limit`` unpublished rows, oldest first, locked ``FOR UPDATE SKIP
        LOCKED`` (rows another relay holds, or leased by :meth:`outbox_claim`, are
        skipped). Publish them inside the block, then
        :meth:`LockedOutbox.mark_published`: one commit per batch, where claim and
        mark cost two, and a relay that dies mid-publish releases its rows at once
        (its transaction rolls back) instead of after a lease. The server ends the
        session of a relay idle in the block for ``lease`` seconds (a stopped
        process), which releases the rows too; leave the block with an exception to
        publish nothing.
        """
        async with self.transaction() as tx:
            await tx._send(
                "limit the relay's transaction",
                self._q["idle_in_transaction_timeout"],
                (f"{max(int(lease * 1000), 1)}ms",),
            )
            params: tuple[Any, ...]
            if self.lease_clock == "database":
                query, params = self._q["outbox_lock_db_clock"], (max(limit, 0),)
            else:
                query, params = self._q["outbox_lock_caller_clock"], (now, max(limit, 0))
            rows = await tx._all("lock outbox rows", query, params)
            rows.sort()
            yield LockedOutbox(
                tx, [OutboxRow(id=r[0], envelope=Envelope.from_json(r[1])) for r in rows]
            )

    # -- mailbox queue (embedded transport) -------------------------------------------
    async def queue_push(
        self, endpoint: str, bodies: Sequence[str], now: float, available_at: float | None = None
    ) -> None:
        """Append raw messages to ``endpoint``'s mailbox, visible from ``available_at``.

        One statement for the batch; it notifies ``queue_channel`` with the endpoint.
        """
        if not bodies:
            return
        params = {
            "endpoint": endpoint,
            "now": now,
            "at": now if available_at is None else available_at,
            "bodies": list(bodies),
            "channel": self.queue_channel,
            "notify": self.notify,
        }
        await self._write(
            f"push {len(bodies)} message(s) to {endpoint!r}", self._q["queue_push"], params
        )
