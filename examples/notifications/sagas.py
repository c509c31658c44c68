"""The saga: hold stock, place the order (the pivot), then e-mail and text the customer.

::

    reserve (orders)  ->  place (orders, PIVOT)  ->  email  ->  sms
    undo: release         no way back               retried, never compensated

Before the pivot a failure (sold out, card declined, the deadline) releases the hold.
Once the order is placed the notifications are owed: ``email`` and ``sms`` are
``retriable`` steps with no compensation. A provider outage is retried with backoff
(growing to two minutes) for as long as the saga's deadline allows; past it the saga
goes to a person (FAILED_NEEDS_MANUAL) with the step that is stuck. Every try of a
step carries the same idempotency key, which the services hand to their providers:
whatever happens to the answers, the customer gets each message once.

Durations are story time (a twenty-minute deadline, outages of minutes or hours),
multiplied by the app's ``time_scale`` option: 0.01 by default, so that the demo runs
in seconds of real time; the testing kit runs the story at scale 1 on its virtual
clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sagakit import (
    ConfigurationError,
    RetryPolicy,
    SagaDefinition,
    SagaView,
    Step,
    StepKind,
    command,
)

from . import mail, sms

NAME = "order_notifications"
"""The saga's name (business key: the order id)."""

DEADLINE = 20 * 60.0
"""The saga's deadline, story seconds: the customer hears from us within 20 minutes, or
a person looks into it."""
COMMAND_TIMEOUT = 1.0
"""Seconds (real, not scaled) to wait for a service's answer before trying again."""
FORWARD_BACKOFF = (10.0, 120.0)
"""First and longest wait between two tries of a notification, story seconds."""

PERSONAL = {"customer": "refuse", "card": "refuse"}
"""Both are tokens issued elsewhere (``cus-...``, ``card-...``), never the values."""


def _order(view: SagaView) -> dict[str, Any]:
    return {"order": view.business_key}


def _hold(view: SagaView) -> dict[str, Any]:
    return {"order": view.business_key, "sku": view.data["sku"], "qty": view.data["qty"]}


def _placement(view: SagaView) -> dict[str, Any]:
    d = view.data
    return {
        "order": view.business_key,
        "customer": d["customer"],
        "amount": d["amount"],
        "card": d["card"],
    }


def _message(route_field: str) -> Callable[[SagaView], Mapping[str, Any]]:
    """The payload of a notification command: the customer's route on that channel."""

    def build(view: SagaView) -> Mapping[str, Any]:
        return {
            "order": view.business_key,
            "customer": view.data["customer"],
            "route": view.data[route_field],
        }

    return build


# --8<-- [start:definition]
def order_notifications(*, time_scale: float = 1.0) -> SagaDefinition:
    """The saga's definition, with its story durations multiplied by ``time_scale``."""
    if not 0 < time_scale < float("inf"):
        raise ConfigurationError(f"time_scale must be a positive number, got {time_scale!r}")
    first, longest = (s * time_scale for s in FORWARD_BACKOFF)
    # After the pivot the deadline bounds the retries, not a count: the budget of
    # tries is far beyond what the deadline lets run.
    forward = RetryPolicy(
        max_attempts=100_000, initial_backoff=first, multiplier=2.0, max_backoff=longest
    )
    before = RetryPolicy(max_attempts=4, initial_backoff=0.05, max_backoff=0.5)
    return SagaDefinition(
        NAME,
        deadline=DEADLINE * time_scale,
        personal=PERSONAL,
        started_status="PLACING",
        completed_status="NOTIFIED",
        steps=[
            Step(
                "reserve",
                command("orders", "ReserveStock", _hold),
                command("orders", "ReleaseStock", _order),
                status="PLACING",
                timeout=COMMAND_TIMEOUT,
                retry=before,
            ),
            Step(
                "place",
                command("orders", "PlaceOrder", _placement),
                kind=StepKind.PIVOT,
                status="PLACING",
                status_query=command("orders", "GetOrder", _order),
                timeout=COMMAND_TIMEOUT,
                retry=RetryPolicy(max_attempts=6, initial_backoff=0.05, max_backoff=0.5),
            ),
            Step(
                "email",
                command("email", mail.SEND, _message("email_route")),
                kind=StepKind.RETRIABLE,
                status="CONFIRMING",
                timeout=COMMAND_TIMEOUT,
                retry=forward,
            ),
            Step(
                "sms",
                command("sms", sms.SEND, _message("sms_route")),
                kind=StepKind.RETRIABLE,
                status="TEXTING",
                timeout=COMMAND_TIMEOUT,
                retry=forward,
            ),
        ],
    )


# --8<-- [end:definition]
