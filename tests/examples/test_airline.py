"""The airline example app (examples/airline): its bookings on the testing kit's virtual
clock, its demo under chaos, its races, and the simulator on its real handlers, with
and without the planted read-then-write seat hold."""

from __future__ import annotations

import json
from typing import Any

from example_support import chaos_demo, sagakit, steps
from sagakit_airline import app
from sagakit_airline.load import BIG, FLIGHTS, LAST_SEAT
from sagakit_airline.payments import CHALLENGE_TIMEOUT, SLOW_APPROVAL
from sagakit_airline.planted import read_then_write_in_tx_races
from sagakit_airline.races import races
from sagakit_airline.sagas import BOOKING
from sagakit_airline.seats import HOLD_TTL
from sagakit_airline.ticketing import OUTAGE

from sagakit import SagaState
from sagakit.testing.kit import SagaHarness
from sagakit.testing.races import explore_all

FARE = FLIGHTS[BIG][1]


def booking(
    n: int, *, card: str = "ok", traveller: str = "ok", flight: str = BIG
) -> dict[str, Any]:
    """A booking's data: the token kinds choose what the fake bank and ticketing do."""
    return {"flight": flight, "card": f"card-{card}-{n}", "traveller": f"pax-{traveller}-{n}"}


async def rows(h: SagaHarness, store: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` in a service's own store."""
    assert h.deployment is not None
    async with h.deployment.store(store).transaction() as tx:
        return await tx.fetchall(sql, params)


async def hold(h: SagaHarness, key: str) -> str | None:
    """The status of the booking's hold (None: it holds nothing)."""
    found = await rows(h, "seats", "SELECT status FROM holds WHERE booking = ?", key)
    return None if not found else str(found[0][0])


async def flight(h: SagaHarness, name: str = BIG) -> tuple[int, int]:
    """(seats held, seats sold) of the flight."""
    ((held, sold),) = await rows(
        h, "seats", "SELECT held, sold FROM flights WHERE flight = ?", name
    )
    return int(held), int(sold)


async def charge(h: SagaHarness, key: str) -> tuple[str, int, int] | None:
    """(status, amount, requests) of the booking's charge at the bank."""
    found = await rows(
        h, "payments", "SELECT status, amount, requests FROM bank_charges WHERE booking = ?", key
    )
    return None if not found else (str(found[0][0]), int(found[0][1]), int(found[0][2]))


async def tickets(h: SagaHarness, key: str) -> list[str]:
    """The ticket numbers of the booking."""
    found = await rows(h, "ticketing", "SELECT ticket_no FROM tickets WHERE booking = ?", key)
    return [str(r[0]) for r in found]


async def test_a_booking_is_quoted_held_confirmed_charged_and_ticketed() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(BOOKING, "bk-1", booking(1))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED and done.status == "TICKETED"
        assert await steps(h, saga.saga_id, "step.succeeded") == [
            "quote",
            "hold_seat",
            "authenticate",
            "confirm_seat",
            "charge",
            "issue_ticket",
        ]
        assert await hold(h, "bk-1") == "SOLD"
        assert await flight(h) == (0, 1)
        assert await charge(h, "bk-1") == ("CHARGED", FARE, 1)
        assert await tickets(h, "bk-1") == ["TK-bk-1"]
        assert await h.check() == []


async def test_a_declined_card_at_the_pivot_gives_the_sold_seat_back() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(BOOKING, "bk-2", booking(2, card="declined"))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.COMPENSATED and done.status == "CANCELLED"
        assert "card declined" in (done.reason or "")
        # Undone in reverse order: the sold seat, the approval, the hold, the quote.
        assert await steps(h, saga.saga_id, "compensation.succeeded") == [
            "confirm_seat",
            "authenticate",
            "hold_seat",
            "quote",
        ]
        assert await hold(h, "bk-2") == "RELEASED"
        assert await flight(h) == (0, 0)
        assert await charge(h, "bk-2") == ("DECLINED", FARE, 1)
        assert await tickets(h, "bk-2") == []
        assert await rows(h, "seats", "SELECT status FROM quotes WHERE booking = 'bk-2'") == [
            ("DROPPED",)
        ]
        assert await h.check() == []


async def test_a_hold_that_lapses_is_swept_and_never_paid_for() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(BOOKING, "bk-3", booking(3, card="slow"))
        assert (await h.saga(saga.saga_id)).status == "AWAITING_TRAVELLER"
        assert await hold(h, "bk-3") == "HELD" and await flight(h) == (1, 0)
        await h.advance(HOLD_TTL)  # the sweeper runs when the hold expires
        assert await hold(h, "bk-3") == "EXPIRED" and await flight(h) == (0, 0)
        assert (await h.saga(saga.saga_id)).status == "AWAITING_TRAVELLER"
        done = await h.run_to_end(saga.saga_id)
        # The traveller approved after SLOW_APPROVAL s, too late: the confirmation is
        # refused before any money moves, and the booking is compensated.
        assert h.clock() - saga.created_at >= SLOW_APPROVAL
        assert done.state is SagaState.COMPENSATED
        assert "confirm_seat" in (done.reason or "") and "expired" in (done.reason or "")
        assert await charge(h, "bk-3") is None and await tickets(h, "bk-3") == []
        assert await h.check() == []


async def test_a_traveller_who_never_approves_is_cancelled_when_the_bank_gives_up() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(BOOKING, "bk-4", booking(4, card="gone"))
        await h.advance(CHALLENGE_TIMEOUT - 1)
        assert (await h.saga(saga.saga_id)).state is SagaState.RUNNING
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.COMPENSATED
        assert "did not approve the payment in time" in (done.reason or "")
        assert len(await steps(h, saga.saga_id, "retry.scheduled")) > 5
        assert await hold(h, "bk-4") in ("EXPIRED", "RELEASED") and await flight(h) == (0, 0)
        assert await charge(h, "bk-4") is None
        assert await h.check() == []


async def test_lost_bank_answers_are_retried_and_the_fare_taken_once() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(BOOKING, "bk-5", booking(5, card="lost", traveller="flaky"))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED
        assert await charge(h, "bk-5") == ("CHARGED", FARE, 3)  # asked three times, once
        assert await tickets(h, "bk-5") == ["TK-bk-5"]  # busy twice, then issued
        assert await h.check() == []


async def test_a_ticketing_outage_after_the_payment_goes_to_a_person_never_back() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(BOOKING, "bk-6", booking(6, traveller="outage"))
        stuck = await h.run_to_end(saga.saga_id)
        assert stuck.state is SagaState.FAILED_NEEDS_MANUAL
        assert stuck.status == "NEEDS_ATTENTION"
        assert "issue_ticket" in (stuck.reason or "")
        assert await steps(h, saga.saga_id, "compensation.sent") == []
        # Paid and seated, not refunded: the person's to settle.
        assert await charge(h, "bk-6") == ("CHARGED", FARE, 1)
        assert await hold(h, "bk-6") == "SOLD" and await tickets(h, "bk-6") == []
        assert await h.check() == []
        await h.advance(OUTAGE)  # the ticketing system is back
        await h.engine.resolve(saga.saga_id, "retry", reason="ticketing is back", actor="ops-1")
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED
        assert await tickets(h, "bk-6") == ["TK-bk-6"]
        assert await h.check() == []


async def test_three_bookings_race_for_the_last_seat_and_one_flies() -> None:
    async with SagaHarness.for_app(app) as h:
        sagas = [
            await h.engine.start(BOOKING, f"bk-{n}", booking(n, flight=LAST_SEAT))
            for n in (7, 8, 9)
        ]
        ends = [await h.run_to_end(s.saga_id) for s in sagas]
        states = sorted(e.state.value for e in ends)
        assert states == ["COMPENSATED", "COMPENSATED", "SUCCEEDED"], states
        assert all("sold out" in (e.reason or "") for e in ends if e.reason)
        assert await flight(h, LAST_SEAT) == (0, 1)
        assert await h.check() == []


async def test_the_hold_races_hold_and_the_planted_one_loses_a_seat() -> None:
    found = await explore_all(races())
    assert [r.name for r in found] == [
        "last-seat",
        "hold-beside-sweeper",
        "confirm-beside-sweeper",
        "release-beside-confirm",
    ]
    assert all(r.complete and not r.violations for r in found), found
    (bad,) = await explore_all(read_then_write_in_tx_races())
    assert bad.name == "last-seat"
    assert any(v.startswith("counters:") or v.startswith("oversold:") for v in bad.violations)


def test_the_demo_under_chaos_ends_every_saga_with_every_invariant_holding() -> None:
    report = chaos_demo("sagakit_airline:app", seed=3)
    for state in ("SUCCEEDED", "COMPENSATED", "FAILED_NEEDS_MANUAL"):
        assert report["outcomes"].get(state, 0) > 0, report["outcomes"]


def test_the_simulator_finds_no_violation() -> None:
    done = sagakit("simulate", "--app", "sagakit_airline:app", "--seeds", "40", "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["violations"] == 0 and report["failing_seeds"] == []
    for kind in ("compensation", "post_pivot_failure", "manual_escalation"):
        assert report["exercised"][kind] > 0, kind


def test_the_simulator_catches_the_planted_read_then_write() -> None:
    done = sagakit(
        "simulate", "--app", "sagakit_airline.planted:read_then_write", "--seeds", "20", "--json"
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["failing_seeds"]
    assert any("oversold: flight LS1" in v for v in report["shrunk"]["violations"])


def test_the_simulator_cannot_see_the_read_then_write_inside_one_transaction() -> None:
    # One transaction at a time: the races above are what catch this one.
    done = sagakit(
        "simulate", "--app", "sagakit_airline.planted:read_then_write_in_tx", "--seeds", "40",
        "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
