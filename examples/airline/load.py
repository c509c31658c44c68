"""What ``sagakit demo --app sagakit_airline:app`` and ``sagakit simulate`` run: a seeded
mix of bookings, and the flights they book.

Every load, however small, has bookings racing for the last seat: the first two go to
:data:`LAST_SEAT` (one seat), and more join them and the two seats of
:data:`LAST_TWO` at random. The card and traveller tokens choose what the fake bank
and ticketing system do (:mod:`.payments`, :mod:`.ticketing`): a plain booking, a
traveller slower than the hold (compensated), one who never approves (compensated), a
declined card at the pivot (compensated), a bank that loses its answers (the status
query finds the charge), a busy ticketing system (retried) and one down for longer
than the retries (a person).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from .sagas import BOOKING
from .seats import NAME as SEATS
from .seats import add_flights

if TYPE_CHECKING:
    from sagakit import Deployment

BIG = "SK100"
"""A flight with seats for everyone."""
LAST_SEAT = "LS1"
"""A flight with one seat: whoever holds it first flies."""
LAST_TWO = "LS2"
"""A flight with two seats."""

FLIGHTS = {BIG: (100_000, 12_000), LAST_SEAT: (1, 9_000), LAST_TWO: (2, 15_000)}
"""Flight -> (seats, base fare in cents)."""

CARDS = (("ok", 0.58), ("slow", 0.10), ("gone", 0.05), ("declined", 0.12), ("lost", 0.15))
"""Card kinds and their shares (see :mod:`.payments`)."""
TRAVELLERS = (("ok", 0.80), ("flaky", 0.13), ("outage", 0.07))
"""Traveller kinds and their shares (see :mod:`.ticketing`)."""


def _pick(rng: random.Random, shares: tuple[tuple[str, float], ...]) -> str:
    roll = rng.random()
    for kind, share in shares:
        roll -= share
        if roll < 0:
            return kind
    return shares[-1][0]


def load(count: int, seed: int) -> list[tuple[str, str, dict[str, Any]]]:
    """``count`` bookings to start: ``(definition, business key, data)``; same seed,
    same list."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        n = f"{seed}-{i:05d}"
        roll = rng.random()
        if i < 2 or roll < 0.12:
            flight = LAST_SEAT
        elif roll < 0.24:
            flight = LAST_TWO
        else:
            flight = BIG
        data = {
            "flight": flight,
            "card": f"card-{_pick(rng, CARDS)}-{n}",
            "traveller": f"pax-{_pick(rng, TRAVELLERS)}-{n}",
        }
        out.append((BOOKING, f"bk-{n}", data))
    return out


async def setup(dep: Deployment) -> None:
    """Put the flights on sale (idempotent: a flight already there keeps its seats)."""
    await add_flights(dep.store(SEATS), FLIGHTS)
