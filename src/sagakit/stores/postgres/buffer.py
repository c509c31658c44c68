"""How a PostgreSQL transaction talks to its connection: the write buffer.

The engine's writes (saga inserts and version-checked updates, history, timers,
outbox, mailbox rows and acknowledgements, idempotency records) wait in the
transaction and go out as one statement, each table's rows one JSON array, together
with the next statement that needs an answer or with the COMMIT
(:meth:`PostgresTxBuffer._flush`); the saga writes and idempotency records it carried
are checked from its answer. Every statement of a transaction goes through the helpers
here, which refuse to run once the block has ended and translate driver errors.
:class:`PostgresTxBuffer` is the base of :class:`~sagakit.stores.postgres.PostgresTx`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from sagakit.core.envelope import Envelope
from sagakit.core.instance import HistoryEntry, SagaInstance, Timer
from sagakit.errors import ConcurrencyError, StoreError
from sagakit.stores.postgres.driver import _Params, psycopg, translate_error
from sagakit.stores.postgres.queries import _saga_insert_params, _saga_update_params
from sagakit.stores.rows import history_params as _history_params

if TYPE_CHECKING:
    from sagakit.stores.postgres.driver import _Cursor
    from sagakit.stores.postgres.store import PostgresStore


def _finished() -> NoReturn:
    raise StoreError(
        "this transaction has ended; use the Tx only inside its `async with "
        "store.transaction()` block"
    )


# The rows of one write part (see postgres_queries.sql): the elements of its JSON array.
_ROWS = "SELECT e, i FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS r(e, i)"

# Per checked write part: how its rows and its RETURNING rows name a row (see _flush).
_SEP = "\x1f"  # joins consumer and key: neither holds control characters in practice
_CHECKED = {
    "write_sagas_new": ("e->>0", "saga_id"),
    "write_sagas_changed": ("e->>13", "saga_id"),
    "write_idempotency": ("(e->>0) || chr(31) || (e->>1)", "consumer || chr(31) || key"),
}


def _idem_id(consumer: str, key: str) -> str:
    return f"{consumer}{_SEP}{key}"


def _already_recorded(consumer: str, key: str) -> StoreError:
    return StoreError(
        f"idempotency key {key!r} of consumer {consumer!r} is already recorded; "
        "read it with idempotency_get before writing"
    )


def _json_rows(rows: object) -> str:
    """Rows (tuples of str, int, float, bool, None) as the JSON text of one write part."""
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":"))


class PostgresTxBuffer:
    """The state and the connection helpers of :class:`~sagakit.stores.postgres.PostgresTx`:
    the buffered writes, the statements sent and awaited, the end of the block."""

    __slots__ = (
        "_acks",
        "_checks",
        "_cur",
        "_history",
        "_idem_sent",
        "_idempotency",
        "_inbox",
        "_inserted",
        "_name",
        "_new",
        "_notify",
        "_opener",
        "_outbox",
        "_pipeline",
        "_q",
        "_queue",
        "_queued",
        "_store",
        "_timers",
        "_timers_due",
        "_updates",
    )

    def __init__(
        self, cursor: _Cursor, pipeline: psycopg.AsyncPipeline | None, store: PostgresStore
    ) -> None:
        # One cursor for every statement: in pipeline mode each statement's result is
        # attached to it in order, so after a sync it holds the last statement's.
        self._cur: _Cursor | None = cursor
        self._pipeline = pipeline
        # Set by PostgresStore.transaction(): BEGIN (and pipeline mode) not sent yet. The
        # first statement sends it; if there is none before the end, the buffered writes
        # are one statement, which then runs alone as the whole transaction.
        self._opener: Callable[[], Awaitable[None]] | None = None
        self._store = store
        self._name = store.name
        self._q = store._q
        self._queued: list[str] = []  # writes sent since the last answer, for error messages
        self._notify: set[tuple[str, str]] = set()  # (channel, payload), sent at commit
        # The earliest timer this transaction set: the timers NOTIFY carries it, so that
        # a timer loop already waiting for something sooner need not look.
        self._timers_due: float | None = None
        # Write-behind: the engine's writes (sagas, history, timers, outbox, mailbox
        # rows and acknowledgements) wait here and go out just before the next statement
        # that needs an answer (a read sees them) or before COMMIT, all of them as one
        # statement (see _flush). Per statement and per parameter psycopg costs far more
        # client CPU than the server spends on a JSON array (a step's transaction sent
        # ten statements before, five now).
        self._new: dict[str, SagaInstance] = {}  # inserts, in order
        self._updates: dict[str, tuple[SagaInstance, int]] = {}  # id -> (latest, expected)
        self._history: list[HistoryEntry] = []
        self._idempotency: list[tuple[str, str, str, bool, float]] = []
        self._inbox: list[tuple[str, str, float]] = []  # ids that must be new (no answer)
        self._idem_sent: set[tuple[str, str]] = set()  # every (consumer, key) recorded
        self._timers: dict[tuple[str, str], Timer | None] = {}  # None: cancel; last wins
        self._outbox: list[tuple[Envelope, float]] = []
        self._queue: list[tuple[int, str, str, float, float, int]] = []  # mailbox rows
        self._acks: list[int] = []
        # Version-checked writes sent without waiting: (cursor, [("insert"|"update",
        # saga id -> expected version) per column of its one row]), verified at the
        # next answer, and always before COMMIT.
        self._checks: list[tuple[_Cursor, list[tuple[str, dict[str, int]]]]] = []
        self._inserted: dict[str, SagaInstance] = {}  # inserts being checked, by id

    def _fail(self, what: str, exc: Exception) -> StoreError:
        if self._queued:
            what = f"{what} (or {', '.join(self._queued)}, sent before it)"
            self._queued = []
        return translate_error(self._name, what, exc)

    # The helpers below are the only places that touch the connection: they refuse to
    # run after the block ended and translate driver errors into StoreError.
    async def _live(self) -> _Cursor:
        """The transaction's cursor, BEGIN sent (see ``_opener``)."""
        cursor = self._cur or _finished()
        if self._opener is not None:
            opener, self._opener = self._opener, None
            await opener()
        return cursor

    async def _send(self, what: str, query: str, params: _Params) -> None:
        """A write whose result is not needed: queued in the pipeline."""
        cursor = await self._live()
        try:
            await cursor.execute(query, params)
        except psycopg.Error as exc:
            raise self._fail(what, exc) from exc
        self._queued.append(what)

    def _check_open(self) -> None:
        if self._cur is None:
            _finished()

    async def _ask(self, what: str, query: str, params: _Params) -> _Cursor:
        """A statement whose result is needed: sends it with everything queued, waits."""
        await self._flush()
        cursor = await self._live()
        try:
            await cursor.execute(query, params)
            if self._pipeline is not None:
                await self._pipeline.sync()
        except psycopg.Error as exc:
            raise self._fail(what, exc) from exc
        self._queued = []
        if self._checks:
            await self._verify_updates()
        return cursor

    async def _verify_updates(self) -> None:
        """Raise for the first buffered saga write (ConcurrencyError) or idempotency
        record (StoreError) that did not apply."""
        checks, self._checks = self._checks, []
        inserted, self._inserted = self._inserted, {}
        for cursor, columns in checks:
            try:
                row = await cursor.fetchone()
            except psycopg.Error as exc:
                raise self._fail("write the buffered sagas and records", exc) from exc
            for n, (verb, expected) in enumerate(columns):
                applied = set(row[n] or ()) if row is not None else set()
                for saga_id, version in expected.items():
                    if saga_id not in applied:
                        if verb == "idempotency":
                            consumer, _, key = saga_id.partition(_SEP)
                            raise _already_recorded(consumer, key)
                        if verb == "insert":
                            await self._refuse_insert(inserted[saga_id])
                        await self._refuse_update(saga_id, version)

    async def _flush(
        self, notify: Sequence[tuple[str, str]] = (), *, last: bool = False, alone: bool = False
    ) -> None:
        """Send the buffered writes (and ``notify``) as one statement (see postgres_queries.sql).

        The sagas inserted and updated are checked from its answer: at the next
        statement that waits for one (pipeline mode), else at once. The ``last`` flush,
        with COMMIT right behind it, has the statement check them itself: a saga not
        written fails it (sagakit_refuse), so the transaction, and its COMMIT, with it.
        ``alone``: nothing was sent before it, and it is sent as the whole transaction
        (autocommit: one statement is atomic), its answer awaited.
        """
        parts: list[str] = []
        params: list[Any] = []
        checked: list[str] = []
        columns: list[tuple[str, dict[str, int]]] = []
        what: list[str] = []
        q = self._q

        def part(name: str, rows: object, label: str) -> None:
            parts.append(f"{name}_rows AS ({_ROWS}), {name} AS ({q[name]})")
            params.append(_json_rows(rows))
            what.append(label)

        def check(name: str, verb: str, expected: dict[str, int]) -> None:
            # Rows and RETURNING compared by the id expression of the part (_CHECKED).
            row_id, written_id = _CHECKED[name]
            if last:
                checked.append(
                    f"(SELECT sagakit_refuse('{verb}', m) FROM (SELECT jsonb_agg(e ORDER BY i)"
                    f" AS m FROM {name}_rows WHERE {row_id} NOT IN"
                    f" (SELECT {written_id} FROM {name})) AS x WHERE m IS NOT NULL)"
                )
            else:
                checked.append(f"ARRAY(SELECT {written_id} FROM {name})")
                columns.append((verb, expected))

        if self._new:
            new, self._new = list(self._new.values()), {}
            if not last:  # refusals explained in Python need the instances
                self._inserted.update((i.saga_id, i) for i in new)
            part(
                "write_sagas_new",
                [_saga_insert_params(i) for i in new],
                f"insert {len(new)} saga(s)",
            )
            check("write_sagas_new", "insert", {i.saga_id: -1 for i in new})
        if self._updates:
            updates, self._updates = self._updates, {}
            rows = [_saga_update_params(i, exp) for i, exp in updates.values()]
            part("write_sagas_changed", rows, f"update {len(rows)} saga(s)")
            check("write_sagas_changed", "update", {k: exp for k, (_, exp) in updates.items()})
        if self._inbox:
            # No ON CONFLICT: an id handled before fails the statement (unique key), so
            # the transaction (ConcurrencyError) with it.
            rows, self._inbox = self._inbox, []
            part("write_inbox", rows, f"record {len(rows)} new message(s) in the inbox")
        if self._idempotency:
            rows, self._idempotency = self._idempotency, []
            part("write_idempotency", rows, f"record {len(rows)} idempotency key(s)")
            check("write_idempotency", "idempotency", {_idem_id(r[0], r[1]): 0 for r in rows})
        if self._history:
            rows, self._history = _history_params(self._history), []
            part("write_history", rows, f"append {len(rows)} history row(s)")
        if self._timers:
            timers, self._timers = self._timers, {}
            gone = [key for key, t in timers.items() if t is None]
            if gone:
                part("write_timers_gone", gone, f"cancel {len(gone)} timer(s)")
            rows = [(t.saga_id, t.name, t.due_at, t.fence) for t in timers.values() if t]
            if rows:
                part("write_timers_set", rows, f"set {len(rows)} timer(s)")
        if self._outbox:
            out, self._outbox = self._outbox, []
            rows = [(e.message_id, e.destination, e.saga_id, e.to_json(), now) for e, now in out]
            part("write_outbox", rows, f"add {len(rows)} message(s) to the outbox")
        if self._queue:
            mail, self._queue = self._queue, []
            part("write_mailbox", mail, f"add {len(mail)} message(s) to the mailbox")
        if self._acks:
            acks, self._acks = self._acks, []
            part("write_acks", acks, f"remove {len(acks)} message(s) from the mailbox")
        if not parts and not notify:
            return
        select = checked + ["pg_notify(%s, %s)"] * len(notify)
        for channel, payload in notify:
            params += (channel, payload)
        query = (
            f"WITH {', '.join(parts)} SELECT {', '.join(select) or '1'}"
            if parts
            else (f"SELECT {', '.join(select)}")
        )
        conn = (self._cur or _finished() if alone else await self._live()).connection
        label = ", ".join(what) or "notify"
        try:
            # A cursor of its own: its answer is read at the next sync, whatever the
            # transaction's main cursor runs meanwhile.
            cursor = conn.cursor()
            await cursor.execute(query, params)
        except psycopg.Error as exc:
            raise self._fail(label, exc) from exc
        self._queued.append(label)
        if columns:
            self._checks.append((cursor, columns))
            if self._pipeline is None:
                await self._verify_updates()

    async def _all(self, what: str, query: str, params: _Params) -> list[tuple[Any, ...]]:
        cursor = await self._ask(what, query, params)
        if cursor.description is None:  # not a query: no rows, as on SQLite
            return []
        try:
            return await cursor.fetchall()
        except psycopg.Error as exc:
            raise self._fail(what, exc) from exc

    async def _one(self, what: str, query: str, params: _Params) -> tuple[Any, ...] | None:
        cursor = await self._ask(what, query, params)
        if cursor.description is None:
            return None
        try:
            return await cursor.fetchone()
        except psycopg.Error as exc:
            raise self._fail(what, exc) from exc

    async def _refuse_insert(self, instance: SagaInstance) -> NoReturn:
        what = f"insert saga {instance.saga_id}"
        if await self._one(what, self._q["saga_exists"], (instance.saga_id,)) is not None:
            raise ConcurrencyError(f"saga {instance.saga_id} already exists")
        raise ConcurrencyError(
            f"a {instance.definition} saga already exists for business key "
            f"{instance.business_key!r}"
        )

    async def _refuse_update(self, saga_id: str, expected_version: int) -> NoReturn:
        # Only the losing path pays for the second query that explains the loss.
        row = await self._one(f"update saga {saga_id}", self._q["saga_exists"], (saga_id,))
        found = "it does not exist" if row is None else f"it is at version {row[0]}"
        raise ConcurrencyError(
            f"saga {saga_id} was not updated: expected version {expected_version}, "
            f"but {found}; reload it and recompute the transition"
        )

    # -- end of the block ---------------------------------------------------------------
    async def _send_commit(self) -> None:
        """Queue the last writes with the notifications, then COMMIT; leaving pipeline
        mode sends them. The last write statement checks itself (see :meth:`_flush`), so
        nothing waits for its answer; earlier flushes were checked by the answer that
        followed them.

        If nothing was sent yet (no read: a transition on a saga the orchestrator held
        a copy of, a start), BEGIN was never sent: the one write statement runs alone,
        in autocommit, as the whole transaction. One round trip either way, but the
        driver's work for BEGIN, COMMIT and the pipeline is saved.
        """
        if self._opener is not None:
            self._opener = None
            await self._flush_last(alone=True)
            return
        await self._flush_last()
        await (self._cur or _finished()).execute("COMMIT")

    async def _flush_last(self, *, alone: bool = False) -> None:
        due = self._timers_due
        if due is not None and self._store.notify:
            if self._store._timers_news(due):
                self._notify.add((self._store.timers_channel, repr(due)))
            else:
                self._timers_due = None  # nothing to tell: nothing to remember at commit
        await self._flush(
            sorted(self._notify) if self._store.notify else (), last=True, alone=alone
        )

    async def flush_for_owner(self) -> None:
        """Send every buffered write and the notifications, checked, and end this Tx
        without committing: for a transaction its owner commits (see
        :mod:`sagakit.runtime.own_tx`). A refused write raises here, and PostgreSQL
        has then aborted the owner's transaction."""
        await self._flush_last()
        if self._pipeline is not None:
            try:
                await self._pipeline.sync()
            except psycopg.Error as exc:
                raise self._fail("send the buffered writes", exc) from exc
        if self._checks:
            await self._verify_updates()
        self._cur = None
