"""The e-mail service: sends the order confirmation through its e-mail provider.

A step after the pivot: the order is placed, so the confirmation must go out, and is
never taken back (there is no compensation). The service calls the provider with the
command's idempotency key, which stays the same for every try of the step (a retry
after a provider outage, a retry after a lost answer, a person's retry): the provider
sends the message once whatever happens to its answers. The fake provider's tables
(:mod:`.provider`) live in this service's store.
"""

from __future__ import annotations

from typing import Any

from sagakit import Envelope, Service, now
from sagakit.stores.base import Tx

from . import provider

SEND = "SendConfirmationEmail"
"""The command the saga's ``email`` step sends."""


# --8<-- [start:service]
def email_service(*, key_per_attempt: bool = False) -> Service:
    """The ``email`` service. ``key_per_attempt`` is the planted bug
    (:func:`sagakit_notifications.planted.retry_without_key`): the provider is given a
    fresh key on each try instead of the command's idempotency key."""
    email = Service("email", migrations=provider.MIGRATIONS)

    @email.handles(SEND)
    async def send_confirmation(tx: Tx, env: Envelope) -> dict[str, Any]:
        key = provider.key_of(env)
        if key_per_attempt:
            # The bug: "make every request unique". A try after a lost answer then
            # looks new to the provider, which sends the e-mail again.
            key = f"{key}#try-{env.attempt}"
        return await provider.send(
            tx,
            channel="email",
            provider_key=key,
            order_id=env.payload["order"],
            customer=env.payload["customer"],
            route=env.payload["route"],
            now=now(),
        )

    return email


# --8<-- [end:service]
