"""Notifications after the pivot, as a sagakit app.

An order holds stock and is placed (the pivot: the payment is taken, there is no way
back); then the customer gets a confirmation e-mail and an SMS. Those two steps are
retriable and never compensated: a provider outage is retried with backoff until the
saga's deadline, then a person takes over. Every try carries the step's idempotency
key to the provider, which deduplicates by it, so the customer hears about an order
once however often the services try.

    sagakit demo --app sagakit_notifications:app --faults chaos --orders 100
"""

from __future__ import annotations

from .app import app, build_app

__all__ = ["app", "build_app"]
