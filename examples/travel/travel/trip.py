"""The trip saga: flight, hotel, charge (the pivot), then the confirmation e-mail.

The flight, the charge and the e-mail are *local steps*: Python callables the worker
runs, at least once each, calling the partners (:mod:`travel.partners`). The hotel is a
*command* to the hotel service (:mod:`travel.hotel`), which runs in its own process
with its own database and answers with a reply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sagakit import (
    AppContext,
    PersonalField,
    RetryPolicy,
    SagaDefinition,
    SagaView,
    Step,
    StepContext,
    StepFailed,
    StepKind,
    command,
    local,
)
from sagakit.errors import ConfigurationError

from .partners import Partners, Refused, Unavailable


# --8<-- [start:local-steps]
@contextmanager
def partner_call() -> Iterator[None]:
    """Turn a partner's answer into the step's outcome."""
    try:
        yield
    except Refused as exc:  # a definite no: the saga compensates (or, after the pivot,
        raise StepFailed(str(exc)) from exc  # a person decides)
    except Unavailable as exc:  # no answer: try again with the same key
        raise StepFailed(str(exc), retryable=True) from exc


def effect_key(ctx: StepContext) -> str:
    """The key of this step's effect at the partner.

    ``ctx.idempotency_key`` is stable across the retries of one action, but a step's
    compensation and its status query each get their own. They must name the effect of
    the action, so the flight and the charge use a key made of the saga and the step.
    """
    return f"{ctx.saga_id}:{ctx.step}"


class TripSteps:
    """The trip's local steps; ``partners`` is called on first use (in the worker)."""

    def __init__(self, partners: Callable[[], Partners]) -> None:
        self._partners = partners
        self._cached: Partners | None = None

    @property
    def partners(self) -> Partners:
        if self._cached is None:
            self._cached = self._partners()
        return self._cached

    def book_flight(self, ctx: StepContext) -> dict[str, Any]:
        with partner_call():
            return self.partners.airline.book(effect_key(ctx), ctx.business_key, ctx.data["flight"])

    def cancel_flight(self, ctx: StepContext) -> dict[str, Any]:
        with partner_call():
            return self.partners.airline.cancel(effect_key(ctx), ctx.business_key)

    def flight_voucher(self, ctx: StepContext) -> dict[str, Any]:
        with partner_call():
            return self.partners.airline.voucher(effect_key(ctx))

    def charge(self, ctx: StepContext) -> dict[str, Any]:
        with partner_call():
            return self.partners.cards.charge(
                effect_key(ctx), ctx.business_key, ctx.data["card"], ctx.data["price"]
            )

    def charge_status(self, ctx: StepContext) -> dict[str, Any]:
        # {"state": "done" | "failed" | "not_found" | "pending", ...}: see the guide.
        with partner_call():
            return self.partners.cards.status(effect_key(ctx))

    def send_confirmation(self, ctx: StepContext) -> dict[str, Any]:
        # Its own effect only: the action's idempotency key is the right one here.
        with partner_call():
            return self.partners.mailer.send(
                ctx.idempotency_key, ctx.business_key, ctx.data["traveller"]
            )


# --8<-- [end:local-steps]


def partners_of(ctx: AppContext) -> Partners:
    """The partners' files: ``--partners DIR``, else the process's data directory."""
    directory = ctx.option("partners") or ctx.data_dir
    if directory is None:
        raise ConfigurationError(
            "the trip's local steps call the partners, whose files need a directory: "
            "give --partners DIR (or TRAVEL_PARTNERS)"
        )
    return Partners(Path(directory))


# --8<-- [start:definition]
def hotel_request(v: SagaView) -> dict[str, Any]:
    """The BookHotel command's payload (tokens and numbers, no personal data)."""
    return {"trip": v.business_key, "hotel": v.data["hotel"], "nights": v.data["nights"]}


def trip_ref(v: SagaView) -> dict[str, Any]:
    return {"trip": v.business_key}


RETRY = RetryPolicy(
    max_attempts=5,  # the first try included
    initial_backoff=0.2,  # 0.2, 0.4, 0.8, 1.6 s between tries (+-20% jitter)
    timeout_multiplier=2.0,  # each try waits twice as long for its answer...
    max_timeout=60.0,  # ...up to a minute
)
PATIENT = RetryPolicy(max_attempts=30, initial_backoff=0.5, max_backoff=60.0)
"""After the pivot a step must succeed: many tries, then a person decides."""


def trip_definition(steps: TripSteps, *, timeout: float = 5.0) -> SagaDefinition:
    """The trip saga, version 1; ``timeout``: seconds the first try of a step waits."""
    return SagaDefinition(
        "trip",
        version=1,
        deadline=600.0,  # past it before the pivot: compensated, TIMED_OUT
        started_status="BOOKING",
        completed_status="CONFIRMED",
        # Personal data: the traveller and the card are tokens of the services that own
        # them (trv-..., card-...); the engine refuses a start with anything else there,
        # and one with an e-mail address or a card number in any other field.
        personal={
            "traveller": PersonalField("refuse", kind="trv"),
            "card": PersonalField("refuse", kind="card"),
        },
        steps=[
            Step(
                "flight",
                local(steps.book_flight),
                # A compensation ladder: cancel; if the airline refuses, a voucher.
                [local(steps.cancel_flight), local(steps.flight_voucher)],
                timeout=timeout,
                retry=RETRY,
            ),
            Step(
                "hotel",
                command("hotel", "BookHotel", hotel_request),
                command("hotel", "CancelHotel", trip_ref),
                status_query=command("hotel", "GetHotelBooking", trip_ref),
                timeout=timeout,
                retry=RETRY,
            ),
            Step(
                "charge",
                local(steps.charge),
                kind=StepKind.PIVOT,  # the point of no return
                status="PAYING",
                status_query=local(steps.charge_status),
                timeout=timeout,
                retry=RETRY,
            ),
            Step(
                "email",
                local(steps.send_confirmation),
                kind=StepKind.RETRIABLE,  # after the pivot: retried, never undone
                status="CONFIRMING",
                timeout=timeout,
                retry=PATIENT,
            ),
        ],
    )


# --8<-- [end:definition]
