"""The ride-hailing example app (examples/ride): rides that last minutes to hours on the
testing kit's virtual clock, its demo under chaos, and the simulator on its real
handlers, with and without the planted bug."""

from __future__ import annotations

import json
from typing import Any

import pytest
from example_support import chaos_demo, sagakit, steps
from sagakit_ride import app
from sagakit_ride.fares import fare_for, hold_for
from sagakit_ride.planted import cancel_after_start
from sagakit_ride.sagas import RIDE

from sagakit import SagaState
from sagakit.testing.kit import SagaHarness

MINUTE = 60.0
"""The kit runs the app with its default options: real minutes, on a virtual clock."""


def ride(n: int, **changes: Any) -> dict[str, Any]:
    """A ride's data: 20 minutes in the centre, a good card, a rider who never cancels."""
    data: dict[str, Any] = {
        "rider": f"rdr-{n}",
        "card": f"card-ok-{n}",
        "zone": "centre",
        "minutes": 20,
        "detour": False,
        "cancel_after": None,
    }
    data.update(changes)
    return data


async def rows(h: SagaHarness, store: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` in a service's own store."""
    assert h.deployment is not None
    async with h.deployment.store(store).transaction() as tx:
        return await tx.fetchall(sql, params)


async def hold(h: SagaHarness, key: str) -> tuple[str, int, int | None] | None:
    """(status, amount, captured) of the ride's hold on the card."""
    found = await rows(
        h, "payments", "SELECT status, amount, captured FROM holds WHERE ride = ?", key
    )
    return None if not found else (str(found[0][0]), int(found[0][1]), found[0][2])


async def card_ops(h: SagaHarness, key: str) -> list[str]:
    """The operations of the card ledger for the ride, sorted."""
    found = await rows(h, "payments", "SELECT op FROM card_ledger WHERE ride = ? ORDER BY op", key)
    return [str(r[0]) for r in found]


async def trip(h: SagaHarness, key: str) -> dict[str, Any]:
    """The ride's row at dispatch."""
    found = await rows(
        h,
        "dispatch",
        "SELECT status, driver, started_at, ended_at, fare, minutes, why FROM rides WHERE ride = ?",
        key,
    )
    assert found, f"dispatch has no ride {key}"
    names = ("status", "driver", "started_at", "ended_at", "fare", "minutes", "why")
    return dict(zip(names, found[0], strict=True))


async def busy_drivers(h: SagaHarness) -> list[tuple[str, str]]:
    """(driver, ride) of every driver serving a ride."""
    found = await rows(h, "dispatch", "SELECT driver_id, ride FROM drivers WHERE ride IS NOT NULL")
    return [(str(d), str(r)) for d, r in found]


async def rider_cancel(h: SagaHarness, key: str) -> tuple[str, str | None] | None:
    """(status, why) of the rider's cancel request."""
    found = await rows(h, "dispatch", "SELECT status, why FROM rider_cancels WHERE ride = ?", key)
    return None if not found else (str(found[0][0]), found[0][1])


async def test_a_ride_is_held_dispatched_driven_and_paid() -> None:
    async with SagaHarness.for_app(app) as h:
        begun = h.clock()
        saga = await h.start(RIDE, "ride-1", ride(1))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED and done.status == "PAID"
        assert await steps(h, saga.saga_id, "step.succeeded") == [
            "hold",
            "dispatch",
            "pickup",
            "trip",
            "fare",
        ]
        assert "compensation.started" not in await h.events(saga.saga_id)
        row = await trip(h, "ride-1")
        assert row["status"] == "ENDED" and row["started_at"] is not None
        assert row["fare"] == fare_for(row["minutes"])
        # The saga waited for people for most of half an hour of virtual time.
        assert h.clock() - begun >= 17 * MINUTE
        assert await hold(h, "ride-1") == ("CAPTURED", hold_for(20), row["fare"])
        assert await card_ops(h, "ride-1") == ["capture", "hold"]
        assert await busy_drivers(h) == []  # the driver is free again
        assert await h.check() == []


async def test_a_rider_who_cancels_before_the_pickup_is_released_and_not_charged() -> None:
    async with SagaHarness.for_app(app) as h:
        # 1.7 minutes in: a driver accepted (within 1.5), and is on the way (2 or more).
        saga = await h.start(RIDE, "ride-2", ride(2, cancel_after=1.7))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.COMPENSATED and done.status == "CANCELLED"
        assert done.reason == "step 'pickup' failed: the rider cancelled"
        assert await steps(h, saga.saga_id, "step.failed") == ["pickup"]
        # Undone in reverse order: the driver, then the hold on the card.
        assert await steps(h, saga.saga_id, "compensation.succeeded") == ["dispatch", "hold"]
        assert (await trip(h, "ride-2"))["status"] == "CANCELLED"
        assert await rider_cancel(h, "ride-2") == ("ACCEPTED", None)
        assert await hold(h, "ride-2") == ("RELEASED", hold_for(20), None)
        assert await card_ops(h, "ride-2") == ["hold", "release"]
        assert await busy_drivers(h) == []
        assert await h.check() == []


async def test_no_driver_within_two_minutes_cancels_and_releases_the_hold() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(RIDE, "ride-3", ride(3, zone="desert"))  # no drivers there
        await h.advance(1.9 * MINUTE)
        waiting = await h.assert_state(saga.saga_id, SagaState.RUNNING)
        assert waiting.status == "FINDING_DRIVER"
        assert await hold(h, "ride-3") == ("HELD", hold_for(20), None)
        await h.advance(0.2 * MINUTE)
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.COMPENSATED
        history = await h.history(saga.saga_id)
        asked = next(e.at for e in history if e.event == "step.started" and e.step == "dispatch")
        gave_up = next(e.at for e in history if e.event == "outcome.unknown")
        assert gave_up - asked == pytest.approx(2 * MINUTE)  # four tries of half a minute
        assert await steps(h, saga.saga_id, "step.timed_out") == ["dispatch"] * 4
        assert await steps(h, saga.saga_id, "compensation.succeeded") == ["dispatch", "hold"]
        row = await trip(h, "ride-3")
        assert (row["status"], row["why"]) == ("WITHDRAWN", "no driver in time")
        assert await hold(h, "ride-3") == ("RELEASED", hold_for(20), None)
        assert await h.check() == []


async def test_a_slow_pickup_is_asked_about_and_waited_for() -> None:
    async with SagaHarness.for_app(app) as h:
        # This ride's driver needs almost eight minutes to the pickup (drawn from the
        # ride id): longer than the saga's three tries of two minutes.
        saga = await h.start(RIDE, "ride-198", ride(198))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED
        events = [(e.event, e.step) for e in await h.history(saga.saga_id)]
        assert events.count(("step.timed_out", "pickup")) == 3
        assert ("status.queried", "pickup") in events  # GetTrip: where is the trip?
        answers = [
            e.detail["state"] for e in await h.history(saga.saga_id) if e.event == "status.answered"
        ]
        assert answers == ["pending", "pending", "done"]  # on the way, on the way, on board
        assert await h.check() == []


async def test_a_cancel_during_the_trip_is_refused_and_the_fare_captured() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(RIDE, "ride-4", ride(4, minutes=30, cancel_after=15.0))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED
        assert await rider_cancel(h, "ride-4") == (
            "REFUSED",
            "the trip has started: past the point of no return",
        )
        row = await trip(h, "ride-4")
        assert row["status"] == "ENDED"
        assert await hold(h, "ride-4") == ("CAPTURED", hold_for(30), row["fare"])
        assert await h.check() == []


async def test_the_saga_cancel_is_refused_once_the_rider_is_on_board() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(RIDE, "ride-5", ride(5, minutes=40))
        await h.advance(12 * MINUTE)  # accepted within 1.5 minutes, picked up within 8
        on_trip = await h.assert_state(saga.saga_id, SagaState.RUNNING)
        assert on_trip.status == "ON_TRIP"
        await h.engine.cancel(saga.saga_id, "the rider asked the support desk")
        assert "cancel.refused" in await h.events(saga.saga_id)
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED
        assert (await hold(h, "ride-5") or ("",))[0] == "CAPTURED"
        assert await h.check() == []


async def test_a_busy_card_network_is_retried_until_the_fare_is_captured() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(RIDE, "ride-6", ride(6, card="card-flaky-6"))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED
        retried = [
            e.step
            for e in await h.history(saga.saga_id)
            if e.event == "retry.scheduled" and e.step == "fare"
        ]
        assert retried == ["fare", "fare"]
        (tries,) = await rows(
            h, "payments", "SELECT capture_tries FROM holds WHERE ride = ?", "ride-6"
        )
        assert tries[0] == 3
        assert await card_ops(h, "ride-6") == ["capture", "hold"]  # captured once
        assert await h.check() == []


async def test_a_detour_above_the_hold_goes_to_a_person_who_settles_it() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(RIDE, "ride-7", ride(7, minutes=10, detour=True))
        stuck = await h.run_to_end(saga.saga_id)
        assert stuck.state is SagaState.FAILED_NEEDS_MANUAL
        assert "above the hold" in (stuck.reason or "")
        assert (await trip(h, "ride-7"))["status"] == "ENDED"  # driven, never undone
        assert await hold(h, "ride-7") == ("HELD", hold_for(10), None)
        assert await h.check() == []  # the ride is a person's now
        # The person charged the difference by other means, and says so.
        await h.engine.resolve(
            saga.saga_id, "mark_done", reason="charged the detour by hand", actor="ops-1"
        )
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED
        assert await h.check() == []


async def test_two_rides_race_for_the_one_driver_of_a_hill() -> None:
    async with SagaHarness.for_app(app) as h:
        sagas = [await h.start(RIDE, f"ride-r{i}", ride(10 + i, zone="hill-3")) for i in range(2)]
        done = [await h.run_to_end(s.saga_id) for s in sagas]
        assert sorted(d.state.value for d in done) == ["COMPENSATED", "SUCCEEDED"]
        (loser,) = [d for d in done if d.state is SagaState.COMPENSATED]
        assert loser.reason == "step 'dispatch' timed out 4 times; outcome unknown"
        assert (await trip(h, loser.business_key))["status"] == "WITHDRAWN"
        assert (await hold(h, loser.business_key) or ("",))[0] == "RELEASED"
        assert await h.check() == []


async def test_the_planted_cancel_after_start_is_caught_by_the_checks() -> None:
    async with SagaHarness.for_app(cancel_after_start()) as h:
        saga = await h.start(RIDE, "ride-8", ride(8, minutes=30, cancel_after=15.0))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.FAILED_NEEDS_MANUAL  # the trip's end failed
        problems = await h.check()
        assert problems == [
            "started-never-cancelled: ride ride-8 started its trip and was then cancelled"
        ]


def test_the_demo_under_chaos_ends_every_saga_with_every_invariant_holding() -> None:
    # The demo's story minute (0.2 s): the longest trip, 80 minutes, ends within 16 s.
    report = chaos_demo("sagakit_ride:app")
    assert report["outcomes"].get("SUCCEEDED", 0) > 0
    assert report["outcomes"].get("COMPENSATED", 0) > 0


@pytest.mark.slow
def test_the_simulator_finds_no_violation() -> None:
    done = sagakit("simulate", "--app", "sagakit_ride:app", "--seeds", "40", "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["violations"] == 0 and report["failing_seeds"] == []
    for kind in ("compensation", "unknown_outcome", "status_query", "manual_escalation", "cancel"):
        assert report["exercised"][kind] > 0, kind


@pytest.mark.slow
def test_the_simulator_catches_the_planted_cancel_after_start() -> None:
    done = sagakit(
        "simulate", "--app", "sagakit_ride.planted:cancel_after_start", "--seeds", "20", "--json"
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["failing_seeds"]
    assert any("started-never-cancelled" in v for v in report["shrunk"]["violations"])
