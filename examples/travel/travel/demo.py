"""What ``sagakit demo --app travel.app:app`` runs: a seeded mix of trips, then checks.

The load (:func:`load`) is a list of trips for a count and a seed, mixing the happy
path with every way the partners fail (:mod:`travel.partners`) and trips racing for
the three rooms of ``htl-tiny-1``. The invariants (:func:`invariants`) are checked
from the partners' and the hotel's own books after the run, never from the sagas'
view of them.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from sagakit import SagaInstance, SagaState
from sagakit.stores.base import SagaQuery

from .partners import NON_REFUNDABLE, SOLD_OUT, Partners
from .trip import partners_of

if TYPE_CHECKING:
    from sagakit import Deployment


def load(count: int, seed: int) -> list[tuple[str, str, dict[str, Any]]]:
    """``count`` trips to start: ``(definition, business key, data)``, same seed, same list."""
    rng = random.Random(seed)
    trips = []
    for i in range(count):
        n = f"{seed}-{i:05d}"
        data: dict[str, Any] = {
            "traveller": f"trv-{n}",  # tokens, never names or e-mail addresses
            "flight": "AF1234",
            "hotel": "htl-par-1",
            "nights": rng.randint(1, 7),
            "price": rng.randrange(20_000, 200_000, 100),  # cents
            "card": f"card-ok-{n}",
        }
        roll = rng.random()
        if roll < 0.05:
            data["flight"] = SOLD_OUT
        elif roll < 0.10:  # declined, and the ticket cannot be cancelled: a voucher
            data["flight"], data["card"] = NON_REFUNDABLE, f"card-declined-{n}"
        elif roll < 0.15:
            data["hotel"] = "htl-full-1"
        elif roll < 0.25:
            data["hotel"] = "htl-tiny-1"  # three rooms for everyone who asks
        elif roll < 0.32:
            data["card"] = f"card-declined-{n}"
        elif roll < 0.37:
            data["card"] = f"card-slow-{n}"
        elif roll < 0.40:
            data["card"] = f"card-lost-{n}"  # only the status query finds the charge
        elif roll < 0.47:
            data["traveller"] = f"trv-flaky-{n}"
        trips.append(("trip", f"trip-{n}", data))
    return trips


async def trips(dep: Deployment) -> dict[str, SagaInstance]:
    """Every trip saga of the deployment, by business key."""
    store = dep.store("orchestrator")
    out: dict[str, SagaInstance] = {}
    while True:
        page = await store.find_sagas(SagaQuery(definition="trip"), limit=500, offset=len(out))
        out.update((inst.business_key, inst) for inst in page.items)
        if not page.items or len(out) >= page.total:
            return out


# --8<-- [start:invariants]
async def invariants(dep: Deployment) -> list[str]:
    """One message per broken invariant (an empty list: all hold)."""
    partners: Partners = partners_of(dep.ctx)
    by_key = await trips(dep)
    charged = partners.cards.charged()
    tickets = partners.airline.statuses()
    mails = partners.mailer.sent()
    async with dep.store("hotel").transaction() as tx:
        rooms = {
            h: (r, b) for h, r, b in await tx.fetchall("SELECT hotel_id, rooms, booked FROM hotels")
        }
        booked = dict(await tx.fetchall("SELECT trip, status FROM bookings"))
        per_hotel = dict(
            await tx.fetchall(
                "SELECT hotel_id, COUNT(*) FROM bookings WHERE status = 'BOOKED' GROUP BY hotel_id"
            )
        )
    problems: list[str] = []
    for key, inst in sorted(by_key.items()):
        state = inst.state.value
        if inst.state is SagaState.FAILED_NEEDS_MANUAL:
            if not inst.reason:  # a person decides; the books are checked after that
                problems.append(f"manual: {key} is in the manual queue without a reason")
            continue
        done = inst.state is SagaState.SUCCEEDED
        price = inst.data["price"] if done else 0
        if charged.get(key, 0) != price:
            problems.append(f"money: {key} is {state}, charged {charged.get(key, 0)}, not {price}")
        if (tickets.get(key) == "BOOKED") != done:
            problems.append(f"seat: {key} is {state}, its ticket is {tickets.get(key)}")
        if (booked.get(key) == "BOOKED") != done:
            problems.append(f"room: {key} is {state}, its booking is {booked.get(key)}")
        by_hand = bool((inst.steps[-1].result or {}).get("resolved_by"))  # marked done
        if mails.get(key, 0) != (1 if done and not by_hand else 0):
            problems.append(f"mail: {key} is {state}, {mails.get(key, 0)} confirmations sent")
    for hotel_id, (total, count) in sorted(rooms.items()):
        if not count == per_hotel.get(hotel_id, 0) <= total:
            problems.append(
                f"rooms: {hotel_id} counts {count} of {total} rooms booked, "
                f"its bookings say {per_hotel.get(hotel_id, 0)}"
            )
    return problems


# --8<-- [end:invariants]
