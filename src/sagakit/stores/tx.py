"""The transaction port: what a handler may do inside one local transaction (:class:`Tx`),
and :class:`ItemByItem`, the batch methods as loops for adapters that run in process.
Re-exported by :mod:`sagakit.stores.base`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sagakit.core.envelope import Envelope
from sagakit.core.instance import HistoryEntry, SagaInstance, Timer
from sagakit.errors import ConcurrencyError
from sagakit.stores.records import DeadLetter, IdempotencyRecord

__all__ = ["ItemByItem", "Tx"]


class Tx(Protocol):
    """One local transaction. Nothing it writes is visible to others before commit."""

    # -- business data (SQL stores only; qmark ``?`` parameters) ----------------------
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; return the number of rows it changed."""
        ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query; return every row."""
        ...

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """Run a query; return the first row or ``None``."""
        ...

    # -- inbox, idempotency, outbox, dead letters ------------------------------------
    async def inbox_add(self, consumer: str, message_id: str, now: float) -> bool:
        """Record that ``consumer`` handled ``message_id``; False if it already had."""
        ...

    async def inbox_add_many(
        self, consumer: str, message_ids: Sequence[str], now: float
    ) -> set[str]:
        """Record several ids at once; return those ``consumer`` had not handled before.

        An id given twice counts once. PostgreSQL does it in one statement.
        """
        ...

    async def inbox_add_new(self, consumer: str, message_ids: Sequence[str], now: float) -> None:
        """Record ids that must be new to ``consumer``: if any was handled before, the
        transaction fails with :class:`~sagakit.errors.ConcurrencyError`, at its commit
        at the latest.

        For a writer that does not need the answer to go on (the orchestrator applying
        replies to sagas it holds a copy of): PostgreSQL sends it with the transaction's
        next statement instead of waiting for it.
        """
        ...

    async def idempotency_get(self, consumer: str, key: str) -> IdempotencyRecord | None:
        """The outcome ``consumer`` recorded for ``key``, if any."""
        ...

    async def idempotency_get_many(
        self, consumer: str, keys: Sequence[str]
    ) -> dict[str, IdempotencyRecord]:
        """The outcomes ``consumer`` recorded for any of ``keys``, by key (missing left out).

        One statement on the SQL stores, so a batch of commands reads its records at once.
        """
        ...

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
        ...

    async def outbox_add(self, envelopes: Sequence[Envelope], now: float) -> None:
        """Queue messages to be published after commit."""
        ...

    async def dead_letter(
        self, endpoint: str, message_id: str | None, body: str, reason: str, now: float
    ) -> None:
        """Park a message that cannot be handled, with the reason.

        At most one *open* dead letter per endpoint and message id: parking it again
        while one is open does nothing. Once that one is settled (a replay that failed
        again), the message is parked anew.
        """
        ...

    async def dead_letter_get(self, id: int) -> DeadLetter | None:
        """A dead letter by id, locked until the transaction ends (PostgreSQL)."""
        ...

    async def dead_letter_settle(
        self, id: int, settlement: str, actor: str, reason: str, now: float
    ) -> bool:
        """Settle an open dead letter (``replayed`` or ``discarded``) by ``actor``, why.

        False (and nothing written) if it does not exist or was settled already.
        """
        ...

    # -- sagas (orchestrator stores) --------------------------------------------------
    async def saga_get(self, saga_id: str) -> SagaInstance | None:
        """Load an instance for update (PostgreSQL locks the row)."""
        ...

    async def saga_get_many(self, saga_ids: Sequence[str]) -> dict[str, SagaInstance]:
        """Load several instances for update (missing ones are left out).

        PostgreSQL locks the rows in ``saga_id`` order, in one statement: two batches
        that share sagas then wait for each other instead of deadlocking.
        """
        ...

    async def inbox_add_and_load(
        self, consumer: str, message_ids: Sequence[str], now: float, saga_ids: Sequence[str]
    ) -> tuple[set[str], dict[str, SagaInstance]]:
        """:meth:`inbox_add_many`, then :meth:`saga_get_many`: the start of every batch
        of replies. PostgreSQL sends both statements in one round trip."""
        ...

    async def inbox_add_and_read(
        self, consumer: str, message_ids: Sequence[str], now: float, keys: Sequence[str]
    ) -> tuple[set[str], dict[str, IdempotencyRecord]]:
        """:meth:`inbox_add_many`, then :meth:`idempotency_get_many`: the start of every
        batch of commands. PostgreSQL sends both statements in one round trip."""
        ...

    async def saga_get_by_key(self, definition: str, business_key: str) -> SagaInstance | None:
        """The instance of ``definition`` (any version) started for ``business_key``."""
        ...

    async def saga_get_by_keys(
        self, definition: str, business_keys: Sequence[str]
    ) -> dict[str, SagaInstance]:
        """The instances of ``definition`` started for any of ``business_keys``, by key."""
        ...

    async def saga_insert(self, instance: SagaInstance) -> None:
        """Insert a new instance; ``ConcurrencyError`` if its id or (definition, key) exists."""
        ...

    async def saga_insert_many(self, instances: Sequence[SagaInstance]) -> None:
        """Insert new instances; ``ConcurrencyError`` if an id or (definition, key) exists.

        Unlike :meth:`saga_insert`, an adapter may raise the refusal later, at the latest
        when the transaction block ends, before it commits (the block then rolls back).
        """
        ...

    async def saga_update(self, instance: SagaInstance, expected_version: int) -> None:
        """Write ``instance`` if the stored version is still ``expected_version``.

        Raises :class:`~sagakit.errors.ConcurrencyError` otherwise: another worker
        applied a transition first, and this one must be recomputed. An adapter may
        raise it later in the block (PostgreSQL: at the next statement that waits for
        an answer), but always before anything commits.
        """
        ...

    async def history_add(self, entries: Sequence[HistoryEntry]) -> None:
        """Append history rows (never updated, never deleted)."""
        ...

    async def timers_set(self, timers: Sequence[Timer]) -> None:
        """Set timers; one with the same (saga_id, name) is replaced."""
        ...

    async def timers_cancel(self, saga_id: str, names: Sequence[str]) -> None:
        """Delete the named timers of one saga (missing ones are ignored)."""
        ...

    async def timers_take_due(self, now: float, limit: int) -> list[Timer]:
        """Remove and return up to ``limit`` timers due at ``now``, earliest first.

        Taken inside the transaction that applies them: if it rolls back, they stay.
        """
        ...

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

        ``kind`` is one of :data:`SET_ASIDE_KINDS`. Ids grow in the order of the adds.
        """
        ...

    async def set_aside_take(self, ids: Sequence[int]) -> set[int]:
        """Delete set-aside inputs in this transaction (the one that applies them).

        Returns the ids that were still there: only those may be applied (another
        process may have applied the others). PostgreSQL waits for a row another open
        transaction is deleting, and leaves it out once that one commits.
        """
        ...

    # -- mailbox queue, inside the transaction (the orchestrator's local steps) --------
    async def queue_add(
        self,
        endpoint: str,
        bodies: Sequence[str],
        now: float,
        *,
        leased_until: float | None = None,
    ) -> list[int]:
        """Append messages to ``endpoint``'s mailbox on commit; return their ids, in order.

        With ``leased_until`` the messages count as handed out once already (to the
        writer, which handles them itself right after commit) and stay hidden until
        then; like any lease, :meth:`Store.queue_reset_leases` makes them visible.
        """
        ...

    async def queue_remove(self, ids: Sequence[int]) -> None:
        """Remove mailbox messages in this transaction: acknowledged with their effect."""
        ...


class ItemByItem:
    """The batch methods of :class:`Tx` as loops over the single-item ones.

    For adapters whose statements run in process (memory, SQLite), where a loop costs
    no more than one bigger statement; PostgreSQL sends real batch statements instead
    (one round trip each). An adapter overrides any of them it does better.
    """

    async def inbox_add_many(
        self: Tx, consumer: str, message_ids: Sequence[str], now: float
    ) -> set[str]:
        """Record several ids; return those ``consumer`` had not handled before."""
        return {m for m in message_ids if await self.inbox_add(consumer, m, now)}

    async def inbox_add_new(
        self: Tx, consumer: str, message_ids: Sequence[str], now: float
    ) -> None:
        """Record ids that must be new; ConcurrencyError at once if one was handled before."""
        for m in dict.fromkeys(message_ids):
            if not await self.inbox_add(consumer, m, now):
                raise ConcurrencyError(
                    f"message {m} was handled by {consumer} already: the transaction that "
                    "recorded it as new must be undone"
                )

    async def idempotency_get_many(
        self: Tx, consumer: str, keys: Sequence[str]
    ) -> dict[str, IdempotencyRecord]:
        """The outcomes ``consumer`` recorded for any of ``keys``, by key (missing left out)."""
        found: dict[str, IdempotencyRecord] = {}
        for key in keys:
            record = await self.idempotency_get(consumer, key)
            if record is not None:
                found[key] = record
        return found

    async def saga_get_many(self: Tx, saga_ids: Sequence[str]) -> dict[str, SagaInstance]:
        """Load several instances (missing ones are left out)."""
        found: dict[str, SagaInstance] = {}
        for saga_id in saga_ids:
            inst = await self.saga_get(saga_id)
            if inst is not None:
                found[saga_id] = inst
        return found

    async def inbox_add_and_load(
        self: Tx, consumer: str, message_ids: Sequence[str], now: float, saga_ids: Sequence[str]
    ) -> tuple[set[str], dict[str, SagaInstance]]:
        """:meth:`Tx.inbox_add_many`, then :meth:`Tx.saga_get_many`."""
        fresh = await self.inbox_add_many(consumer, message_ids, now)
        return fresh, await self.saga_get_many(saga_ids)

    async def inbox_add_and_read(
        self: Tx, consumer: str, message_ids: Sequence[str], now: float, keys: Sequence[str]
    ) -> tuple[set[str], dict[str, IdempotencyRecord]]:
        """:meth:`Tx.inbox_add_many`, then :meth:`Tx.idempotency_get_many`."""
        fresh = await self.inbox_add_many(consumer, message_ids, now)
        return fresh, await self.idempotency_get_many(consumer, keys)

    async def saga_get_by_keys(
        self: Tx, definition: str, business_keys: Sequence[str]
    ) -> dict[str, SagaInstance]:
        """The instances of ``definition`` started for any of ``business_keys``, by key."""
        found: dict[str, SagaInstance] = {}
        for key in business_keys:
            inst = await self.saga_get_by_key(definition, key)
            if inst is not None:
                found[key] = inst
        return found

    async def saga_insert_many(self: Tx, instances: Sequence[SagaInstance]) -> None:
        """Insert new instances; ``ConcurrencyError`` if an id or (definition, key) exists."""
        for instance in instances:
            await self.saga_insert(instance)
