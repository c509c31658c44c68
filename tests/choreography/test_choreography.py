"""The choreographed checkout: every scenario end to end, and each handler's state checks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from choreo_support import Backend, deliver, event, order_data, quiet, rows, wait_terminal
from sagakit_checkout.choreography import (
    ANNOUNCE_AFTER,
    ANNOUNCE_TIMES,
    CHOREOGRAPHY,
    FLOW,
    Choreography,
    announce_again,
    build_choreography,
    migrate,
    next_announcement,
    open_choreography,
    place_orders,
)
from sagakit_checkout.event_audit import check_event_delivery
from sagakit_checkout.hybrid import HYBRID
from sagakit_checkout.invariants import PIVOT_AT_CAPTURE, check_invariants
from sagakit_checkout.inventory import seed_stock
from sagakit_checkout.provider import FakeCardProvider
from sagakit_checkout.sagas import CHECKOUT

from sagakit import MessageKind, SagaState
from sagakit.flows import check_emissions

SCENARIOS = {
    "o-ok": order_data(),
    "o-declined": order_data(card="card-decline-1"),
    "o-sold-out": order_data(sku="sku-none"),
    "o-bad-address": order_data(ship_to="addr-bad-1"),
    "o-no-void": order_data(card="card-novoid-1", ship_to="addr-bad-2"),
    "o-slow-card": order_data(card="card-slow-1"),
    "o-flaky-carrier": order_data(ship_to="addr-flaky-1"),
    "o-flaky-card": order_data(card="card-flaky-1"),
}
STOCK = {"sku-01": 100, "sku-none": 0}


async def test_every_scenario_ends_as_its_facts_say(backend: Backend, tmp_path: Path) -> None:
    names = ("order", "payment", "inventory", "shipping", "tracker")
    stores = {name: backend.store(name) for name in names}
    ch = build_choreography(stores, FakeCardProvider(tmp_path / "provider.db"))
    engine = ch.engine(idle_poll=0.05)
    async with engine:
        await seed_stock(ch.stores["inventory"], STOCK)
        assert await place_orders(ch, list(SCENARIOS.items())) == len(SCENARIOS)
        assert await place_orders(ch, list(SCENARIOS.items())) == 0  # idempotent by id
        views = await wait_terminal(engine.store, SCENARIOS, CHOREOGRAPHY)
        await quiet(engine.stores)
        report = await check_invariants(**ch.invariant_stores(), initial_stock=STOCK)
        endpoints = {p.name: p.store for p in ch.participants}
        await check_event_delivery(report, endpoints, engine.event_routes)
        events = [e for s in engine.stores for e, _ in await s.outbox_all()]
        histories = {k: await engine.store.history(v.saga_id) for k, v in views.items()}
        manual = await engine.manual_cases()
    assert report.ok, report
    outcome = {k: (v.state, v.status) for k, v in views.items()}
    completed = (SagaState.SUCCEEDED, "COMPLETED")
    cancelled = (SagaState.COMPENSATED, "CANCELLED")
    assert outcome == {
        "o-ok": completed,
        "o-declined": cancelled,
        "o-sold-out": cancelled,
        "o-bad-address": cancelled,
        "o-no-void": cancelled,
        "o-slow-card": completed,
        "o-flaky-carrier": completed,
        "o-flaky-card": completed,
    }
    assert manual == []
    assert views["o-declined"].reason == "card declined"
    assert views["o-sold-out"].reason == "out of stock"
    facts = {k: set(v.data["facts"]) for k, v in views.items()}
    assert "PaymentRefunded" in facts["o-no-void"] and "PaymentVoided" not in facts["o-no-void"]
    assert {"ShipmentFailed", "InventoryReleased", "PaymentVoided"} <= facts["o-bad-address"]
    # The declaration table says exactly what the handlers published.
    assert check_emissions(FLOW, events) == []
    # Every fact carries the order's correlation id and one trace; causes link them up.
    by_id = {e.message_id: e for e in events}
    for e in events:
        assert e.kind is MessageKind.EVENT and e.destination is None
        assert e.correlation_id == e.business_key
        if e.causation_id is not None:
            cause = by_id[e.causation_id]
            assert cause.correlation_id == e.correlation_id
            assert cause.traceparent is not None and e.traceparent is not None
            assert cause.traceparent.split("-")[1] == e.traceparent.split("-")[1]
    assert all(
        h.message_id is not None for hs in histories.values() for h in hs if "event" in h.event
    )


AFTER_THE_PIVOT = {
    "o-pick-flaky": order_data(sku="sku-wh-flaky-01"),
    "o-pick-down": order_data(sku="sku-wh-down-01"),
    "o-recalled": order_data(sku="sku-recalled-01"),
    "o-account-locked": order_data(customer="cust-locked-000001"),
    "o-account-frozen": order_data(customer="cust-frozen-000001"),
    "o-capture-mute": order_data(card="card-mutecapture-1"),
    "o-provider-dark": order_data(card="card-mutecapture-nolookup-1"),
    "o-void-mute": order_data(card="card-mutevoid-nolookup-1", ship_to="addr-bad-1"),
    "o-void-mute-asked": order_data(card="card-mutevoid-1", ship_to="addr-bad-2"),
}
WAREHOUSE_STOCK = {
    "sku-01": 100,
    "sku-wh-flaky-01": 10,
    "sku-wh-down-01": 10,
    "sku-recalled-01": 10,
}


@pytest.mark.fault("F-PROVIDER-OUTAGE")
async def test_failures_after_the_capture_and_a_silent_provider(
    backend: Backend, tmp_path: Path
) -> None:
    """After the capture a step that fails for good, or keeps failing, hands the order
    to a person (never a compensation); one that fails a few times recovers. A provider
    that never answers is asked what it did; with no answer to that either, a person
    decides, and a void of unknown outcome is never followed by a refund."""
    names = ("order", "payment", "inventory", "shipping", "tracker")
    stores = {name: backend.store(name) for name in names}
    ch = build_choreography(stores, FakeCardProvider(tmp_path / "provider.db"))
    engine = ch.engine(idle_poll=0.05)
    async with engine:
        await seed_stock(ch.stores["inventory"], WAREHOUSE_STOCK)
        await place_orders(ch, list(AFTER_THE_PIVOT.items()))
        views = await wait_terminal(engine.store, AFTER_THE_PIVOT, CHOREOGRAPHY)
        await quiet(engine.stores)
        report = await check_invariants(**ch.invariant_stores(), initial_stock=WAREHOUSE_STOCK)
        events = [e for s in engine.stores for e, _ in await s.outbox_all()]
        reservations = dict(
            await rows(ch.stores["inventory"], "SELECT order_id, status FROM reservations")
        )
        effects = {(e.order_id, e.op) for e in await ch.provider.effects()}
        ledger = {
            (o, op)
            for o, op in await rows(ch.stores["payment"], "SELECT order_id, op FROM payment_ledger")
        }
    assert report.ok, report
    assert check_emissions(FLOW, events) == []
    outcome = {k: v.state for k, v in views.items()}
    manual, done = SagaState.FAILED_NEEDS_MANUAL, SagaState.SUCCEEDED
    assert outcome == {
        "o-pick-flaky": done,
        "o-pick-down": manual,
        "o-recalled": manual,
        "o-account-locked": done,
        "o-account-frozen": manual,
        "o-capture-mute": done,
        "o-provider-dark": manual,
        "o-void-mute": manual,
        "o-void-mute-asked": SagaState.COMPENSATED,
    }
    reasons = {k: v.reason or "" for k, v in views.items() if v.state is manual}
    assert reasons["o-pick-down"].startswith("InventoryCommitFailed from inventory")
    assert "did not confirm the pick" in reasons["o-pick-down"]
    assert "recalled" in reasons["o-recalled"]
    assert reasons["o-account-frozen"].startswith("OrderCompletionFailed from order")
    assert "frozen" in reasons["o-account-frozen"]
    assert reasons["o-provider-dark"].startswith("PaymentCaptureFailed from payment")
    assert "outcome is unknown" in reasons["o-provider-dark"]
    assert reasons["o-void-mute"].startswith("PaymentReleaseFailed from payment")
    assert "outcome is unknown" in reasons["o-void-mute"]
    # Past the capture nothing is undone: the reservations stay for the person.
    assert reservations["o-pick-down"] == reservations["o-recalled"] == "RESERVED"
    assert reservations["o-account-frozen"] == "COMMITTED"
    # The provider did what it never answered; asked, it told (and the books know).
    assert {("o-capture-mute", "capture"), ("o-void-mute-asked", "void")} <= effects & ledger
    # Unknown and unanswered: the books do not know, and no refund was tried on a guess.
    assert ("o-provider-dark", "capture") in effects - ledger
    assert ("o-void-mute", "void") in effects - ledger
    assert ("o-void-mute", "refund") not in effects | ledger
    facts = {k: set(v.data["facts"]) for k, v in views.items()}
    assert "PaymentRefunded" not in facts["o-void-mute"]
    assert "PaymentVoided" in facts["o-void-mute-asked"]


def test_the_pivot_rule_of_the_invariants_knows_every_checkout_definition() -> None:
    """The money check's "nothing given back after the capture" applies to the checkout's
    definitions by name: a renamed one must not slip out of it."""
    assert {CHECKOUT, HYBRID, CHOREOGRAPHY} == PIVOT_AT_CAPTURE


async def test_a_stalled_choreography_reaches_the_manual_queue(tmp_path: Path) -> None:
    """The carrier is down for good: shipping's handler keeps asking for a redelivery,
    nothing else happens, and the tracker's SLA check hands the saga to a person."""
    ch = open_choreography(tmp_path, synchronous="NORMAL", sla=1.0, carrier_down_fraction=1.0)
    engine = ch.engine(sla_check_every=0.2, idle_poll=0.05)
    async with engine:
        await seed_stock(ch.stores["inventory"], STOCK)
        await place_orders(ch, [("o-stuck", order_data())])
        views = await wait_terminal(engine.store, ["o-stuck"], CHOREOGRAPHY)
        manual = await engine.manual_cases()
        history = await engine.store.history(views["o-stuck"].saga_id)
    view = views["o-stuck"]
    assert view.state is SagaState.FAILED_NEEDS_MANUAL and view.status == "NEEDS_ATTENTION"
    assert [m.business_key for m in manual] == ["o-stuck"]
    assert view.reason is not None and view.reason.startswith("stuck: no progress")
    assert "InventoryReserved" in view.reason
    assert history[-1].event == "manual.escalated"


@asynccontextmanager
async def opened(tmp: Path) -> AsyncIterator[Choreography]:
    """The choreography's stores opened and migrated, with no engine: tests deliver."""
    ch = open_choreography(tmp, synchronous="NORMAL")
    for s in ch.stores.values():
        await s.open()
    try:
        await migrate(ch)
        await seed_stock(ch.stores["inventory"], STOCK)
        yield ch
    finally:
        for s in ch.stores.values():
            await s.close()


def participant(ch: Choreography, name: str) -> Any:
    return next(p for p in ch.participants if p.name == name)


async def log_of(ch: Choreography, service: str) -> list[tuple[Any, ...]]:
    return await rows(
        ch.stores[service],
        "SELECT message_id, event, verdict, note FROM choreography_log ORDER BY at, message_id",
    )


async def emitted(ch: Choreography, service: str) -> list[str]:
    return [e.type for e, _ in await ch.stores[service].outbox_all()]


async def test_order_a_failure_after_authorization_does_not_cancel_it(tmp_path: Path) -> None:
    async with opened(tmp_path) as ch:
        await place_orders(ch, [("o-1", order_data())])
        order = participant(ch, "order")
        ref = {"order_id": "o-1"}
        await deliver(order, event("PaymentAuthorized", _authorized(), message_id="a"))
        await deliver(order, event("PaymentAuthorized", _authorized(), message_id="a"), 2)
        failed = {**ref, "reason": "card declined"}
        await deliver(order, event("PaymentFailed", failed, message_id="f"))
        assert (await rows(ch.stores["order"], "SELECT status FROM orders"))[0][0] == "CREATED"
        assert await emitted(ch, "order") == ["OrderCreated"]
        voided = {**ref, "voided": 1500, "reason": "out of stock"}
        await deliver(order, event("PaymentVoided", voided, message_id="v"))
        late = {**ref, "sku": "sku-01", "shipped": 1}
        await deliver(order, event("InventoryCommitted", late, message_id="c"))
        assert (await rows(ch.stores["order"], "SELECT status FROM orders"))[0][0] == "CANCELLED"
        assert await emitted(ch, "order") == ["OrderCreated", "OrderCancelled"]
        log = await log_of(ch, "order")
    assert [(m, e, v) for m, e, v, _ in log] == [
        ("a", "PaymentAuthorized", "applied"),  # once: the redelivery was deduplicated
        ("f", "PaymentFailed", "ignored"),
        ("v", "PaymentVoided", "applied"),
        ("c", "InventoryCommitted", "ignored"),
    ]
    assert "does not undo it" in log[1][3] and log[3][3] == "order is CANCELLED"


def _authorized() -> dict[str, Any]:
    return {
        "order_id": "o-1",
        "authorization": "auth-1",
        "amount": 1500,
        "sku": "sku-01",
        "qty": 1,
        "ship_to": "addr-ok-1",
    }


@pytest.mark.fault("F-DUPLICATE", "F-REORDER")
async def test_payment_and_inventory_ignore_late_and_repeated_facts(tmp_path: Path) -> None:
    async with opened(tmp_path) as ch:
        payment, inventory = participant(ch, "payment"), participant(ch, "inventory")
        created = {**order_data(), "order_id": "o-1", "channel": "web"}
        await deliver(payment, event("OrderCreated", created, message_id="c1", version=2))
        # The same fact under another id (a replay by hand): the ledger already has it.
        await deliver(payment, event("OrderCreated", created, message_id="c2", version=2))
        auth = _authorized()
        await deliver(inventory, event("PaymentAuthorized", auth, message_id="a1"))
        await deliver(inventory, event("PaymentAuthorized", auth, message_id="a2"))
        failed = {"order_id": "o-1", "reason": "bad address"}
        await deliver(inventory, event("ShipmentFailed", failed, message_id="s1"))
        released = {"order_id": "o-1", "released": 1, "reason": "bad address"}
        await deliver(payment, event("InventoryReleased", released, message_id="r1"))
        # A capture request after the money was released is refused by the ledger check.
        await deliver(
            payment, event("ShipmentCreated", {"order_id": "o-1", "carrier": "c"}, message_id="sc")
        )
        await deliver(
            inventory, event("PaymentCaptured", {"order_id": "o-1", "captured": 1}, message_id="pc")
        )
        ledger = await rows(ch.stores["payment"], "SELECT op FROM payment_ledger ORDER BY op")
        reservation = await rows(ch.stores["inventory"], "SELECT status FROM reservations")
        pay_log, inv_log = await log_of(ch, "payment"), await log_of(ch, "inventory")
        pay_out, inv_out = await emitted(ch, "payment"), await emitted(ch, "inventory")
    assert ledger == [("authorize",), ("void",)]
    assert reservation == [("RELEASED",)]
    assert pay_out == ["PaymentAuthorized", "PaymentVoided"]
    # A commit after the release is a failure a person must see, not a silent success.
    assert inv_out == ["InventoryReserved", "InventoryReleased", "InventoryCommitFailed"]
    verdicts = {m: v for m, _, v, _ in pay_log + inv_log}
    assert verdicts == {
        "c1": "applied",
        "c2": "ignored",
        "a1": "applied",
        "a2": "ignored",
        "s1": "applied",
        "r1": "applied",
        "sc": "ignored",
        "pc": "applied",
    }


async def test_an_order_nobody_heard_of_is_announced_again_until_payment_answers(
    tmp_path: Path,
) -> None:
    """Found by ``sagakit simulate --mode choreography``: when every copy of OrderCreated
    is lost, no service and no tracker view knows the order exists, so nothing can time
    it out. The order service announces it again (same fact, same message id) until the
    payment service answers, ``ANNOUNCE_TIMES`` times at most."""
    async with opened(tmp_path) as ch:
        placed = 1000.0
        await place_orders(ch, [("o-1", order_data()), ("o-2", order_data())], now=placed)
        first = [e for e, _ in await ch.stores["order"].outbox_all()]
        assert await next_announcement(ch) == placed + ANNOUNCE_AFTER
        assert await announce_again(ch, placed + ANNOUNCE_AFTER - 1) == 0
        # o-2's payment answer arrived; o-1's never will.
        auth = {**_authorized(), "order_id": "o-2"}
        await deliver(participant(ch, "order"), event("PaymentAuthorized", auth, message_id="a"))
        now, again = placed, []
        for _ in range(ANNOUNCE_TIMES + 2):
            now += ANNOUNCE_AFTER
            again.append(await announce_again(ch, now))
        assert await next_announcement(ch) is None
        out = [e for e, _ in await ch.stores["order"].outbox_all()]
    assert again == [1] * (ANNOUNCE_TIMES - 1) + [0, 0, 0]
    repeats = out[len(first) :]
    assert {e.message_id for e in repeats} == {e.message_id for e in first if "o-1" in e.message_id}
    assert all(e.type == "OrderCreated" and e.payload == first[0].payload for e in repeats)
