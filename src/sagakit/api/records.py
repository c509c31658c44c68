"""The API's own tables, and the reads the store port does not offer (yet).

Two tables live in the orchestrator's store, created with ``apply_migrations`` under
the namespace ``sagakit.api`` (portable SQL: SQLite and PostgreSQL, qmark ``?``):

* ``api_idempotency``: one row per ``Idempotency-Key`` of ``POST /orders``, with the
  SHA-256 of the canonical body and the order id it created. The row is committed
  *before* the saga starts, and the start is idempotent by order id, so a client that
  retries after a crash gets the very same order.
* ``api_audit``: the API's audit rows up to this version; its second step copies them
  into the engine's ``audit_trail`` (:mod:`sagakit.runtime.audit`), which now keeps
  every decision, and drops it.

Saga filters (state, definition, version, current step, age, ids) are translated
into one :class:`~sagakit.stores.base.SagaQuery` that the store answers with indexed
SQL, total included; a step name becomes the ``(definition, version, cursor)``
positions it has in the definitions this engine knows.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol, cast

from sagakit.api.auth import Principal
from sagakit.api.validation import SagaFilter
from sagakit.api.views import step_positions
from sagakit.core.instance import SagaInstance
from sagakit.errors import ConfigurationError
from sagakit.runtime.audit import AuditQuery, AuditRecord, append, find, iterate
from sagakit.runtime.engine import Engine
from sagakit.stores.base import SagaQuery, SQLStore

NAMESPACE = "sagakit.api"
"""The ``schema_migrations`` namespace of the API's tables."""

MIGRATIONS: list[str] = [
    """
    CREATE TABLE api_idempotency (
        idempotency_key TEXT NOT NULL PRIMARY KEY,
        body_hash       TEXT NOT NULL,
        order_id        TEXT NOT NULL UNIQUE,
        actor           TEXT NOT NULL,
        created_at      DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE api_audit (
        audit_id TEXT NOT NULL PRIMARY KEY,
        at       DOUBLE PRECISION NOT NULL,
        actor    TEXT NOT NULL,
        role     TEXT NOT NULL,
        action   TEXT NOT NULL,
        saga_id  TEXT,
        reason   TEXT,
        outcome  TEXT NOT NULL,
        detail   TEXT NOT NULL
    );
    CREATE INDEX api_audit_at_idx ON api_audit (at);
    CREATE INDEX api_audit_saga_idx ON api_audit (saga_id, at);
    """,
    # The trail moved to the engine's audit_trail (written in the decisions' own
    # transactions); what the API recorded before is kept there.
    """
    INSERT INTO audit_trail (at, actor, role, action, outcome, saga_id, reason, detail)
    SELECT at, actor, role, action, outcome, saga_id, reason, detail
    FROM api_audit ORDER BY at;
    DROP TABLE api_audit;
    """,
]
"""Schema steps (append, never edit). A text primary key instead of an auto-increment
id keeps the SQL the same on both databases."""


class CheckoutStores(Protocol):
    """What the ledger endpoints need of the reference checkout (its services' stores)."""

    @property
    def payment_store(self) -> Any:
        """The SQL store holding payment_ledger."""
        ...

    @property
    def inventory_store(self) -> Any:
        """The SQL store holding stock and reservations."""
        ...

    @property
    def shipping_store(self) -> Any:
        """The SQL store holding shipments."""
        ...


class Records:
    """The API's tables in the orchestrator store, and filtered reads over the engine."""

    def __init__(self, engine: Engine, *, order_definition: str = "checkout") -> None:
        if not callable(getattr(engine.store, "apply_migrations", None)):
            raise ConfigurationError(
                f"the HTTP API keeps idempotency keys and its audit trail in the orchestrator "
                f"store, which must be an SQL store (SQLiteStore, PostgresStore); "
                f"{type(engine.store).__name__} is not"
            )
        self.engine = engine
        self.store: SQLStore = cast(SQLStore, engine.store)
        self.order_definition = order_definition
        self._ready = False
        self._lock = asyncio.Lock()

    async def ensure(self) -> None:
        """Create the API's tables if needed (once per process; cheap afterwards)."""
        if self._ready:
            return
        async with self._lock:
            if not self._ready:
                await self.store.apply_migrations(NAMESPACE, MIGRATIONS)
                self._ready = True

    # -- idempotency ---------------------------------------------------------------------
    async def claim(self, key: str, body_hash: str, actor: str) -> tuple[str, str, bool]:
        """Record ``key`` for a new order id unless it exists.

        Returns ``(order_id, stored_hash, created)``: the order the key stands for, the
        hash of the body first sent with it, and whether this call created it.
        """
        await self.ensure()
        fresh = f"order-{uuid.uuid4().hex}"
        async with self.store.transaction() as tx:
            created = await tx.execute(
                "INSERT INTO api_idempotency (idempotency_key, body_hash, order_id, actor, "
                "created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING",
                (key, body_hash, fresh, actor, time.time()),
            )
            row = await tx.fetchone(
                "SELECT order_id, body_hash FROM api_idempotency WHERE idempotency_key = ?",
                (key,),
            )
        assert row is not None, "the key was inserted or found in the same transaction"
        return str(row[0]), str(row[1]), created == 1

    async def order_saga(self, order_id: str) -> SagaInstance | None:
        """The checkout saga of ``order_id`` (its business key), or None (a plain read)."""
        return await self.store.get_saga_by_key(self.order_definition, order_id)

    # -- audit ---------------------------------------------------------------------------
    async def audit(
        self,
        who: Principal,
        action: str,
        *,
        saga_id: str | None,
        reason: str | None,
        outcome: str,
        detail: dict[str, Any] | None = None,
        dead_letter_id: int | None = None,
    ) -> None:
        """Append a row to the audit trail in a transaction of its own: for what the API
        saw that has no transaction of its own to share (a refused attempt, an order
        placed). A decision that took effect is recorded by its own transaction."""
        await self.ensure()
        record = AuditRecord(
            at=time.time(),
            actor=who.name,
            role=who.role.value,
            action=action,
            outcome=outcome,
            saga_id=saga_id,
            dead_letter_id=dead_letter_id,
            reason=reason,
            detail=detail or {},
        )
        async with self.store.transaction() as tx:
            await append(tx, record)

    async def audit_rows(self, query: AuditQuery, *, limit: int, offset: int) -> list[AuditRecord]:
        """Audit rows of every store of the engine, newest first (see
        :func:`sagakit.runtime.audit.find`)."""
        await self.ensure()
        stores = [self.engine.store, *self.engine.dead_letters.stores.values()]
        return await find(stores, query, limit=limit, offset=offset)

    async def audit_export(self, query: AuditQuery) -> AsyncIterator[AuditRecord]:
        """Every audit row matching ``query``, newest first, read a page at a time (see
        :func:`sagakit.runtime.audit.iterate`)."""
        await self.ensure()
        stores = [self.engine.store, *self.engine.dead_letters.stores.values()]
        async for record in iterate(stores, query):
            yield record

    # -- filtered saga reads -------------------------------------------------------------
    def query(self, flt: SagaFilter, now: float) -> SagaQuery:
        """The store query of ``flt``; ages are measured back from ``now``."""
        return SagaQuery(
            states=flt.states or None,
            definition=flt.definition,
            version=flt.version,
            positions=None if flt.step is None else step_positions(self.engine, flt.step),
            created_from=None if flt.max_age is None else now - flt.max_age,
            created_until=None if flt.min_age is None else now - flt.min_age,
            saga_ids=flt.saga_ids or None,
        )

    async def select(
        self, flt: SagaFilter, *, limit: int, offset: int, now: float | None = None
    ) -> tuple[int, list[SagaInstance]]:
        """``(total matching, the page [offset, offset + limit))``, newest first."""
        if flt == SagaFilter(states=flt.states):
            # Only states (the console's and the default listing): count_sagas gives the
            # total without a COUNT over the whole table per page.
            states = list(flt.states) or None
            counts = await self.store.count_sagas()
            total = sum(n for s, n in counts.items() if states is None or s in states)
            return total, await self.store.list_sagas(states=states, limit=limit, offset=offset)
        query = self.query(flt, time.time() if now is None else now)
        page = await self.store.find_sagas(query, limit=limit, offset=offset)
        return page.total, page.items


async def payments(
    checkout: CheckoutStores, order_id: str | None, limit: int, offset: int
) -> list[dict[str, Any]]:
    """Rows of the payment service's ledger, newest first."""
    sql = "SELECT order_id, op, amount, provider_ref, at FROM payment_ledger"
    params: tuple[Any, ...] = (limit, offset)
    if order_id is not None:
        sql += " WHERE order_id = ?"
        params = (order_id, *params)
    async with checkout.payment_store.transaction() as tx:
        rows = await tx.fetchall(sql + " ORDER BY at DESC, order_id, op LIMIT ? OFFSET ?", params)
    keys = ("order_id", "op", "amount", "provider_ref", "at")
    return [dict(zip(keys, r, strict=True)) for r in rows]


async def stock(checkout: CheckoutStores, sku: str) -> dict[str, Any] | None:
    """One SKU's stock buckets and its reservations by status, or None."""
    async with checkout.inventory_store.transaction() as tx:
        row = await tx.fetchone(
            "SELECT sku, initial, available, reserved, shipped FROM stock WHERE sku = ?", (sku,)
        )
        counts = await tx.fetchall(
            "SELECT status, COUNT(*) FROM reservations WHERE sku = ? GROUP BY status", (sku,)
        )
    if row is None:
        return None
    out = dict(zip(("sku", "initial", "available", "reserved", "shipped"), row, strict=True))
    out["reservations"] = {str(s): int(n) for s, n in counts}
    return out


async def shipments(
    checkout: CheckoutStores, order_id: str | None, limit: int, offset: int
) -> list[dict[str, Any]]:
    """Rows of the shipping service's shipments, newest first."""
    cols = (
        "order_id",
        "status",
        "carrier",
        "address_token",
        "sku",
        "qty",
        "created_at",
        "updated_at",
    )
    sql = f"SELECT {', '.join(cols)} FROM shipments"
    params: tuple[Any, ...] = (limit, offset)
    if order_id is not None:
        sql += " WHERE order_id = ?"
        params = (order_id, *params)
    async with checkout.shipping_store.transaction() as tx:
        rows = await tx.fetchall(
            sql + " ORDER BY created_at DESC, order_id LIMIT ? OFFSET ?", params
        )
    return [dict(zip(cols, r, strict=True)) for r in rows]
