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
from typing import Protocol

from sagakit.core.envelope import Envelope
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState
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
    SagaOrder,
    SagaPage,
    SagaQuery,
    SetAside,
)
from sagakit.stores.tx import ItemByItem, Tx

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
    "SagaOrder",
    "SagaPage",
    "SagaQuery",
    "SetAside",
    "Store",
    "Tx",
]


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

    async def find_sagas(
        self,
        query: SagaQuery,
        *,
        limit: int = 100,
        offset: int = 0,
        order: SagaOrder = SagaOrder.NEWEST,
    ) -> SagaPage:
        """The sagas ``query`` selects, in ``order`` (newest first by default), and how
        many it selects in all.

        Filtered, ordered and counted by the database (indexed on state, definition and
        version, creation time); the page and the total come from one consistent
        snapshot.
        """
        ...

    async def get_saga_by_key(self, definition: str, business_key: str) -> SagaInstance | None:
        """The instance of ``definition`` started for ``business_key`` (read-only, no lock)."""
        ...

    async def count_sagas(self) -> dict[SagaState, int]:
        """How many instances are in each state (states with none are left out)."""
        ...

    async def oldest_update(self, states: Sequence[SagaState]) -> float | None:
        """``updated_at`` of the saga in any of ``states`` that changed least recently,
        or ``None`` when none is. A terminal saga's ``updated_at`` is when it got there:
        for the manual queue, when its oldest case started waiting (a metric)."""
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
