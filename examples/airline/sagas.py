"""The booking saga: quote, hold a seat, the traveller approves, confirm the seat, charge
the fare (the pivot), issue the ticket.

* ``quote`` (seats): the fare and the seats left, kept as the booking's offer; it
  holds no seat. Undone by ``DropQuote`` (the offer is withdrawn).
* ``hold_seat`` (seats): a seat set aside for :data:`~.seats.HOLD_TTL` seconds;
  undone by ``ReleaseSeat``.
* ``authenticate`` (payments): the traveller approves the payment at the bank (3-D
  Secure). It may take longer than the hold lives. Undone by ``CancelChallenge`` (the
  bank withdraws the challenge).
* ``confirm_seat`` (seats): the held seat becomes sold, only while the hold is alive;
  a lapsed hold (swept or not) is refused for good and the booking is compensated
  before any money moves. Undone by ``ReleaseSeat``, which gives a sold seat back too.
* ``charge`` (payments, the PIVOT): the fare is taken. A declined card compensates the
  seat; once it is charged, the booking only goes forward. When every answer is lost,
  the status query ``GetCharge`` asks the bank what became of it.
* ``issue_ticket`` (ticketing, retriable): retried while the ticketing system is down;
  when it stays down, a person decides (retry once it is back, or settle by hand).
  Nothing refunds the fare on its own.

Confirming the seat *before* the charge is what keeps a lapsed hold from being paid
for: after the pivot, the seat is already sold to the booking and cannot lapse.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sagakit import PersonalField, RetryPolicy, SagaDefinition, SagaView, Step, StepKind, command

BOOKING = "booking"
"""The saga definition's name."""

COMMAND_TIMEOUT = 2.0
"""Seconds the first try of a command waits for its answer (later tries wait longer)."""

RETRY = RetryPolicy(
    max_attempts=5, initial_backoff=0.1, max_backoff=1.0, timeout_multiplier=2.0, max_timeout=8.0
)
"""Steps before the pivot and the compensations."""

APPROVAL = dataclasses.replace(
    RETRY, max_attempts=16, initial_backoff=0.5, multiplier=1.5, max_backoff=1.5
)
"""The traveller's approval: asked again every second or so, for longer than the bank
waits for an answer (:data:`~.payments.CHALLENGE_TIMEOUT`)."""

FORWARD = dataclasses.replace(RETRY, max_attempts=8, max_backoff=2.0)
"""The pivot and the ticket: tried for about half a minute, then a person."""

DEADLINE = 90.0
"""The booking's SLA in seconds: not charged by then, it is compensated (TIMED_OUT);
charged, a person looks at it."""

PERSONAL = {
    "traveller": PersonalField("refuse"),
    "card": PersonalField("refuse"),
    "flight": PersonalField("public"),
}
"""The traveller and the card are tokens of the systems that own them, never names or
card numbers: the engine refuses anything else before it is stored."""


def _data(v: SagaView, name: str, default: str) -> str:
    # ``sagakit check`` explores the definition with data of its own ({"n": i}).
    return str(v.data.get(name, default))


def _quote(v: SagaView) -> dict[str, Any]:
    return {"booking": v.business_key, "flight": _data(v, "flight", "SK100")}


def _ref(v: SagaView) -> dict[str, Any]:
    return {"booking": v.business_key}


def _card(v: SagaView) -> dict[str, Any]:
    return {"booking": v.business_key, "card": _data(v, "card", "card-ok-0")}


def _charge(v: SagaView) -> dict[str, Any]:
    return {**_card(v), "amount": int(v.results.get("quote", {}).get("fare", 1))}


def _ticket(v: SagaView) -> dict[str, Any]:
    return {**_quote(v), "traveller": _data(v, "traveller", "pax-ok-0")}


# --8<-- [start:definition]
def booking_definition(*, timeout: float = COMMAND_TIMEOUT) -> SagaDefinition:
    """The booking saga, version 1."""
    return SagaDefinition(
        BOOKING,
        version=1,
        deadline=DEADLINE,
        started_status="QUOTING",
        completed_status="TICKETED",
        personal=PERSONAL,
        steps=[
            Step(
                "quote",
                command("seats", "QuoteFare", _quote),
                command("seats", "DropQuote", _ref),
                status="QUOTING",
                timeout=timeout,
                retry=RETRY,
            ),
            Step(
                "hold_seat",
                command("seats", "HoldSeat", _quote),
                command("seats", "ReleaseSeat", _ref),
                status="HOLDING",
                timeout=timeout,
                retry=RETRY,
            ),
            Step(
                "authenticate",
                command("payments", "AuthenticateCard", _card),
                command("payments", "CancelChallenge", _ref),
                status="AWAITING_TRAVELLER",
                timeout=timeout,
                retry=APPROVAL,
            ),
            Step(
                "confirm_seat",
                command("seats", "ConfirmSeat", _ref),
                command("seats", "ReleaseSeat", _ref),
                status="CONFIRMING",
                timeout=timeout,
                retry=RETRY,
            ),
            Step(
                "charge",
                command("payments", "ChargeFare", _charge),
                kind=StepKind.PIVOT,
                status_query=command("payments", "GetCharge", _ref),
                status="PAYING",
                timeout=timeout,
                retry=FORWARD,
            ),
            Step(
                "issue_ticket",
                command("ticketing", "IssueTicket", _ticket),
                kind=StepKind.RETRIABLE,
                status="TICKETING",
                timeout=timeout,
                retry=FORWARD,
            ),
        ],
    )


# --8<-- [end:definition]


def booking() -> SagaDefinition:
    """The booking saga, for tools that take a definition
    (``sagakit check sagakit_airline.sagas:booking``, ``sagakit graph``)."""
    return booking_definition()
