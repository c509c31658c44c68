"""The ride saga: hold, find a driver, pick up (the pivot), drive, capture the fare.

    hold      payments.HoldFare     compensation: payments.ReleaseHold
    dispatch  dispatch.FindDriver   compensation: dispatch.ReleaseDriver   (a person)
    pickup    dispatch.StartTrip    PIVOT, status query dispatch.GetTrip    (a person)
    trip      dispatch.EndTrip      retriable                                (a person)
    fare      payments.CaptureFare  retriable

The three dispatch steps are human steps: the service defers its answer until a
driver acts (:mod:`.dispatch`), so their timeouts are the story's patience, in story
minutes (:mod:`.timing`): the saga waits two minutes for a driver (four tries of half
a minute: a retry finds the offer waiting and waits on), six for the pickup before it
asks where the trip is, and two hours for the end of the trip. The payment steps talk
to a machine; their timeouts are plain seconds, growing from one try to the next.

Before the pivot a failure or a rider's cancel compensates: the driver is released, the
hold on the card too. After it, nothing is undone: the trip is driven to its end and
the fare captured, retried until it is, or a person decides.
"""

from __future__ import annotations

from typing import Any

from sagakit import (
    PersonalField,
    RetryPolicy,
    Rung,
    SagaDefinition,
    SagaView,
    Step,
    StepKind,
    command,
)

from .fares import hold_for

RIDE = "ride"
"""The definition's name."""

MACHINE = RetryPolicy(
    max_attempts=6,
    initial_backoff=0.2,
    max_backoff=5.0,
    timeout_multiplier=2.0,
    max_timeout=30.0,
)
"""Steps that talk to a machine (the card network, a release): a try unanswered for
:data:`MACHINE_TIMEOUT` seconds is sent again, each later try waiting twice as long."""
MACHINE_TIMEOUT = 2.0
FORWARD = RetryPolicy(
    max_attempts=12,
    initial_backoff=0.2,
    max_backoff=10.0,
    timeout_multiplier=2.0,
    max_timeout=30.0,
)
"""The capture, after the pivot: more patient, then a person decides."""


def _hold(v: SagaView) -> dict[str, Any]:
    return {"ride": v.business_key, "card": v.data["card"], "amount": hold_for(v.data["minutes"])}


def _request(v: SagaView) -> dict[str, Any]:
    d = v.data
    return {
        "ride": v.business_key,
        "rider": d["rider"],
        "zone": d["zone"],
        "minutes": d["minutes"],
        "detour": bool(d.get("detour")),
        "cancel_after": d.get("cancel_after"),
    }


def _ref(v: SagaView) -> dict[str, Any]:
    return {"ride": v.business_key}


def _fare(v: SagaView) -> dict[str, Any]:
    # The fare the trip's end reported. A person who marked the trip done by hand may
    # have left no result: the capture then refuses, and the person decides again.
    trip = v.results.get("trip") or {}
    return {"ride": v.business_key, "fare": trip.get("fare")}


# --8<-- [start:definition]
def ride_definition(minute: float = 60.0) -> SagaDefinition:
    """The ride saga, version 1, with ``minute`` seconds to a story minute."""
    release_driver = Rung(
        command("dispatch", "ReleaseDriver", _ref), retry=MACHINE, timeout=MACHINE_TIMEOUT
    )
    return SagaDefinition(
        RIDE,
        version=1,
        started_status="REQUESTED",
        completed_status="PAID",
        cancelling_status="CANCELLING",
        cancelled_status="CANCELLED",
        # The rider and the card are tokens of the services that own them: the engine
        # refuses a start with anything else there.
        personal={
            "rider": PersonalField("refuse", kind="rdr"),
            "card": PersonalField("refuse", kind="card"),
            "zone": PersonalField("public"),
        },
        steps=[
            Step(
                "hold",
                command("payments", "HoldFare", _hold),
                command("payments", "ReleaseHold", _ref),
                timeout=MACHINE_TIMEOUT,
                retry=MACHINE,
            ),
            Step(
                "dispatch",
                command("dispatch", "FindDriver", _request),
                release_driver,
                status="FINDING_DRIVER",
                # Two minutes for a driver: four tries of half a minute each. A retry
                # only re-sends the offer (the service keeps waiting on it); when the
                # last one runs out the outcome is unknown, and before the pivot the
                # saga compensates: the offer is withdrawn, the hold released.
                timeout=0.5 * minute,
                retry=RetryPolicy(max_attempts=4, initial_backoff=0.0, jitter=0.0),
            ),
            Step(
                "pickup",
                command("dispatch", "StartTrip", _ref),
                kind=StepKind.PIVOT,
                status="DRIVER_ON_THE_WAY",
                status_query=command("dispatch", "GetTrip", _ref),
                # The driver needs two to eight minutes. The saga re-sends every two
                # minutes, three times; then it asks where the trip is (GetTrip), three
                # times, one and a half then three minutes apart, before a person looks
                # (some ten minutes in: no driver is that slow).
                timeout=2.0 * minute,
                retry=RetryPolicy(
                    max_attempts=3, initial_backoff=1.5 * minute, max_backoff=3.0 * minute
                ),
            ),
            Step(
                "trip",
                command("dispatch", "EndTrip", _ref),
                kind=StepKind.RETRIABLE,
                status="ON_TRIP",
                # Trips last up to an hour and more: the saga re-sends every ten minutes
                # for two hours (a lost command costs ten minutes, not the ride).
                timeout=10.0 * minute,
                retry=RetryPolicy(
                    max_attempts=12, initial_backoff=0.1 * minute, max_backoff=minute
                ),
            ),
            Step(
                "fare",
                command("payments", "CaptureFare", _fare),
                kind=StepKind.RETRIABLE,
                status="CHARGING",
                timeout=MACHINE_TIMEOUT,
                retry=FORWARD,
            ),
        ],
    )


# --8<-- [end:definition]
