"""One actor's transactions in a race (:mod:`sagakit.testing.races`): READ COMMITTED on
SQLite, with a point before each statement where another actor may run.

Each actor has its own connection to the file, and each of its transactions runs in two
phases: until its first write, every statement reads the latest committed data
(autocommit) and the runtime's writes whose result it does not read (idempotency
records, outbox rows) are kept aside, an inbox insert reading whether the id is there;
at its first business write, or at commit, it takes the file's write lock, writes what
it kept aside, and runs to its end with no other transaction in between.
"""

from __future__ import annotations

import inspect
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, cast

from sagakit.core.envelope import Envelope
from sagakit.errors import SagakitError, StoreError
from sagakit.stores.base import IdempotencyRecord, ItemByItem
from sagakit.stores.sqlite import SQLiteStore, SQLiteTx


class RaceError(SagakitError):
    """The race cannot be explored as written (not a violation of its invariants)."""


class _Point:
    """Awaited before a statement another actor may run ahead of: yields to the explorer."""

    __slots__ = ("kind", "what")

    def __init__(self, kind: str, what: str) -> None:
        self.kind = kind  # "read" (phase one) or "write" (takes the lock, runs to the end)
        self.what = what

    def __await__(self) -> Generator[_Point, None, None]:
        yield self


class _Gate:
    """One actor's connection and the state of its open transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.writing = False
        self.staged: list[Callable[[], Awaitable[None]]] = []
        self.inbox: set[tuple[str, str]] = set()
        self.records: dict[tuple[str, str], IdempotencyRecord] = {}

    def reset(self) -> None:
        self.writing = False
        self.staged.clear()
        self.inbox.clear()
        self.records.clear()


def _writes(sql: str) -> bool:
    """Whether ``sql`` may write (anything but a plain query counts as a write, which
    only explores fewer orders, never a wrong one)."""
    words = sql.lstrip().split(None, 1)
    head = words[0].upper() if words else ""
    if head in ("SELECT", "VALUES", "EXPLAIN"):
        return " RETURNING " in f" {sql.upper()} "
    if head == "WITH":
        upper = sql.upper()
        return any(w in upper for w in ("INSERT ", "UPDATE ", "DELETE ", "REPLACE "))
    return True


class _SteppedTx(SQLiteTx):
    """A :class:`SQLiteTx` on an actor's connection, run in the two phases above."""

    __slots__ = ("_gate",)
    _gate: _Gate

    async def _point(self, kind: str, what: str) -> None:
        if self._gate.writing:
            return
        await _Point(kind, what)
        if kind == "write":
            await self._begin_writes()

    async def _begin_writes(self) -> None:
        gate = self._gate
        if gate.conn.in_transaction:
            raise RaceError("an actor's read left a transaction open before its first write")
        gate.conn.execute("BEGIN IMMEDIATE")  # free: no other write phase is running
        gate.writing = True
        staged = list(gate.staged)
        gate.staged.clear()
        for write in staged:
            await write()

    # -- business statements ----------------------------------------------------------
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        await self._point("write" if _writes(sql) else "read", _short(sql))
        return await super().execute(sql, params)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        await self._point("write" if _writes(sql) else "read", _short(sql))
        return await super().fetchall(sql, params)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        await self._point("write" if _writes(sql) else "read", _short(sql))
        return await super().fetchone(sql, params)

    # -- the runtime's records: read now, written at the write phase -------------------
    async def inbox_add(self, consumer: str, message_id: str, now: float) -> bool:
        if self._gate.writing:
            return await super().inbox_add(consumer, message_id, now)
        await self._point("read", f"inbox has {message_id}?")
        return self._stage_inbox(consumer, message_id, now)

    async def inbox_add_many(
        self, consumer: str, message_ids: Sequence[str], now: float
    ) -> set[str]:
        if self._gate.writing:
            return await super().inbox_add_many(consumer, message_ids, now)
        await self._point("read", f"inbox has {', '.join(message_ids)}?")
        return {m for m in message_ids if self._stage_inbox(consumer, m, now)}

    def _stage_inbox(self, consumer: str, message_id: str, now: float) -> bool:
        gate = self._gate
        if (consumer, message_id) in gate.inbox or self._one(
            "read the inbox", self._q["inbox_has"], (consumer, message_id)
        ):
            return False
        gate.inbox.add((consumer, message_id))

        async def write() -> None:
            if not await SQLiteTx.inbox_add(self, consumer, message_id, now):
                raise StoreError(
                    f"message {message_id} entered {consumer}'s inbox in another transaction "
                    "since this one read the inbox (a concurrent delivery of the same "
                    "message): this transaction rolls back and the message is delivered again"
                )

        gate.staged.append(write)
        return True

    async def idempotency_get(self, consumer: str, key: str) -> IdempotencyRecord | None:
        await self._point("read", f"record of {key}?")
        staged = self._gate.records.get((consumer, key))
        return staged if staged is not None else await super().idempotency_get(consumer, key)

    async def idempotency_get_many(
        self, consumer: str, keys: Sequence[str]
    ) -> dict[str, IdempotencyRecord]:
        await self._point("read", f"records of {', '.join(keys)}?")
        found = await super().idempotency_get_many(consumer, keys)
        for (c, key), record in self._gate.records.items():
            if c == consumer and key in keys:
                found[key] = record
        return found

    async def idempotency_put(
        self,
        consumer: str,
        key: str,
        outcome: dict[str, Any],
        now: float,
        *,
        tombstone: bool = False,
    ) -> None:
        if self._gate.writing:
            return await super().idempotency_put(consumer, key, outcome, now, tombstone=tombstone)
        gate = self._gate
        gate.records[(consumer, key)] = IdempotencyRecord(
            key=key, outcome=outcome, tombstone=tombstone, at=now
        )

        async def write() -> None:
            await SQLiteTx.idempotency_put(self, consumer, key, outcome, now, tombstone=tombstone)

        gate.staged.append(write)

    async def outbox_add(self, envelopes: Sequence[Envelope], now: float) -> None:
        if self._gate.writing:
            return await super().outbox_add(envelopes, now)
        batch = list(envelopes)

        async def write() -> None:
            await SQLiteTx.outbox_add(self, batch, now)

        self._gate.staged.append(write)


def _writing(method: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Any other Tx method: treated as a write (takes the lock first)."""

    async def call(self: _SteppedTx, *args: Any, **kwargs: Any) -> Any:
        await self._point("write", method.__name__)
        return await method(self, *args, **kwargs)

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


for _name, _method in inspect.getmembers(SQLiteTx, inspect.iscoroutinefunction):
    # ItemByItem's batch methods loop over the single-item ones, which are stepped.
    composite = _name in vars(ItemByItem) and _name not in vars(SQLiteTx)
    if not _name.startswith("_") and _name not in vars(_SteppedTx) and not composite:
        setattr(_SteppedTx, _name, _writing(_method))


def _short(sql: str) -> str:
    text = " ".join(sql.split())
    return text if len(text) <= 90 else text[:87] + "..."


class _Transaction(AbstractAsyncContextManager[SQLiteTx]):
    """An actor's transaction: commits its write phase, or writes what it kept aside."""

    def __init__(self, gate: _Gate, store: str) -> None:
        self._gate = gate
        self._store = store
        self._tx: _SteppedTx | None = None

    async def __aenter__(self) -> SQLiteTx:
        if self._gate.writing or self._gate.staged:
            raise RaceError("an actor opened a transaction inside another one")
        tx = cast(_SteppedTx, _SteppedTx.on_connection(self._gate.conn, self._store))
        tx._gate = self._gate
        self._tx = tx
        return tx

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        gate, tx = self._gate, self._tx
        assert tx is not None
        try:
            if exc_type is None and not gate.writing and gate.staged:
                await tx._point("write", "commit")
            if gate.conn.in_transaction:
                gate.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        except BaseException:
            if gate.conn.in_transaction:
                gate.conn.execute("ROLLBACK")
            raise
        finally:
            gate.reset()
            tx._conn = None


class _ActorStore:
    """What an actor gets as its store: stepped transactions on its own connection;
    anything else is the run's store's."""

    def __init__(self, base: SQLiteStore, gate: _Gate) -> None:
        self._base = base
        self._gate = gate
        self.name = base.name
        self.dialect = base.dialect

    def transaction(self) -> AbstractAsyncContextManager[SQLiteTx]:
        """A transaction run in the two phases of :mod:`sagakit.testing.races`."""
        return _Transaction(self._gate, self.name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._base, attr)
