"""The checkout's four services and the fake card provider, driven command by command.

Each test builds the command envelopes the orchestrator would send, delivers them to a
participant as the transport would, and reads the reply from the participant's outbox
and the effects from the services' own ledgers. The last tests run whole sagas through
the embedded engine and check the invariants, then plant violations and check that
each one is caught.

Every test that touches a store runs twice, on the same business SQL: on SQLite files
and on PostgreSQL (marked ``postgres``), each store in its own uniquely named schema
that is dropped afterwards (``SAGAKIT_TEST_POSTGRES_DSN`` overrides the server). The
card provider, an external system, keeps its SQLite file on both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sagakit_checkout import deploy, inventory, order, payment, shipping
from sagakit_checkout.demo import SCENARIOS as DEMO_SCENARIOS
from sagakit_checkout.demo import make_orders
from sagakit_checkout.invariants import (
    InvariantReport,
    check_invariants,
    status_path_violation,
    status_step_allowed,
)
from sagakit_checkout.provider import (
    OUTAGE_REQUESTS,
    CardRules,
    FakeCardProvider,
    ProviderTimeout,
)
from sagakit_checkout.sagas import CHECKOUT, DEADLINE, FORWARD, RETRY, checkout_definition
from sagakit_checkout.services import Checkout, checkout_engine, checkout_on, migrate, open_checkout

from sagakit import (
    CommandAction,
    Envelope,
    MessageKind,
    Outcome,
    Participant,
    RetryPolicy,
    SagaState,
)
from sagakit.core.envelope import MANUAL_RETRY
from sagakit.runtime.participant import REFUSED_AFTER_COMPENSATION
from sagakit.stores.postgres import PostgresStore
from sagakit.stores.sqlite import SQLiteStore
from sagakit.transports.base import Delivery

PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
STORES = ("orchestrator", "order", "payment", "inventory", "shipping")

_handles = itertools.count(1)
_ids = itertools.count(1)


# -- plumbing --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Site:
    """Where one test's checkout lives: SQLite files in ``path``, or PostgreSQL schemas.

    ``path`` also holds the card provider's file on both backends. On PostgreSQL the
    store ``name`` lives in schema ``<prefix>_<name>``; opening the checkout again (a
    second :func:`services` block) finds the same data, as reopening the files does.
    """

    backend: str
    path: Path
    prefix: str

    @property
    def postgres(self) -> bool:
        return self.backend == "postgres"

    def schema(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def store(self, name: str) -> Any:
        """A new (unopened) store for service ``name``."""
        if self.postgres:
            return PostgresStore(PG_DSN, name=name, schema=self.schema(name))
        return SQLiteStore(self.path / f"{name}.db", name=name, synchronous="NORMAL")

    def checkout(
        self, *, carrier_down_fraction: float = 0.0, provider_clock: Any = time.time
    ) -> Checkout:
        """The checkout on this site's stores (``open_checkout`` builds the SQLite one)."""
        if not self.postgres:
            return open_checkout(
                self.path,
                synchronous="NORMAL",
                carrier_down_fraction=carrier_down_fraction,
                provider_clock=provider_clock,
            )
        stores = {name: self.store(name) for name in STORES}
        provider = FakeCardProvider(self.path / "provider.db", clock=provider_clock)
        return checkout_on(self.path, stores, provider, carrier_down_fraction=carrier_down_fraction)

    def plant(self, name: str, *statements: str) -> None:
        """Run raw SQL on service ``name``'s database behind its store, in one transaction
        (as a bug or an operator would); the store must be closed."""
        if self.postgres:
            import psycopg
            from psycopg import sql

            with psycopg.connect(PG_DSN) as pg:
                pg.execute(
                    sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema(name)))
                )
                for statement in statements:
                    pg.execute(statement)  # no parameters: sent as written
            return
        conn = sqlite3.connect(self.path / f"{name}.db")
        try:
            with conn:
                for statement in statements:
                    conn.execute(statement)
        finally:
            conn.close()

    def drop(self) -> None:
        """Drop this site's PostgreSQL schemas (nothing to do for files)."""
        if self.postgres:
            import psycopg
            from psycopg import sql

            with psycopg.connect(PG_DSN, autocommit=True) as pg:
                for name in STORES:
                    pg.execute(
                        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                            sql.Identifier(self.schema(name))
                        )
                    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    """The test's checkout site, on SQLite and on PostgreSQL."""
    if request.param == "postgres":
        pytest.importorskip("psycopg", reason="needs the sagakit[postgres] extra")
    s = Site(request.param, tmp_path, f"t_{uuid.uuid4().hex[:16]}")
    try:
        yield s
    finally:
        s.drop()


@asynccontextmanager
async def services(
    site: Site, stock: Mapping[str, int] | None = None, **kw: Any
) -> AsyncIterator[Checkout]:
    """The checkout with its stores opened by hand (no engine: commands are sent directly)."""
    c = site.checkout(**kw)
    stores = [c.orchestrator_store, *c.service_stores.values()]
    for s in stores:
        await s.open()
    try:
        await migrate(c, initial_stock=stock)
        yield c
    finally:
        for s in stores:
            await s.close()
        c.provider.close()


def command(
    to: Participant,
    type_: str,
    payload: dict[str, Any],
    *,
    saga: str = "saga-1",
    step: str,
    attempt: int = 1,
    rung: int | None = None,
) -> Envelope:
    """A command as the orchestrator sends it; ``rung`` makes it a compensation."""
    action_key = f"{saga}:{step}:action"
    key = action_key if rung is None else f"{saga}:{step}:comp:{rung}"
    message_id = f"{saga}:{next(_ids)}:0"
    return Envelope(
        message_id=message_id,
        type=type_,
        kind=MessageKind.COMMAND,
        source="orchestrator",
        destination=to.name,
        correlation_id=saga,
        occurred_at=time.time(),
        payload=payload,
        saga_id=saga,
        business_key=payload.get("order_id"),
        step=step,
        attempt=attempt,
        fence=1,
        idempotency_key=key,
        compensates=None if rung is None else action_key,
        reply_to="orchestrator",
    )


async def deliver(p: Participant, env: Envelope, deliveries: int = 1) -> Outcome:
    """Deliver ``env`` once and return the reply the participant put in its outbox."""
    settles = await p([Delivery(next(_handles), env.to_json(), deliveries)])
    assert settles[0].ack, f"{env.type} was not acknowledged: {settles[0].error}"
    return await reply_of(p, env)


async def reply_of(p: Participant, env: Envelope) -> Outcome:
    replies = [e for e, _ in await p.store.outbox_all() if e.causation_id == env.message_id]
    assert len(replies) == 1, f"expected one reply to {env.message_id}, got {len(replies)}"
    assert replies[0].destination == "orchestrator"
    assert replies[0].idempotency_key == env.idempotency_key
    return Outcome.from_payload(replies[0].payload)


async def rows(store: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async with store.transaction() as tx:
        result: list[tuple[Any, ...]] = await tx.fetchall(sql, params)
    return result


async def ledger(c: Checkout, order_id: str) -> dict[str, int]:
    got = await rows(
        c.payment_store, "SELECT op, amount FROM payment_ledger WHERE order_id = ?", (order_id,)
    )
    return {op: amount for op, amount in got}


async def provider_ops(c: Checkout, order_id: str) -> list[tuple[str, int]]:
    return [(e.op, e.amount) for e in await c.provider.effects(order_id)]


def pay(order_id: str, card: str = "card-ok-1", amount: int = 2500) -> dict[str, Any]:
    return {"order_id": order_id, "amount": amount, "currency": "EUR", "card": card}


async def authorize(c: Checkout, order_id: str, card: str, saga: str = "saga-1") -> Outcome:
    return await deliver(
        c.payment,
        command(
            c.payment, "AuthorizePayment", pay(order_id, card), saga=saga, step="authorize_payment"
        ),
    )


def ref(order_id: str) -> dict[str, Any]:
    return {"order_id": order_id}


async def invariants(c: Checkout, stock: Mapping[str, int]) -> InvariantReport:
    return await check_invariants(**c.invariant_stores(), initial_stock=stock)


# -- order -----------------------------------------------------------------------------


async def test_order_create_is_idempotent_and_history_is_kept(site: Site) -> None:
    async with services(site) as c:
        data = {"order_id": "o-1", "customer": "cust-7", "sku": "sku-1", "qty": 2, "amount": 900}
        first = command(c.order, "CreateOrder", data, step="create_order")
        assert (await deliver(c.order, first)).result == {"order_id": "o-1", "status": "CREATED"}
        # The same message again (redelivery): the inbox skips it, no second reply.
        await c.order([Delivery(next(_handles), first.to_json(), 2)])
        assert len(await c.order.store.outbox_all()) == 1
        # A retry under the same key: the recorded answer, no second order.
        again = command(c.order, "CreateOrder", data, step="create_order", attempt=2)
        assert (await deliver(c.order, again)).ok
        done = await deliver(
            c.order, command(c.order, "CompleteOrder", ref("o-1"), step="complete_order")
        )
        assert done.result["status"] == "COMPLETED"
        cancel = await deliver(
            c.order, command(c.order, "CancelOrder", ref("o-1"), step="create_order", rung=0)
        )
        assert not cancel.ok and "already completed" in cancel.reason
        assert await rows(c.order_store, "SELECT order_id, status, amount FROM orders") == [
            ("o-1", "COMPLETED", 900)
        ]
        assert await rows(
            c.order_store, "SELECT seq, status FROM order_status_history ORDER BY seq"
        ) == [
            (1, "CREATED"),
            (2, "COMPLETED"),
        ]


async def test_order_refuses_personal_data(site: Site) -> None:
    async with services(site) as c:
        data = {
            "order_id": "o-1",
            "customer": "Jane Doe <jane@example.com>",
            "sku": "s",
            "qty": 1,
            "amount": 1,
        }
        out = await deliver(c.order, command(c.order, "CreateOrder", data, step="create_order"))
        assert not out.ok and not out.retryable and "token" in out.reason
        assert await rows(c.order_store, "SELECT * FROM orders") == []


# -- payment ---------------------------------------------------------------------------


async def test_payment_happy_path_authorize_then_capture(site: Site) -> None:
    async with services(site) as c:
        auth = await authorize(c, "o-1", "card-ok-1")
        assert auth.ok and auth.result["amount"] == 2500
        cap = await deliver(
            c.payment, command(c.payment, "CapturePayment", ref("o-1"), step="capture_payment")
        )
        assert cap.ok and cap.result == {"captured": 2500}
        assert await ledger(c, "o-1") == {"authorize": 2500, "capture": 2500}
        assert await provider_ops(c, "o-1") == [("authorize", 2500), ("capture", 2500)]
        status = await deliver(
            c.payment,
            command(c.payment, "GetPaymentStatus", ref("o-1"), step="capture_payment").with_changes(
                kind=MessageKind.QUERY
            ),
        )
        assert status.result["capture"]["amount"] == 2500


async def test_declined_card_fails_definitively_without_effect(site: Site) -> None:
    async with services(site) as c:
        out = await authorize(c, "o-1", "card-decline-42")
        assert not out.ok and out.reason == "card declined" and not out.retryable
        assert await ledger(c, "o-1") == {}
        assert await provider_ops(c, "o-1") == []


@pytest.mark.fault("F-DUPLICATE")
async def test_duplicate_authorize_returns_same_reply_without_second_effect(site: Site) -> None:
    async with services(site) as c:
        first = await authorize(c, "o-1", "card-ok-1")
        # The reply was lost; the orchestrator retries with the same key.
        second = await deliver(
            c.payment,
            command(c.payment, "AuthorizePayment", pay("o-1"), step="authorize_payment", attempt=2),
        )
        assert second == first
        assert await provider_ops(c, "o-1") == [("authorize", 2500)]
        assert await c.provider.calls("saga-1:authorize_payment:action") == 1
        assert await ledger(c, "o-1") == {"authorize": 2500}


@pytest.mark.fault("F-PROVIDER-OUTAGE")
async def test_provider_timeout_after_success_then_retry_gives_one_effect(site: Site) -> None:
    async with services(site) as c:
        first = await authorize(c, "o-1", "card-slow-1")
        assert not first.ok and first.retryable
        # The provider did authorize; the payment ledger does not know it yet.
        assert await provider_ops(c, "o-1") == [("authorize", 2500)]
        assert await ledger(c, "o-1") == {}
        second = await deliver(
            c.payment,
            command(
                c.payment,
                "AuthorizePayment",
                pay("o-1", "card-slow-1"),
                step="authorize_payment",
                attempt=2,
            ),
        )
        assert second.ok and second.result["amount"] == 2500
        assert await provider_ops(c, "o-1") == [("authorize", 2500)]
        assert await ledger(c, "o-1") == {"authorize": 2500}
        # The capture times out the same way and is settled by its retry.
        cap = command(c.payment, "CapturePayment", ref("o-1"), step="capture_payment")
        assert (await deliver(c.payment, cap)).retryable
        cap2 = command(c.payment, "CapturePayment", ref("o-1"), step="capture_payment", attempt=2)
        assert (await deliver(c.payment, cap2)).result == {"captured": 2500}
        assert await provider_ops(c, "o-1") == [("authorize", 2500), ("capture", 2500)]


async def test_provider_replays_a_key_and_times_out_only_once(tmp_path: Path) -> None:
    provider = FakeCardProvider(tmp_path / "p.db")
    try:
        with pytest.raises(ProviderTimeout):
            await provider.authorize("k", order_id="o", card="card-slow", amount=5, currency="EUR")
        r1 = await provider.authorize("k", order_id="o", card="card-slow", amount=5, currency="EUR")
        r2 = await provider.authorize("k", order_id="o", card="card-slow", amount=5, currency="EUR")
        assert r1 == r2 and await provider.lookup("k") == r1
        assert len(await provider.effects()) == 1 and await provider.calls("k") == 3
        # Explicit rules override the token's flags.
        provider.configure("card-plain", CardRules(decline=True))
        assert provider.rules("card-plain").decline
        assert CardRules.from_token("card-slow-novoid-3") == CardRules(slow=True, refuse_void=True)
    finally:
        provider.close()


async def test_flaky_provider_fails_transiently_then_answers_once(site: Site) -> None:
    async with services(site) as c:
        for attempt in (1, 2):
            out = await deliver(
                c.payment,
                command(
                    c.payment,
                    "AuthorizePayment",
                    pay("o-1", "card-flaky-1"),
                    step="authorize_payment",
                    attempt=attempt,
                ),
            )
            assert not out.ok and out.retryable
            assert await provider_ops(c, "o-1") == []
        out = await deliver(
            c.payment,
            command(
                c.payment,
                "AuthorizePayment",
                pay("o-1", "card-flaky-1"),
                step="authorize_payment",
                attempt=3,
            ),
        )
        assert out.ok and await provider_ops(c, "o-1") == [("authorize", 2500)]


async def test_void_releases_the_hold(site: Site) -> None:
    async with services(site) as c:
        await authorize(c, "o-1", "card-ok-1")
        out = await deliver(
            c.payment,
            command(c.payment, "VoidAuthorization", ref("o-1"), step="authorize_payment", rung=0),
        )
        assert out.result == {"voided": 2500}
        assert [a.status for a in await c.provider.authorizations("o-1")] == ["VOIDED"]
        assert (await invariants(c, {})).invariants["money"]


async def test_void_refused_moves_to_refund_which_releases_the_hold(site: Site) -> None:
    async with services(site) as c:
        await authorize(c, "o-1", "card-novoid-1")
        void = await deliver(
            c.payment,
            command(c.payment, "VoidAuthorization", ref("o-1"), step="authorize_payment", rung=0),
        )
        assert not void.ok and not void.retryable
        assert void.reason == "authorization cannot be voided"
        report = await invariants(c, {})
        assert not report.invariants["money"]  # the hold is still open here
        refund = await deliver(
            c.payment,
            command(c.payment, "RefundPayment", ref("o-1"), step="authorize_payment", rung=1),
        )
        assert refund.ok and refund.result == {"refunded": 0}
        assert [a.status for a in await c.provider.authorizations("o-1")] == ["RELEASED"]
        assert await ledger(c, "o-1") == {"authorize": 2500, "refund": 0}
        assert (await invariants(c, {})).invariants["money"]


async def test_captured_money_is_refunded_or_credited(site: Site) -> None:
    async with services(site) as c:
        for order_id, card in (("o-r", "card-ok-1"), ("o-c", "card-norefund-1")):
            saga = f"saga-{order_id}"
            await authorize(c, order_id, card, saga=saga)
            cap = await deliver(
                c.payment,
                command(
                    c.payment, "CapturePayment", ref(order_id), saga=saga, step="capture_payment"
                ),
            )
            assert cap.ok
            void = await deliver(
                c.payment,
                command(
                    c.payment,
                    "VoidAuthorization",
                    ref(order_id),
                    saga=saga,
                    step="authorize_payment",
                    rung=0,
                ),
            )
            assert not void.ok and "already captured" in void.reason
        refund = await deliver(
            c.payment,
            command(
                c.payment,
                "RefundPayment",
                ref("o-r"),
                saga="saga-o-r",
                step="authorize_payment",
                rung=1,
            ),
        )
        assert refund.result == {"refunded": 2500}
        refused = await deliver(
            c.payment,
            command(
                c.payment,
                "RefundPayment",
                ref("o-c"),
                saga="saga-o-c",
                step="authorize_payment",
                rung=1,
            ),
        )
        assert not refused.ok and not refused.retryable
        credit = await deliver(
            c.payment,
            command(
                c.payment,
                "IssueCreditNote",
                ref("o-c"),
                saga="saga-o-c",
                step="authorize_payment",
                rung=2,
            ),
        )
        assert credit.result == {"credited": 2500, "credit_note": "credit-note-o-c"}
        assert await ledger(c, "o-r") == {"authorize": 2500, "capture": 2500, "refund": 2500}
        assert await ledger(c, "o-c") == {"authorize": 2500, "capture": 2500, "credit": 2500}
        # The sums add up, but captured money went back with no saga, and so no person,
        # deciding it: after the pivot that is a violation of its own.
        money = [v for v in (await invariants(c, {})).violations if v.startswith("money:")]
        assert money == [
            f"money: order {o}: captured 2500, then refunded {r} and credited {cr} without a "
            "person's decision: a compensation after the pivot [no saga]"
            for o, r, cr in (("o-c", 0, 2500), ("o-r", 2500, 0))
        ]


async def test_credit_note_refuses_while_the_hold_is_open(site: Site) -> None:
    async with services(site) as c:
        await authorize(c, "o-1", "card-novoid-norefund-1")
        out = await deliver(
            c.payment,
            command(c.payment, "IssueCreditNote", ref("o-1"), step="authorize_payment", rung=2),
        )
        assert not out.ok and not out.retryable and "still open" in out.reason
        assert await ledger(c, "o-1") == {"authorize": 2500}


@pytest.mark.fault("F-REORDER")
async def test_compensation_before_action_leaves_tombstone(site: Site) -> None:
    async with services(site) as c:
        void = await deliver(
            c.payment,
            command(c.payment, "VoidAuthorization", ref("o-1"), step="authorize_payment", rung=0),
        )
        assert void.ok  # nothing to undo
        late = await authorize(c, "o-1", "card-ok-1")
        assert not late.ok and late.reason == REFUSED_AFTER_COMPENSATION
        assert await provider_ops(c, "o-1") == [] and await ledger(c, "o-1") == {}


async def test_compensation_after_a_provider_timeout_releases_the_hold(site: Site) -> None:
    async with services(site) as c:
        first = await authorize(c, "o-1", "card-slow-1")
        assert first.retryable  # the provider authorized, the answer was lost
        # The saga is cancelled before the retry: the step's outcome is unknown, so it
        # is compensated. The hold must be released.
        for attempt in (1, 2):  # a slow card times out the first void too
            void = await deliver(
                c.payment,
                command(
                    c.payment,
                    "VoidAuthorization",
                    ref("o-1"),
                    step="authorize_payment",
                    rung=0,
                    attempt=attempt,
                ),
            )
        assert void.ok and void.result == {"voided": 2500}, void
        assert [a.status for a in await c.provider.authorizations("o-1")] == ["VOIDED"]


# -- inventory -------------------------------------------------------------------------


def reserve(c: Checkout, order_id: str, sku: str = "sku-1", qty: int = 1) -> Envelope:
    return command(
        c.inventory,
        "ReserveInventory",
        {"order_id": order_id, "sku": sku, "qty": qty},
        saga=f"saga-{order_id}",
        step="reserve_inventory",
    )


async def stock(c: Checkout, sku: str = "sku-1") -> tuple[int, int, int, int]:
    got = await rows(
        c.inventory_store,
        "SELECT initial, available, reserved, shipped FROM stock WHERE sku = ?",
        (sku,),
    )
    initial, available, reserved, shipped = got[0]
    return initial, available, reserved, shipped


@pytest.mark.fault("F-LAST-ITEM")
async def test_last_item_goes_to_exactly_one_order(site: Site) -> None:
    async with services(site, {"sku-1": 1}) as c:
        outs = [await deliver(c.inventory, reserve(c, o)) for o in ("o-1", "o-2")]
        assert [o.ok for o in outs] == [True, False]
        assert outs[1].reason == inventory.OUT_OF_STOCK and not outs[1].retryable
        assert await stock(c) == (1, 0, 1, 0)
        unknown = await deliver(c.inventory, reserve(c, "o-3", sku="sku-nope"))
        assert not unknown.ok and "unknown sku" in unknown.reason


@pytest.mark.fault("F-LAST-ITEM")
def test_last_item_race_between_processes(site: Site) -> None:
    """Eight consumers, each with its own connection (as separate processes would have)."""

    async def setup() -> None:
        async with services(site, {"sku-1": 1}):
            pass

    asyncio.run(setup())
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def worker(i: int) -> None:
        async def run() -> bool:
            store = site.store("inventory")
            await store.open()
            try:
                p = inventory.build_inventory(store)
                barrier.wait()
                env = command(
                    p,
                    "ReserveInventory",
                    {"order_id": f"o-{i}", "sku": "sku-1", "qty": 1},
                    saga=f"saga-{i}",
                    step="reserve_inventory",
                )
                outcome = await deliver(p, env)
                return outcome.ok
            finally:
                await store.close()

        results.append(asyncio.run(run()))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]

    async def check() -> None:
        store = site.store("inventory")
        await store.open()
        try:
            assert await rows(store, "SELECT available, reserved FROM stock") == [(0, 1)]
            assert await rows(store, "SELECT COUNT(*) FROM reservations") == [(1,)]
        finally:
            await store.close()

    asyncio.run(check())


async def test_release_and_commit(site: Site) -> None:
    async with services(site, {"sku-1": 5}) as c:
        await inventory.seed_stock(c.inventory_store, {"sku-1": 99})  # idempotent: ignored
        assert (await deliver(c.inventory, reserve(c, "o-1", qty=2))).ok
        assert (await deliver(c.inventory, reserve(c, "o-2", qty=3))).ok
        assert await stock(c) == (5, 0, 5, 0)
        rel = command(
            c.inventory,
            "ReleaseInventory",
            ref("o-1"),
            saga="saga-o-1",
            step="reserve_inventory",
            rung=0,
        )
        assert (await deliver(c.inventory, rel)).result == {"released": 2}
        commit = command(
            c.inventory, "CommitReservation", ref("o-2"), saga="saga-o-2", step="commit_inventory"
        )
        assert (await deliver(c.inventory, commit)).result == {"sku": "sku-1", "shipped": 3}
        # Committed already, asked again under another key: same answer, no second move.
        again = command(
            c.inventory, "CommitReservation", ref("o-2"), saga="saga-other", step="commit_inventory"
        )
        assert (await deliver(c.inventory, again)).result == {"sku": "sku-1", "shipped": 3}
        assert await stock(c) == (5, 2, 0, 3)
        status = await rows(
            c.inventory_store, "SELECT order_id, status FROM reservations ORDER BY order_id"
        )
        assert status == [("o-1", "RELEASED"), ("o-2", "COMMITTED")]


@pytest.mark.fault("F-REORDER")
async def test_release_before_reserve_refuses_the_late_reservation(site: Site) -> None:
    async with services(site, {"sku-1": 1}) as c:
        rel = command(
            c.inventory,
            "ReleaseInventory",
            ref("o-1"),
            saga="saga-o-1",
            step="reserve_inventory",
            rung=0,
        )
        assert (await deliver(c.inventory, rel)).ok  # nothing to undo
        late = await deliver(c.inventory, reserve(c, "o-1"))
        assert not late.ok and late.reason == REFUSED_AFTER_COMPENSATION
        assert await stock(c) == (1, 1, 0, 0)
        assert await rows(c.inventory_store, "SELECT * FROM reservations") == []


async def hold_in_transaction(store: Any, statements: list[str], held: asyncio.Event) -> None:
    """Run ``statements`` in one transaction, set ``held``, and commit 0.3 s later: another
    transaction meets them uncommitted (PostgreSQL) or waits for the store (SQLite)."""
    async with store.transaction() as tx:
        for statement in statements:
            await tx.execute(statement)
        held.set()
        await asyncio.sleep(0.3)


async def test_a_commit_racing_the_sweeper_moves_no_unit_twice(site: Site) -> None:
    """The sweeper expires a reservation while CommitReservation handles it: on
    PostgreSQL the handler reads it RESERVED, its conditional UPDATE waits for the
    sweeper, finds it EXPIRED and fails; the units move once."""
    async with services(site, {"sku-1": 2}) as c:
        for o in ("o-1", "o-2"):
            assert (await deliver(c.inventory, reserve(c, o))).ok
        held = asyncio.Event()
        sweeper = asyncio.create_task(
            hold_in_transaction(
                c.inventory_store,
                [
                    "UPDATE reservations SET status = 'EXPIRED' "
                    "WHERE order_id = 'o-1' AND status = 'RESERVED'",
                    "UPDATE stock SET available = available + 1, reserved = reserved - 1 "
                    "WHERE sku = 'sku-1'",
                ],
                held,
            )
        )
        await held.wait()
        late = command(
            c.inventory, "CommitReservation", ref("o-1"), saga="saga-o-1", step="commit_inventory"
        )
        out = await deliver(c.inventory, late)
        await sweeper
        assert not out.ok and out.reason == "the reservation of order o-1 expired"
        assert await stock(c) == (2, 1, 1, 0)  # o-2 still holds its unit
        assert await rows(
            c.inventory_store, "SELECT order_id, status FROM reservations ORDER BY order_id"
        ) == [("o-1", "EXPIRED"), ("o-2", "RESERVED")]


async def test_complete_racing_a_cancel_shows_one_final_status(site: Site) -> None:
    async with services(site) as c:
        data = {"order_id": "o-1", "customer": "cust-7", "sku": "sku-1", "qty": 1, "amount": 900}
        assert (
            await deliver(c.order, command(c.order, "CreateOrder", data, step="create_order"))
        ).ok
        held = asyncio.Event()
        cancel = asyncio.create_task(
            hold_in_transaction(
                c.order_store,
                [
                    "UPDATE orders SET status = 'CANCELLED' "
                    "WHERE order_id = 'o-1' AND status = 'CREATED'",
                    "INSERT INTO order_status_history (order_id, seq, status, at) "
                    "VALUES ('o-1', 2, 'CANCELLED', 0.0)",
                ],
                held,
            )
        )
        await held.wait()
        out = await deliver(
            c.order, command(c.order, "CompleteOrder", ref("o-1"), step="complete_order")
        )
        await cancel
        assert not out.ok and "was cancelled" in out.reason
        assert await rows(c.order_store, "SELECT status FROM orders") == [("CANCELLED",)]
        assert await rows(
            c.order_store, "SELECT seq, status FROM order_status_history ORDER BY seq"
        ) == [(1, "CREATED"), (2, "CANCELLED")]


# -- shipping --------------------------------------------------------------------------


def ship(c: Checkout, order_id: str, address: str, attempt: int = 1) -> Envelope:
    payload = {"order_id": order_id, "ship_to": address, "sku": "sku-1", "qty": 1}
    return command(
        c.shipping,
        "CreateShipment",
        payload,
        saga=f"saga-{order_id}",
        step="create_shipment",
        attempt=attempt,
    )


async def test_shipping_bad_address_and_flaky_carrier(site: Site) -> None:
    async with services(site) as c:
        bad = await deliver(c.shipping, ship(c, "o-bad", "addr-bad-1"))
        assert not bad.ok and bad.reason == "bad address" and not bad.retryable
        for attempt in (1, 2):
            down = await deliver(c.shipping, ship(c, "o-fl", "addr-flaky-1", attempt))
            assert not down.ok and down.retryable
        up = await deliver(c.shipping, ship(c, "o-fl", "addr-flaky-1", 3))
        assert up.ok and up.result["carrier"] in shipping.CARRIERS
        cancel = command(
            c.shipping,
            "CancelShipment",
            ref("o-fl"),
            saga="saga-o-fl",
            step="create_shipment",
            rung=0,
        )
        assert (await deliver(c.shipping, cancel)).result == {"cancelled": True}
        assert await rows(c.shipping_store, "SELECT order_id, status FROM shipments") == [
            ("o-fl", "CANCELLED")
        ]


def test_carrier_outages_are_deterministic() -> None:
    pairs = [(f"o-{i}", a) for i in range(400) for a in (1, 2)]
    down = [shipping.carrier_down(o, a, 0.25) for o, a in pairs]
    assert down == [shipping.carrier_down(o, a, 0.25) for o, a in pairs]
    assert 0.15 < sum(down) / len(down) < 0.35
    assert not any(shipping.carrier_down(o, a, 0.0) for o, a in pairs)


# -- invariants ------------------------------------------------------------------------


def order_data(
    card: str = "card-ok-1", address: str = "addr-ok-1", sku: str = "sku-1", amount: int = 1500
) -> dict[str, Any]:
    return {
        "customer": "cust-1",
        "sku": sku,
        "qty": 1,
        "amount": amount,
        "currency": "EUR",
        "card": card,
        "ship_to": address,
    }


async def drain(c: Checkout, quiet: float = 0.2, limit: float = 20.0) -> None:
    """Wait until no outbox row is pending and no mailbox holds a message."""
    stores = [c.orchestrator_store, *c.service_stores.values()]
    end, calm = time.monotonic() + limit, time.monotonic()
    while time.monotonic() < end:
        busy = sum([await s.outbox_pending() + await s.queue_depth() for s in stores])
        if busy:
            calm = time.monotonic()
        elif time.monotonic() - calm >= quiet:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the checkout did not go quiet")


SCENARIOS = {
    "o-ok": (order_data(), SagaState.SUCCEEDED),
    "o-declined": (order_data(card="card-decline-1"), SagaState.COMPENSATED),
    "o-slow": (order_data(card="card-slow-1"), SagaState.SUCCEEDED),
    "o-novoid": (order_data(card="card-novoid-1", address="addr-bad-1"), SagaState.COMPENSATED),
    "o-flaky": (order_data(address="addr-flaky-1"), SagaState.SUCCEEDED),
    "o-last-1": (order_data(sku="sku-last"), None),
    "o-last-2": (order_data(sku="sku-last"), None),
}
STOCK = {"sku-1": 10, "sku-last": 1}


async def run_sagas(site: Site) -> None:
    c = site.checkout()
    async with checkout_engine(c, idle_poll=0.05) as engine:
        await migrate(c, initial_stock=STOCK)
        started = {o: await engine.start(CHECKOUT, o, data) for o, (data, _) in SCENARIOS.items()}
        done = {o: await engine.wait(inst.saga_id, timeout=30) for o, inst in started.items()}
        await drain(c)
    c.provider.close()
    for o, (_, expected) in SCENARIOS.items():
        if expected is not None:
            assert done[o].state is expected, (o, done[o].state, done[o].reason)
    last = sorted(done[o].state.value for o in ("o-last-1", "o-last-2"))
    assert last == ["COMPENSATED", "SUCCEEDED"]


async def test_invariants_hold_after_a_clean_run(site: Site) -> None:
    await run_sagas(site)
    async with services(site) as c:
        report = await invariants(c, STOCK)
        assert report.ok, str(report)
        assert report.violations == []
        assert set(report.invariants) == {
            "money",
            "stock",
            "terminal",
            "effect_once",
            "honest_status",
            "nothing_lost",
        }
        assert await ledger(c, "o-novoid") == {"authorize": 1500, "refund": 0}
        assert await ledger(c, "o-slow") == {"authorize": 1500, "capture": 1500}


async def test_invariants_catch_planted_violations(site: Site) -> None:
    await run_sagas(site)
    # A second capture under another key at the provider: money taken twice.
    conn = sqlite3.connect(site.path / "provider.db")
    with conn:
        conn.execute(
            "INSERT INTO effects (key, order_id, op, authorization, amount, at) "
            "SELECT 'rogue-key', order_id, op, authorization, amount, at FROM effects "
            "WHERE order_id = 'o-ok' AND op = 'capture'"
        )
    conn.close()
    # Stock below zero (past the CHECK constraints, as a bug in raw SQL would be) and a
    # reservation left behind by a compensated saga.
    past_checks = (
        "ALTER TABLE stock DROP CONSTRAINT stock_available_check"
        if site.postgres
        else "PRAGMA ignore_check_constraints = ON"
    )
    site.plant(
        "inventory",
        past_checks,
        "UPDATE stock SET available = -1, initial = initial - available - 1 WHERE sku = 'sku-1'",
        "UPDATE reservations SET status = 'RESERVED' WHERE order_id = ("
        "SELECT order_id FROM reservations WHERE status = 'RELEASED' LIMIT 1)",
    )
    # A message the relay never published.
    site.plant(
        "order", "UPDATE outbox SET published_at = NULL WHERE id = (SELECT MIN(id) FROM outbox)"
    )
    # The shipment of a completed order vanishes: COMPLETED was shown dishonestly.
    site.plant("shipping", "DELETE FROM shipments WHERE order_id = 'o-ok'")
    site.plant("orchestrator", "UPDATE sagas SET state = 'RUNNING' WHERE business_key = 'o-flaky'")

    async with services(site) as c:
        report = await invariants(c, STOCK)
    assert {k for k, ok in report.invariants.items() if not ok} == set(report.invariants)
    text = "\n".join(report.violations)
    assert "effect_once: order o-ok: 2 capture effects in the provider's ledger" in text
    assert "money: order o-ok: captured 3000" in text
    assert "stock: sku sku-1: negative stock" in text
    assert "outlives its saga" in text
    assert "terminal: order o-flaky" in text
    assert "honest_status: order o-ok" in text and "without shipment created" in text
    assert "nothing_lost: message" in text and "never published" in text


async def test_thirty_demo_orders_end_to_end(site: Site) -> None:
    """The embedded engine, the four participants and the orchestrator on this site's
    stores: 30 orders of the demo's mix, every saga terminal, every invariant true."""
    specs, initial = make_orders(30, seed=7)
    c = site.checkout()
    # The production saga with backoffs of at most 0.2 s instead of 2 s: every scenario
    # takes the same path (the same attempts, command timeouts and status queries), in
    # seconds instead of the twenty a provider that never answers holds its saga.
    definition = checkout_definition(
        retry=dataclasses.replace(RETRY, max_backoff=0.2),
        forward=dataclasses.replace(FORWARD, max_backoff=0.2),
    )
    async with checkout_engine(c, definition=definition, idle_poll=0.05) as engine:
        await migrate(c, initial_stock=initial)
        started = [await engine.start(CHECKOUT, s.order_id, s.data) for s in specs]
        done = [await engine.wait(inst.saga_id, timeout=DEADLINE + 60) for inst in started]
        await drain(c)
        assert all(d.terminal for d in done), [(d.business_key, d.state) for d in done]
        report = await invariants(c, initial)
        counts = await c.orchestrator_store.count_sagas()
    c.provider.close()
    assert report.ok, str(report)
    assert report.violations == []
    assert sum(counts.values()) == 30 and all(state.terminal for state in counts)


def test_status_order_rules() -> None:
    ok = [
        ("PENDING_PAYMENT", "PENDING_SHIPMENT"),
        ("COMPLETING", "CANCELLING"),
        ("CANCELLING", "CANCELLED"),
        ("COMPLETED", "NEEDS_ATTENTION"),
        ("CANCELLING", "NEEDS_ATTENTION"),
    ]
    bad = [
        ("PENDING_SHIPMENT", "PENDING_PAYMENT"),
        ("COMPLETED", "CANCELLING"),
        ("CANCELLING", "COMPLETED"),
        ("NEEDS_ATTENTION", "CANCELLED"),
        ("CANCELLED", "PENDING_PAYMENT"),
    ]
    assert all(status_step_allowed(a, b) for a, b in ok)
    assert not any(status_step_allowed(a, b) for a, b in bad)


# -- payment status queries ------------------------------------------------------------


def status_query(
    c: Checkout, order_id: str, step: str, saga: str = "saga-1", action_key: str | None = None
) -> Envelope:
    """GetPaymentStatus as the orchestrator sends it when an action's outcome is unknown."""
    payload = {"order_id": order_id, "action_key": action_key or f"{saga}:{step}:action"}
    return command(c.payment, "GetPaymentStatus", payload, saga=saga, step=step).with_changes(
        kind=MessageKind.QUERY, idempotency_key=f"{saga}:{step}:query"
    )


async def test_payment_status_answers_done_with_the_actions_result(site: Site) -> None:
    async with services(site) as c:
        auth = await authorize(c, "o-1", "card-ok-1")
        out = await deliver(c.payment, status_query(c, "o-1", "authorize_payment"))
        assert out.ok and out.result == {"state": "done", "result": auth.result}
        cap = await deliver(
            c.payment, command(c.payment, "CapturePayment", ref("o-1"), step="capture_payment")
        )
        out = await deliver(c.payment, status_query(c, "o-1", "capture_payment"))
        assert out.result == {"state": "done", "result": cap.result}
        # A query has no effect and is not remembered under a key: asking again answers again.
        again = await deliver(c.payment, status_query(c, "o-1", "capture_payment"))
        assert again.result == out.result
        assert await provider_ops(c, "o-1") == [("authorize", 2500), ("capture", 2500)]


async def test_payment_status_answers_failed_and_not_found(site: Site) -> None:
    async with services(site) as c:
        await authorize(c, "o-d", "card-decline-1", saga="saga-d")
        declined = await deliver(c.payment, status_query(c, "o-d", "authorize_payment", "saga-d"))
        assert declined.result == {"state": "failed", "reason": "card declined"}
        never = await deliver(c.payment, status_query(c, "o-n", "authorize_payment", "saga-n"))
        assert never.result == {"state": "not_found"}
        # Only transient failures at the provider: nothing happened there either.
        flaky = await authorize(c, "o-f", "card-flaky-1", saga="saga-f")
        assert flaky.retryable
        out = await deliver(c.payment, status_query(c, "o-f", "authorize_payment", "saga-f"))
        assert out.result == {"state": "not_found"}
        # Compensated before it arrived: the action will be refused whenever it comes.
        await deliver(
            c.payment,
            command(
                c.payment,
                "VoidAuthorization",
                ref("o-t"),
                saga="saga-t",
                step="authorize_payment",
                rung=0,
            ),
        )
        tomb = await deliver(c.payment, status_query(c, "o-t", "authorize_payment", "saga-t"))
        assert tomb.result["state"] == "failed"
        assert "compensated before it arrived" in tomb.result["reason"]


@pytest.mark.fault("F-MESSAGE-LOST")
async def test_payment_status_learns_a_lost_answer_from_the_provider(site: Site) -> None:
    """The provider authorized, then timed out: the handler failed (retryably) and kept
    no ledger row. The status query finds the effect under the key and records it, so
    the capture that follows finds its authorization."""
    async with services(site) as c:
        first = await authorize(c, "o-1", "card-slow-1")
        assert first.retryable and await ledger(c, "o-1") == {}
        out = await deliver(c.payment, status_query(c, "o-1", "authorize_payment"))
        auths = await c.provider.authorizations("o-1")
        assert out.result == {
            "state": "done",
            "result": {"authorization": auths[0].authorization, "amount": 2500},
        }
        assert await ledger(c, "o-1") == {"authorize": 2500}
        again = await deliver(c.payment, status_query(c, "o-1", "authorize_payment"))
        assert again.result == out.result and await ledger(c, "o-1") == {"authorize": 2500}
        cap = command(c.payment, "CapturePayment", ref("o-1"), step="capture_payment")
        assert (await deliver(c.payment, cap)).retryable  # slow: captured, answer lost
        out = await deliver(c.payment, status_query(c, "o-1", "capture_payment"))
        assert out.result == {"state": "done", "result": {"captured": 2500}}
        assert await ledger(c, "o-1") == {"authorize": 2500, "capture": 2500}
        assert await provider_ops(c, "o-1") == [("authorize", 2500), ("capture", 2500)]
        report = await invariants(c, {})
        assert report.invariants["effect_once"]
        # The payment ledger agrees with the provider (the order itself never completed
        # here, which the money check rightly reports).
        assert not any("disagrees with the provider" in v for v in report.violations)


# -- failures after the pivot, and a provider that answers nothing ------------------------


def commit(c: Checkout, order_id: str, attempt: int = 1) -> Envelope:
    return command(
        c.inventory,
        "CommitReservation",
        ref(order_id),
        saga=f"saga-{order_id}",
        step="commit_inventory",
        attempt=attempt,
    )


async def test_the_warehouse_commit_fails_as_the_sku_token_says(site: Site) -> None:
    skus = {"sku-wh-flaky-1": 5, "sku-wh-down-1": 5, "sku-recalled-1": 5}
    async with services(site, skus) as c:
        for o, sku in (
            ("o-fl", "sku-wh-flaky-1"),
            ("o-dn", "sku-wh-down-1"),
            ("o-rc", "sku-recalled-1"),
        ):
            assert (await deliver(c.inventory, reserve(c, o, sku=sku))).ok
        for attempt in (1, 2):
            out = await deliver(c.inventory, commit(c, "o-fl", attempt))
            assert not out.ok and out.retryable and "did not confirm the pick" in out.reason
        out = await deliver(c.inventory, commit(c, "o-fl", 3))
        assert out.result == {"sku": "sku-wh-flaky-1", "shipped": 1}
        for attempt in range(1, 8):
            out = await deliver(c.inventory, commit(c, "o-dn", attempt))
            assert not out.ok and out.retryable, attempt
        recalled = await deliver(c.inventory, commit(c, "o-rc"))
        assert not recalled.ok and not recalled.retryable and "recalled" in recalled.reason
        # Nothing moved for the failed commits: their units stay reserved for a person.
        assert await stock(c, "sku-wh-flaky-1") == (5, 4, 0, 1)
        assert await stock(c, "sku-wh-down-1") == (5, 4, 1, 0)
        assert await stock(c, "sku-recalled-1") == (5, 4, 1, 0)


async def test_completing_an_order_checks_the_customers_account(site: Site) -> None:
    async with services(site) as c:
        for o, customer in (("o-lk", "cust-locked-1"), ("o-fz", "cust-frozen-1")):
            data = {"order_id": o, "customer": customer, "sku": "sku-1", "qty": 1, "amount": 900}
            create = command(c.order, "CreateOrder", data, saga=f"saga-{o}", step="create_order")
            assert (await deliver(c.order, create)).ok

        def complete(o: str, attempt: int) -> Envelope:
            return command(
                c.order,
                "CompleteOrder",
                ref(o),
                saga=f"saga-{o}",
                step="complete_order",
                attempt=attempt,
            )

        for attempt in (1, 2):
            out = await deliver(c.order, complete("o-lk", attempt))
            assert not out.ok and out.retryable and "locked" in out.reason
        out = await deliver(c.order, complete("o-lk", 3))
        assert out.result == {"order_id": "o-lk", "status": "COMPLETED"}
        frozen = await deliver(c.order, complete("o-fz", 1))
        assert not frozen.ok and not frozen.retryable and "frozen" in frozen.reason
        got = await rows(c.order_store, "SELECT order_id, status FROM orders ORDER BY order_id")
        assert got == [("o-fz", "CREATED"), ("o-lk", "COMPLETED")]


@pytest.mark.fault("F-PROVIDER-OUTAGE")
async def test_a_provider_that_answers_nothing(tmp_path: Path) -> None:
    assert CardRules.from_token("card-mutevoid-1") == CardRules(mute_void=True)
    assert CardRules.from_token("card-mutecapture-nolookup-3") == CardRules(
        mute_capture=True, mute_lookup=True
    )
    provider = FakeCardProvider(tmp_path / "p.db")
    try:
        auth = await provider.authorize(
            "a", order_id="o", card="card-mutevoid-1", amount=5, currency="EUR"
        )
        for _ in range(3):
            with pytest.raises(ProviderTimeout):
                await provider.void("v", authorization=auth.authorization)
        # Carried out once, on the first call, and never answered; its lookup tells.
        assert [e.op for e in await provider.effects()] == ["authorize", "void"]
        assert await provider.calls("v") == 3
        looked = await provider.lookup("v")
        assert looked is not None and looked.op == "void"
        rules = CardRules(mute_capture=True, mute_lookup=True)
        provider.configure("card-plain", rules)
        assert provider.rules("card-plain") == rules
        auth2 = await provider.authorize(
            "a2", order_id="o2", card="card-plain", amount=7, currency="EUR"
        )
        with pytest.raises(ProviderTimeout):
            await provider.capture("c2", authorization=auth2.authorization)
        for key in ("c2", "a2"):  # no lookup of the card's keys is answered
            with pytest.raises(ProviderTimeout):
                await provider.lookup(key)
        assert [e.op for e in await provider.effects("o2")] == ["authorize", "capture"]
    finally:
        provider.close()


@pytest.mark.fault("F-PROVIDER-OUTAGE")
async def test_a_provider_out_of_reach_does_nothing_until_the_outage_ends(
    tmp_path: Path,
) -> None:
    assert CardRules.from_token("card-outage-1") == CardRules(outage_requests=OUTAGE_REQUESTS)
    provider = FakeCardProvider(tmp_path / "p.db")
    try:
        # Calls and lookups of the key count together; none is answered or has an effect.
        for _ in range(OUTAGE_REQUESTS // 2):
            with pytest.raises(ProviderTimeout, match="out of reach"):
                await provider.authorize(
                    "a", order_id="o", card="card-outage-1", amount=5, currency="EUR"
                )
            with pytest.raises(ProviderTimeout, match="out of reach"):
                await provider.lookup("a")
        assert await provider.calls("a") == OUTAGE_REQUESTS
        assert await provider.effects() == [] and await provider.authorizations() == []
        # Over: asking tells that nothing happened, and the next call gets through.
        assert await provider.lookup("a") is None
        auth = await provider.authorize(
            "a", order_id="o", card="card-outage-1", amount=5, currency="EUR"
        )
        assert [e.op for e in await provider.effects()] == ["authorize"]
        assert await provider.lookup("a") == auth
        assert await provider.lookup("never-asked") is None
    finally:
        provider.close()


@pytest.mark.fault("F-CANCEL-RACE")
async def test_a_retry_after_an_outage_is_refused_once_a_void_overtook_it(site: Site) -> None:
    """The outage leaves the authorization's outcome unknown (every call and question
    unanswered); a person retries it, the customer cancels, and the void gets there
    first: it finds nothing to undo and tombstones the key, so the retry is refused,
    never carried out after its undo."""
    async with services(site) as c:
        card = "card-outage-1"
        for attempt in range(1, 7):
            out = await deliver(
                c.payment,
                command(
                    c.payment,
                    "AuthorizePayment",
                    pay("o-1", card),
                    step="authorize_payment",
                    attempt=attempt,
                ),
            )
            assert not out.ok and out.retryable
        for _ in range(6):
            asked = await deliver(c.payment, status_query(c, "o-1", "authorize_payment"))
            assert not asked.ok and asked.retryable and "did not answer" in asked.reason
        retried = {MANUAL_RETRY: "1"}
        void = command(
            c.payment, "VoidAuthorization", ref("o-1"), step="authorize_payment", rung=0
        ).with_changes(headers=retried)
        assert (await deliver(c.payment, void)).result == {"voided": 0}
        retry = command(
            c.payment, "AuthorizePayment", pay("o-1", card), step="authorize_payment", attempt=7
        ).with_changes(headers=retried)
        refused = await deliver(c.payment, retry)
        assert not refused.ok and not refused.retryable
        assert refused.reason == REFUSED_AFTER_COMPENSATION
        assert await provider_ops(c, "o-1") == [] and await ledger(c, "o-1") == {}


async def test_a_provider_file_from_before_the_mute_rules_gets_them(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "CREATE TABLE card_rules (card TEXT PRIMARY KEY, decline INTEGER NOT NULL, "
            "transient_calls INTEGER NOT NULL, slow INTEGER NOT NULL, "
            "refuse_void INTEGER NOT NULL, refuse_refund INTEGER NOT NULL)"
        )
        conn.execute("INSERT INTO card_rules VALUES ('card-plain', 1, 0, 0, 0, 0)")
        conn.execute(
            "CREATE TABLE requests (key TEXT PRIMARY KEY, op TEXT NOT NULL, "
            "calls INTEGER NOT NULL, outcome TEXT, at REAL NOT NULL)"
        )
    conn.close()
    provider = FakeCardProvider(path)
    try:
        assert provider.rules("card-plain") == CardRules(decline=True)
        provider.configure("card-other", CardRules(mute_void=True))
        assert provider.rules("card-other") == CardRules(mute_void=True)
        provider.configure("card-down", CardRules(outage_requests=1))
        assert provider.rules("card-down") == CardRules(outage_requests=1)
        # The requests table gets the card column: the outage counts the lookup too.
        with pytest.raises(ProviderTimeout):
            await provider.authorize("a", order_id="o", card="card-down", amount=5, currency="EUR")
        assert await provider.lookup("a") is None
    finally:
        provider.close()


async def test_a_void_never_answered_stays_unknown_and_the_books_say_so(site: Site) -> None:
    async with services(site) as c:
        await authorize(c, "o-1", "card-mutevoid-nolookup-1")
        for attempt in (1, 2, 3):
            void = command(
                c.payment, "VoidAuthorization", ref("o-1"), step="authorize_payment", rung=0
            ).with_changes(attempt=attempt)
            out = await deliver(c.payment, void)
            assert not out.ok and out.retryable
        assert [a.status for a in await c.provider.authorizations("o-1")] == ["VOIDED"]
        assert await ledger(c, "o-1") == {"authorize": 2500}
        # No saga hands the order to a person here: books that do not know of a void the
        # provider did are a violation (under a saga in the manual queue, a note).
        report = await invariants(c, {})
        assert (
            "money: order o-1: payment ledger (void 0) disagrees with the provider (void 2500)"
            " [no saga]" in report.violations
        )


async def test_a_capture_never_answered_is_learned_by_asking_unless_that_is_unanswered_too(
    site: Site,
) -> None:
    async with services(site) as c:
        for o, card in (("o-1", "card-mutecapture-1"), ("o-2", "card-mutecapture-nolookup-1")):
            await authorize(c, o, card, saga=f"saga-{o}")
            for attempt in (1, 2):
                cap = command(
                    c.payment,
                    "CapturePayment",
                    ref(o),
                    saga=f"saga-{o}",
                    step="capture_payment",
                    attempt=attempt,
                )
                out = await deliver(c.payment, cap)
                assert not out.ok and out.retryable
        asked = await deliver(c.payment, status_query(c, "o-1", "capture_payment", "saga-o-1"))
        assert asked.result == {"state": "done", "result": {"captured": 2500}}
        assert await ledger(c, "o-1") == {"authorize": 2500, "capture": 2500}
        dark = await deliver(c.payment, status_query(c, "o-2", "capture_payment", "saga-o-2"))
        assert not dark.ok and dark.retryable and "did not answer" in dark.reason
        assert await ledger(c, "o-2") == {"authorize": 2500}
        assert await provider_ops(c, "o-2") == [("authorize", 2500), ("capture", 2500)]


TOKENS = {
    "commit_flaky": ("sku", "sku-wh-flaky-"),
    "commit_stuck": ("sku", "sku-wh-down-"),
    "commit_refused": ("sku", "sku-recalled-"),
    "complete_flaky": ("customer", "cust-locked-"),
    "complete_refused": ("customer", "cust-frozen-"),
    "void_unanswered": ("card", "card-mutevoid-nolookup-"),
    "capture_unanswered": ("card", "card-mutecapture-"),
    "provider_dark": ("card", "card-mutecapture-nolookup-"),
    "authorize_outage": ("card", "card-outage-"),
}


def test_every_demo_scenario_is_chosen_by_tokens_only() -> None:
    token = re.compile(r"^[a-z]+-[A-Za-z0-9_.:\-]+$")
    for name, _ in DEMO_SCENARIOS:
        specs, initial = make_orders(6, seed=1, scenarios=[(name, 1)])
        assert {s.scenario for s in specs} == {name}
        for spec in specs:
            d = spec.data
            assert all(token.match(d[k]) for k in ("customer", "card", "ship_to", "sku")), d
            assert d["sku"] in initial
            if name in TOKENS:
                field, prefix = TOKENS[name]
                assert d[field].startswith(prefix), (name, d)
    with pytest.raises(ValueError, match="unknown scenarios"):
        make_orders(1, seed=1, scenarios=[("meteor_strike", 1)])


QUICK = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)
AFTER_THE_PIVOT: dict[str, tuple[dict[str, Any], SagaState, str]] = {
    "o-pick-flaky": (order_data(sku="sku-wh-flaky-1"), SagaState.SUCCEEDED, ""),
    "o-pick-down": (
        order_data(sku="sku-wh-down-1"),
        SagaState.FAILED_NEEDS_MANUAL,
        "step 'commit_inventory' failed after the pivot: the warehouse did not confirm",
    ),
    "o-recalled": (
        order_data(sku="sku-recalled-1"),
        SagaState.FAILED_NEEDS_MANUAL,
        "step 'commit_inventory' failed after the pivot: sku-recalled-1 was recalled",
    ),
    "o-locked": (order_data() | {"customer": "cust-locked-1"}, SagaState.SUCCEEDED, ""),
    "o-frozen": (
        order_data() | {"customer": "cust-frozen-1"},
        SagaState.FAILED_NEEDS_MANUAL,
        "step 'complete_order' failed after the pivot: the account of customer cust-frozen-1",
    ),
    "o-capture-mute": (order_data(card="card-mutecapture-1"), SagaState.SUCCEEDED, ""),
    "o-dark": (
        order_data(card="card-mutecapture-nolookup-1"),
        SagaState.FAILED_NEEDS_MANUAL,
        "outcome of step 'capture_payment' still unknown after 4 status queries",
    ),
    # Before the pivot: the provider out of reach for every call and question (4 + 4 here).
    "o-outage": (
        order_data(card="card-outage-1"),
        SagaState.FAILED_NEEDS_MANUAL,
        "outcome of step 'authorize_payment' still unknown after 4 status queries",
    ),
    # Compensations have no status query: even though the lookup would answer, a void of
    # unknown outcome goes to a person, and never on to the refund.
    "o-void-mute": (
        order_data(card="card-mutevoid-1", address="addr-bad-1"),
        SagaState.FAILED_NEEDS_MANUAL,
        "of step 'authorize_payment' failed 4 times",
    ),
}


async def test_failures_after_the_pivot_and_a_silent_provider_end_to_end(site: Site) -> None:
    """Forward recovery after the capture, a person when it fails for good or keeps
    failing (never a compensation), and the ladder's rule: unknown goes to a person."""
    initial = {"sku-1": 10, "sku-wh-flaky-1": 5, "sku-wh-down-1": 5, "sku-recalled-1": 5}
    definition = checkout_definition(timeout=1.0, retry=QUICK, forward=QUICK)
    c = site.checkout()
    async with checkout_engine(c, definition=definition, idle_poll=0.05) as engine:
        await migrate(c, initial_stock=initial)
        started = {
            o: await engine.start(CHECKOUT, o, d) for o, (d, _, _) in AFTER_THE_PIVOT.items()
        }
        done = {o: await engine.wait(i.saga_id, timeout=60) for o, i in started.items()}
        await drain(c)
        report = await invariants(c, initial)
        histories = {o: await c.orchestrator_store.history(i.saga_id) for o, i in done.items()}
    c.provider.close()
    assert report.ok, str(report)
    for o, (_, state, reason) in AFTER_THE_PIVOT.items():
        assert done[o].state is state, (o, done[o].state, done[o].reason)
        assert reason in (done[o].reason or ""), (o, done[o].reason)
    for o, history in histories.items():
        events = [h.event for h in history]
        if o != "o-void-mute":
            assert not any(e.startswith("compensation.") for e in events), (o, events)
    void_mute = [h.event for h in histories["o-void-mute"]]
    assert "compensation.failed" in void_mute and "compensation.escalated" not in void_mute
    assert void_mute[-1] in ("manual.escalated", "saga.finished")
    assert "outcome unknown" in (done["o-void-mute"].reason or "")
    # In the manual queue, the money and stock checks leave the orders to the person.
    assert any("left to the person on duty" in n for n in report.notes)


async def test_payment_status_refuses_a_bad_action_key(site: Site) -> None:
    async with services(site) as c:
        bad = status_query(c, "o-1", "authorize_payment").with_changes(
            payload={"order_id": "o-1", "action_key": 42}
        )
        out = await deliver(c.payment, bad)
        assert not out.ok and "'action_key' must be a key" in out.reason


def test_checkout_payment_steps_have_a_status_query() -> None:
    d = checkout_definition()
    for name in ("authorize_payment", "capture_payment"):
        query = d.steps[d.step_index(name)].status_query
        assert isinstance(query, CommandAction)
        assert (query.endpoint, query.type) == ("payment", "GetPaymentStatus")
    assert all(
        d.steps[d.step_index(n)].status_query is None
        for n in ("create_order", "reserve_inventory", "create_shipment", "commit_inventory")
    )
    short = checkout_definition(deadline=5, timeout=0.5)
    assert short.deadline == 5 and {s.timeout for s in short.steps} == {0.5}
    assert {r.timeout for s in short.steps for r in s.ladder} == {0.5}


def test_checkout_waits_longer_for_each_attempt_so_a_backlog_is_not_a_loss() -> None:
    """A burst's queue is not mistaken for lost commands: ~90 s before "unknown"."""
    d = checkout_definition()
    step = d.steps[d.step_index("authorize_payment")]
    waits = [step.retry.timeout(step.timeout, a) for a in range(1, step.retry.max_attempts + 1)]
    assert waits == [2, 4, 8, 16, 30, 30]
    rung = step.ladder[0]
    assert rung.retry.timeout(rung.timeout, 3) == 8


def test_worker_command_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from sagakit_checkout import app

    from sagakit import cli_processes

    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser(prog="sagakit")
        cli_processes.register(parser.add_subparsers(dest="command", required=True), lambda c: app)
        return parser.parse_args(["worker", "--app", "sagakit_checkout:app", *argv])

    monkeypatch.delenv("SAGAKIT_COMMAND_TIMEOUT", raising=False)
    assert parse().command_timeout is None
    assert parse("--command-timeout", "5").command_timeout == 5.0
    monkeypatch.setenv("SAGAKIT_COMMAND_TIMEOUT", "7.5")
    assert parse().command_timeout == 7.5
    for bad in ("0", "-1", "inf", "soon"):
        with pytest.raises(SystemExit):
            parse("--command-timeout", bad)
    engine = deploy.build_worker(
        "postgresql://127.0.0.1/none", "nats://127.0.0.1:1", command_timeout=5.0
    )
    (definition,) = engine.orchestrator.latest.values()
    assert {s.timeout for s in definition.steps} == {5.0}


# -- reservation TTL -------------------------------------------------------------------


def test_reservations_outlive_the_saga_deadline_by_default() -> None:
    assert inventory.RESERVATION_TTL > DEADLINE
    assert checkout_definition().deadline == DEADLINE
    with pytest.raises(ValueError, match="reservation_ttl"):
        inventory.build_inventory(object(), reservation_ttl=0)


async def test_reservations_expire_back_to_stock(site: Site) -> None:
    async with services(site, {"sku-1": 5}) as c:
        c.inventory = inventory.build_inventory(c.inventory_store, reservation_ttl=60.0)
        assert (await deliver(c.inventory, reserve(c, "o-1", qty=2))).ok
        assert (await deliver(c.inventory, reserve(c, "o-2", qty=1))).ok
        created, expires = (
            await rows(
                c.inventory_store,
                "SELECT created_at, expires_at FROM reservations WHERE order_id = 'o-1'",
            )
        )[0]
        assert expires == pytest.approx(created + 60.0)
        assert await inventory.expire_reservations(c.inventory_store, created + 59) == 0
        commit = command(
            c.inventory, "CommitReservation", ref("o-2"), saga="saga-o-2", step="commit_inventory"
        )
        assert (await deliver(c.inventory, commit)).ok  # committed ones never expire
        assert await inventory.expire_reservations(c.inventory_store, created + 61) == 1
        assert await inventory.expire_reservations(c.inventory_store, created + 61) == 0
        assert await stock(c) == (5, 4, 0, 1)
        assert await rows(
            c.inventory_store, "SELECT order_id, status FROM reservations ORDER BY order_id"
        ) == [("o-1", "EXPIRED"), ("o-2", "COMMITTED")]
        # Releasing it is a no-op: its units came back once already.
        rel = command(
            c.inventory,
            "ReleaseInventory",
            ref("o-1"),
            saga="saga-o-1",
            step="reserve_inventory",
            rung=0,
        )
        assert (await deliver(c.inventory, rel)).result == {"released": 0}
        assert await stock(c) == (5, 4, 0, 1)
        # Committing it fails for good: the units may be another order's by now.
        late = command(
            c.inventory, "CommitReservation", ref("o-1"), saga="saga-o-1", step="commit_inventory"
        )
        out = await deliver(c.inventory, late)
        assert not out.ok and not out.retryable
        assert out.reason == "the reservation of order o-1 expired"
        again = command(
            c.inventory,
            "ReserveInventory",
            {"order_id": "o-1", "sku": "sku-1", "qty": 2},
            saga="saga-other",
            step="reserve_inventory",
        )
        out = await deliver(c.inventory, again)
        assert not out.ok and "already expired" in out.reason
        assert await stock(c) == (5, 4, 0, 1)


async def test_a_reservation_past_its_time_but_not_swept_can_still_commit(site: Site) -> None:
    async with services(site, {"sku-1": 1}) as c:
        c.inventory = inventory.build_inventory(c.inventory_store, reservation_ttl=0.01)
        assert (await deliver(c.inventory, reserve(c, "o-1"))).ok
        await asyncio.sleep(0.02)
        commit = command(
            c.inventory, "CommitReservation", ref("o-1"), saga="saga-o-1", step="commit_inventory"
        )
        assert (await deliver(c.inventory, commit)).ok  # its unit was still held
        assert await inventory.expire_reservations(c.inventory_store, time.time()) == 0
        assert await stock(c) == (1, 0, 0, 1)


async def test_migrations_are_portable_and_applied_once(site: Site) -> None:
    """The same migration text creates every table and index on both backends; applying
    the steps again changes nothing."""
    modules = (order, payment, inventory, shipping)
    stores = {m.NAME: site.store(m.NAME) for m in modules}
    for st in stores.values():
        await st.open()
    try:
        for m in modules:
            await stores[m.NAME].apply_migrations(m.NAMESPACE, m.MIGRATIONS)
        store = stores[inventory.NAME]
        async with store.transaction() as tx:
            await tx.execute(
                "INSERT INTO reservations "
                "(order_id, sku, qty, status, created_at, updated_at, expires_at) "
                "VALUES ('o-old', 'sku-1', 1, 'RESERVED', 100.0, 100.0, 1000.0)"
            )
            await tx.execute("INSERT INTO stock VALUES ('sku-1', 1, 0, 1, 0)")
        for m in modules:
            await stores[m.NAME].apply_migrations(m.NAMESPACE, m.MIGRATIONS)  # no-op
        assert await rows(
            store, "SELECT order_id, status, created_at, expires_at FROM reservations"
        ) == [("o-old", "RESERVED", 100.0, 1000.0)]
        assert await inventory.expire_reservations(store, 1000.0) == 1
        assert await rows(store, "SELECT status FROM reservations") == [("EXPIRED",)]
        assert await rows(store, "SELECT * FROM stock") == [("sku-1", 1, 1, 0, 0)]
        index_names = (
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            if site.postgres
            else "SELECT name FROM sqlite_master WHERE type = 'index'"
        )
        indexes = {r[0] for r in await rows(store, index_names)}
        assert {"reservations_sku_status_idx", "reservations_expiry_idx"} <= indexes
        # Epoch seconds keep their sub-second precision (PostgreSQL's REAL would not).
        t = 1_700_000_000.123456
        async with stores[payment.NAME].transaction() as tx:
            await tx.execute(
                "INSERT INTO payment_ledger (order_id, op, amount, provider_ref, at) "
                "VALUES (?, 'authorize', ?, 'auth-1', ?)",
                ("o-1", 2**40, t),
            )
        assert await rows(stores[payment.NAME], "SELECT amount, at FROM payment_ledger") == [
            (2**40, t)
        ]
    finally:
        for st in stores.values():
            await st.close()


# -- invariants: expired reservations and manual resolutions ---------------------------


async def test_invariants_catch_an_order_completed_on_an_expired_reservation(
    site: Site,
) -> None:
    await run_sagas(site)
    # The reservation of a completed order expired instead of being committed, and its
    # unit went back to stock: the stock equation holds, but the item was sold twice.
    site.plant(
        "inventory",
        "UPDATE stock SET available = available + 1, shipped = shipped - 1 WHERE sku = 'sku-1'",
        "UPDATE reservations SET status = 'EXPIRED' WHERE order_id = 'o-ok'",
    )
    async with services(site) as c:
        report = await invariants(c, STOCK)
    # Stock, and honest status too: COMPLETED was shown without the inventory committed.
    assert [k for k, ok in report.invariants.items() if not ok] == ["stock", "honest_status"]
    assert any("order o-ok: completed although its reservation" in v for v in report.violations), (
        report.violations
    )
    assert not any("initial" in v for v in report.violations)  # the equation itself holds


def test_status_path_through_needs_attention_needs_a_person() -> None:
    def path(*steps: str) -> list[tuple[str, str]]:
        out = []
        for s in steps:
            event, _, status = s.rpartition(":")
            out.append((event or "step.started", status))
        return out

    ok = [
        path("PENDING_PAYMENT", "COMPLETING", "NEEDS_ATTENTION"),
        # A person resumed it: it goes on from where it was.
        path(
            "COMPLETING",
            "NEEDS_ATTENTION",
            "manual.resolved:NEEDS_ATTENTION",
            "COMPLETING",
            "COMPLETED",
        ),
        path(
            "PENDING_SHIPMENT",
            "CANCELLING",
            "NEEDS_ATTENTION",
            "manual.resolved:NEEDS_ATTENTION",
            "CANCELLING",
            "CANCELLED",
        ),
        path("COMPLETING", "NEEDS_ATTENTION", "manual.resolved:NEEDS_ATTENTION", "CANCELLING"),
        path("COMPLETING", "NEEDS_ATTENTION", "manual.resolved:NEEDS_ATTENTION", "COMPLETED"),
        path(
            "COMPLETING",
            "NEEDS_ATTENTION",
            "manual.resolved:NEEDS_ATTENTION",
            "PARTIALLY_COMPLETED",
        ),
        # Resumed, stuck again, resumed again.
        path(
            "COMPLETING",
            "NEEDS_ATTENTION",
            "manual.resolved:NEEDS_ATTENTION",
            "COMPLETING",
            "NEEDS_ATTENTION",
            "manual.resolved:NEEDS_ATTENTION",
            "COMPLETED",
        ),
    ]
    bad = [
        (path("COMPLETING", "NEEDS_ATTENTION", "COMPLETED"), ("NEEDS_ATTENTION", "COMPLETED")),
        (
            path("CANCELLING", "NEEDS_ATTENTION", "saga.finished:CANCELLED"),
            ("NEEDS_ATTENTION", "CANCELLED"),
        ),
        # Even resumed, it may not go back past what the user saw before.
        (
            path(
                "COMPLETING",
                "NEEDS_ATTENTION",
                "manual.resolved:NEEDS_ATTENTION",
                "PENDING_PAYMENT",
            ),
            ("NEEDS_ATTENTION", "PENDING_PAYMENT"),
        ),
        (
            path("CANCELLING", "NEEDS_ATTENTION", "manual.resolved:NEEDS_ATTENTION", "COMPLETED"),
            ("NEEDS_ATTENTION", "COMPLETED"),
        ),
        # One resolution resumes once; a second escalation needs a second one.
        (
            path(
                "COMPLETING",
                "NEEDS_ATTENTION",
                "manual.resolved:NEEDS_ATTENTION",
                "COMPLETING",
                "NEEDS_ATTENTION",
                "COMPLETED",
            ),
            ("NEEDS_ATTENTION", "COMPLETED"),
        ),
        # A resolution row elsewhere does not count.
        (
            path("manual.resolved:COMPLETING", "NEEDS_ATTENTION", "COMPLETED"),
            ("NEEDS_ATTENTION", "COMPLETED"),
        ),
    ]
    for p in ok:
        assert status_path_violation(p) is None, p
    for p, expected in bad:
        assert status_path_violation(p) == expected, p
