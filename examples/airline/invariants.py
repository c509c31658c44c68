"""The airline's invariants, read from the services' own ledgers, never from the sagas'
view of them.

At every moment (:func:`watch`; the simulator checks it after every step, the demo
several times a second):

* ``oversold``: per flight, seats held + seats sold <= its seats;
* ``counters``: the flight's held and sold counters equal its HELD and SOLD holds;
* ``lapsed``: no hold was sold at or after its expiry (a lapsed hold never becomes a
  seat, so never a ticket, unless the booking holds again);
* ``tickets``: at most one ticket per booking (the primary key) and no more tickets
  on a flight than its seats; every ticket is backed by a sold seat of its booking on
  its flight, and by a charge (except for bookings a person owns or vouched for).

At the end of a run (:func:`invariants`, with the above), per booking saga that no
person owns or vouched for:

* ``ticketed``: a TICKETED booking has its ticket, its sold seat and a charge of the
  quoted fare;
* ``cancelled``: a compensated (or timed out) booking has no ticket, holds no seat and
  was not charged: a paid booking is ticketed or goes to a person, never refunded
  on its own (the payments service has no refund at all).

The reads go downstream first (tickets, then charges, then seats): what a later ledger
shows already happened in an earlier one, so a ticket read first always finds its
charge and its seat, even while the services run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sagakit import SagaInstance, SagaState
from sagakit.testing.app_checks import sagas_by_key, settled_by_hand

from . import payments, seats, ticketing
from .sagas import BOOKING

if TYPE_CHECKING:
    from sagakit import Deployment


@dataclass(frozen=True, slots=True)
class Books:
    """The three services' ledgers, read one store at a time."""

    tickets: dict[str, str]
    """Booking -> the flight of its ticket."""
    charges: dict[str, tuple[str, int]]
    """Booking -> (CHARGED or DECLINED, amount)."""
    flights: dict[str, tuple[int, int, int]]
    """Flight -> (seats, held, sold)."""
    holds: dict[str, tuple[str, str, float, float | None]]
    """Booking -> (flight, status, expires_at, sold_at)."""


async def read_books(dep: Deployment) -> Books:
    """The ledgers, downstream first (see the module docstring)."""
    async with dep.store(ticketing.NAME).snapshot() as tx:
        tickets = {
            str(b): str(f) for b, f in await tx.fetchall("SELECT booking, flight FROM tickets")
        }
    async with dep.store(payments.NAME).snapshot() as tx:
        rows = await tx.fetchall("SELECT booking, status, amount FROM bank_charges")
        charges = {str(b): (str(s), int(a)) for b, s, a in rows}
    async with dep.store(seats.NAME).snapshot() as tx:
        flights = {
            str(f): (int(c), int(h), int(s))
            for f, c, h, s in await tx.fetchall("SELECT flight, capacity, held, sold FROM flights")
        }
        holds = {
            str(b): (str(f), str(s), float(e), None if t is None else float(t))
            for b, f, s, e, t in await tx.fetchall(
                "SELECT booking, flight, status, expires_at, sold_at FROM holds"
            )
        }
    return Books(tickets, charges, flights, holds)


def conservation(books: Books) -> tuple[list[str], dict[str, list[str]]]:
    """What must hold at every moment: the broken rules that concern no one booking,
    and those of one booking (booking -> messages), which a person may have vouched for."""
    general: list[str] = []
    per_booking: dict[str, list[str]] = {}
    counts: Counter[tuple[str, str]] = Counter((f, s) for f, s, _, _ in books.holds.values())
    ticketed: Counter[str] = Counter(books.tickets.values())
    for flight, (capacity, held, sold) in sorted(books.flights.items()):
        if held + sold > capacity:
            general.append(
                f"oversold: flight {flight}: {held} held + {sold} sold > capacity {capacity}"
            )
        rows = (counts[(flight, "HELD")], counts[(flight, "SOLD")])
        if (held, sold) != rows:
            general.append(
                f"counters: flight {flight} counts {held} held and {sold} sold, its holds "
                f"say {rows[0]} and {rows[1]}"
            )
        if ticketed[flight] > capacity:
            general.append(
                f"tickets: flight {flight}: {ticketed[flight]} tickets > capacity {capacity}"
            )
    for booking, (_flight, status, expires_at, sold_at) in sorted(books.holds.items()):
        if status == "SOLD" and (sold_at is None or sold_at >= expires_at):
            general.append(
                f"lapsed: booking {booking}'s hold was sold at {sold_at}, "
                f"after it expired at {expires_at}"
            )
    for booking, flight in sorted(books.tickets.items()):
        problems = []
        hold = books.holds.get(booking)
        if hold is None or hold[1] != "SOLD" or hold[0] != flight:
            problems.append(
                f"tickets: booking {booking} has a ticket on {flight} but its seat is "
                + ("not held" if hold is None else f"{hold[1]} on {hold[0]}")
            )
        if books.charges.get(booking, ("NONE", 0))[0] != "CHARGED":
            problems.append(f"tickets: booking {booking} has a ticket but no payment")
        if problems:
            per_booking[booking] = problems
    return general, per_booking


async def _owned_by_a_person(dep: Deployment) -> set[str]:
    """Bookings in the manual queue, and those a person vouched for."""
    by_key = await sagas_by_key(dep, BOOKING)
    manual = {k for k, s in by_key.items() if s.state is SagaState.FAILED_NEEDS_MANUAL}
    return manual | await settled_by_hand(dep, BOOKING)


async def watch(dep: Deployment) -> list[str]:
    """The rules that hold at every moment (see the module docstring)."""
    general, per_booking = conservation(await read_books(dep))
    if per_booking:  # rare: only then is the orchestrator asked who owns what
        owned = await _owned_by_a_person(dep)
        general += [m for b, ms in sorted(per_booking.items()) if b not in owned for m in ms]
    return general


async def _compensation_decided(dep: Deployment, inst: SagaInstance) -> bool:
    """True when a person decided to compensate the booking."""
    return any(
        entry.event == "manual.resolved" and entry.detail.get("action") == "compensate"
        for entry in await dep.store("orchestrator").history(inst.saga_id)
    )


def _quoted_fare(inst: SagaInstance) -> int | None:
    result = inst.steps[0].result or {}
    fare = result.get("fare")
    return int(fare) if isinstance(fare, int) else None


async def invariants(dep: Deployment) -> list[str]:
    """The end-of-run checks: :func:`watch`'s, and each booking's end against the books."""
    books = await read_books(dep)
    by_key = await sagas_by_key(dep, BOOKING)
    owned = await _owned_by_a_person(dep)
    general, per_booking = conservation(books)
    problems = general + [m for b, ms in sorted(per_booking.items()) if b not in owned for m in ms]
    for key, inst in sorted(by_key.items()):
        if key in owned or not inst.state.terminal:
            continue  # a person's, or still running (the generic checks report that)
        hold = books.holds.get(key)
        seat = "none" if hold is None else hold[1]
        charge = books.charges.get(key, ("NONE", 0))
        state = inst.state.value
        if inst.state is SagaState.SUCCEEDED:
            fare = _quoted_fare(inst)
            if key not in books.tickets:
                problems.append(f"ticketed: booking {key} is {state} without a ticket")
            if seat != "SOLD":
                problems.append(f"ticketed: booking {key} is {state}, its seat is {seat}")
            if charge != ("CHARGED", fare):
                problems.append(
                    f"ticketed: booking {key} is {state}, charged {charge}, quoted {fare}"
                )
        elif inst.state in (SagaState.COMPENSATED, SagaState.TIMED_OUT):
            if key in books.tickets:
                problems.append(f"cancelled: booking {key} is {state} but has a ticket")
            if seat in ("HELD", "SOLD"):
                problems.append(f"cancelled: booking {key} is {state} but its seat is {seat}")
            if charge[0] == "CHARGED" and not await _compensation_decided(dep, inst):
                # A person who chose to cancel a booking whose charge was in doubt owns
                # its money: a charge still on its way then may land (the pivot has no
                # undo), and the person refunds it. Without a person, it is a bug.
                problems.append(
                    f"cancelled: booking {key} is {state} but was charged {charge[1]}: "
                    "a paid booking goes forward or to a person"
                )
    return problems
