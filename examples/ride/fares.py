"""Fares and holds: what a ride costs, and how much is held on the card before it.

Amounts are integers in cents. The hold is the fare of the estimated trip with a
margin of a quarter, so an ordinary trip (a little longer or shorter than estimated)
is always covered; a long detour is not, and a person settles the difference.
"""

from __future__ import annotations

BASE_FARE = 250
"""Cents every ride costs, however short."""
PER_MINUTE = 45
"""Cents per minute of the trip."""


def fare_for(minutes: int) -> int:
    """The fare of a trip of ``minutes`` minutes, in cents."""
    return BASE_FARE + PER_MINUTE * minutes


def hold_for(estimated_minutes: int) -> int:
    """The hold placed on the rider's card for a trip estimated at ``estimated_minutes``:
    its fare plus a quarter, rounded up to the cent."""
    fare = fare_for(estimated_minutes)
    return fare + (fare + 3) // 4
