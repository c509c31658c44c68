"""A fake external card provider, with storage of its own: a SQLite file, or a schema.

The provider stands for a system the checkout does not own: its effects are committed
at once (autocommit, one short transaction per request) and never roll back with the
payment service's transaction. Every request carries an idempotency key: the same key
always gets the first answer, and never causes a second effect.

Behaviour is chosen per card token, so that tests and demos can provoke each failure.
The words of a token after ``card-`` are flags (a word *starting* with a flag counts,
so ``card-declined-7`` declines); several flags can be combined (``card-slow-novoid``):

=============  ===========================================================================
``decline``    authorizations are declined (a definitive answer)
``flaky``      the first two calls of every key fail with :class:`ProviderUnavailable`
               before doing anything (a transient outage)
``slow``       the first call of every key does its effect, commits it, *then* raises
               :class:`ProviderTimeout`; a retry with the same key gets the recorded result
``novoid``     voids are refused ("authorization cannot be voided")
``norefund``   refunds (and releases of uncaptured holds) are refused
``mutevoid``   voids are carried out (on the first call), but no call of a void key is
               ever answered: every one raises :class:`ProviderTimeout`, replays too
``mutecapture`` the same for captures
``nolookup``   the status lookup (:meth:`FakeCardProvider.lookup`) of the card's keys never
               answers: it raises :class:`ProviderTimeout`
``outage``     the provider is out of reach for the first :data:`OUTAGE_REQUESTS` requests
               about each of the card's keys, calls and lookups counted together: each
               raises :class:`ProviderTimeout` without reaching it (nothing happens); the
               ones after it get through
=============  ===========================================================================

``mutevoid`` and ``mutecapture`` model a provider that answers nothing: whoever called
cannot tell whether the operation happened (it did). With ``nolookup`` as well, asking
afterwards does not tell either, so only a person can find out. ``outage`` models an
outage instead: nothing happens, yet the caller cannot tell that it did not, and asking
goes unanswered too; what a person or a compensation sends once it is over gets through.

:meth:`FakeCardProvider.configure` sets the same rules for a token explicitly.

Amounts are integers in minor units (cents). A refund of an authorization that was
never captured releases the hold (as real providers do), with amount 0.

Where it keeps its records: a SQLite file (``FakeCardProvider("provider.db")``), shared
by the processes of one machine, or a PostgreSQL schema of its own
(``FakeCardProvider("postgresql://user@host/db?schema=card_provider")``), shared by
every process that reaches the database; a deployment on PostgreSQL keeps it there, so
that what the provider did outlives any process and any temporary directory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS card_rules (
    card              TEXT PRIMARY KEY,
    decline           INTEGER NOT NULL,
    transient_calls   INTEGER NOT NULL,
    slow              INTEGER NOT NULL,
    refuse_void       INTEGER NOT NULL,
    refuse_refund     INTEGER NOT NULL
);
-- One row per idempotency key: how often it was called and what it answered (NULL
-- while only transient failures were seen).
CREATE TABLE IF NOT EXISTS requests (
    key      TEXT PRIMARY KEY,
    op       TEXT NOT NULL,
    calls    INTEGER NOT NULL,
    outcome  TEXT,
    at       REAL NOT NULL,
    card     TEXT
);
CREATE TABLE IF NOT EXISTS authorizations (
    authorization TEXT PRIMARY KEY,
    order_id      TEXT NOT NULL,
    card          TEXT NOT NULL,
    amount        INTEGER NOT NULL,
    currency      TEXT NOT NULL,
    status        TEXT NOT NULL,   -- AUTHORIZED | CAPTURED | VOIDED | RELEASED
    captured      INTEGER NOT NULL DEFAULT 0,
    refunded      INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
-- The provider's ledger of effects: what really happened to money, for the invariant
-- checks. No uniqueness on (order_id, op): a caller that uses two keys for one
-- operation gets two effects here, which is exactly what the checks must catch.
CREATE TABLE IF NOT EXISTS effects (
    id            INTEGER PRIMARY KEY,
    key           TEXT NOT NULL UNIQUE,
    order_id      TEXT NOT NULL,
    op            TEXT NOT NULL,
    authorization TEXT NOT NULL,
    amount        INTEGER NOT NULL,
    at            REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS effects_order_idx ON effects (order_id, op);
"""

_RULE_COLUMNS = ("mute_void", "mute_capture", "mute_lookup", "outage_requests")
"""card_rules columns added after the first schema (a provider file from before gets them)."""
_RULE_FIELDS = (
    "decline",
    "transient_calls",
    "slow",
    "refuse_void",
    "refuse_refund",
    *_RULE_COLUMNS,
)
"""Every card_rules column but the card, in :class:`CardRules`' order."""

_PG_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS card_rules (
        card              TEXT PRIMARY KEY,
        decline           INTEGER NOT NULL,
        transient_calls   INTEGER NOT NULL,
        slow              INTEGER NOT NULL,
        refuse_void       INTEGER NOT NULL,
        refuse_refund     INTEGER NOT NULL,
        mute_void         INTEGER NOT NULL DEFAULT 0,
        mute_capture      INTEGER NOT NULL DEFAULT 0,
        mute_lookup       INTEGER NOT NULL DEFAULT 0,
        outage_requests   INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS requests (
        key      TEXT PRIMARY KEY,
        op       TEXT NOT NULL,
        calls    INTEGER NOT NULL,
        outcome  TEXT,
        at       DOUBLE PRECISION NOT NULL,
        card     TEXT
    )""",
    # "authorization" is a reserved word in PostgreSQL: quoted here and in every query.
    """CREATE TABLE IF NOT EXISTS authorizations (
        "authorization" TEXT PRIMARY KEY,
        order_id        TEXT NOT NULL,
        card            TEXT NOT NULL,
        amount          BIGINT NOT NULL,
        currency        TEXT NOT NULL,
        status          TEXT NOT NULL,
        captured        BIGINT NOT NULL DEFAULT 0,
        refunded        BIGINT NOT NULL DEFAULT 0,
        created_at      DOUBLE PRECISION NOT NULL,
        updated_at      DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS authorizations_order_idx ON authorizations (order_id)",
    """CREATE TABLE IF NOT EXISTS effects (
        id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        key             TEXT NOT NULL UNIQUE,
        order_id        TEXT NOT NULL,
        op              TEXT NOT NULL,
        "authorization" TEXT NOT NULL,
        amount          BIGINT NOT NULL,
        at              DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS effects_order_idx ON effects (order_id, op)",
)
"""The same tables in the provider's PostgreSQL schema (see :data:`_SCHEMA`)."""

DEFAULT_SCHEMA = "card_provider"
"""The provider's schema when a ``postgresql://`` location names none (``?schema=``)."""
_MAX_IDENTIFIER = 63  # PostgreSQL's identifier limit, in bytes

TRANSIENT_CALLS = 2
"""How many calls per key a ``flaky`` card fails before the provider answers."""

OUTAGE_REQUESTS = 12
"""How many requests about each key of an ``outage`` card go unanswered (calls and lookups):
as many as the checkout saga's attempts and status queries of one step (6 + 6), so its
authorization ends in the manual queue with its outcome unknown, and what comes after
(a person's retry, or a void asking what became of the authorization) gets through."""


class ProviderError(Exception):
    """The card provider did not do what was asked."""


class CardDeclined(ProviderError):
    """The card was declined (a definitive answer: retrying will not help)."""


class OperationRefused(ProviderError):
    """The provider refused the operation definitively (e.g. a void it cannot do)."""


class ProviderUnavailable(ProviderError):
    """The provider is down; nothing happened. Retry with the same key."""


class ProviderTimeout(ProviderError):
    """No answer in time: the effect may or may not have happened. Retry with the same key."""


@dataclass(frozen=True, slots=True)
class CardRules:
    """How the provider treats one card token."""

    decline: bool = False
    transient_calls: int = 0
    slow: bool = False
    refuse_void: bool = False
    refuse_refund: bool = False
    mute_void: bool = False
    mute_capture: bool = False
    mute_lookup: bool = False
    outage_requests: int = 0
    """How many requests about each key go unanswered, without reaching the provider."""

    def mute(self, op: str) -> bool:
        """True when calls of ``op`` are never answered for this card."""
        return (op == "void" and self.mute_void) or (op == "capture" and self.mute_capture)

    @classmethod
    def from_token(cls, card: str) -> CardRules:
        """The rules a token's flag words ask for (see the module docstring)."""
        words = card.split("-")[1:] if card.startswith("card-") else []

        def has(flag: str) -> bool:
            return any(w.startswith(flag) for w in words)

        return cls(
            decline=has("decline"),
            transient_calls=TRANSIENT_CALLS if has("flaky") else 0,
            slow=has("slow"),
            refuse_void=has("novoid"),
            refuse_refund=has("norefund"),
            mute_void=has("mutevoid"),
            mute_capture=has("mutecapture"),
            mute_lookup=has("nolookup"),
            outage_requests=OUTAGE_REQUESTS if has("outage") else 0,
        )


@dataclass(frozen=True, slots=True)
class Receipt:
    """The provider's answer to a successful request (the same for every retry of its key)."""

    key: str
    op: str
    order_id: str
    authorization: str
    amount: int


@dataclass(frozen=True, slots=True)
class Authorization:
    """An authorization as the provider sees it."""

    authorization: str
    order_id: str
    card: str
    amount: int
    currency: str
    status: str
    captured: int
    refunded: int

    @property
    def open(self) -> bool:
        """True while money is held on the card but neither taken nor released."""
        return self.status == "AUTHORIZED"


@dataclass(frozen=True, slots=True)
class Effect:
    """One row of the provider's ledger."""

    key: str
    order_id: str
    op: str
    authorization: str
    amount: int
    at: float


class _Rows(Protocol):
    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class _Db(Protocol):
    """One connection to the provider's storage, in autocommit mode: each request opens
    its own transaction. Queries are written with ``?`` placeholders."""

    for_update: str
    """What a SELECT appends to lock the rows it reads until the transaction ends."""

    @property
    def in_transaction(self) -> bool: ...

    @property
    def usable(self) -> bool: ...

    def execute(self, query: str, params: Sequence[Any] = ()) -> _Rows: ...

    def begin(self, key: str) -> None: ...

    def close(self) -> None: ...


class _SQLiteDb:
    """The provider's SQLite file."""

    for_update = ""  # BEGIN IMMEDIATE already holds the only write lock of the file

    def __init__(self, path: Path) -> None:
        # A new file is created readable by its owner only (0600); SQLite gives its
        # -wal and -shm files the same mode.
        with contextlib.suppress(OSError):  # it exists, or sqlite3 reports why not
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        have = {r[1] for r in conn.execute("PRAGMA table_info(card_rules)")}
        for column in _RULE_COLUMNS:
            if column not in have:
                conn.execute(
                    f"ALTER TABLE card_rules ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0"
                )
        if "card" not in {r[1] for r in conn.execute("PRAGMA table_info(requests)")}:
            conn.execute("ALTER TABLE requests ADD COLUMN card TEXT")
        self._conn = conn

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    @property
    def usable(self) -> bool:
        return True

    def execute(self, query: str, params: Sequence[Any] = ()) -> _Rows:
        return self._conn.execute(query, params)

    def begin(self, key: str) -> None:
        # One writer at a time for the whole file: requests are serialized, whatever
        # their key or authorization.
        self._conn.execute("BEGIN IMMEDIATE")

    def close(self) -> None:
        self._conn.close()


class _PostgresDb:
    """The provider's own schema in a PostgreSQL database (created if missing).

    A request holds a transaction-level advisory lock on its key, so two callers racing
    on one key get one effect, and reads the authorization it changes ``FOR UPDATE``,
    so two keys racing on one authorization (a capture and a void) see each other's
    effect; requests about other keys and authorizations run side by side.
    """

    for_update = " FOR UPDATE"

    def __init__(self, dsn: str, schema: str) -> None:
        import psycopg
        from psycopg import sql

        self._psycopg = psycopg
        self._schema = schema
        try:
            conn = psycopg.connect(
                dsn, autocommit=True, application_name="sagakit fake card provider"
            )
        except psycopg.OperationalError as exc:
            # Nothing was asked of the provider yet: the caller may retry at will.
            raise ProviderUnavailable(f"card provider's database unreachable: {exc}") from exc
        self._conn = conn
        try:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            with conn.transaction():
                # Processes starting together must not race to create the same tables.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_id(schema, ""),))
                exists = conn.execute(
                    "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)
                ).fetchone()
                if exists is None:
                    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
                for statement in _PG_SCHEMA:
                    conn.execute(statement)
        except BaseException:
            conn.close()
            raise

    @property
    def in_transaction(self) -> bool:
        status = self._conn.info.transaction_status
        tx = self._psycopg.pq.TransactionStatus
        # UNKNOWN (a lost connection) counts as none: there is nothing to roll back.
        return status in (tx.INTRANS, tx.INERROR, tx.ACTIVE)

    @property
    def usable(self) -> bool:
        return not (self._conn.closed or self._conn.broken)

    def execute(self, query: str, params: Sequence[Any] = ()) -> _Rows:
        try:
            return self._conn.execute(_pg_query(query), params)
        except self._psycopg.OperationalError as exc:
            if self.usable:
                raise
            # The connection is gone, maybe after a COMMIT was sent: whatever was asked
            # may or may not have happened, exactly like a provider's timeout.
            raise ProviderTimeout(f"lost the card provider's database: {exc}") from exc

    def begin(self, key: str) -> None:
        self.execute("BEGIN")
        self.execute("SELECT pg_advisory_xact_lock(?)", (_lock_id(self._schema, key),))

    def close(self) -> None:
        self._conn.close()


@functools.lru_cache(maxsize=128)
def _pg_query(query: str) -> Any:
    """A query of the provider, as written for SQLite, in PostgreSQL's words.

    psycopg's placeholder is ``%s`` (no query here contains a literal ``?`` or ``%``),
    and ``authorization``, a column name on SQLite, is a reserved word in PostgreSQL.
    """
    return _RESERVED.sub('"authorization"', query.replace("?", "%s"))


_RESERVED = re.compile(r'(?<!")\bauthorization\b(?!")')


def _lock_id(schema: str, key: str) -> int:
    """A signed 64-bit advisory lock id for ``key`` in ``schema`` ("" for the schema)."""
    digest = hashlib.blake2b(f"sagakit card provider {schema}\0{key}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def postgres_location(url: str) -> tuple[str, str]:
    """``postgresql://user@host/db?schema=NAME`` as (connection string, schema).

    The schema defaults to :data:`DEFAULT_SCHEMA`; the URL's other query parameters
    (``sslmode=``, ...) go to the connection.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a postgresql:// URL: {_shown(url)}")
    params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    schema = params.pop("schema", DEFAULT_SCHEMA)
    if not 0 < len(schema.encode()) <= _MAX_IDENTIFIER:
        raise ValueError(
            f"card provider URL {_shown(url)}: the schema must be 1 to {_MAX_IDENTIFIER} "
            f"bytes long, got {schema!r}"
        )
    dsn = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(params)))
    return dsn, schema


def _shown(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class FakeCardProvider:
    """The fake provider, on a SQLite file or in a PostgreSQL schema of its own.

    ``location`` is a file path (SQLite, shared by every process that opens the file)
    or ``postgresql://user@host/db?schema=NAME`` (its own schema, default
    :data:`DEFAULT_SCHEMA`, shared by every process that reaches the database). Each
    request runs in one transaction that checks the key, applies the effect and records
    the answer, so two callers racing on one key get one effect. The connection is
    opened on first use.
    """

    def __init__(self, location: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        text = str(location)
        self.path: Path | None = None
        """The SQLite file (None in PostgreSQL)."""
        self.url: str | None = None
        """The ``postgresql://`` location (None on a SQLite file)."""
        if isinstance(location, str) and urlsplit(text).scheme in ("postgresql", "postgres"):
            self.url = text
            self._dsn, self._schema = postgres_location(text)
        elif "://" in text:
            raise ValueError(
                f"card provider location {_shown(text)}: give a file path or a postgresql:// URL"
            )
        else:
            self.path = Path(location)
        self.clock = clock
        self._conn: _Db | None = None

    def __repr__(self) -> str:
        where = _shown(self.url) if self.url is not None else str(self.path)
        return f"FakeCardProvider({where!r})"

    # -- plumbing ---------------------------------------------------------------------
    def _db(self) -> _Db:
        if self._conn is not None and not self._conn.usable:
            self.close()  # lost (a server restart): the next request reconnects
        if self._conn is None:
            if self.path is not None:
                self._conn = _SQLiteDb(self.path)
            else:
                self._conn = _PostgresDb(self._dsn, self._schema)
        return self._conn

    def close(self) -> None:
        """Close the connection (it reopens on the next request)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _request(
        self,
        key: str,
        op: str,
        card_of: Callable[[_Db], str],
        effect: Callable[[_Db, float], Receipt],
    ) -> Receipt:
        """Run one keyed request: replay the recorded answer, or call ``effect`` once."""
        if not key:
            raise ValueError("a provider request needs a non-empty idempotency key")
        db = self._db()
        now = self.clock()
        timeout = False
        db.begin(key)
        try:
            row = db.execute(
                "SELECT op, calls, outcome FROM requests WHERE key = ?", (key,)
            ).fetchone()
            if row is not None and row[0] != op:
                raise ValueError(f"idempotency key {key!r} was used for {row[0]}, not {op}")
            calls = 1 if row is None else row[1] + 1
            card = card_of(db)
            # The card is kept with the key: a lookup of a key that never got an answer
            # must know whether the card's provider is out of reach.
            db.execute(
                "INSERT INTO requests (key, op, calls, at, card) VALUES (?, ?, 1, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET calls = requests.calls + 1",
                (key, op, now, card),
            )
            rules = self.rules(card)
            if calls <= rules.outage_requests:
                db.execute("COMMIT")  # counted: the outage ends after so many requests
                raise ProviderTimeout(f"provider out of reach ({op}, request {calls} of {key})")
            if row is not None and row[2] is not None:
                db.execute("COMMIT")
                if rules.mute(op):
                    # Done long ago; the answer is lost on the way back, every time.
                    raise ProviderTimeout(f"provider did not answer {op} (key {key})")
                return _replay(json.loads(row[2]))
            if calls <= rules.transient_calls:
                db.execute("COMMIT")  # the call count must survive: it is what ends the outage
                raise ProviderUnavailable(f"provider unavailable (call {calls} of key {key})")
            try:
                receipt = effect(db, now)
                outcome: dict[str, Any] = {"ok": True, "receipt": asdict(receipt)}
            except (CardDeclined, OperationRefused) as exc:
                outcome = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
            db.execute("UPDATE requests SET outcome = ? WHERE key = ?", (json.dumps(outcome), key))
            timeout = (rules.slow and calls == 1) or rules.mute(op)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if timeout:
            # The effect is committed; only the answer is lost on the way back.
            raise ProviderTimeout(f"provider timed out on {op} (key {key})")
        return _replay(outcome)

    def _auth_row(self, db: _Db, authorization: str) -> Authorization:
        row = db.execute(
            "SELECT authorization, order_id, card, amount, currency, status, captured, refunded "
            "FROM authorizations WHERE authorization = ?" + db.for_update,
            (authorization,),
        ).fetchone()
        if row is None:
            raise OperationRefused(f"no such authorization {authorization!r}")
        return Authorization(*row)

    @staticmethod
    def _effect(db: _Db, receipt: Receipt, now: float) -> Receipt:
        db.execute(
            "INSERT INTO effects (key, order_id, op, authorization, amount, at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (receipt.key, receipt.order_id, receipt.op, receipt.authorization, receipt.amount, now),
        )
        return receipt

    # -- configuration ----------------------------------------------------------------
    def configure(self, card: str, rules: CardRules) -> None:
        """Set the rules for ``card`` explicitly (they replace what its flags say)."""
        columns = ", ".join(_RULE_FIELDS)
        self._db().execute(
            f"INSERT INTO card_rules (card, {columns}) VALUES (?{', ?' * len(_RULE_FIELDS)}) "
            "ON CONFLICT (card) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in _RULE_FIELDS),
            (
                card,
                # Stored as integers: PostgreSQL will not put a boolean in an INTEGER.
                int(rules.decline),
                rules.transient_calls,
                int(rules.slow),
                int(rules.refuse_void),
                int(rules.refuse_refund),
                int(rules.mute_void),
                int(rules.mute_capture),
                int(rules.mute_lookup),
                rules.outage_requests,
            ),
        )

    def rules(self, card: str) -> CardRules:
        """The rules in force for ``card``."""
        row = (
            self._db()
            .execute(
                "SELECT decline, transient_calls, slow, refuse_void, refuse_refund, "
                "mute_void, mute_capture, mute_lookup, outage_requests FROM card_rules "
                "WHERE card = ?",
                (card,),
            )
            .fetchone()
        )
        if row is None:
            return CardRules.from_token(card)
        flags = CardRules(bool(row[0]), int(row[1]), *(bool(v) for v in row[2:8]))
        return replace(flags, outage_requests=int(row[8]))

    # -- operations -------------------------------------------------------------------
    async def authorize(
        self, key: str, *, order_id: str, card: str, amount: int, currency: str
    ) -> Receipt:
        """Hold ``amount`` on ``card``; :class:`CardDeclined` if the card is declined."""

        def effect(db: _Db, now: float) -> Receipt:
            if self.rules(card).decline:
                raise CardDeclined("card declined")
            auth = f"auth-{uuid.uuid4().hex[:16]}"
            db.execute(
                "INSERT INTO authorizations (authorization, order_id, card, amount, currency, "
                "status, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'AUTHORIZED', ?, ?)",
                (auth, order_id, card, amount, currency, now, now),
            )
            return self._effect(db, Receipt(key, "authorize", order_id, auth, amount), now)

        return self._request(key, "authorize", lambda _db: card, effect)

    async def capture(self, key: str, *, authorization: str) -> Receipt:
        """Take the authorized amount; refused if the hold was voided, released or taken."""

        def effect(db: _Db, now: float) -> Receipt:
            a = self._auth_row(db, authorization)
            if a.status != "AUTHORIZED":
                raise OperationRefused(f"authorization is {a.status}, cannot capture")
            db.execute(
                "UPDATE authorizations SET status = 'CAPTURED', captured = amount, updated_at = ? "
                "WHERE authorization = ?",
                (now, authorization),
            )
            receipt = Receipt(key, "capture", a.order_id, authorization, a.amount)
            return self._effect(db, receipt, now)

        return self._request(key, "capture", lambda db: self._card(db, authorization), effect)

    async def void(self, key: str, *, authorization: str) -> Receipt:
        """Release an uncaptured hold; refused for ``novoid`` cards and captured holds."""

        def effect(db: _Db, now: float) -> Receipt:
            a = self._auth_row(db, authorization)
            if a.status == "CAPTURED":
                raise OperationRefused("authorization already captured; refund it instead")
            if a.status != "AUTHORIZED":
                raise OperationRefused(f"authorization is already {a.status}")
            if self.rules(a.card).refuse_void:
                raise OperationRefused("authorization cannot be voided")
            db.execute(
                "UPDATE authorizations SET status = 'VOIDED', updated_at = ? "
                "WHERE authorization = ?",
                (now, authorization),
            )
            return self._effect(db, Receipt(key, "void", a.order_id, authorization, a.amount), now)

        return self._request(key, "void", lambda db: self._card(db, authorization), effect)

    async def refund(self, key: str, *, authorization: str) -> Receipt:
        """Give back what was captured and not yet refunded; release an uncaptured hold."""

        def effect(db: _Db, now: float) -> Receipt:
            a = self._auth_row(db, authorization)
            if a.status in ("VOIDED", "RELEASED"):
                return Receipt(key, "refund", a.order_id, authorization, 0)  # nothing held
            if self.rules(a.card).refuse_refund:
                raise OperationRefused("refund refused by the provider")
            if a.status == "AUTHORIZED":
                db.execute(
                    "UPDATE authorizations SET status = 'RELEASED', updated_at = ? "
                    "WHERE authorization = ?",
                    (now, authorization),
                )
                return self._effect(db, Receipt(key, "refund", a.order_id, authorization, 0), now)
            amount = a.captured - a.refunded
            db.execute(
                "UPDATE authorizations SET refunded = refunded + ?, updated_at = ? "
                "WHERE authorization = ?",
                (amount, now, authorization),
            )
            return self._effect(db, Receipt(key, "refund", a.order_id, authorization, amount), now)

        return self._request(key, "refund", lambda db: self._card(db, authorization), effect)

    @staticmethod
    def _card(db: _Db, authorization: str) -> str:
        row = db.execute(
            "SELECT card FROM authorizations WHERE authorization = ?", (authorization,)
        ).fetchone()
        return "" if row is None else str(row[0])

    # -- reads ------------------------------------------------------------------------
    async def lookup(self, key: str) -> Receipt | None:
        """The receipt recorded for ``key``, if that request succeeded (no side effect).

        This is how a caller that lost an answer (a timeout) learns what happened.
        :class:`ProviderTimeout` when the key's card is ``nolookup``: the lookup is not
        answered either; nor while an ``outage`` card's key is out of reach (a lookup then
        counts as one of its requests).
        """
        db = self._db()
        row = db.execute(
            "SELECT outcome, card, calls FROM requests WHERE key = ?", (key,)
        ).fetchone()
        if row is not None and row[1] and row[2] < self.rules(row[1]).outage_requests:
            db.execute("UPDATE requests SET calls = calls + 1 WHERE key = ?", (key,))
            raise ProviderTimeout(f"provider out of reach (lookup, request {row[2] + 1} of {key})")
        if row is None or row[0] is None:
            return None
        outcome = json.loads(row[0])
        if not outcome["ok"]:
            return None
        receipt = Receipt(**outcome["receipt"])
        if self.rules(self._card(db, receipt.authorization)).mute_lookup:
            raise ProviderTimeout(f"provider did not answer the lookup of key {key}")
        return receipt

    async def authorizations(self, order_id: str | None = None) -> list[Authorization]:
        """Every authorization (of one order, if given)."""
        where, params = ("", ()) if order_id is None else ("WHERE order_id = ? ", (order_id,))
        rows = (
            self._db()
            .execute(
                "SELECT authorization, order_id, card, amount, currency, status, captured, "
                f"refunded FROM authorizations {where}ORDER BY created_at, authorization",
                params,
            )
            .fetchall()
        )
        return [Authorization(*r) for r in rows]

    async def effects(self, order_id: str | None = None) -> list[Effect]:
        """The provider's ledger of effects (of one order, if given), oldest first."""
        where, params = ("", ()) if order_id is None else ("WHERE order_id = ? ", (order_id,))
        rows = (
            self._db()
            .execute(
                f"SELECT key, order_id, op, authorization, amount, at FROM effects {where}"
                "ORDER BY id",
                params,
            )
            .fetchall()
        )
        return [Effect(*r) for r in rows]

    async def calls(self, key: str) -> int:
        """How many times ``key`` was requested (retries included; for an ``outage`` card,
        its lookups too)."""
        row = self._db().execute("SELECT calls FROM requests WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])


def _replay(outcome: dict[str, Any]) -> Receipt:
    if outcome["ok"]:
        return Receipt(**outcome["receipt"])
    error = CardDeclined if outcome["error"] == "CardDeclined" else OperationRefused
    raise error(outcome["message"])
