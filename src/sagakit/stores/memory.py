"""An in-memory store for tests: the same contract as the SQLite store, no file.

Use it in your own tests of sagas and participants that need no business tables::

    store = MemoryStore()
    await store.open()
    async with store.transaction() as tx:
        await tx.inbox_add("payments", "m-1", now=0.0)

Transactions are serialised by one lock, like SQLite's single writer. Writes apply in
place and record how to undo them, so an exception in the block rolls every one of
them back. Everything is stored as the SQL stores keep it (JSON text for data,
outcomes and envelopes), which isolates stored values from the caller's objects and
fails on the same unserialisable values the SQL stores would reject.

One difference from SQLite: while a transaction is suspended at an ``await``, a reader
in another task can see its uncommitted writes. The engine never awaits anything but
the store inside a transaction, so this only matters to handlers that do.
"""

from __future__ import annotations

import asyncio
import heapq
import json
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from functools import partial
from types import TracebackType
from typing import Any, NamedTuple, NoReturn

from sagakit.core.envelope import Envelope
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState, Timer
from sagakit.errors import ConcurrencyError, StoreError
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
from sagakit.stores.rows import check_settlement

__all__ = ["MemoryStore", "MemoryTx"]

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.JSONDecoder().decode


class _SagaRow(NamedTuple):
    """A saga as the SQL stores keep it; ``seq`` orders sagas created at the same time."""

    seq: int
    saga_id: str
    definition: str
    definition_version: int
    business_key: str
    correlation_id: str
    state: SagaState
    status: str
    data: str
    steps: str
    created_at: float
    updated_at: float
    cursor: int
    version: int
    deadline_at: float | None
    reason: str | None
    cancel_requested: bool
    timed_out: bool

    @classmethod
    def pack(cls, seq: int, i: SagaInstance) -> _SagaRow:
        return cls(
            seq,
            i.saga_id,
            i.definition,
            i.definition_version,
            i.business_key,
            i.correlation_id,
            i.state,
            i.status,
            _dumps(i.data),
            _dumps(i.steps_to_json()),
            i.created_at,
            i.updated_at,
            i.cursor,
            i.version,
            i.deadline_at,
            i.reason,
            i.cancel_requested,
            i.timed_out,
        )

    def unpack(self) -> SagaInstance:
        return SagaInstance(
            saga_id=self.saga_id,
            definition=self.definition,
            definition_version=self.definition_version,
            business_key=self.business_key,
            correlation_id=self.correlation_id,
            state=self.state,
            status=self.status,
            data=_loads(self.data),
            steps=SagaInstance.steps_from_json(_loads(self.steps)),
            created_at=self.created_at,
            updated_at=self.updated_at,
            cursor=self.cursor,
            version=self.version,
            deadline_at=self.deadline_at,
            reason=self.reason,
            cancel_requested=self.cancel_requested,
            timed_out=self.timed_out,
        )


@dataclass(slots=True)
class _OutboxEntry:
    body: str
    created_at: float
    claimed_until: float | None = None
    published_at: float | None = None


@dataclass(slots=True)
class _QueueEntry:
    id: int
    endpoint: str
    body: str
    enqueued_at: float
    available_at: float
    deliveries: int = 0
    last_error: str | None = None


@dataclass(slots=True)
class _SetAsideEntry:
    row: SetAside
    claimed_until: float | None = None


def _finished() -> NoReturn:
    raise StoreError(
        "this transaction has ended; use the Tx only inside its `async with "
        "store.transaction()` block"
    )


class MemoryTx(ItemByItem):
    """One transaction of a :class:`MemoryStore` (see :class:`~sagakit.stores.base.Tx`)."""

    __slots__ = ("_store", "_undo")

    def __init__(self, store: MemoryStore) -> None:
        self._store: MemoryStore | None = store
        self._undo: list[Callable[[], object]] = []

    def _rollback(self) -> None:
        while self._undo:
            self._undo.pop()()

    # -- business data ----------------------------------------------------------------
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Not available: the in-memory store has no SQL."""
        _no_sql()

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Not available: the in-memory store has no SQL."""
        _no_sql()

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """Not available: the in-memory store has no SQL."""
        _no_sql()

    # -- inbox, idempotency, outbox, dead letters ------------------------------------
    async def inbox_add(self, consumer: str, message_id: str, now: float) -> bool:
        """Record that ``consumer`` handled ``message_id``; False if it already had."""
        store = self._store or _finished()
        seen = store._inbox.setdefault(consumer, {})
        if message_id in seen:
            return False
        seen[message_id] = now
        self._undo.append(partial(seen.pop, message_id))
        return True

    async def idempotency_get(self, consumer: str, key: str) -> IdempotencyRecord | None:
        """The outcome ``consumer`` recorded for ``key``, if any."""
        store = self._store or _finished()
        found = store._idempotency.get((consumer, key))
        if found is None:
            return None
        outcome, tombstone, at = found
        return IdempotencyRecord(key=key, outcome=_loads(outcome), tombstone=tombstone, at=at)

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
        store = self._store or _finished()
        record_key = (consumer, key)
        if record_key in store._idempotency:
            raise StoreError(
                f"idempotency key {key!r} of consumer {consumer!r} is already recorded; "
                "read it with idempotency_get before writing"
            )
        store._idempotency[record_key] = (_dumps(outcome), tombstone, now)
        self._undo.append(partial(store._idempotency.pop, record_key))

    async def outbox_add(self, envelopes: Sequence[Envelope], now: float) -> None:
        """Queue messages to be published after commit."""
        store = self._store or _finished()
        for envelope in envelopes:
            store._last_id += 1
            row_id = store._last_id
            entry = _OutboxEntry(body=envelope.to_json(), created_at=now)
            store._outbox[row_id] = entry
            store._unpublished[row_id] = entry
            self._undo.append(partial(store._outbox_remove, row_id))

    async def dead_letter(
        self, endpoint: str, message_id: str | None, body: str, reason: str, now: float
    ) -> None:
        """Park a message that cannot be handled, with the reason."""
        store = self._store or _finished()
        if message_id is not None and any(
            d.endpoint == endpoint and d.message_id == message_id and d.open
            for d in store._dead_letters
        ):
            return  # parked already (a redelivery after a crash): once is enough
        store._last_id += 1
        store._dead_letters.append(
            DeadLetter(store._last_id, endpoint, message_id, body, reason, now)
        )
        self._undo.append(store._dead_letters.pop)

    async def dead_letter_get(self, id: int) -> DeadLetter | None:
        """A dead letter by id (the transaction lock already excludes other writers)."""
        store = self._store or _finished()
        return store._dead_letter(id)[1]

    async def dead_letter_settle(
        self, id: int, settlement: str, actor: str, reason: str, now: float
    ) -> bool:
        """Settle an open dead letter; False if it does not exist or was settled already."""
        store = self._store or _finished()
        check_settlement(settlement)
        index, letter = store._dead_letter(id)
        if letter is None or not letter.open:
            return False
        store._dead_letters[index] = replace(
            letter, settlement=settlement, settled_by=actor, settled_at=now, settle_reason=reason
        )
        self._undo.append(partial(store._dead_letters.__setitem__, index, letter))
        return True

    # -- sagas ------------------------------------------------------------------------
    async def saga_get(self, saga_id: str) -> SagaInstance | None:
        """Load an instance (the transaction lock already excludes other writers)."""
        store = self._store or _finished()
        row = store._sagas.get(saga_id)
        return None if row is None else row.unpack()

    async def saga_get_by_key(self, definition: str, business_key: str) -> SagaInstance | None:
        """The instance of ``definition`` (any version) started for ``business_key``."""
        store = self._store or _finished()
        saga_id = store._saga_keys.get((definition, business_key))
        return None if saga_id is None else store._sagas[saga_id].unpack()

    async def saga_insert(self, instance: SagaInstance) -> None:
        """Insert a new instance; ``ConcurrencyError`` if its id or (definition, key) exists."""
        store = self._store or _finished()
        key = (instance.definition, instance.business_key)
        if instance.saga_id in store._sagas:
            raise ConcurrencyError(f"saga {instance.saga_id} already exists")
        if key in store._saga_keys:
            raise ConcurrencyError(
                f"a {instance.definition} saga already exists for business key "
                f"{instance.business_key!r}"
            )
        store._last_id += 1
        store._sagas[instance.saga_id] = _SagaRow.pack(store._last_id, instance)
        store._saga_keys[key] = instance.saga_id
        self._undo.append(partial(store._saga_remove, instance.saga_id, key))

    async def saga_update(self, instance: SagaInstance, expected_version: int) -> None:
        """Write ``instance`` if the stored version is still ``expected_version``.

        Raises :class:`~sagakit.errors.ConcurrencyError` otherwise: another worker
        applied a transition first, and this one must be recomputed. The id,
        definition, business key and creation time stay as inserted.
        """
        store = self._store or _finished()
        old = store._sagas.get(instance.saga_id)
        if old is None or old.version != expected_version:
            found = "it does not exist" if old is None else f"it is at version {old.version}"
            raise ConcurrencyError(
                f"saga {instance.saga_id} was not updated: expected version "
                f"{expected_version}, but {found}; reload it and recompute the transition"
            )
        new = _SagaRow.pack(old.seq, instance)._replace(
            definition=old.definition, business_key=old.business_key, created_at=old.created_at
        )
        store._sagas[instance.saga_id] = new
        self._undo.append(partial(store._sagas.__setitem__, instance.saga_id, old))

    async def history_add(self, entries: Sequence[HistoryEntry]) -> None:
        """Append history rows (never updated, never deleted)."""
        store = self._store or _finished()
        # Serialise all first, so that a bad detail leaves no row behind.
        rows = [(e, _dumps(e.detail)) for e in entries]
        for entry, detail in rows:
            rows_of_saga = store._history.setdefault(entry.saga_id, [])
            rows_of_saga.append((entry, detail))
            self._undo.append(rows_of_saga.pop)

    async def timers_set(self, timers: Sequence[Timer]) -> None:
        """Set timers; one with the same (saga_id, name) is replaced."""
        store = self._store or _finished()
        for timer in timers:
            key = (timer.saga_id, timer.name)
            self._undo.append(partial(store._timer_restore, key, store._timers.get(key)))
            store._timer_put(timer)

    async def timers_cancel(self, saga_id: str, names: Sequence[str]) -> None:
        """Delete the named timers of one saga (missing ones are ignored)."""
        store = self._store or _finished()
        for name in names:
            key = (saga_id, name)
            old = store._timers.pop(key, None)
            if old is not None:
                self._undo.append(partial(store._timer_restore, key, old))

    async def timers_take_due(self, now: float, limit: int) -> list[Timer]:
        """Remove and return up to ``limit`` timers due at ``now``, earliest first.

        Taken inside the transaction that applies them: if it rolls back, they stay.
        """
        store = self._store or _finished()
        heap, timers = store._timer_heap, store._timers
        taken: list[Timer] = []
        while heap and len(taken) < limit and heap[0][0] <= now:
            due_at, saga_id, name = heapq.heappop(heap)
            key = (saga_id, name)
            timer = timers.get(key)
            if timer is None or timer.due_at != due_at:
                continue  # a stale heap entry: the timer was replaced or cancelled
            del timers[key]
            taken.append(timer)
            self._undo.append(partial(store._timer_restore, key, timer))
        return taken

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
        store = self._store or _finished()
        store._last_id += 1
        row = SetAside(store._last_id, saga_id, definition, definition_version, kind, body, now)
        store._set_aside[row.id] = _SetAsideEntry(row)
        self._undo.append(partial(store._set_aside.pop, row.id))

    async def set_aside_take(self, ids: Sequence[int]) -> set[int]:
        """Delete set-aside inputs in this transaction; return the ids still there."""
        store = self._store or _finished()
        taken: set[int] = set()
        for id in ids:
            entry = store._set_aside.pop(id, None)
            if entry is not None:
                taken.add(id)
                self._undo.append(partial(store._set_aside_restore, entry))
        return taken

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
        store = self._store or _finished()
        mailbox = store._queues.setdefault(endpoint, {})
        ids: list[int] = []
        for body in bodies:
            store._last_id += 1
            if leased_until is None:
                entry = _QueueEntry(store._last_id, endpoint, body, now, now)
            else:
                entry = _QueueEntry(store._last_id, endpoint, body, now, leased_until, 1)
            mailbox[entry.id] = entry
            store._queued[entry.id] = entry
            self._undo.append(partial(store._queue_remove, entry.id))
            ids.append(entry.id)
        return ids

    async def queue_remove(self, ids: Sequence[int]) -> None:
        """Remove mailbox messages in this transaction: acknowledged with their effect."""
        store = self._store or _finished()
        for queue_id in ids:
            entry = store._queue_remove(queue_id)
            if entry is not None:
                self._undo.append(partial(store._queue_restore, entry))


def _no_sql() -> NoReturn:
    raise StoreError(
        "MemoryStore has no SQL: execute/fetchall/fetchone need a SQL store; use "
        "SQLiteStore (a file in a temporary directory is fine in tests) for participants "
        "with business tables"
    )


class _Transaction(AbstractAsyncContextManager[MemoryTx]):
    """``async with``: take the store lock; undo every write if the block raises."""

    __slots__ = ("_store", "_tx")

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._tx: MemoryTx | None = None

    async def __aenter__(self) -> MemoryTx:
        await self._store._acquire()
        self._tx = MemoryTx(self._store)
        return self._tx

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tx = self._tx
        assert tx is not None, "transaction exited without entering"
        try:
            if exc_type is not None:
                tx._rollback()
        finally:
            tx._store = None
            tx._undo = []
            self._store._release()


class MemoryStore:
    """A :class:`~sagakit.stores.base.Store` kept in dicts, for tests and simulations.

    Data lives as long as the object: :meth:`close` then :meth:`open` keeps it, which
    is how a restart looks from the store's side. There is no SQL (use
    :class:`~sagakit.stores.sqlite.SQLiteStore` for business tables).
    """

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self._open = False
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        # One id sequence for every table, never rolled back, so ids are never reused.
        self._last_id = 0
        self._sagas: dict[str, _SagaRow] = {}
        self._saga_keys: dict[tuple[str, str], str] = {}
        self._history: dict[str, list[tuple[HistoryEntry, str]]] = {}
        self._timers: dict[tuple[str, str], Timer] = {}
        # (due_at, saga_id, name), the SQL order; entries of replaced or cancelled timers
        # stay until popped or compacted away, and are recognised by their due time.
        self._timer_heap: list[tuple[float, str, str]] = []
        self._outbox: dict[int, _OutboxEntry] = {}
        self._unpublished: dict[int, _OutboxEntry] = {}
        self._inbox: dict[str, dict[str, float]] = {}
        self._idempotency: dict[tuple[str, str], tuple[str, bool, float]] = {}
        self._queues: dict[str, dict[int, _QueueEntry]] = {}
        self._queued: dict[int, _QueueEntry] = {}
        self._dead_letters: list[DeadLetter] = []
        self._set_aside: dict[int, _SetAsideEntry] = {}

    def __repr__(self) -> str:
        return f"MemoryStore(name={self.name!r})"

    # -- lifecycle --------------------------------------------------------------------
    async def open(self) -> None:
        """Make the store usable (there is nothing to connect to)."""
        if not self._open:
            self._lock = asyncio.Lock()  # the store may be reopened under another loop
            self._open = True

    async def close(self) -> None:
        """Make the store unusable until opened again; the data is kept."""
        if self._open:
            await self._acquire()
            self._open = False
            self._release()

    def transaction(self) -> AbstractAsyncContextManager[MemoryTx]:
        """A transaction: commits when the block exits normally, rolls back on error."""
        return _Transaction(self)

    # -- the writer lock and helpers --------------------------------------------------
    def _check_open(self) -> None:
        if not self._open:
            raise StoreError(f"memory store {self.name!r} is not open; call `await store.open()`")

    async def _acquire(self) -> None:
        self._check_open()
        task = asyncio.current_task()
        if self._owner is not None and self._owner is task:
            raise StoreError(
                f"store {self.name!r} is already in a transaction in this task; waiting for "
                "it would deadlock (use the open Tx instead of the store or a second transaction)"
            )
        await self._lock.acquire()
        if not self._open:  # closed while waiting
            self._lock.release()
            self._check_open()
        self._owner = task

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    def _saga_remove(self, saga_id: str, key: tuple[str, str]) -> None:
        del self._sagas[saga_id]
        del self._saga_keys[key]

    def _dead_letter(self, id: int) -> tuple[int, DeadLetter | None]:
        for index, letter in enumerate(self._dead_letters):
            if letter.id == id:
                return index, letter
        return -1, None

    def _queue_remove(self, queue_id: int) -> _QueueEntry | None:
        entry = self._queued.pop(queue_id, None)
        if entry is not None:
            del self._queues[entry.endpoint][queue_id]
        return entry

    def _queue_restore(self, entry: _QueueEntry) -> None:
        # Back in id order: the mailbox hands messages out oldest first.
        mailbox = self._queues.setdefault(entry.endpoint, {})
        mailbox[entry.id] = entry
        self._queues[entry.endpoint] = dict(sorted(mailbox.items()))
        self._queued[entry.id] = entry

    def _set_aside_restore(self, entry: _SetAsideEntry) -> None:
        # Back in id order: a saga's inputs are applied in the order they were set aside.
        self._set_aside[entry.row.id] = entry
        self._set_aside = dict(sorted(self._set_aside.items()))

    def _outbox_remove(self, row_id: int) -> None:
        del self._outbox[row_id]
        self._unpublished.pop(row_id, None)

    def _timer_put(self, timer: Timer) -> None:
        self._timers[(timer.saga_id, timer.name)] = timer
        heap = self._timer_heap
        heapq.heappush(heap, (timer.due_at, timer.saga_id, timer.name))
        if len(heap) > 2 * len(self._timers) + 1024:
            # Drop the stale entries of replaced and cancelled timers.
            heap[:] = [(t.due_at, t.saga_id, t.name) for t in self._timers.values()]
            heapq.heapify(heap)

    def _timer_restore(self, key: tuple[str, str], old: Timer | None) -> None:
        if old is None:
            self._timers.pop(key, None)
        else:
            self._timer_put(old)

    # -- reads ------------------------------------------------------------------------
    async def get_saga(self, saga_id: str) -> SagaInstance | None:
        """An instance by id (no lock)."""
        self._check_open()
        row = self._sagas.get(saga_id)
        return None if row is None else row.unpack()

    async def list_sagas(
        self,
        *,
        states: Sequence[SagaState] | None = None,
        definition: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[SagaInstance]:
        """Instances, newest first (ties in insertion order), optionally filtered."""
        query = SagaQuery(states=None if states is None else tuple(states), definition=definition)
        return (await self.find_sagas(query, limit=limit, offset=offset)).items

    async def find_sagas(self, query: SagaQuery, *, limit: int = 100, offset: int = 0) -> SagaPage:
        """The sagas ``query`` selects, newest first, and how many it selects in all."""
        self._check_open()
        # Filtered on the packed rows: only the page is unpacked (JSON parsed).
        rows = [r for r in self._sagas.values() if query.matches(r)]
        rows.sort(key=lambda r: (r.created_at, r.seq), reverse=True)
        start = max(offset, 0)
        return SagaPage(len(rows), [r.unpack() for r in rows[start : start + max(limit, 0)]])

    async def get_saga_by_key(self, definition: str, business_key: str) -> SagaInstance | None:
        """The instance of ``definition`` started for ``business_key`` (no lock)."""
        self._check_open()
        saga_id = self._saga_keys.get((definition, business_key))
        return None if saga_id is None else self._sagas[saga_id].unpack()

    async def count_sagas(self) -> dict[SagaState, int]:
        """How many instances are in each state (states with none are left out)."""
        self._check_open()
        return dict(Counter(r.state for r in self._sagas.values()))

    async def history(self, saga_id: str) -> list[HistoryEntry]:
        """A saga's history in the order it was written."""
        self._check_open()
        rows = self._history.get(saga_id, [])
        return [replace(entry, detail=_loads(detail)) for entry, detail in rows]

    async def next_timer_due(self) -> float | None:
        """When the earliest timer is due, or ``None`` when there is none."""
        self._check_open()
        heap, timers = self._timer_heap, self._timers
        while heap:
            due_at, saga_id, name = heap[0]
            timer = timers.get((saga_id, name))
            if timer is not None and timer.due_at == due_at:
                return due_at
            heapq.heappop(heap)  # stale; see _timer_heap
        return None

    async def count_sagas_by_version(self) -> dict[tuple[str, int, SagaState], int]:
        """How many instances there are per (definition, version, state)."""
        self._check_open()
        return dict(
            Counter((r.definition, r.definition_version, r.state) for r in self._sagas.values())
        )

    # -- inputs set aside for a missing definition version ------------------------------
    async def set_aside_counts(self) -> dict[tuple[str, int], int]:
        """How many inputs wait per (definition, version)."""
        self._check_open()
        return dict(
            Counter((e.row.definition, e.row.definition_version) for e in self._set_aside.values())
        )

    async def set_aside_claim(
        self, versions: Sequence[tuple[str, int]], limit: int, now: float, lease: float
    ) -> list[SetAside]:
        """Claim up to ``limit`` inputs waiting for any of ``versions``, oldest first."""
        await self._acquire()
        try:
            wanted = set(versions)
            claimed: list[SetAside] = []
            for entry in self._set_aside.values():
                if len(claimed) >= limit:
                    break
                row = entry.row
                if (row.definition, row.definition_version) not in wanted:
                    continue
                if entry.claimed_until is None or entry.claimed_until <= now:
                    entry.claimed_until = now + lease
                    claimed.append(row)
            return claimed
        finally:
            self._release()

    async def set_aside_of_saga(self, saga_id: str) -> list[SetAside]:
        """The inputs of ``saga_id`` set aside, oldest first."""
        self._check_open()
        return [e.row for e in self._set_aside.values() if e.row.saga_id == saga_id]

    # -- outbox relay -----------------------------------------------------------------
    async def outbox_claim(self, limit: int, now: float, lease: float) -> list[OutboxRow]:
        """Claim up to ``limit`` unpublished rows for ``lease`` seconds, oldest first.

        A claimed row is not handed to another relay until its lease expires, so a
        relay that dies mid-publish only delays its rows. Callers publish, wait for the
        acknowledgement, then :meth:`outbox_mark_published`.
        """
        await self._acquire()
        try:
            claimed: list[OutboxRow] = []
            for row_id, entry in self._unpublished.items():
                if len(claimed) >= limit:
                    break
                if entry.claimed_until is None or entry.claimed_until <= now:
                    entry.claimed_until = now + lease
                    claimed.append(OutboxRow(row_id, Envelope.from_json(entry.body)))
            return claimed
        finally:
            self._release()

    async def outbox_mark_published(self, ids: Sequence[int], now: float) -> None:
        """Mark rows as published (acknowledged by the transport)."""
        await self._acquire()
        try:
            for row_id in ids:
                entry = self._unpublished.pop(row_id, None)
                if entry is not None:
                    entry.published_at = now
        finally:
            self._release()

    async def outbox_pending(self) -> int:
        """How many rows are not yet published."""
        self._check_open()
        return len(self._unpublished)

    async def outbox_all(self) -> list[tuple[Envelope, float | None]]:
        """Every outbox row with its published time (for audits and invariant checks)."""
        self._check_open()
        return [(Envelope.from_json(e.body), e.published_at) for e in self._outbox.values()]

    async def outbox_of_saga(self, saga_id: str) -> list[tuple[Envelope, float | None]]:
        """The outbox rows whose envelope carries ``saga_id``, in write order.

        A scan (this store is for tests): only bodies that mention the id are parsed.
        """
        self._check_open()
        out = []
        for e in self._outbox.values():
            if saga_id in e.body:
                env = Envelope.from_json(e.body)
                if env.saga_id == saga_id:
                    out.append((env, e.published_at))
        return out

    async def outbox_purge(self, published_before: float, *, batch: int = 1000) -> int:
        """Delete rows published before ``published_before``; return how many."""
        await self._acquire()
        try:
            old = [
                row_id
                for row_id, e in self._outbox.items()
                if e.published_at is not None and e.published_at < published_before
            ]
            for row_id in old:
                del self._outbox[row_id]
            return len(old)
        finally:
            self._release()

    async def outbox_oldest_pending(self) -> float | None:
        """``created_at`` of the oldest unpublished row, or ``None`` when all are published."""
        self._check_open()
        return min((e.created_at for e in self._unpublished.values()), default=None)

    # -- inbox ------------------------------------------------------------------------
    async def inbox_ids(self, consumer: str) -> set[str]:
        """Message ids ``consumer`` has handled (for audits and invariant checks)."""
        self._check_open()
        return set(self._inbox.get(consumer, ()))

    async def inbox_has(self, consumer: str, message_id: str) -> bool:
        """Whether ``consumer`` recorded ``message_id`` as handled."""
        self._check_open()
        return message_id in self._inbox.get(consumer, {})

    async def inbox_purge(self, older_than: float) -> int:
        """Delete inbox rows recorded before ``older_than``; return how many."""
        await self._acquire()
        try:
            purged = 0
            for seen in self._inbox.values():
                old = [message_id for message_id, at in seen.items() if at < older_than]
                for message_id in old:
                    del seen[message_id]
                purged += len(old)
            return purged
        finally:
            self._release()

    # -- mailbox queue (embedded transport) -------------------------------------------
    async def queue_push(
        self, endpoint: str, bodies: Sequence[str], now: float, available_at: float | None = None
    ) -> None:
        """Append raw messages to ``endpoint``'s mailbox, visible from ``available_at``."""
        at = now if available_at is None else available_at
        await self._acquire()
        try:
            mailbox = self._queues.setdefault(endpoint, {})
            for body in bodies:
                self._last_id += 1
                entry = _QueueEntry(self._last_id, endpoint, body, now, at)
                mailbox[entry.id] = entry
                self._queued[entry.id] = entry
        finally:
            self._release()

    async def queue_fetch(
        self, endpoint: str, limit: int, now: float, lease: float
    ) -> list[QueuedMessage]:
        """Hand out up to ``limit`` visible messages, oldest first, hidden for ``lease`` s.

        Each counts one more delivery. A message not acknowledged before its lease
        ends is handed out again (at-least-once).
        """
        await self._acquire()
        try:
            fetched: list[QueuedMessage] = []
            for entry in self._queues.get(endpoint, {}).values():
                if len(fetched) >= limit:
                    break
                if entry.available_at <= now:
                    entry.deliveries += 1
                    entry.available_at = now + lease
                    fetched.append(
                        QueuedMessage(
                            entry.id, endpoint, entry.body, entry.deliveries, entry.enqueued_at
                        )
                    )
            return fetched
        finally:
            self._release()

    async def queue_ack(self, ids: Sequence[int]) -> None:
        """Remove handled messages from the mailbox."""
        await self._acquire()
        try:
            for message_id in ids:
                entry = self._queued.pop(message_id, None)
                if entry is not None:
                    del self._queues[entry.endpoint][message_id]
        finally:
            self._release()

    async def queue_retry(self, id: int, available_at: float, error: str) -> None:
        """Make a message visible again at ``available_at`` (a failed delivery)."""
        await self._acquire()
        try:
            entry = self._queued.get(id)
            if entry is not None:
                entry.available_at = available_at
                entry.last_error = error
        finally:
            self._release()

    async def queue_reset_leases(self, endpoint: str) -> int:
        """Make every leased message of ``endpoint`` visible now (the sole consumer restarted).

        A message counts as leased once it was handed out; messages delayed at push
        time and never delivered keep their delay.
        """
        await self._acquire()
        try:
            reset = 0
            for entry in self._queues.get(endpoint, {}).values():
                if entry.deliveries > 0 and entry.available_at > 0:
                    entry.available_at = 0.0
                    reset += 1
            return reset
        finally:
            self._release()

    async def queue_depth(self, endpoint: str | None = None) -> int:
        """How many messages wait in a mailbox (all mailboxes when ``endpoint`` is None)."""
        self._check_open()
        if endpoint is None:
            return len(self._queued)
        return len(self._queues.get(endpoint, ()))

    async def next_queue_visible(self, endpoint: str) -> float | None:
        """When the next hidden or delayed message of ``endpoint`` becomes visible.

        This is the smallest ``available_at`` of the mailbox, which is in the past when
        a message is visible already; ``None`` when the mailbox is empty.
        """
        self._check_open()
        mailbox = self._queues.get(endpoint)
        return min((e.available_at for e in mailbox.values()), default=None) if mailbox else None

    def _dead_letters_of(self, endpoint: str | None, settled: bool | None) -> list[DeadLetter]:
        return [
            d
            for d in self._dead_letters
            if (endpoint is None or d.endpoint == endpoint)
            and (settled is None or d.open is not settled)
        ]

    async def dead_letters(
        self,
        endpoint: str | None = None,
        *,
        settled: bool | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[DeadLetter]:
        """Dead letters, oldest first, optionally of one endpoint, open or settled, a page."""
        self._check_open()
        found = self._dead_letters_of(endpoint, settled)[offset:]
        return found if limit is None else found[:limit]

    async def dead_letter_count(
        self, endpoint: str | None = None, *, settled: bool | None = False
    ) -> int:
        """How many dead letters there are (by default the open ones)."""
        self._check_open()
        return len(self._dead_letters_of(endpoint, settled))

    async def get_dead_letter(self, id: int) -> DeadLetter | None:
        """A dead letter by id, settled or not."""
        self._check_open()
        return self._dead_letter(id)[1]
