"""The airline booking as a sagakit app: ``sagakit worker --app sagakit_airline:app``.

Three services, each with its own store: ``seats`` (the flights' seats and the
bookings' holds, with the sweeper that gives lapsed holds back), ``payments`` (the
traveller's card, through a fake bank in its own tables) and ``ticketing`` (the
e-tickets, through a fake ticketing system). One saga, ``booking`` (:mod:`.sagas`).

    sagakit demo     --app sagakit_airline:app --faults chaos --orders 100
    sagakit simulate --app sagakit_airline:app --seeds 300
    sagakit check sagakit_airline.sagas:booking --races sagakit_airline.races:races
"""

from __future__ import annotations

from sagakit import App

from .invariants import invariants, watch
from .load import load, setup
from .payments import build_payments
from .sagas import booking_definition
from .seats import build_seats
from .ticketing import build_ticketing

BUGS = ("read_then_write", "read_then_write_in_tx")
"""The bugs :mod:`.planted` can plant (see :func:`.seats.take_seat`)."""


def build_app(*, bug: str | None = None) -> App:
    """The airline app; ``bug`` plants one of :data:`BUGS` in the seat hold."""
    if bug is not None and bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}; choose from {BUGS}")
    return App(
        "airline",
        [booking_definition()],
        services=[build_seats(bug=bug), build_payments(), build_ticketing()],
        load=load,
        setup=setup,
        invariants=invariants,
        watch=watch,
        description="airline booking: seat hold with a TTL, payment (the pivot), ticket",
    )


app = build_app()
