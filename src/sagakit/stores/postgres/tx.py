"""A PostgreSQL transaction, :class:`PostgresTx`: the statements a step runs (business
data, inbox, idempotency, outbox, dead letters, inputs set aside, mailbox). The saga
rows are in :mod:`~sagakit.stores.postgres.sagas`, the write buffer under them in
:mod:`~sagakit.stores.postgres.buffer`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagakit.core.envelope import Envelope
from sagakit.core.instance import SagaInstance
from sagakit.stores.base import DeadLetter, IdempotencyRecord
from sagakit.stores.postgres.buffer import _already_recorded
from sagakit.stores.postgres.driver import _Params, psycopg, qmark_to_psycopg
from sagakit.stores.postgres.sagas import PostgresSagaStatements
from sagakit.stores.rows import check_settlement, dead_letter_from_row
from sagakit.stores.rows import dumps as _dumps
from sagakit.stores.rows import loads as _loads
from sagakit.stores.rows import saga_from_row as _saga_from_row

__all__ = ["PostgresTx"]


class PostgresTx(PostgresSagaStatements):
    """One transaction on one pooled connection (see :class:`~sagakit.stores.base.Tx`).

    Obtained from :meth:`PostgresStore.transaction`; every method raises
    :class:`~sagakit.errors.StoreError` once the block has ended. After a method
    raised, PostgreSQL has aborted the transaction: leave the block (it rolls back).
    Expected refusals (a duplicate saga, idempotency key, inbox or dead-letter entry)
    do not abort it.
    """

    __slots__ = ()

    # -- business data ----------------------------------------------------------------
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement (qmark ``?`` parameters); return the number of rows it changed."""
        cursor = await self._ask(f"execute {sql[:200]!r}", qmark_to_psycopg(sql), tuple(params))
        return max(cursor.rowcount, 0)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query (qmark ``?`` parameters); return every row."""
        return await self._all(f"run query {sql[:200]!r}", qmark_to_psycopg(sql), tuple(params))

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """Run a query (qmark ``?`` parameters); return the first row or ``None``."""
        return await self._one(f"run query {sql[:200]!r}", qmark_to_psycopg(sql), tuple(params))

    # -- inbox, idempotency, outbox, dead letters ------------------------------------
    async def inbox_add(self, consumer: str, message_id: str, now: float) -> bool:
        """Record that ``consumer`` handled ``message_id``; False if it already had.

        A concurrent transaction recording the same id makes this one wait for its
        outcome: False if it commits, True if it rolls back.
        """
        row = await self._one(
            f"record message {message_id} in the inbox",
            self._q["inbox_add"],
            (consumer, message_id, now),
        )
        return row is not None

    async def inbox_add_many(
        self, consumer: str, message_ids: Sequence[str], now: float
    ) -> set[str]:
        """Record several ids in one statement; return those not handled before."""
        if not message_ids:
            return set()
        rows = await self._all(
            f"record {len(message_ids)} message(s) in the inbox",
            self._q["inbox_add_many"],
            {"consumer": consumer, "ids": list(message_ids), "now": now},
        )
        return {r[0] for r in rows}

    async def inbox_add_new(self, consumer: str, message_ids: Sequence[str], now: float) -> None:
        """Record ids that must be new (see :meth:`Tx.inbox_add_new`): buffered with the
        other writes, no round trip of its own; an id handled before fails the statement
        that carries it, and the transaction with it (ConcurrencyError)."""
        self._check_open()
        self._inbox.extend((consumer, m, now) for m in dict.fromkeys(message_ids))

    async def idempotency_get(self, consumer: str, key: str) -> IdempotencyRecord | None:
        """The outcome ``consumer`` recorded for ``key``, if any."""
        row = await self._one(
            f"read idempotency key {key!r}", self._q["idempotency_get"], (consumer, key)
        )
        if row is None:
            return None
        return IdempotencyRecord(key=key, outcome=_loads(row[0]), tombstone=row[1], at=row[2])

    async def idempotency_get_many(
        self, consumer: str, keys: Sequence[str]
    ) -> dict[str, IdempotencyRecord]:
        """The outcomes ``consumer`` recorded for any of ``keys``, in one statement."""
        if not keys:
            return {}
        rows = await self._all(
            f"read {len(keys)} idempotency key(s)",
            self._q["idempotency_get_many"],
            {"consumer": consumer, "keys": list(keys)},
        )
        return {r[0]: _record_from_row(r) for r in rows}

    async def idempotency_put(
        self,
        consumer: str,
        key: str,
        outcome: dict[str, Any],
        now: float,
        *,
        tombstone: bool = False,
    ) -> None:
        """Record the outcome for ``key``; a key is written once (a second put is an error).

        Buffered with the other writes (no round trip of its own): a key this
        transaction wrote is refused at once; one recorded by another transaction is
        refused by the statement that carries the write, before COMMIT takes effect.
        """
        self._check_open()
        if (consumer, key) in self._idem_sent:
            raise _already_recorded(consumer, key)
        self._idempotency.append((consumer, key, _dumps(outcome), tombstone, now))
        self._idem_sent.add((consumer, key))

    async def outbox_add(self, envelopes: Sequence[Envelope], now: float) -> None:
        """Queue messages to be published after commit (and notify the relays on commit)."""
        if not envelopes:
            return
        self._check_open()
        self._outbox.extend((e, now) for e in envelopes)
        self._notify.add((self._store.outbox_channel, ""))

    async def dead_letter(
        self, endpoint: str, message_id: str | None, body: str, reason: str, now: float
    ) -> None:
        """Park a message that cannot be handled, with the reason (once per endpoint and id)."""
        await self._send(
            f"park message {message_id} as a dead letter",
            self._q["dead_letter_add"],
            (endpoint, message_id, body, reason, now),
        )

    async def dead_letter_get(self, id: int) -> DeadLetter | None:
        """A dead letter by id, its row locked until the transaction ends (FOR UPDATE)."""
        row = await self._one(
            f"read dead letter {id}", self._q["dead_letter_get_for_update"], (id,)
        )
        return None if row is None else dead_letter_from_row(row)

    async def dead_letter_settle(
        self, id: int, settlement: str, actor: str, reason: str, now: float
    ) -> bool:
        """Settle an open dead letter; False if it does not exist or was settled already."""
        check_settlement(settlement)
        cursor = await self._ask(
            f"settle dead letter {id} as {settlement}",
            self._q["dead_letter_settle"],
            (settlement, actor, now, reason, id),
        )
        return cursor.rowcount == 1

    async def inbox_add_and_load(
        self, consumer: str, message_ids: Sequence[str], now: float, saga_ids: Sequence[str]
    ) -> tuple[set[str], dict[str, SagaInstance]]:
        """:meth:`inbox_add_many` and :meth:`saga_get_many` in one round trip."""
        if not message_ids or not saga_ids:
            fresh = await self.inbox_add_many(consumer, message_ids, now)
            return fresh, await self.saga_get_many(saga_ids)
        fresh, rows = await self._inbox_and(
            consumer,
            message_ids,
            now,
            f"load {len(saga_ids)} saga(s)",
            self._q["saga_get_many"],
            {"ids": list(saga_ids)},
        )
        return fresh, {r[0]: _saga_from_row(r) for r in rows}

    async def inbox_add_and_read(
        self, consumer: str, message_ids: Sequence[str], now: float, keys: Sequence[str]
    ) -> tuple[set[str], dict[str, IdempotencyRecord]]:
        """:meth:`inbox_add_many` and :meth:`idempotency_get_many` in one round trip."""
        if not message_ids or not keys:
            fresh = await self.inbox_add_many(consumer, message_ids, now)
            return fresh, await self.idempotency_get_many(consumer, keys)
        fresh, rows = await self._inbox_and(
            consumer,
            message_ids,
            now,
            f"read {len(keys)} idempotency key(s)",
            self._q["idempotency_get_many"],
            {"consumer": consumer, "keys": list(dict.fromkeys(keys))},
        )
        return fresh, {r[0]: _record_from_row(r) for r in rows}

    async def _inbox_and(
        self,
        consumer: str,
        message_ids: Sequence[str],
        now: float,
        what: str,
        query: str,
        params: _Params,
    ) -> tuple[set[str], list[tuple[Any, ...]]]:
        """Record ``message_ids`` in the inbox and run ``query``, with one sync."""
        await self._flush()  # first: the inbox statement then travels with the query
        recording = f"record {len(message_ids)} message(s) in the inbox"
        live = await self._live()
        try:
            # A cursor of its own: in pipeline mode each cursor keeps the result of its
            # last statement once synced, whatever the main cursor runs meanwhile.
            inbox = live.connection.cursor()
            await inbox.execute(
                self._q["inbox_add_many"],
                {"consumer": consumer, "ids": list(message_ids), "now": now},
            )
        except psycopg.Error as exc:
            raise self._fail(recording, exc) from exc
        self._queued.append(recording)
        cursor = await self._ask(what, query, params)
        try:
            return {r[0] for r in await inbox.fetchall()}, await cursor.fetchall()
        except psycopg.Error as exc:
            raise self._fail(what, exc) from exc

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
        """Set aside an input of ``saga_id`` until a process with the version applies it.

        Sent without waiting for an answer; the commit notifies ``aside_channel``, so
        that processes that have the version look at once.
        """
        await self._send(
            f"set aside a {kind} of saga {saga_id}",
            self._q["set_aside_add"],
            (saga_id, definition, definition_version, kind, body, now),
        )
        self._notify.add((self._store.aside_channel, ""))

    async def set_aside_take(self, ids: Sequence[int]) -> set[int]:
        """Delete set-aside inputs in this transaction; return the ids still there.

        A row another open transaction is deleting is waited for, then left out if
        that one commits.
        """
        if not ids:
            return set()
        rows = await self._all(
            f"take {len(ids)} input(s) set aside", self._q["set_aside_take"], {"ids": list(ids)}
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
        Visible ones notify ``queue_channel`` with the endpoint on commit. Buffered like
        the other writes: the ids come from a block the store reserved (see
        :meth:`PostgresStore._queue_ids`), so this needs no round trip of its own.
        """
        if not bodies:
            return []
        self._check_open()
        at, deliveries = (now, 0) if leased_until is None else (leased_until, 1)
        ids = await self._store._queue_ids(self, len(bodies))
        self._queue.extend(
            (id, endpoint, body, now, at, deliveries) for id, body in zip(ids, bodies, strict=True)
        )
        if leased_until is None:
            self._notify.add((self._store.queue_channel, endpoint))
        return ids

    async def queue_remove(self, ids: Sequence[int]) -> None:
        """Remove mailbox messages in this transaction: acknowledged with their effect."""
        self._check_open()
        self._acks.extend(ids)


def _record_from_row(r: Sequence[Any]) -> IdempotencyRecord:
    """An idempotency record from (key, outcome, tombstone, at)."""
    return IdempotencyRecord(key=r[0], outcome=_loads(r[1]), tombstone=r[2], at=r[3])
