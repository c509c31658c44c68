"""sagakit_ride: ride hailing as a sagakit app (``--app sagakit_ride:app``).

A ride holds the fare on the rider's card, waits for a driver to accept, starts when
the driver picks the rider up (the pivot), ends when the driver drops them off, and
captures the fare. The drivers and riders are people: the dispatch service answers
their steps when they act, minutes to an hour later. See :mod:`sagakit_ride.app`.
"""

from __future__ import annotations

from .app import app, build_app

__all__ = ["app", "build_app"]
