"""A user's own saga tested with the pytest plugin only (no sagakit internals).

The plugin's fixtures put a real engine and the user's participants on SQLite files in
the test's tmp_path and drive them with a virtual clock: the flight service below is
down for good, the step times out after two minutes, is retried twice, and the hotel
booked before it is cancelled -- in well under a second of real time.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from sagakit import (
    Envelope,
    Participant,
    RetryPolicy,
    SagaDefinition,
    SagaState,
    Step,
    StepKind,
    command,
    local,
)

TIMEOUT = 120.0  # two minutes for the flight service to answer


def trip() -> SagaDefinition:
    return SagaDefinition(
        "trip",
        [
            Step("hotel", command("hotel", "Book"), command("hotel", "Cancel")),
            Step(
                "flight",
                command("airline", "Book"),
                command("airline", "Cancel"),
                timeout=TIMEOUT,
                retry=RetryPolicy(max_attempts=3, initial_backoff=10.0, jitter=0.0),
            ),
            Step("confirm", local(lambda ctx: {"confirmed": True}), kind=StepKind.PIVOT),
        ],
    )


def hotel(store: Any, booked: set[str]) -> Participant:
    p = Participant("hotel", store)

    @p.handles("Book")
    def book(tx: Any, cmd: Envelope) -> dict[str, Any]:
        booked.add(cmd.saga_id or "")
        return {"room": "101"}

    @p.handles("Cancel")
    def cancel(tx: Any, cmd: Envelope) -> dict[str, Any]:
        booked.discard(cmd.saga_id or "")
        return {}

    return p


def airline(store: Any, calls: list[int], *, down: bool) -> Participant:
    p = Participant("airline", store)

    @p.handles("Book")
    def book(tx: Any, cmd: Envelope) -> dict[str, Any]:
        calls.append(cmd.attempt)
        if down:
            raise ConnectionError("the airline's system is down")
        return {"seat": "12A"}

    @p.handles("Cancel")
    def cancel(tx: Any, cmd: Envelope) -> dict[str, Any]:
        return {}

    return p


async def test_a_silent_service_times_out_is_retried_and_the_done_steps_are_compensated(
    saga_harness: Any,
) -> None:
    booked: set[str] = set()
    calls: list[int] = []
    h = saga_harness([trip()])
    h.add(hotel(h.store("hotel"), booked))
    h.add(airline(h.store("airline"), calls, down=True))
    started = time.monotonic()
    async with h:
        saga = await h.start("trip", "trip-1", {"price": 420})
        assert booked == {saga.saga_id}
        still = await h.saga(saga.saga_id)
        assert still.state is SagaState.RUNNING  # nothing answers before the timeout
        await h.advance(TIMEOUT - 1)
        assert "step.timed_out" not in await h.events(saga.saga_id)
        await h.advance(1)
        assert "step.timed_out" in await h.events(saga.saga_id)
        done = await h.run_to_end(saga.saga_id)
        await h.assert_state(saga.saga_id, SagaState.COMPENSATED)
        events = await h.events(saga.saga_id)
    assert done.state is SagaState.COMPENSATED
    assert events.count("step.timed_out") == 3  # three attempts of two minutes each
    assert "compensation.succeeded" in events
    assert booked == set()  # the hotel was cancelled
    assert set(calls) >= {1, 2, 3}  # each attempt reached the airline, with its number
    # Six virtual minutes, not six real ones (the airline's 60 failed deliveries and
    # their backoffs take most of the real time).
    assert time.monotonic() - started < 10.0


def unready_airline(store: Any) -> Participant:
    """An airline that cannot book yet: its service knows only Cancel, so every Book is
    parked as a dead letter at once and never answered."""
    p = Participant("airline", store)

    @p.handles("Cancel")
    def cancel(tx: Any, cmd: Envelope) -> dict[str, Any]:
        return {}

    return p


async def test_a_two_minute_timeout_takes_well_under_a_second(saga_harness: Any) -> None:
    booked: set[str] = set()
    h = saga_harness([trip()])
    h.add(hotel(h.store("hotel"), booked))
    h.add(unready_airline(h.store("airline")))
    async with h:
        started = time.monotonic()
        saga = await h.start("trip", "trip-4", {})
        done = await h.run_to_end(saga.saga_id)
        took = time.monotonic() - started
        events = await h.events(saga.saga_id)
    assert done.state is SagaState.COMPENSATED, events
    assert events.count("step.timed_out") == 3 and booked == set()
    assert took < 1.0, f"{took:.2f}s of real time for six virtual minutes"


async def test_a_healthy_trip_succeeds_without_moving_the_clock(
    saga_harness: Any, saga_clock: Any
) -> None:
    h = saga_harness([trip()])
    h.add(hotel(h.store("hotel"), set()))
    h.add(airline(h.store("airline"), [], down=False))
    async with h:
        before = saga_clock()
        saga = await h.start("trip", "trip-2", {"price": 99})
        done = await h.assert_state(saga.saga_id, SagaState.SUCCEEDED)
        assert done.terminal and saga_clock() == before


async def test_a_service_that_never_answers_hands_the_saga_to_a_person(
    saga_harness: Any,
) -> None:
    h = saga_harness([trip()])
    h.add(hotel(h.store("hotel"), set()))
    # No airline at all: its commands wait in their mailbox and nobody answers, not even
    # the cancel of a booking that may have happened -- a person must look.
    async with h:
        saga = await h.start("trip", "trip-3", {})
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.FAILED_NEEDS_MANUAL
        assert "airline.Cancel" in (done.reason or "") and "outcome unknown" in (done.reason or "")
        with pytest.raises(AssertionError, match="expected SUCCEEDED"):
            await h.assert_state(saga.saga_id, SagaState.SUCCEEDED)


async def test_the_clock_only_moves_forward(saga_clock: Any) -> None:
    with pytest.raises(ValueError, match="only moves forward"):
        saga_clock.advance(-1)


@pytest.mark.parametrize("seed", range(5))
async def test_faults_injected_through_the_harness_still_end_every_saga(
    saga_harness: Any, seed: int
) -> None:
    from sagakit.testing.faults import Faults

    rooms: set[str] = set()
    h = saga_harness([trip()], faults=Faults.named("chaos", seed))
    h.add(hotel(h.store("hotel"), rooms))
    h.add(airline(h.store("airline"), [], down=False))
    async with h:
        sagas = [await h.start("trip", f"trip-{seed}-{n}", {}) for n in range(5)]
        for saga in sagas:
            done = await h.run_to_end(saga.saga_id)
            assert done.state is SagaState.SUCCEEDED, await h.events(saga.saga_id)
    assert rooms == {s.saga_id for s in sagas}
