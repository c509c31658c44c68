"""Every message of the checkout, versioned: commands (imperative) and events (facts).

One pydantic model per (type, version) in :data:`REGISTRY`. Payloads carry tokens,
never personal data: the customer is ``cust-...``, the card ``card-...``, the address
``addr-...`` (the patterns refuse an e-mail, a name or a bare card number), and no
model accepts a field it does not declare. ``examples/checkout/schemas.baseline.json``
is the committed baseline that ``sagakit schemas check`` compares against.

``OrderCreated`` shows a version change: v2 added the sales ``channel``; the upcaster
reads v1 messages (written before v2 existed) as coming from the web shop.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from sagakit.schemas import Payload, SchemaRegistry

REGISTRY = SchemaRegistry("checkout")

Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")]
Sku = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$")]
CustomerToken = Annotated[str, StringConstraints(pattern=r"^cust-[A-Za-z0-9_.:\-]{1,120}$")]
CardToken = Annotated[str, StringConstraints(pattern=r"^card-[A-Za-z0-9_.:\-]{1,120}$")]
AddressToken = Annotated[str, StringConstraints(pattern=r"^addr-[A-Za-z0-9_.:\-]{1,120}$")]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
Reason = Annotated[str, StringConstraints(max_length=500)]
Qty = Annotated[int, Field(gt=0)]
Cents = Annotated[int, Field(ge=0)]


class _Order(Payload):
    order_id: Id


class _Failure(_Order):
    reason: Reason


# -- commands of the orchestrated checkout (sagas.py) -----------------------------------


@REGISTRY.command("CreateOrder")
class CreateOrderV1(_Order):
    customer: CustomerToken
    sku: Sku
    qty: Qty
    amount: Cents


@REGISTRY.command("AuthorizePayment")
class AuthorizePaymentV1(_Order):
    amount: Annotated[int, Field(gt=0)]
    currency: Currency
    card: CardToken


@REGISTRY.command("ReserveInventory")
class ReserveInventoryV1(_Order):
    sku: Sku
    qty: Qty


@REGISTRY.command("CreateShipment")
class CreateShipmentV1(_Order):
    ship_to: AddressToken
    sku: Sku
    qty: Qty


@REGISTRY.command("RequestShipment")
class RequestShipmentV1(CreateShipmentV1):
    """The hybrid's shipping command: answered when the shipping choreography ends."""


@REGISTRY.command("GetPaymentStatus")
class GetPaymentStatusV1(_Order):
    action_key: str | None = None


for _name in (
    "CancelOrder",
    "CompleteOrder",
    "CapturePayment",
    "VoidAuthorization",
    "RefundPayment",
    "IssueCreditNote",
    "ReleaseInventory",
    "CommitReservation",
    "CancelShipment",
):
    REGISTRY.command(_name)(type(f"{_name}V1", (_Order,), {"__module__": __name__}))


# -- facts of the choreographed checkout (choreography.py) ------------------------------


def _channel_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "channel": "web"}


@REGISTRY.event("OrderCreated")
class OrderCreatedV1(_Order):
    customer: CustomerToken
    sku: Sku
    qty: Qty
    amount: Annotated[int, Field(gt=0)]
    currency: Currency
    card: CardToken
    ship_to: AddressToken


@REGISTRY.event("OrderCreated", 2, upcast=_channel_v1_to_v2)
class OrderCreatedV2(OrderCreatedV1):
    channel: Literal["web", "api", "store"]


@REGISTRY.event("PaymentAuthorized")
class PaymentAuthorizedV1(_Order):
    authorization: Id
    amount: Cents
    sku: Sku
    qty: Qty
    ship_to: AddressToken


@REGISTRY.event("InventoryReserved")
class InventoryReservedV1(_Order):
    sku: Sku
    qty: Qty
    ship_to: AddressToken


@REGISTRY.event("ShipmentCreated")
class ShipmentCreatedV1(_Order):
    carrier: Id


@REGISTRY.event("PaymentCaptured")
class PaymentCapturedV1(_Order):
    captured: Cents


@REGISTRY.event("InventoryCommitted")
class InventoryCommittedV1(_Order):
    sku: Sku
    shipped: Qty


@REGISTRY.event("OrderCompleted")
class OrderCompletedV1(_Order):
    pass


@REGISTRY.event("InventoryReleased")
class InventoryReleasedV1(_Failure):
    released: Cents


@REGISTRY.event("PaymentVoided")
class PaymentVoidedV1(_Failure):
    voided: Cents


@REGISTRY.event("PaymentRefunded")
class PaymentRefundedV1(_Failure):
    refunded: Cents


for _name in (
    "PaymentFailed",
    "InventoryFailed",
    "ShipmentFailed",
    "PaymentCaptureFailed",
    "InventoryCommitFailed",
    "PaymentReleaseFailed",
    "OrderCompletionFailed",
    "OrderCancelled",
):
    REGISTRY.event(_name)(type(f"{_name}V1", (_Failure,), {"__module__": __name__}))


# -- facts of the shipping domain's own choreography (hybrid.py) ------------------------


@REGISTRY.event("ShipmentRequested")
class ShipmentRequestedV1(_Order):
    ship_to: AddressToken
    sku: Sku
    qty: Qty


@REGISTRY.event("LabelPrinted")
class LabelPrintedV1(_Order):
    label: Id
    ship_to: AddressToken


@REGISTRY.event("CarrierBooked")
class CarrierBookedV1(_Order):
    carrier: Id
    label: Id


for _name in ("LabelFailed", "CarrierBookingFailed", "ShipmentCancelled"):
    REGISTRY.event(_name)(type(f"{_name}V1", (_Failure,), {"__module__": __name__}))


@REGISTRY.event("CarrierBookingCancelled")
class CarrierBookingCancelledV1(_Order):
    """The carrier holds no booking for the order (cancelled, or never to be made)."""
