"""sagakit_airline: an airline booking, proven by the simulator.

A booking quotes a fare, holds a seat for a few seconds (many bookings race for the
last one), waits for the traveller to approve the payment, confirms the seat while the
hold is alive, charges the fare (the point of no return) and issues the ticket. A hold
that lapses is given back by a sweeper; a ticketing outage after the payment goes
forward (retried, then a person), never back. See docs/examples/airline.md.

``sagakit_airline:app`` is the app; :mod:`sagakit_airline.planted` plants a
read-then-write seat hold for the simulator (and the race checker) to catch.
"""

from __future__ import annotations

from .app import app, build_app

__all__ = ["app", "build_app"]
