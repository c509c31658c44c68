"""The hybrid checkout: an orchestrated command answered by a choreography's end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from choreo_support import Backend, deliver, event, order_data, quiet, rows, wait_terminal
from sagakit_checkout.deploy import SERVICES
from sagakit_checkout.event_audit import check_event_delivery
from sagakit_checkout.hybrid import (
    HYBRID,
    SHIPPING_FLOW,
    Hybrid,
    build_hybrid,
    hybrid_definition,
    migrate_hybrid,
    open_hybrid,
)
from sagakit_checkout.invariants import check_invariants
from sagakit_checkout.inventory import seed_stock
from sagakit_checkout.provider import FakeCardProvider
from sagakit_checkout.services import checkout_on
from sagakit_checkout.shipping_domain import check_bookings

from sagakit import Envelope, MessageKind, Outcome, RetryPolicy, SagaState
from sagakit.flows import check_emissions
from sagakit.runtime.participant import REFUSED_AFTER_COMPENSATION

STOCK = {"sku-01": 100, "sku-none": 0}
ORDERS = {
    "h-ok": order_data(),
    "h-declined": order_data(card="card-decline-1"),
    "h-sold-out": order_data(sku="sku-none"),
    "h-bad-address": order_data(ship_to="addr-bad-1"),
    "h-no-route": order_data(ship_to="addr-noroute-1"),
    "h-flaky-carrier": order_data(ship_to="addr-flaky-1"),
    "h-no-void": order_data(card="card-novoid-1", ship_to="addr-bad-2"),
}


def hybrid_on(backend: Backend, tmp: Path) -> Hybrid:
    """The hybrid checkout on the backend's stores (the card provider stays a file)."""
    stores = {n: backend.store(n) for n in ("orchestrator", *SERVICES, "labels", "carrier")}
    provider = FakeCardProvider(tmp / "provider.db")
    checkout = checkout_on(tmp, stores, provider)
    return build_hybrid(checkout, stores["labels"], stores["carrier"])


async def test_the_hybrid_checkout_ends_every_order_and_keeps_the_invariants(
    backend: Backend, tmp_path: Path
) -> None:
    h = hybrid_on(backend, tmp_path)
    engine = h.engine(idle_poll=0.05)
    async with engine:
        await seed_stock(h.checkout.inventory_store, STOCK)
        await engine.orchestrator.start_many([(HYBRID, k, v) for k, v in ORDERS.items()])
        sagas = await wait_terminal(engine.store, ORDERS, HYBRID)
        await quiet(engine.stores)
        report = await check_invariants(**h.checkout.invariant_stores(), initial_stock=STOCK)
        endpoints = {p.name: p.store for p in h.participants}
        await check_event_delivery(report, endpoints, engine.event_routes)
        await check_bookings(report, h.checkout.shipping_store, h.carrier_store)
        events = [e for s in engine.stores for e, _ in await s.outbox_all()]
        requests = dict(
            await rows(h.checkout.shipping_store, "SELECT order_id, status FROM shipping_requests")
        )
    assert report.ok, report
    states = {k: s.state for k, s in sagas.items()}
    assert states == {
        "h-ok": SagaState.SUCCEEDED,
        "h-declined": SagaState.COMPENSATED,
        "h-sold-out": SagaState.COMPENSATED,
        "h-bad-address": SagaState.COMPENSATED,
        "h-no-route": SagaState.COMPENSATED,
        "h-flaky-carrier": SagaState.SUCCEEDED,
        "h-no-void": SagaState.COMPENSATED,
    }
    assert requests == {
        "h-ok": "BOOKED",
        "h-flaky-carrier": "BOOKED",
        "h-bad-address": "FAILED",
        "h-no-route": "FAILED",
        "h-no-void": "FAILED",
    }
    step = sagas["h-no-route"].steps[3]
    assert step.error == "no carrier serves this address"
    assert check_emissions(SHIPPING_FLOW, events) == []
    # The shipping domain's facts carry the saga's correlation id: one trace end to end.
    for e in events:
        if e.kind is MessageKind.EVENT:
            assert e.correlation_id == sagas[e.business_key or ""].correlation_id


async def test_a_step_given_up_mid_choreography_is_compensated_without_a_booking(
    tmp_path: Path,
) -> None:
    """The carrier is down for good: the orchestrator's tries run out while the shipping
    domain's flow is still under way, and CancelShipment lands in the middle of it."""
    h = open_hybrid(tmp_path, synchronous="NORMAL", carrier_down_fraction=1.0)
    quick = RetryPolicy(max_attempts=2, initial_backoff=0.05, max_backoff=0.1)
    engine = h.engine(definition=hybrid_definition(timeout=0.5, retry=quick), idle_poll=0.05)
    async with engine:
        await seed_stock(h.checkout.inventory_store, STOCK)
        await engine.start(HYBRID, "h-stuck", order_data())
        saga = (await wait_terminal(engine.store, ["h-stuck"], HYBRID))["h-stuck"]
        # The label was printed and is redelivered to the carrier until it hears the cancel.
        for _ in range(100):
            label = await rows(h.labels_store, "SELECT status FROM labels")
            bookings = await rows(h.carrier_store, "SELECT status FROM carrier_bookings")
            if label == [("VOIDED",)] and bookings:
                break
            await asyncio.sleep(0.05)
        await quiet(engine.stores)
        report = await check_invariants(**h.checkout.invariant_stores(), initial_stock=STOCK)
        await check_bookings(report, h.checkout.shipping_store, h.carrier_store)
        request = await rows(h.checkout.shipping_store, "SELECT status FROM shipping_requests")
        history = [x.event for x in await engine.store.history(saga.saga_id)]
    assert report.ok, report
    assert saga.state is SagaState.COMPENSATED
    assert "outcome.unknown" in history and "compensation.succeeded" in history
    assert request == [("CANCELLED",)]
    assert bookings == [("CANCELLED",)], "the carrier left a tombstone and never booked"
    assert label == [("VOIDED",)]


@asynccontextmanager
async def opened(tmp: Path) -> AsyncIterator[Hybrid]:
    h = open_hybrid(tmp, synchronous="NORMAL")
    stores = [h.checkout.orchestrator_store, *h.checkout.service_stores.values()]
    stores += [h.labels_store, h.carrier_store]
    for s in stores:
        await s.open()
    try:
        await migrate_hybrid(h)
        yield h
    finally:
        for s in stores:
            await s.close()


def command(
    type_: str, attempt: int = 1, *, compensates: str | None = None, rung: int | None = None
) -> Envelope:
    """A command as the orchestrator sends it for saga s-1's shipping step."""
    key = "s-1:create_shipment:action" if rung is None else f"s-1:create_shipment:comp:{rung}"
    payload: dict[str, Any] = {"order_id": "o-1"}
    if type_ == "RequestShipment":
        payload.update(ship_to="addr-ok-1", sku="sku-01", qty=1)
    return Envelope(
        message_id=f"s-1:{type_}:{attempt}",
        type=type_,
        kind=MessageKind.COMMAND,
        source="orchestrator",
        destination="shipping",
        correlation_id="s-1",
        saga_id="s-1",
        business_key="o-1",
        step="create_shipment",
        attempt=attempt,
        fence=attempt,
        idempotency_key=key,
        compensates=compensates,
        reply_to="orchestrator",
        occurred_at=time.time(),
        payload=payload,
    )


async def outbox(h: Hybrid) -> list[Envelope]:
    return [e for e, _ in await h.checkout.shipping_store.outbox_all()]


async def carrier_facts(h: Hybrid) -> list[Envelope]:
    return [e for e, _ in await h.carrier_store.outbox_all()]


async def test_a_cancel_the_carrier_never_heard_is_told_again_and_answered_once(
    tmp_path: Path,
) -> None:
    """Found by ``sagakit simulate --mode hybrid``: a ShipmentCancelled lost on its way to
    the carrier left the booking alive under a cancelled shipment, and the checkout,
    answered at once, never asked again. Now the answer waits for the carrier."""
    async with opened(tmp_path) as h:
        front, carrier = h.participants[3], h.participants[5]
        await deliver(front, command("RequestShipment", 1))
        label = event(
            "LabelPrinted",
            {"order_id": "o-1", "label": "lbl-o-1", "ship_to": "addr-ok-1"},
            message_id="l-1",
            correlation_id="s-1",
        )
        await deliver(carrier, label)  # booked; CarrierBooked still on its way
        comp = {"compensates": "s-1:create_shipment:action", "rung": 0}
        await deliver(front, command("CancelShipment", 1, **comp))  # its fact is lost
        await deliver(front, command("CancelShipment", 2, **comp))  # the timeout's retry
        told = [e for e in await outbox(h) if e.type == "ShipmentCancelled"]
        assert len(told) == 2 and not [e for e in await outbox(h) if e.kind is MessageKind.REPLY]
        await deliver(carrier, told[1])
        confirmed = (await carrier_facts(h))[-1]
        assert confirmed.type == "CarrierBookingCancelled"
        await deliver(front, confirmed)
        await deliver(front, booked())  # the booking's fact, late: ignored
        await deliver(carrier, told[0])  # the lost copy turns up after all
        await deliver(front, (await carrier_facts(h))[-1])  # its confirmation: no answer
        await deliver(front, command("CancelShipment", 3, **comp))  # the runtime answers
        sent = await outbox(h)
        bookings = await rows(h.carrier_store, "SELECT status FROM carrier_bookings")
        shipments = await rows(h.checkout.shipping_store, "SELECT status FROM shipments")
    replies = [e for e in sent if e.kind is MessageKind.REPLY]
    assert [(r.attempt, Outcome.from_payload(r.payload).result) for r in replies] == [
        (2, {"cancelled": True, "was": "REQUESTED"}),  # the newest try, on the confirmation
        (3, {"cancelled": True, "was": "REQUESTED"}),  # replayed from the record
    ]
    assert bookings == [("CANCELLED",)] and shipments == []


def booked() -> Envelope:
    payload = {"order_id": "o-1", "carrier": "carrier-a", "label": "lbl-o-1"}
    return event("CarrierBooked", payload, message_id="b-1", correlation_id="s-1")


async def test_the_answer_waits_for_the_booking_and_retries_do_not_restart_it(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path) as h:
        front = h.participants[3]
        await deliver(front, command("RequestShipment", 1))
        await deliver(front, command("RequestShipment", 2))  # the orchestrator's retry
        assert [e.type for e in await outbox(h)] == ["ShipmentRequested"], "no reply yet"
        await deliver(front, booked())
        await deliver(front, command("RequestShipment", 3))  # a retry after the answer
        sent = await outbox(h)
    replies = [e for e in sent if e.kind is MessageKind.REPLY]
    assert [(r.attempt, Outcome.from_payload(r.payload).ok) for r in replies] == [
        (2, True),  # the answer went to the newest try, from the booking's handler
        (3, True),  # the runtime replayed the recorded answer
    ]
    assert Outcome.from_payload(replies[0].payload).result == {"carrier": "carrier-a"}


async def test_a_cancel_mid_choreography_undoes_it_and_refuses_the_late_answer(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path) as h:
        front, labels, carrier = h.participants[3:6]
        await deliver(front, command("RequestShipment", 1))
        requested = (await outbox(h))[0]
        # The label is printed; then the step times out and is compensated.
        await deliver(labels, requested)
        label = next(e for e, _ in await h.labels_store.outbox_all())
        cancel = command("CancelShipment", 1, compensates="s-1:create_shipment:action", rung=0)
        await deliver(front, cancel)
        cancelled = [e for e in await outbox(h) if e.type == "ShipmentCancelled"]
        assert len(cancelled) == 1
        # The carrier hears the cancel before the label: it never books, and says so.
        await deliver(carrier, cancelled[0])
        await deliver(carrier, label)
        await deliver(labels, cancelled[0])
        assert not [e for e in await outbox(h) if e.kind is MessageKind.REPLY], "not yet"
        await deliver(front, (await carrier_facts(h))[-1])
        # A booking fact that reaches the cancelled request is ignored; a late retry of
        # the command is refused by the runtime's tombstone.
        await deliver(front, booked())
        await deliver(front, command("RequestShipment", 2))
        sent = await outbox(h)
        bookings = await rows(h.carrier_store, "SELECT status FROM carrier_bookings")
        label_rows = await rows(h.labels_store, "SELECT status FROM labels")
        request = await rows(h.checkout.shipping_store, "SELECT status FROM shipping_requests")
    replies = {r.type: Outcome.from_payload(r.payload) for r in sent if r.kind is MessageKind.REPLY}
    assert replies["CancelShipment.reply"].result == {"cancelled": True, "was": "REQUESTED"}
    assert not replies["RequestShipment.reply"].ok
    assert replies["RequestShipment.reply"].reason == REFUSED_AFTER_COMPENSATION
    assert bookings == [("CANCELLED",)] and label_rows == [("VOIDED",)]
    assert request == [("CANCELLED",)]


async def test_a_booking_made_before_the_cancel_is_cancelled(tmp_path: Path) -> None:
    async with opened(tmp_path) as h:
        carrier = h.participants[5]
        label = event(
            "LabelPrinted",
            {"order_id": "o-1", "label": "lbl-o-1", "ship_to": "addr-ok-1"},
            message_id="l-1",
        )
        await deliver(carrier, label)
        cancel = event("ShipmentCancelled", {"order_id": "o-1", "reason": "x"}, message_id="c-1")
        await deliver(carrier, cancel)
        await deliver(carrier, label, deliveries=2)  # redelivered: the inbox drops it
        bookings = await rows(h.carrier_store, "SELECT status FROM carrier_bookings")
        emitted = [e.type for e, _ in await h.carrier_store.outbox_all()]
    assert bookings == [("CANCELLED",)]
    assert emitted == ["CarrierBooked", "CarrierBookingCancelled"]
