"""The store port: what the runtime needs from a database, as ``typing.Protocol`` s.

A store is one service's database. The orchestrator's store keeps saga instances,
history and timers; every store (orchestrator and participants alike) keeps an outbox,
an inbox, idempotency records, a mailbox queue for the embedded transport and a
dead-letter table. Everything a handler does happens inside one :class:`Tx`, which
commits atomically or not at all.

Adapters: :class:`~sagakit.stores.memory.MemoryStore`,
:class:`~sagakit.stores.sqlite.SQLiteStore`,
:class:`~sagakit.stores.postgres.PostgresStore`. All of them pass
``tests/contract/test_store_contract.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from sagakit.core.envelope import Envelope
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState, Timer
from sagakit.stores.records import (
    DISCARDED,
    REPLAYED,
    SET_ASIDE_KINDS,
    SETTLEMENTS,
    DeadLetter,
    IdempotencyRecord,
    OutboxRow,
    QueuedMessage,
    SagaColumns,
    SagaPage,
    SagaQuery,
    SetAside,
)

__all__ = [
    "DISCARDED",
    "REPLAYED",
    "SETTLEMENTS",
    "SET_ASIDE_KINDS",
    "DeadLetter",
    "IdempotencyRecord",
    "ItemByItem",
    "OutboxRow",
    "QueuedMessage",
    "SQLStore",
    "SagaColumns",
    "SagaPage",
    "SagaQuery",
    "SetAside",
    "Store",
    "Tx",
]


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


class Store(Protocol):
    """One service's database."""

    name: str

    async def open(self) -> None:
        """Connect and apply pending schema migrations."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """A transaction: commits when the block exits normally, rolls back on error."""
        ...

    # -- reads ------------------------------------------------------------------------
    async def get_saga(self, saga_id: str) -> SagaInstance | None:
        """An instance by id (no lock)."""
        ...

    async def list_sagas(
        self,
        *,
        states: Sequence[SagaState] | None = None,
        definition: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[SagaInstance]:
        """Instances, newest first, optionally filtered."""
        ...

    async def find_sagas(self, query: SagaQuery, *, limit: int = 100, offset: int = 0) -> SagaPage:
        """The sagas ``query`` selects, newest first, and how many it selects in all.

        Filtered and counted by the database (indexed on state, definition and version,
        creation time); the page and the total come from one consistent snapshot.
        """
        ...

    async def get_saga_by_key(self, definition: str, business_key: str) -> SagaInstance | None:
        """The instance of ``definition`` started for ``business_key`` (read-only, no lock)."""
        ...

    async def count_sagas(self) -> dict[SagaState, int]:
        """How many instances are in each state (states with none are left out)."""
        ...

    async def history(self, saga_id: str) -> list[HistoryEntry]:
        """A saga's history in the order it was written."""
        ...

    async def next_timer_due(self) -> float | None:
        """When the earliest timer is due, or ``None`` when there is none."""
        ...

    async def count_sagas_by_version(self) -> dict[tuple[str, int, SagaState], int]:
        """How many instances there are per (definition, version, state) (a scan: for
        deploy-time checks such as ``sagakit versions``, not for every scrape)."""
        ...

    # -- inputs set aside for a missing definition version ------------------------------
    async def set_aside_counts(self) -> dict[tuple[str, int], int]:
        """How many inputs wait per (definition, version) (versions with none left out)."""
        ...

    async def set_aside_claim(
        self, versions: Sequence[tuple[str, int]], limit: int, now: float, lease: float
    ) -> list[SetAside]:
        """Claim up to ``limit`` inputs waiting for any of ``versions``, oldest first.

        A claimed input is not handed to another claim for ``lease`` seconds; the
        claimer applies it with :meth:`Tx.set_aside_take` in the applying transaction.
        One that is never applied (the claimer died) is claimed again after the lease.
        """
        ...

    async def set_aside_of_saga(self, saga_id: str) -> list[SetAside]:
        """The inputs of ``saga_id`` set aside, oldest first (claimed or not)."""
        ...

    # -- outbox relay -----------------------------------------------------------------
    async def outbox_claim(self, limit: int, now: float, lease: float) -> list[OutboxRow]:
        """Claim up to ``limit`` unpublished rows for ``lease`` seconds, oldest first.

        A claimed row is not handed to another relay until its lease expires, so a
        relay that dies mid-publish only delays its rows. Callers publish, wait for the
        acknowledgement, then :meth:`outbox_mark_published`.
        """
        ...

    async def outbox_mark_published(self, ids: Sequence[int], now: float) -> None:
        """Mark rows as published (acknowledged by the transport)."""
        ...

    async def outbox_pending(self) -> int:
        """How many rows are not yet published."""
        ...

    async def outbox_all(self) -> list[tuple[Envelope, float | None]]:
        """Every outbox row with its published time (for audits and invariant checks)."""
        ...

    async def outbox_of_saga(self, saga_id: str) -> list[tuple[Envelope, float | None]]:
        """The outbox rows whose envelope carries ``saga_id``, in write order.

        Indexed: SQL stores keep the envelope's saga id in a column of its own.
        """
        ...

    async def outbox_purge(self, published_before: float, *, batch: int = 1000) -> int:
        """Delete rows published before ``published_before``; return how many.

        Unpublished rows are never deleted. SQL stores delete in batches of ``batch``
        rows, each its own short transaction, so a large purge holds no long locks.
        """
        ...

    async def outbox_oldest_pending(self) -> float | None:
        """``created_at`` of the oldest unpublished row, or ``None`` when all are published.

        Cheap (the relay's own index), for the outbox lag metric.
        """
        ...

    # -- inbox ------------------------------------------------------------------------
    async def inbox_ids(self, consumer: str) -> set[str]:
        """Message ids ``consumer`` has handled (for audits and invariant checks)."""
        ...

    async def inbox_has(self, consumer: str, message_id: str) -> bool:
        """Whether ``consumer`` recorded ``message_id`` as handled (one indexed lookup)."""
        ...

    async def inbox_purge(self, older_than: float) -> int:
        """Delete inbox rows recorded before ``older_than``; return how many."""
        ...

    # -- mailbox queue (embedded transport) -------------------------------------------
    async def queue_push(
        self, endpoint: str, bodies: Sequence[str], now: float, available_at: float | None = None
    ) -> None:
        """Append raw messages to ``endpoint``'s mailbox, visible from ``available_at``."""
        ...

    async def queue_fetch(
        self, endpoint: str, limit: int, now: float, lease: float
    ) -> list[QueuedMessage]:
        """Hand out up to ``limit`` visible messages, oldest first, hidden for ``lease`` s.

        Each counts one more delivery. A message not acknowledged before its lease
        ends is handed out again (at-least-once).
        """
        ...

    async def queue_ack(self, ids: Sequence[int]) -> None:
        """Remove handled messages from the mailbox."""
        ...

    async def queue_retry(self, id: int, available_at: float, error: str) -> None:
        """Make a message visible again at ``available_at`` (a failed delivery)."""
        ...

    async def queue_reset_leases(self, endpoint: str) -> int:
        """Make every leased message of ``endpoint`` visible now (the sole consumer restarted)."""
        ...

    async def queue_depth(self, endpoint: str | None = None) -> int:
        """How many messages wait in a mailbox (all mailboxes when ``endpoint`` is None)."""
        ...

    async def next_queue_visible(self, endpoint: str) -> float | None:
        """When the next hidden or delayed message of ``endpoint`` becomes visible."""
        ...

    async def dead_letters(
        self,
        endpoint: str | None = None,
        *,
        settled: bool | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[DeadLetter]:
        """Dead letters, oldest first: all of them, or only open (``settled=False``)
        or settled ones (``settled=True``), of one endpoint or all, optionally a page."""
        ...

    async def dead_letter_count(
        self, endpoint: str | None = None, *, settled: bool | None = False
    ) -> int:
        """How many dead letters there are, without reading them: by default the open
        ones (still parked), of one endpoint or all."""
        ...

    async def get_dead_letter(self, id: int) -> DeadLetter | None:
        """A dead letter by id (no lock), settled or not."""
        ...


class SQLStore(Store, Protocol):
    """A store with business tables: what participants' migrations need.

    Business SQL uses qmark ``?`` parameters on every adapter. Transactions are
    isolated, not necessarily serialised (PostgreSQL runs them concurrently under row
    locks). After a ``StoreError`` inside a block other than the documented refusals,
    the transaction can only roll back.
    """

    dialect: str
    """``"sqlite"`` or ``"postgresql"``."""

    def snapshot(self) -> AbstractAsyncContextManager[Tx]:
        """A transaction for reading only, whose reads all see one state of the database
        (PostgreSQL: REPEATABLE READ, READ ONLY; its transactions are READ COMMITTED,
        where two SELECTs may see different commits). For checks that compare several
        tables while others write, such as an app's ``watch``."""
        ...

    async def apply_migrations(self, namespace: str, steps: Sequence[str]) -> None:
        """Apply, in order and once each, the SQL scripts of ``namespace`` not applied yet."""
        ...
