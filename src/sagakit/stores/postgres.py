"""The PostgreSQL store: one service's database (or schema) for production deployments.

::

    store = PostgresStore("postgresql://app@db/shop", name="payments", schema="payments")
    await store.open()          # creates the schema if missing, applies migrations
    async with store.transaction() as tx:
        await tx.execute("UPDATE stock SET available = available - ? WHERE sku = ?", (1, "A"))

Needs the ``sagakit[postgres]`` extra (psycopg 3 and psycopg-pool).

**Connections.** A pool (``min_size``..``max_size``) in autocommit mode; every pooled
connection gets ``search_path`` set to the store's ``schema``, so tables are never
qualified and no statement crosses into another service's schema. Each
``async with store.transaction()`` takes one connection for its whole block and runs
an explicit transaction (READ COMMITTED) in *pipeline mode*. The engine's writes
(saga inserts and version-checked updates, history, timers, outbox, mailbox
acknowledgements) are buffered in the transaction and sent as one statement per table,
each column a binary array, together with the next statement that must wait for an
answer, or with the COMMIT: a batch of hundreds of transitions costs a handful of
statements and round trips, not several per transition. An error in a buffered write
(a lost version race included) surfaces at that next statement or at commit, named as
such, before anything commits.
Transactions of different tasks run concurrently: row locks (``saga_get`` is
``SELECT ... FOR UPDATE``) and the version check order them, not a store-wide lock.

**Clocks.** Outbox leases are contended by every relay process, so by default
(``lease_clock="database"``) :meth:`PostgresStore.outbox_claim` stamps and compares
``claimed_until`` with the server's clock and ignores its ``now`` argument; a relay
host whose clock is off cannot steal a fresh claim. Timers keep the caller's clock:
``due_at`` is computed by the state machine from the runtime's clock, and the
runtime decides "something is due" with that same clock before it calls
``timers_take_due``; comparing on the server instead would let a worker whose clock
runs ahead spin on timers it sees due but cannot take. The mailbox queue keeps the
caller's clock too (its delays come from ``queue_push``/``queue_retry`` and it has a
single consumer per endpoint). To run *every* process on the database clock, pass
``clock=store.clock`` to the runtime: :meth:`PostgresStore.clock` is the local clock
corrected by the offset to the server's, measured at :meth:`~PostgresStore.open`.

**Notifications.** A commit that added outbox rows runs
``pg_notify('sagakit_outbox_<name>', '')`` in the same transaction (delivered on commit,
never for a rollback); one that set timers, ``sagakit_timers_<name>`` with the earliest
due time it set as payload (``repr`` of the float); ``queue_push``
notifies ``sagakit_queue_<name>`` with the endpoint as payload. Wake loops with
:meth:`PostgresStore.listen` instead of polling::

    async def wake_on_commits(store: PostgresStore, wakeups: Wakeups) -> None:
        local = {store.outbox_channel: f"outbox:{store.name}",
                 store.timers_channel: f"timers:{store.name}"}
        async for channel, payload in store.listen():
            if channel == store.queue_channel:
                wakeups.notify(f"queue:{payload}")   # "" (reconnected): wake every queue
            else:
                wakeups.notify(local[channel])

Every statement lives in ``stores/sql/postgres_queries.sql``, the schema in
``stores/sql/postgres_NNNN_*.sql``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from functools import cache, lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeAlias

from sagakit.core.envelope import Envelope
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState, Timer
from sagakit.errors import ConcurrencyError, ConfigurationError, StoreError
from sagakit.stores.base import (
    DeadLetter,
    IdempotencyRecord,
    OutboxRow,
    QueuedMessage,
    SagaPage,
    SagaQuery,
    SetAside,
)
from sagakit.stores.rows import (
    check_settlement,
    dead_letter_from_row,
    saga_find_statements,
    saga_insert_params,
    saga_update_params,
)
from sagakit.stores.rows import dumps as _dumps
from sagakit.stores.rows import history_params as _history_params
from sagakit.stores.rows import loads as _loads
from sagakit.stores.rows import saga_from_row as _saga_from_row
from sagakit.stores.shared import SharedStatements

# The driver is optional: `import sagakit` never imports this module, and a missing
# extra is reported when a PostgresStore is built.
_MISSING_DRIVER: ImportError | None = None
try:
    import psycopg
    import psycopg_pool
    from psycopg import sql
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    _MISSING_DRIVER = exc

if TYPE_CHECKING:
    _Conn: TypeAlias = psycopg.AsyncConnection[tuple[Any, ...]]
    _Pool: TypeAlias = psycopg_pool.AsyncConnectionPool[_Conn]
    _Cursor: TypeAlias = psycopg.AsyncCursor[tuple[Any, ...]]

__all__ = [
    "ENGINE_NAMESPACE",
    "LockedOutbox",
    "PostgresStore",
    "PostgresTx",
    "qmark_to_psycopg",
    "translate_error",
]

ENGINE_NAMESPACE = "sagakit"
"""The ``schema_migrations`` namespace of sagakit's own tables."""

_Params: TypeAlias = "Sequence[Any] | Mapping[str, Any]"
_MIGRATION_FILE = re.compile(r"postgres_(\d{4})_\w+\.sql")
_IDLE_STATUS = 0  # psycopg.pq.TransactionStatus.IDLE (the driver may be missing here)
_MAX_IDENTIFIER = 63  # bytes; PostgreSQL truncates longer names (NAMEDATALEN - 1)
log = logging.getLogger(__name__)


@cache
def _queries() -> dict[str, str]:
    text = _sql_dir().joinpath("postgres_queries.sql").read_text(encoding="utf-8")
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", text, flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        queries[name.strip()] = "\n".join(lines).strip()
    return queries


@cache
def _engine_migrations() -> tuple[str, ...]:
    found = sorted(
        (int(match[1]), entry.name)
        for entry in _sql_dir().iterdir()
        if (match := _MIGRATION_FILE.fullmatch(entry.name))
    )
    if [number for number, _ in found] != list(range(1, len(found) + 1)):
        raise ConfigurationError(f"sagakit's PostgreSQL migrations are not numbered 1..n: {found}")
    return tuple(_sql_dir().joinpath(name).read_text(encoding="utf-8") for _, name in found)


def _sql_dir() -> Traversable:
    return resources.files("sagakit.stores").joinpath("sql")


# -- qmark parameters ----------------------------------------------------------------

# Whatever may contain a "?" that is not a parameter, or a "%" psycopg would misread.
# An E-string or dollar quote must not continue an identifier (date'...' is no E-string).
_SQL_TOKEN = re.compile(
    r"""
      (?<![\w$])[Ee]'(?:[^'\\]|\\.|'')*'?   # escape string: backslash escapes
    | '(?:[^']|'')*'?                       # string literal
    | "(?:[^"]|"")*"?                       # quoted identifier
    | --[^\n]*                              # line comment
    | /\*                                   # block comment (they nest)
    | (?<![\w$])\$(?:[A-Za-z_]\w*)?\$       # dollar quote, opening tag
    | \?\d*                                 # qmark parameter (numbered: refused)
    | %                                     # psycopg's placeholder mark
    """,
    re.VERBOSE | re.DOTALL,
)
_BLOCK_COMMENT = re.compile(r"/\*|\*/")


@lru_cache(maxsize=4096)
def qmark_to_psycopg(query: str) -> str:
    """Rewrite SQLite-style ``?`` parameters as psycopg's ``%s`` (cached per string).

    A ``?`` inside a string literal, quoted identifier, comment or dollar-quoted body
    stays as it is, and every ``%`` becomes ``%%`` (psycopg reads ``%`` everywhere,
    literals included). PostgreSQL's JSON operators ``?``, ``?|`` and ``?&`` cannot be
    told from a parameter: write ``jsonb_exists(doc, key)`` and friends instead.
    """
    if "?" not in query and "%" not in query:
        return query
    out: list[str] = []
    pos = 0
    while (match := _SQL_TOKEN.search(query, pos)) is not None:
        token, start, end = match.group(), match.start(), match.end()
        out.append(query[pos:start])
        if token == "?":
            out.append("%s")
        elif token.startswith("?"):
            raise StoreError(
                f"numbered parameter {token!r} is not supported by PostgresStore; "
                f"use plain ? parameters in order (in {query[:200]!r})"
            )
        elif token == "%":
            out.append("%%")
        else:
            if token == "/*":
                end = _block_comment_end(query, end)
            elif token.startswith("$"):
                close = query.find(token, end)
                end = len(query) if close < 0 else close + len(token)
            out.append(query[start:end].replace("%", "%%"))
        pos = end
    out.append(query[pos:])
    return "".join(out)


def _block_comment_end(query: str, pos: int) -> int:
    depth = 1
    while depth and (match := _BLOCK_COMMENT.search(query, pos)) is not None:
        depth += 1 if match.group() == "/*" else -1
        pos = match.end()
    return pos if depth == 0 else len(query)


# -- errors --------------------------------------------------------------------------

# Lost a race with another transaction: retrying the transaction is the remedy.
_CONFLICT_STATES = {
    "23505": "a unique key is already taken",
    "40001": "serialization failure",
    "40P01": "deadlock detected",
    "55P03": "lock not available",
}


def translate_error(store: str, what: str, exc: Exception) -> StoreError:
    """A driver error as sagakit's :class:`StoreError` (raise it ``from exc``).

    Unique violations, serialization failures, deadlocks and lock timeouts become
    :class:`ConcurrencyError` (another transaction won; retry); everything else,
    :class:`StoreError`.
    """
    state: str | None = getattr(exc, "sqlstate", None)
    if state in (_REFUSED, _RECORDED):  # sagakit_refuse: its message says what and why
        diag = getattr(exc, "diag", None)
        said = getattr(diag, "message_primary", None) or str(exc)
        return ConcurrencyError(said) if state == _REFUSED else StoreError(said)
    detail = " ".join(str(exc).split()) or type(exc).__name__
    message = f"PostgreSQL store {store!r} could not {what}: {detail}"
    if state is not None:
        message += f" (SQLSTATE {state})"
    if state in _CONFLICT_STATES:
        return ConcurrencyError(f"{message}; {_CONFLICT_STATES[state]}: retry the transaction")
    if state == "25P02":
        message += "; an earlier statement of this transaction failed, so it can only roll back"
    return StoreError(message)


def _finished() -> NoReturn:
    raise StoreError(
        "this transaction has ended; use the Tx only inside its `async with "
        "store.transaction()` block"
    )


# The rows of one write part (see postgres_queries.sql): the elements of its JSON array.
_ROWS = "SELECT e, i FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS r(e, i)"
_REFUSED = "SK001"  # sagakit_refuse: a buffered saga write did not apply (migration 0005)
_RECORDED = "SK002"  # sagakit_refuse: a buffered idempotency key was recorded before

# Per checked write part: how its rows and its RETURNING rows name a row (see _flush).
_SEP = "\x1f"  # joins consumer and key: neither holds control characters in practice
_CHECKED = {
    "write_sagas_new": ("e->>0", "saga_id"),
    "write_sagas_changed": ("e->>13", "saga_id"),
    "write_idempotency": ("(e->>0) || chr(31) || (e->>1)", "consumer || chr(31) || key"),
}


def _record_from_row(r: Sequence[Any]) -> IdempotencyRecord:
    """An idempotency record from (key, outcome, tombstone, at)."""
    return IdempotencyRecord(key=r[0], outcome=_loads(r[1]), tombstone=r[2], at=r[3])


def _idem_id(consumer: str, key: str) -> str:
    return f"{consumer}{_SEP}{key}"


def _already_recorded(consumer: str, key: str) -> StoreError:
    return StoreError(
        f"idempotency key {key!r} of consumer {consumer!r} is already recorded; "
        "read it with idempotency_get before writing"
    )


# Mailbox ids reserved per statement (see PostgresStore._queue_ids): a batch of local
# steps takes up to 256, so a block serves several batches before the next round trip.
_QUEUE_ID_BLOCK = 2048


def _json_rows(rows: object) -> str:
    """Rows (tuples of str, int, float, bool, None) as the JSON text of one write part."""
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":"))


def _lock_key(schema: str | None) -> int:
    digest = hashlib.blake2b(f"sagakit migrate {schema or ''}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _safe_dsn(dsn: str) -> str:
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparsable DSN>"
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "password")


# -- row codecs ----------------------------------------------------------------------


# -- transaction ---------------------------------------------------------------------


class PostgresTx:
    """One transaction on one pooled connection (see :class:`~sagakit.stores.base.Tx`).

    Obtained from :meth:`PostgresStore.transaction`; every method raises
    :class:`~sagakit.errors.StoreError` once the block has ended. After a method
    raised, PostgreSQL has aborted the transaction: leave the block (it rolls back).
    Expected refusals (a duplicate saga, idempotency key, inbox or dead-letter entry)
    do not abort it.
    """

    __slots__ = (
        "_acks",
        "_checks",
        "_cur",
        "_history",
        "_idem_sent",
        "_idempotency",
        "_inserted",
        "_name",
        "_new",
        "_notify",
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
    async def _send(self, what: str, query: str, params: _Params) -> None:
        """A write whose result is not needed: queued in the pipeline."""
        cursor = self._cur or _finished()
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
        cursor = self._cur or _finished()
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

    async def _flush(self, notify: Sequence[tuple[str, str]] = (), *, last: bool = False) -> None:
        """Send the buffered writes (and ``notify``) as one statement (see postgres_queries.sql).

        The sagas inserted and updated are checked from its answer: at the next
        statement that waits for one (pipeline mode), else at once. The ``last`` flush,
        with COMMIT right behind it, has the statement check them itself: a saga not
        written fails it (sagakit_refuse), so the transaction, and its COMMIT, with it.
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
        conn = (self._cur or _finished()).connection
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

    # -- sagas ------------------------------------------------------------------------
    async def saga_get(self, saga_id: str) -> SagaInstance | None:
        """Load an instance and lock its row until the transaction ends (FOR UPDATE).

        Another transaction loading it waits, then reads the version committed here.
        """
        row = await self._one(f"load saga {saga_id}", self._q["saga_get"], (saga_id,))
        return None if row is None else _saga_from_row(row)

    async def saga_get_many(self, saga_ids: Sequence[str]) -> dict[str, SagaInstance]:
        """Load and lock several instances in one statement, in ``saga_id`` order."""
        if not saga_ids:
            return {}
        rows = await self._all(
            f"load {len(saga_ids)} saga(s)", self._q["saga_get_many"], {"ids": list(saga_ids)}
        )
        return {r[0]: _saga_from_row(r) for r in rows}

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
        try:
            # A cursor of its own: in pipeline mode each cursor keeps the result of its
            # last statement once synced, whatever the main cursor runs meanwhile.
            inbox = (self._cur or _finished()).connection.cursor()
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

    async def saga_get_by_key(self, definition: str, business_key: str) -> SagaInstance | None:
        """The instance of ``definition`` (any version) started for ``business_key``."""
        row = await self._one(
            f"load the {definition} saga of {business_key!r}",
            self._q["saga_get_by_key"],
            (definition, business_key),
        )
        return None if row is None else _saga_from_row(row)

    async def saga_get_by_keys(
        self, definition: str, business_keys: Sequence[str]
    ) -> dict[str, SagaInstance]:
        """The instances of ``definition`` started for any of ``business_keys``, by key."""
        if not business_keys:
            return {}
        rows = await self._all(
            f"load the {definition} sagas of {len(business_keys)} key(s)",
            self._q["saga_get_by_keys"],
            {"definition": definition, "keys": list(business_keys)},
        )
        return {r[3]: _saga_from_row(r) for r in rows}

    async def saga_insert(self, instance: SagaInstance) -> None:
        """Insert a new instance; ``ConcurrencyError`` if its id or (definition, key) exists.

        The refusal leaves the transaction usable (nothing is aborted).
        """
        what = f"insert saga {instance.saga_id}"
        row = await self._one(what, self._q["saga_insert"], _saga_insert_params(instance))
        if row is not None:
            return
        await self._refuse_insert(instance)

    async def saga_insert_many(self, instances: Sequence[SagaInstance]) -> None:
        """Insert new instances; ``ConcurrencyError`` if an id or (definition, key) exists.

        The inserts are buffered and sent as one statement with the transaction's other
        writes (see ``__init__``); a refusal is raised by the next statement that waits
        for an answer or when the block ends, before COMMIT (the transaction then
        rolls back).
        """
        self._check_open()
        for instance in instances:
            if instance.saga_id in self._new or instance.saga_id in self._inserted:
                raise ConcurrencyError(f"saga {instance.saga_id} already exists")
            self._new[instance.saga_id] = instance

    async def _refuse_insert(self, instance: SagaInstance) -> NoReturn:
        what = f"insert saga {instance.saga_id}"
        if await self._one(what, self._q["saga_exists"], (instance.saga_id,)) is not None:
            raise ConcurrencyError(f"saga {instance.saga_id} already exists")
        raise ConcurrencyError(
            f"a {instance.definition} saga already exists for business key "
            f"{instance.business_key!r}"
        )

    async def saga_update(self, instance: SagaInstance, expected_version: int) -> None:
        """Write ``instance`` if the stored version is still ``expected_version``.

        Raises :class:`~sagakit.errors.ConcurrencyError` otherwise: another worker
        applied a transition first, and this one must be recomputed. A concurrent
        writer of the same row makes this wait for its commit, then re-check. In
        pipeline mode the update is sent without waiting, and the error is raised by
        the next statement that waits for an answer or when the block ends, before
        COMMIT is sent (the transaction then rolls back).

        Buffered (see ``__init__``): several updates of one saga in a transaction are
        sent as one, checked against the version the first one expected.
        """
        self._check_open()
        saga_id = instance.saga_id
        pending = self._new.get(saga_id)
        if pending is not None:  # inserted in this transaction, not yet sent
            if pending.version != expected_version:
                await self._refuse_update(saga_id, expected_version)
            self._new[saga_id] = instance
            return
        earlier = self._updates.get(saga_id)
        if earlier is None:
            self._updates[saga_id] = (instance, expected_version)
        elif earlier[0].version == expected_version:
            self._updates[saga_id] = (instance, earlier[1])
        else:
            await self._refuse_update(saga_id, expected_version)

    async def _refuse_update(self, saga_id: str, expected_version: int) -> NoReturn:
        # Only the losing path pays for the second query that explains the loss.
        row = await self._one(f"update saga {saga_id}", self._q["saga_exists"], (saga_id,))
        found = "it does not exist" if row is None else f"it is at version {row[0]}"
        raise ConcurrencyError(
            f"saga {saga_id} was not updated: expected version {expected_version}, "
            f"but {found}; reload it and recompute the transition"
        )

    async def history_add(self, entries: Sequence[HistoryEntry]) -> None:
        """Append history rows (never updated, never deleted)."""
        self._check_open()
        self._history.extend(entries)

    async def timers_set(self, timers: Sequence[Timer]) -> None:
        """Set timers; one with the same (saga_id, name) is replaced."""
        if not timers:
            return
        self._check_open()
        for t in timers:
            self._timers[(t.saga_id, t.name)] = t
        due = min(t.due_at for t in timers)
        self._timers_due = due if self._timers_due is None else min(due, self._timers_due)

    async def timers_cancel(self, saga_id: str, names: Sequence[str]) -> None:
        """Delete the named timers of one saga (missing ones are ignored)."""
        self._check_open()
        for name in names:
            self._timers[(saga_id, name)] = None

    async def timers_take_due(self, now: float, limit: int) -> list[Timer]:
        """Remove and return up to ``limit`` timers due at ``now``, earliest first.

        Taken inside the transaction that applies them: if it rolls back, they stay.
        Timers another open transaction took are skipped (SKIP LOCKED), not waited for,
        so concurrent workers never take the same timer. ``now`` is the caller's clock,
        the clock ``due_at`` was computed with (see the module docstring).
        """
        if limit <= 0:
            return []
        rows = await self._all("take due timers", self._q["timers_take_due"], (now, limit))
        if len(rows) < limit:
            # Timers whose saga row is gone lock no saga: take them on their own.
            rows += await self._all(
                "take due orphan timers",
                self._q["timers_take_due_orphans"],
                (now, limit - len(rows)),
            )
        rows.sort(key=lambda r: (r[2], r[0], r[1]))
        return [Timer(saga_id=r[0], name=r[1], due_at=r[2], fence=r[3]) for r in rows]

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

    # -- end of the block ---------------------------------------------------------------
    async def _send_commit(self) -> None:
        """Queue the last writes with the notifications, then COMMIT; leaving pipeline
        mode sends them. The last write statement checks itself (see :meth:`_flush`), so
        nothing waits for its answer; earlier flushes were checked by the answer that
        followed them."""
        await self._flush_last()
        await (self._cur or _finished()).execute("COMMIT")

    async def _flush_last(self) -> None:
        if self._store.notify and self._timers_due is not None:
            self._notify.add((self._store.timers_channel, repr(self._timers_due)))
        await self._flush(sorted(self._notify) if self._store.notify else (), last=True)

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
    """``async with``: a pooled connection in pipeline mode, BEGIN; COMMIT or ROLLBACK."""

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
            pipeline = None
            if store._use_pipeline:
                pipeline = await self._stack.enter_async_context(conn.pipeline())
            cursor = conn.cursor()
            await cursor.execute(self._begin)  # queued: travels with the first statement
        except psycopg.Error as exc:
            await self._release()
            raise translate_error(store.name, "begin a transaction", exc) from exc
        except BaseException:
            await self._release()
            raise
        self._tx = PostgresTx(cursor, pipeline, store)
        return self._tx

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
                except psycopg.Error as commit_exc:
                    # A lost connection may have lost the answer, not the commit.
                    outcome = (
                        "commit: the connection was lost, so whether it committed is unknown"
                        if self._conn is None or self._conn.broken
                        else "commit (nothing was written)"
                    )
                    raise tx._fail(outcome, commit_exc) from commit_exc
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


# -- store ---------------------------------------------------------------------------


# When each pooled connection was last given back (monotonic seconds). Weak keys: the
# pool closes and drops connections on its own.
_RETURNED_AT: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

# A connection given back this recently is lent again without a round trip to check it:
# the check would double the round trips of a busy engine (one per transaction and per
# read). A restart within this window costs one failed transaction (a StoreError, which
# every loop retries); the pool discards the broken connection when it comes back.
_CHECK_IDLE_AFTER = 1.0


async def _stamp_returned(conn: Any) -> None:
    """The pool's ``reset`` hook: remember when the connection came back."""
    _RETURNED_AT[conn] = time.monotonic()


async def _check_if_idle(conn: Any) -> None:
    """The pool's ``check`` hook: ping a connection only if it sat idle for a while."""
    returned = _RETURNED_AT.get(conn)
    if returned is not None and time.monotonic() - returned < _CHECK_IDLE_AFTER:
        return
    await psycopg_pool.AsyncConnectionPool.check_connection(conn)


class PostgresStore(SharedStatements):
    """A :class:`~sagakit.stores.base.Store` in a PostgreSQL database (or one schema of it).

    ``schema`` is this service's own schema: created if missing, and the only one on
    the ``search_path`` of every pooled connection. ``None`` uses the server's default
    search path. ``min_size``/``max_size`` bound the pool; a transaction holds one
    connection for its whole block. ``lease_clock`` says whose clock outbox leases use
    (``"database"``, the default, or ``"caller"`` for simulated clocks); ``notify=False``
    turns off the NOTIFY sent by commits that add outbox rows or timers.

    Call :meth:`open` before use (it applies pending migrations) and :meth:`close`
    after; a closed store can be opened again.
    """

    dialect = "postgresql"
    """The SQL dialect of business tables, for the rare migration that differs."""
    _mark = "%s"
    _no_limit = None

    def __init__(
        self,
        dsn: str,
        *,
        name: str = "store",
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        lease_clock: Literal["database", "caller"] = "database",
        idle_tx_timeout: float = 15.0,
        notify: bool = True,
    ) -> None:
        if _MISSING_DRIVER is not None:
            raise ConfigurationError(
                "PostgresStore needs psycopg 3 and psycopg-pool: install the "
                f"`sagakit[postgres]` extra (pip install 'sagakit[postgres]'); {_MISSING_DRIVER}"
            )
        if schema is not None and not 0 < len(schema.encode()) <= _MAX_IDENTIFIER:
            raise ConfigurationError(
                f"schema {schema!r} must be 1 to {_MAX_IDENTIFIER} bytes long (PostgreSQL "
                "truncates longer names)"
            )
        if len(f"sagakit_outbox_{name}".encode()) > _MAX_IDENTIFIER:
            raise ConfigurationError(
                f"store name {name!r} is too long for a notification channel "
                f"(sagakit_outbox_<name> must fit in {_MAX_IDENTIFIER} bytes)"
            )
        if not 0 <= min_size <= max_size or max_size < 2:
            raise ConfigurationError(
                f"need 0 <= min_size <= max_size and max_size >= 2 (a transaction holds one "
                f"connection, a read or a claim needs another); got {min_size}, {max_size}"
            )
        if lease_clock not in ("database", "caller"):
            raise ConfigurationError(
                f"lease_clock={lease_clock!r}: use 'database' (relays on many hosts) or "
                "'caller' (simulated clocks)"
            )
        self.dsn = dsn
        self.name = name
        self.schema = schema
        self.min_size = min_size
        self.max_size = max_size
        self.idle_tx_timeout = idle_tx_timeout
        self.lease_clock = lease_clock
        self.notify = notify
        self.outbox_channel = f"sagakit_outbox_{name}"
        self.timers_channel = f"sagakit_timers_{name}"
        self.queue_channel = f"sagakit_queue_{name}"
        self.aside_channel = f"sagakit_aside_{name}"
        """Notified by commits that set inputs aside (not among :meth:`listen`'s defaults)."""
        self._q = _queries()
        self._pool: _Pool | None = None
        self._use_pipeline = psycopg.Pipeline.is_supported()
        self._tasks_in_tx: set[asyncio.Task[Any]] = set()
        self._clock_offset = 0.0
        self._spare_queue_ids: list[int] = []

    def __repr__(self) -> str:
        return f"PostgresStore({_safe_dsn(self.dsn)!r}, name={self.name!r}, schema={self.schema!r})"

    # -- lifecycle --------------------------------------------------------------------
    async def open(self) -> None:
        """Create the schema if missing, apply pending migrations, open the pool.

        Migrations run under a transaction-level advisory lock, so processes that
        start together apply each step once; an up-to-date database costs one query.
        """
        if self._pool is not None:
            return
        try:
            conn = await psycopg.AsyncConnection.connect(self.dsn, **self._connect_args("open"))
        except psycopg.Error as exc:
            raise translate_error(self.name, f"connect to {_safe_dsn(self.dsn)}", exc) from exc
        try:
            await self._configure(conn)
            await self._migrate(conn, ENGINE_NAMESPACE, _engine_migrations(), bootstrap=True)
            await self._measure_clock(conn)
        except psycopg.Error as exc:
            raise translate_error(self.name, "prepare the database", exc) from exc
        finally:
            await conn.close()
        pool: _Pool = psycopg_pool.AsyncConnectionPool(
            self.dsn,
            min_size=self.min_size,
            max_size=self.max_size,
            kwargs=self._connect_args("pool"),
            configure=self._configure,
            # A server restart kills every idle connection: check before lending one
            # that sat idle for a while (see _check_if_idle).
            check=_check_if_idle,
            reset=_stamp_returned,
            name=f"sagakit-{self.name}",
            open=False,
        )
        try:
            await pool.open(wait=True)
        except psycopg.Error as exc:
            await pool.close()
            raise translate_error(self.name, "open the connection pool", exc) from exc
        if self._pool is not None:  # a concurrent open() of this store finished first
            await pool.close()
            return
        self._pool = pool

    def _connect_args(self, role: str) -> dict[str, Any]:
        # No server-side prepared statements: after an aborted pipeline psycopg's cache
        # can name a statement the server already dropped ("_pg3_N does not exist").
        args: dict[str, Any] = {"autocommit": True, "prepare_threshold": None}
        # Names the connections in pg_stat_activity, unless the DSN names them already.
        if "application_name" not in psycopg.conninfo.conninfo_to_dict(self.dsn):
            args["application_name"] = f"sagakit {self.name} {role}"[:_MAX_IDENTIFIER]
        return args

    async def _configure(self, conn: _Conn) -> None:
        # A process frozen (SIGSTOP, a GC pause, a dead client) inside a transaction
        # must not hold saga and inbox locks forever: the server ends its session.
        await conn.execute(
            f"SET idle_in_transaction_session_timeout = {int(self.idle_tx_timeout * 1000)}"
        )
        if self.schema is not None:
            await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))

    async def _queue_ids(self, tx: PostgresTx, n: int) -> list[int]:
        """``n`` fresh mailbox ids, ascending, from the block this store reserved.

        A block of :data:`_QUEUE_ID_BLOCK` (or ``n``) is reserved with one statement
        when the spare ones run out: nextval is not transactional, so the ids stay
        reserved whatever becomes of ``tx``, and values a process never used are gaps.
        """
        spare = self._spare_queue_ids
        if len(spare) < n:
            rows = await tx._all(
                "reserve mailbox ids", self._q["queue_ids"], (max(n, _QUEUE_ID_BLOCK),)
            )
            # Another transaction of this process may have refilled meanwhile.
            spare.extend(r[0] for r in rows)
            spare.sort()
        ids = spare[:n]
        del spare[:n]
        return ids

    async def close(self) -> None:
        """Close the pool (connections still lent out close when they come back)."""
        self._spare_queue_ids = []  # the next open may be a different database
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def apply_migrations(self, namespace: str, steps: Sequence[str]) -> None:
        """Apply the SQL scripts of ``steps`` not yet applied for ``namespace``, in order.

        Step *n* is ``steps[n - 1]``: append new steps, never edit or reorder applied
        ones. Each step runs in its own transaction, under the advisory lock, together
        with its record in ``schema_migrations``; PostgreSQL's DDL is transactional,
        so a step that fails leaves nothing behind. Scripts may hold many statements
        (no parameters; no BEGIN/COMMIT). Participant services call this after
        :meth:`open` for their business tables.
        """
        if not namespace:
            raise ConfigurationError("apply_migrations needs a non-empty namespace")
        if isinstance(steps, str):
            raise ConfigurationError(
                "apply_migrations takes a sequence of SQL scripts (one per step), not one string"
            )
        pool = self._pool or self._not_open()
        self._check_no_tx()
        try:
            async with pool.connection() as conn:
                await self._migrate(conn, namespace, steps, bootstrap=False)
        except psycopg.Error as exc:
            raise translate_error(self.name, f"apply migrations of {namespace!r}", exc) from exc

    async def _migrate(
        self, conn: _Conn, namespace: str, steps: Sequence[str], *, bootstrap: bool
    ) -> None:
        q = self._q
        try:
            cursor = await conn.execute(q["migration_steps"], (namespace,))
            done: set[int] = {r[0] for r in await cursor.fetchall()}
        except psycopg.errors.UndefinedTable:
            done = set()  # a new database (or schema): bootstrapped below, under the lock
        for number, script in enumerate(steps, start=1):
            if number in done:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(q["migration_lock"], (_lock_key(self.schema),))
                    if bootstrap:
                        await self._bootstrap(conn)
                    # Another process may have applied it while this one waited.
                    cursor = await conn.execute(q["migration_steps"], (namespace,))
                    if number not in {r[0] for r in await cursor.fetchall()}:
                        await conn.execute(script)  # no parameters: no %-parsing
                        await conn.execute(q["migration_record"], (namespace, number))
            except psycopg.Error as exc:
                raise translate_error(
                    self.name,
                    f"apply migration step {number} of {namespace!r} (rolled back; fix the "
                    "script and open again)",
                    exc,
                ) from exc

    async def _bootstrap(self, conn: _Conn) -> None:
        # Created only when missing: CREATE ... IF NOT EXISTS would need the CREATE
        # privilege even when there is nothing to create.
        if self.schema is not None:
            cursor = await conn.execute(self._q["schema_exists"], (self.schema,))
            if await cursor.fetchone() is None:
                await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
        cursor = await conn.execute(self._q["schema_migrations_exists"])
        row = await cursor.fetchone()
        if row is None or not row[0]:
            await conn.execute(self._q["schema_migrations_create"])

    # -- clock ------------------------------------------------------------------------
    async def _measure_clock(self, conn: _Conn) -> None:
        before = time.time()
        cursor = await conn.execute(self._q["database_time"])
        row = await cursor.fetchone()
        after = time.time()
        assert row is not None
        self._clock_offset = float(row[0]) - (before + after) / 2

    async def sync_clock(self) -> float:
        """Measure the offset to the server's clock again; return it in seconds."""
        pool = self._pool or self._not_open()
        try:
            async with pool.connection() as conn:
                await self._measure_clock(conn)
        except psycopg.Error as exc:
            raise translate_error(self.name, "read the database clock", exc) from exc
        return self._clock_offset

    def clock(self) -> float:
        """The database server's time, in epoch seconds, without a round trip.

        The local clock plus the offset measured at :meth:`open` (or
        :meth:`sync_clock`), accurate to about half a round trip. Hand it to the
        runtime (``clock=store.clock``) so every process computes and compares timer
        due times and leases on the same clock.
        """
        return time.time() + self._clock_offset

    # -- notifications ----------------------------------------------------------------
    async def listen(
        self, *channels: str, health_every: float = 30.0, retry_every: float = 1.0
    ) -> AsyncGenerator[tuple[str, str], None]:
        """Yield ``(channel, payload)`` for each notification, until the caller stops.

        Listens on ``channels`` (default: this store's outbox, timers and queue
        channels) over a dedicated connection, not a pooled one. Right after
        connecting, and after every reconnection, it yields each channel once with an
        empty payload: notifications sent while nobody listened are lost, so the
        waiter must look for work. The connection is checked every ``health_every``
        seconds; a lost one is reopened every ``retry_every`` seconds until it works.
        Close the iterator (``aclose``, or leave the ``async for``) to stop.
        """
        channels = channels or (self.outbox_channel, self.timers_channel, self.queue_channel)
        while True:
            conn: _Conn | None = None
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.dsn, **self._connect_args("listen")
                )
                for channel in channels:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                for channel in channels:
                    yield channel, ""
                while True:
                    async with contextlib.aclosing(conn.notifies(timeout=health_every)) as notes:
                        async for note in notes:
                            yield note.channel, note.payload
                    await conn.execute("SELECT 1")
            except psycopg.Error as exc:
                log.warning(
                    "store %r: listening for notifications failed (%s); retrying in %.1fs",
                    self.name,
                    exc,
                    retry_every,
                )
            finally:
                if conn is not None:
                    await conn.close()
            await asyncio.sleep(retry_every)

    # -- connections ------------------------------------------------------------------
    def _not_open(self) -> NoReturn:
        raise StoreError(
            f"PostgreSQL store {self.name!r} is not open; call `await store.open()` first"
        )

    def _check_no_tx(self) -> None:
        task = asyncio.current_task()
        if task is not None and task in self._tasks_in_tx:
            raise StoreError(
                f"store {self.name!r} is already in a transaction in this task; a second "
                "connection could wait on the first one's locks forever (use the open Tx "
                "instead of the store or a second transaction)"
            )

    def _enter_task(self) -> asyncio.Task[Any] | None:
        if self._pool is None:
            self._not_open()
        self._check_no_tx()
        task = asyncio.current_task()
        if task is not None:
            self._tasks_in_tx.add(task)
        return task

    def _leave_task(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._tasks_in_tx.discard(task)

    def transaction(self) -> AbstractAsyncContextManager[PostgresTx]:
        """A transaction: commits when the block exits normally, rolls back on error."""
        return _Transaction(self)

    def snapshot(self) -> AbstractAsyncContextManager[PostgresTx]:
        """A read-only transaction whose reads all see one snapshot (REPEATABLE READ,
        READ ONLY): under the default READ COMMITTED, two SELECTs of one transaction
        may see different commits."""
        return _Transaction(self, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    async def _read(self, what: str, query: str, params: _Params = ()) -> list[tuple[Any, ...]]:
        pool = self._pool or self._not_open()
        try:
            async with pool.connection() as conn:
                cursor = await conn.execute(query, params)
                return await cursor.fetchall()
        except psycopg.Error as exc:
            raise translate_error(self.name, what, exc) from exc

    async def _write(self, what: str, query: str, params: _Params) -> tuple[int, list[Any]]:
        """One statement as its own transaction (autocommit); rows changed and returned."""
        pool = self._pool or self._not_open()
        self._check_no_tx()
        try:
            async with pool.connection() as conn:
                cursor = await conn.execute(query, params)
                rows = await cursor.fetchall() if cursor.description is not None else []
                return cursor.rowcount, rows
        except psycopg.Error as exc:
            raise translate_error(self.name, what, exc) from exc

    # -- reads ------------------------------------------------------------------------
    async def list_sagas(
        self,
        *,
        states: Sequence[SagaState] | None = None,
        definition: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[SagaInstance]:
        """Instances, newest first (ties in insertion order), optionally filtered."""
        params = {
            "states": None if states is None else [s.value for s in states],
            "definition": definition,
            "limit": max(limit, 0),
            "offset": max(offset, 0),
        }
        rows = await self._read("list sagas", self._q["saga_list"], params)
        return [_saga_from_row(r) for r in rows]

    async def find_sagas(self, query: SagaQuery, *, limit: int = 100, offset: int = 0) -> SagaPage:
        """The sagas ``query`` selects, newest first, and how many it selects in all."""
        page_sql, count_sql, params = saga_find_statements(self._q, query, "%s")
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
        return [SetAside(*r) for r in rows]

    async def set_aside_of_saga(self, saga_id: str) -> list[SetAside]:
        """The inputs of ``saga_id`` set aside, oldest first."""
        rows = await self._read(
            f"read the inputs of saga {saga_id} set aside", self._q["set_aside_of_saga"], (saga_id,)
        )
        return [SetAside(*r) for r in rows]

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

    async def outbox_mark_published(self, ids: Sequence[int], now: float) -> None:
        """Mark rows as published (acknowledged by the transport); ``now`` is recorded."""
        if ids:
            await self._write(
                f"mark {len(ids)} outbox row(s) published",
                self._q["outbox_mark_published"],
                (now, list(ids)),
            )

    async def outbox_purge(self, published_before: float, *, batch: int = 1000) -> int:
        """Delete rows published before ``published_before``, ``batch`` rows per
        transaction (short row locks, never waiting on a relay's); return how many."""
        purged = 0
        while True:
            n, _ = await self._write(
                "purge published outbox rows",
                self._q["outbox_purge"],
                (published_before, published_before, batch),
            )
            purged += n
            if n < batch:
                return purged

    async def outbox_oldest_pending(self) -> float | None:
        """``created_at`` of the oldest unpublished row, or ``None`` when all are published."""
        rows = await self._read(
            "read the oldest pending outbox row", self._q["outbox_oldest_pending"]
        )
        oldest: float | None = rows[0][0]
        return oldest

    # -- inbox ------------------------------------------------------------------------
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

    async def queue_fetch(
        self, endpoint: str, limit: int, now: float, lease: float
    ) -> list[QueuedMessage]:
        """Hand out up to ``limit`` visible messages, oldest first, hidden for ``lease`` s.

        Each counts one more delivery. A message not acknowledged before its lease
        ends is handed out again (at-least-once). Concurrent fetches skip each
        other's rows (SKIP LOCKED). Uses the caller's clock, like the push delays.
        """
        if limit <= 0:
            return []
        _, rows = await self._write(
            f"fetch from the mailbox of {endpoint!r}",
            self._q["queue_fetch"],
            (now + lease, endpoint, now, limit),
        )
        rows.sort()
        return [
            QueuedMessage(id=r[0], endpoint=r[1], body=r[2], deliveries=r[3], enqueued_at=r[4])
            for r in rows
        ]

    async def queue_ack(self, ids: Sequence[int]) -> None:
        """Remove handled messages from the mailbox."""
        if ids:
            await self._write(
                f"acknowledge {len(ids)} message(s)", self._q["queue_ack"], (list(ids),)
            )


def _saga_insert_params(i: SagaInstance) -> tuple[Any, ...]:
    return saga_insert_params(i, bool)


def _saga_update_params(i: SagaInstance, expected_version: int) -> tuple[Any, ...]:
    return saga_update_params(i, expected_version, bool)
