"""The orchestrated checkout saga.

CreateOrder -> AuthorizePayment -> ReserveInventory -> CreateShipment -> CapturePayment
(the pivot: money is taken) -> CommitInventory -> CompleteOrder.

Before the pivot every step has a compensation: CancelOrder, the payment ladder
(void the authorisation -> refund -> credit note), ReleaseInventory, CancelShipment.
After it, steps are retried until they succeed or a person decides. Commands carry
tokens (customer, card, address), never personal data.

The two payment steps talk to an external card provider, whose answer can be lost
after it acted (a timeout after success). When their attempts run out without an
answer, the saga does not guess: it asks ``GetPaymentStatus`` what became of the
action's idempotency key, and continues, compensates or escalates on the answer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sagakit import (
    CommandAction,
    PersonalField,
    RetryPolicy,
    SagaDefinition,
    SagaView,
    Step,
    StepKind,
    command,
)

CHECKOUT = "checkout"

# Embedded replies arrive in milliseconds; a command unanswered for 2 s is retried with
# the same idempotency key. Each later attempt waits twice as long (at most 30 s): a
# burst of orders puts commands in line behind each other, and a fixed 2 s would take
# the line for lost messages (6 attempts in ~12 s, then "outcome unknown" for every
# order in the burst). With growing waits the 6 attempts span ~90 s before the outcome
# is treated as unknown. Deployments tune the first wait (``sagakit worker
# --command-timeout``).
COMMAND_TIMEOUT = 2.0
MAX_COMMAND_TIMEOUT = 30.0
RETRY = RetryPolicy(
    max_attempts=6,
    initial_backoff=0.1,
    max_backoff=2.0,
    timeout_multiplier=2.0,
    max_timeout=MAX_COMMAND_TIMEOUT,
)
FORWARD = dataclasses.replace(RETRY, max_attempts=12)
DEADLINE = 120.0
"""The checkout's SLA in seconds (inventory reservations live longer than this)."""

PERSONAL = {
    "customer": PersonalField("refuse"),
    "card": PersonalField("refuse"),
    "ship_to": PersonalField("refuse"),
    "sku": PersonalField("public"),  # a product code, never personal (barcodes look like cards)
}
"""The order's personal fields: tokens of the services that own the data (the order
service's customers, the payment service's card vault; see :mod:`.personal`). The
engine refuses a start that holds anything else there, before anything is stored. Any
token is taken (``kind-`` and an id with a digit), as ``POST /orders`` takes them: the
fake provider's made-up tokens have kinds of their own."""


def _order(v: SagaView) -> dict[str, Any]:
    return {
        "order_id": v.business_key,
        **{k: v.data[k] for k in ("customer", "sku", "qty", "amount")},
    }


def _payment(v: SagaView) -> dict[str, Any]:
    d = v.data
    return {
        "order_id": v.business_key,
        "amount": d["amount"],
        "currency": d["currency"],
        "card": d["card"],
    }


def _stock(v: SagaView) -> dict[str, Any]:
    return {"order_id": v.business_key, "sku": v.data["sku"], "qty": v.data["qty"]}


def _shipment(v: SagaView) -> dict[str, Any]:
    return {
        "order_id": v.business_key,
        "ship_to": v.data["ship_to"],
        "sku": v.data["sku"],
        "qty": v.data["qty"],
    }


def _ref(v: SagaView) -> dict[str, Any]:
    return {"order_id": v.business_key}


def _payment_status() -> CommandAction:
    # The machine adds ``action_key`` (the key of the action in doubt) to this payload.
    return command("payment", "GetPaymentStatus", _ref)


def checkout_definition(
    *,
    deadline: float = DEADLINE,
    timeout: float = COMMAND_TIMEOUT,
    retry: RetryPolicy = RETRY,
    forward: RetryPolicy = FORWARD,
) -> SagaDefinition:
    """The checkout saga, version 1.

    ``timeout`` (per command), ``retry`` (steps before the pivot and compensations) and
    ``forward`` (the pivot and the steps after it) default to the production values;
    tests pass short ones.
    """
    return SagaDefinition(
        CHECKOUT,
        version=1,
        deadline=deadline,
        started_status="PENDING_PAYMENT",
        personal=PERSONAL,
        steps=[
            Step(
                "create_order",
                command("order", "CreateOrder", _order),
                command("order", "CancelOrder", _ref),
                timeout=timeout,
                retry=retry,
            ),
            Step(
                "authorize_payment",
                command("payment", "AuthorizePayment", _payment),
                [
                    command("payment", "VoidAuthorization", _ref),
                    command("payment", "RefundPayment", _ref),
                    command("payment", "IssueCreditNote", _ref),
                ],
                status="PENDING_PAYMENT",
                status_query=_payment_status(),
                timeout=timeout,
                retry=retry,
            ),
            Step(
                "reserve_inventory",
                command("inventory", "ReserveInventory", _stock),
                command("inventory", "ReleaseInventory", _ref),
                status="PENDING_INVENTORY",
                timeout=timeout,
                retry=retry,
            ),
            Step(
                "create_shipment",
                command("shipping", "CreateShipment", _shipment),
                command("shipping", "CancelShipment", _ref),
                status="PENDING_SHIPMENT",
                timeout=timeout,
                retry=retry,
            ),
            Step(
                "capture_payment",
                command("payment", "CapturePayment", _ref),
                kind=StepKind.PIVOT,
                status="COMPLETING",
                status_query=_payment_status(),
                timeout=timeout,
                retry=forward,
            ),
            Step(
                "commit_inventory",
                command("inventory", "CommitReservation", _ref),
                kind=StepKind.RETRIABLE,
                timeout=timeout,
                retry=forward,
            ),
            Step(
                "complete_order",
                command("order", "CompleteOrder", _ref),
                kind=StepKind.RETRIABLE,
                timeout=timeout,
                retry=forward,
            ),
        ],
    )
