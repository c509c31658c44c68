"""The orchestrated checkout saga.

CreateOrder -> AuthorizePayment -> ReserveInventory -> CreateShipment -> CapturePayment
(the pivot: money is taken) -> CommitInventory -> CompleteOrder.

Before the pivot every step has a compensation: CancelOrder, the payment ladder
(void the authorisation -> refund -> credit note), ReleaseInventory, CancelShipment.
After it, steps are retried until they succeed or a person decides. Commands carry
tokens (customer, card, address), never personal data.
"""

from __future__ import annotations

from typing import Any

from sagakit import RetryPolicy, SagaDefinition, SagaView, Step, StepKind, command

CHECKOUT = "checkout"

# Embedded replies arrive in milliseconds; a command unanswered for 2 s is retried with
# the same idempotency key, and after 6 tries its outcome is treated as unknown.
COMMAND_TIMEOUT = 2.0
RETRY = RetryPolicy(max_attempts=6, initial_backoff=0.1, max_backoff=2.0)
FORWARD = RetryPolicy(max_attempts=12, initial_backoff=0.1, max_backoff=2.0)


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


def checkout_definition(*, deadline: float = 120.0) -> SagaDefinition:
    """The checkout saga, version 1."""
    return SagaDefinition(
        CHECKOUT,
        version=1,
        deadline=deadline,
        started_status="PENDING_PAYMENT",
        steps=[
            Step(
                "create_order",
                command("order", "CreateOrder", _order),
                command("order", "CancelOrder", _ref),
                timeout=COMMAND_TIMEOUT,
                retry=RETRY,
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
                timeout=COMMAND_TIMEOUT,
                retry=RETRY,
            ),
            Step(
                "reserve_inventory",
                command("inventory", "ReserveInventory", _stock),
                command("inventory", "ReleaseInventory", _ref),
                status="PENDING_INVENTORY",
                timeout=COMMAND_TIMEOUT,
                retry=RETRY,
            ),
            Step(
                "create_shipment",
                command("shipping", "CreateShipment", _shipment),
                command("shipping", "CancelShipment", _ref),
                status="PENDING_SHIPMENT",
                timeout=COMMAND_TIMEOUT,
                retry=RETRY,
            ),
            Step(
                "capture_payment",
                command("payment", "CapturePayment", _ref),
                kind=StepKind.PIVOT,
                status="COMPLETING",
                timeout=COMMAND_TIMEOUT,
                retry=FORWARD,
            ),
            Step(
                "commit_inventory",
                command("inventory", "CommitReservation", _ref),
                kind=StepKind.RETRIABLE,
                timeout=COMMAND_TIMEOUT,
                retry=FORWARD,
            ),
            Step(
                "complete_order",
                command("order", "CompleteOrder", _ref),
                kind=StepKind.RETRIABLE,
                timeout=COMMAND_TIMEOUT,
                retry=FORWARD,
            ),
        ],
    )
