"""The SMS service: texts the customer that the order is placed, through its SMS
provider, once the confirmation e-mail went out.

Like the e-mail, a step after the pivot with no compensation, deduplicated at the
provider by the command's idempotency key (the fake provider's tables,
:mod:`.provider`, live in this service's store).
"""

from __future__ import annotations

from typing import Any

from sagakit import Envelope, Service, now
from sagakit.stores.base import Tx

from . import provider

SEND = "SendOrderSms"
"""The command the saga's ``sms`` step sends."""


def sms_service() -> Service:
    """The ``sms`` service."""
    sms = Service("sms", migrations=provider.MIGRATIONS)

    @sms.handles(SEND)
    async def send_sms(tx: Tx, env: Envelope) -> dict[str, Any]:
        return await provider.send(
            tx,
            channel="sms",
            provider_key=provider.key_of(env),
            order_id=env.payload["order"],
            customer=env.payload["customer"],
            route=env.payload["route"],
            now=now(),
        )

    return sms
