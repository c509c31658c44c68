"""The ride app with a bug planted, for the simulator to catch.

    sagakit simulate --app sagakit_ride.planted:cancel_after_start --seeds 200   # exits 1

Each function builds the real app (:func:`.app.build_app`) with one bug switched on:
the bug is a flag in the real code, not a copy of it.
"""

from __future__ import annotations

from sagakit import App

from .app import build_app


def cancel_after_start() -> App:
    """The dispatch service honours a rider's cancel after the trip started: the ride
    is marked cancelled and the driver freed mid-trip, and the trip's end fails (the
    saga goes to a person, whom the end-of-run checks leave it to). The watch
    ``started-never-cancelled`` catches it the moment the cancel commits."""
    return build_app(bug="cancel_after_start")
