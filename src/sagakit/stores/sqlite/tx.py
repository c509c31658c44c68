"""A transaction of the SQLite store: :class:`SQLiteTx` on the writer connection, and
the ``async with`` that begins, commits or rolls it back (see
:mod:`sagakit.stores.sqlite`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sagakit.core.envelope import Envelope
from sagakit.core.instance import HistoryEntry, SagaInstance, Timer
from sagakit.errors import ConcurrencyError, StoreError
from sagakit.stores.base import (
    DeadLetter,
    IdempotencyRecord,
    ItemByItem,
)
from sagakit.stores.rows import (
    check_settlement,
    dead_letter_from_row,
)
from sagakit.stores.rows import dumps as _dumps
from sagakit.stores.rows import history_params as _history_params
from sagakit.stores.rows import loads as _loads
from sagakit.stores.rows import saga_from_row as _saga_from_row
from sagakit.stores.sqlite.sql import (
    _fail,
    _finished,
    _queries,
    _rollback,
    _saga_insert_params,
    _saga_update_params,
)

if TYPE_CHECKING:
    from sagakit.stores.sqlite.store import SQLiteStore


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
        """See :meth:`Tx.inbox_add_many`: one INSERT over the ids as a JSON array."""
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
        """See :meth:`Tx.idempotency_get_many`: one SELECT over the keys as a JSON array."""
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
        """See :meth:`Tx.set_aside_take`: one DELETE ... RETURNING over the ids as JSON."""
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
        """See :meth:`Tx.queue_add`: one INSERT per message, whose ``lastrowid`` is its id
        (executemany does not report them)."""
        at, deliveries = (now, 0) if leased_until is None else (leased_until, 1)
        sql, what = self._q["queue_add"], f"add {len(bodies)} message(s) to {endpoint!r}"
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
