"""The rides ``sagakit demo`` and ``sagakit simulate`` start, and the drivers they meet.

:func:`load` returns a seeded mix of rides; the ride's data decides how the fake
people and the fake card network behave (:mod:`.dispatch`, :mod:`.payments`):

* plain rides in the centre, where drivers are plenty;
* a declined card (the hold fails: compensated, nothing to release);
* a ride in the desert, where no driver ever accepts (two minutes, then compensated:
  the offer is withdrawn, the hold released);
* riders who cancel while waiting for a driver, or while the driver is on the way
  (compensated), and riders who try to cancel during the trip (refused: past the
  pivot);
* hour-long trips; a card whose network is busy at the capture (retried); a long
  detour whose fare is above the hold (after the pivot: a person decides);
* contention: in every three rides, the first two are requested in the same hill
  zone, which has one driver. One of them gets the driver; the other waits, and is
  compensated when its two minutes run out (unless the first rider cancels in time).

:func:`setup` seeds the drivers (idempotently: the simulator empties every table and
calls it again for each seed).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from .sagas import RIDE

if TYPE_CHECKING:
    from sagakit import Deployment

CENTRE_DRIVERS = 40
"""Drivers of the zone ``centre``."""
HILLS = 40
"""Zones ``hill-0`` ... with one driver each (where rides race for the driver)."""
DESERT = "desert"
"""A zone without drivers."""


def drivers() -> list[tuple[str, str]]:
    """Every driver: ``(driver id, zone)``."""
    out = [(f"drv-centre-{k:02d}", "centre") for k in range(CENTRE_DRIVERS)]
    out += [(f"drv-hill-{k:02d}", f"hill-{k}") for k in range(HILLS)]
    return out


async def setup(dep: Deployment) -> None:
    """Seed the drivers, each free (a driver already there is left as it is)."""
    rows = drivers()
    values = ", ".join("(?, ?)" for _ in rows)
    params = [x for row in rows for x in row]
    async with dep.store("dispatch").transaction() as tx:
        await tx.execute(
            f"INSERT INTO drivers (driver_id, zone) VALUES {values} "
            "ON CONFLICT (driver_id) DO NOTHING",
            params,
        )


def load(count: int, seed: int) -> list[tuple[str, str, dict[str, Any]]]:
    """``count`` rides to start: ``(definition, business key, data)``; the same for the
    same ``(count, seed)``."""
    rng = random.Random(f"ride-load:{seed}")
    rides = []
    for i in range(count):
        n = f"{seed}-{i:05d}"
        # The first two of every three race for the one driver of a hill.
        zone = f"hill-{(seed * 7 + i // 3) % HILLS}" if i % 3 < 2 else "centre"
        data: dict[str, Any] = {
            "rider": f"rdr-{n}",  # tokens, never names or card numbers
            "card": f"card-ok-{n}",
            "zone": zone,
            "minutes": rng.randint(5, 40),  # the trip's estimate
            "detour": False,
            "cancel_after": None,  # minutes after the request the rider cancels
        }
        roll = rng.random()
        if roll < 0.08:
            data["card"] = f"card-declined-{n}"
        elif roll < 0.15:
            data["zone"] = DESERT
        elif roll < 0.21:
            data["cancel_after"] = 0.1  # before any driver looks at the offer
        elif roll < 0.29:
            data["cancel_after"] = 1.7  # the driver accepted, and is on the way
        elif roll < 0.40:
            data["cancel_after"] = 15.0  # mid-trip: refused
            data["minutes"] = rng.randint(25, 45)
        elif roll < 0.46:
            data["minutes"] = rng.randint(50, 70)  # an hour-long trip
        elif roll < 0.54:
            data["card"] = f"card-flaky-{n}"
        elif roll < 0.60:
            data["detour"] = True  # twice as long: the fare is above the hold
            data["minutes"] = rng.randint(5, 15)
        rides.append((RIDE, f"ride-{n}", data))
    return rides
