"""The seats service: the airline's inventory of seats per flight, and one hold per booking.

A flight counts its seats in three buckets: ``capacity`` (what the aircraft has),
``held`` (seats set aside for bookings that have not paid yet) and ``sold``. A hold is
one row per booking, HELD until it is confirmed (SOLD), given back by the saga's
compensation (RELEASED) or past its time to live (EXPIRED). The counters always equal
the rows: every change of a hold's status moves one seat between the counters in the
same transaction.

Rules the handlers keep, whatever runs beside them (another replica on PostgreSQL under
READ COMMITTED, the sweeper):

* a hold is taken by one conditional statement, ``UPDATE flights SET held = held + 1
  WHERE ... AND held + sold < capacity``, whose row count decides: two bookings racing
  for the last seat cannot both win;
* a hold lives until ``expires_at`` (:data:`HOLD_TTL` after it was taken). A lapsed hold
  is never confirmed, swept or not: the confirmation is conditional on
  ``expires_at > now``. Lapsed holds are given back by the sweeper (:func:`sweep`, a
  job run when the earliest hold expires) and, for their flight, by the next hold
  that needs the seat, so the last seat freed by a lapse is sold again at once;
* every status change is a conditional UPDATE (``WHERE status = 'HELD'``), so the
  sweeper and a handler settling one hold at the same time move its seat once.

The SQL is the same on SQLite and PostgreSQL (``?`` placeholders, portable types).
"""

from __future__ import annotations

from typing import Any

from sagakit import Envelope, Service, StepFailed, now
from sagakit.stores.base import SQLStore, Tx

NAME = "seats"
"""The service's endpoint name."""

HOLD_TTL = 5.0
"""Seconds a hold keeps its seat. Airlines hold for 15 to 30 minutes; the example's
sagas run in seconds (the demo runs in real time), so its hold does too."""

SWEEP_EVERY = 1.0
"""Seconds between two runs of the sweeper in a real process (the simulator and the
testing kit run it exactly when a hold expires, see :func:`next_expiry`)."""

LAST_SEATS = 2
"""From this many seats left, the quoted fare is the last-seats fare."""

LAST_SEATS_MARKUP = 1.5
"""The last seats of a flight cost half as much again."""

MIGRATIONS: list[str] = [
    # No CHECK (held + sold <= capacity): the hold's conditional UPDATE keeps it, and the
    # app's invariants check it at every moment (a production schema may add the CHECK
    # as a second line of defence; an oversell then fails a transaction instead).
    """
    CREATE TABLE flights (
        flight    TEXT NOT NULL PRIMARY KEY,
        capacity  BIGINT NOT NULL CHECK (capacity >= 0),
        held      BIGINT NOT NULL CHECK (held >= 0),
        sold      BIGINT NOT NULL CHECK (sold >= 0),
        base_fare BIGINT NOT NULL CHECK (base_fare > 0)
    );
    CREATE TABLE holds (
        booking    TEXT NOT NULL PRIMARY KEY,
        flight     TEXT NOT NULL,
        status     TEXT NOT NULL CHECK (status IN ('HELD', 'SOLD', 'EXPIRED', 'RELEASED')),
        fare       BIGINT NOT NULL,
        held_at    DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        sold_at    DOUBLE PRECISION,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX holds_expiry_idx ON holds (status, expires_at);
    CREATE INDEX holds_flight_idx ON holds (flight, status);
    CREATE TABLE quotes (
        booking    TEXT NOT NULL PRIMARY KEY,
        flight     TEXT NOT NULL,
        fare       BIGINT NOT NULL CHECK (fare > 0),
        seats_left BIGINT NOT NULL,
        status     TEXT NOT NULL CHECK (status IN ('QUOTED', 'DROPPED')),
        quoted_at  DOUBLE PRECISION NOT NULL
    );
    """,
]
"""Schema steps (append, never edit)."""


async def add_flights(store: SQLStore, flights: dict[str, tuple[int, int]]) -> None:
    """Put ``flight -> (capacity, base fare in cents)`` on sale; a flight already there
    keeps its numbers (so seeding again is harmless)."""
    async with store.transaction() as tx:
        for flight, (capacity, fare) in flights.items():
            await tx.execute(
                "INSERT INTO flights (flight, capacity, held, sold, base_fare) "
                "VALUES (?, ?, 0, 0, ?) ON CONFLICT (flight) DO NOTHING",
                (flight, capacity, fare),
            )


async def _expire(tx: Tx, holds: list[tuple[str, str]], at: float) -> int:
    """Mark the HELD holds ``(booking, flight)`` EXPIRED and give their seats back; how
    many this transaction expired (one settled meanwhile by another is skipped)."""
    expired = 0
    for booking, flight in holds:
        changed = await tx.execute(
            "UPDATE holds SET status = 'EXPIRED', updated_at = ? "
            "WHERE booking = ? AND status = 'HELD'",
            (at, booking),
        )
        if changed:
            await tx.execute("UPDATE flights SET held = held - 1 WHERE flight = ?", (flight,))
            expired += 1
    return expired


async def release_lapsed(tx: Tx, flight: str, at: float) -> int:
    """Expire the holds of ``flight`` whose time ran out by ``at`` (the sweeper's work,
    done early for one flight); how many."""
    rows = await tx.fetchall(
        "SELECT booking FROM holds WHERE flight = ? AND status = 'HELD' AND expires_at <= ?",
        (flight, at),
    )
    return await _expire(tx, [(str(r[0]), flight) for r in rows], at)


async def sweep(store: SQLStore) -> int:
    """The sweeper: expire every hold whose time ran out; how many. Safe to run in
    several processes at once (each hold is expired by one conditional UPDATE)."""
    at = now()
    async with store.transaction() as tx:
        rows = await tx.fetchall(
            "SELECT booking, flight FROM holds WHERE status = 'HELD' AND expires_at <= ? "
            "ORDER BY expires_at",
            (at,),
        )
        return await _expire(tx, [(str(b), str(f)) for b, f in rows], at)


async def next_expiry(store: SQLStore) -> float | None:
    """When the sweeper next has work: the earliest expiry of a HELD hold (None: none)."""
    async with store.transaction() as tx:
        row = await tx.fetchone("SELECT MIN(expires_at) FROM holds WHERE status = 'HELD'")
    return None if row is None or row[0] is None else float(row[0])


def _text(env: Envelope, name: str) -> str:
    value = env.payload.get(name)
    if not isinstance(value, str) or not value:
        raise StepFailed(f"{env.type}: {name!r} must be a non-empty string, got {value!r}")
    return value


async def _flight(tx: Tx, flight: str) -> tuple[int, int, int, int]:
    """``(capacity, held, sold, base_fare)`` of ``flight``; StepFailed if unknown."""
    row = await tx.fetchone(
        "SELECT capacity, held, sold, base_fare FROM flights WHERE flight = ?", (flight,)
    )
    if row is None:
        raise StepFailed(f"no flight {flight} on sale")
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


async def quote(tx: Tx, booking: str, flight: str, at: float) -> dict[str, Any]:
    """Price the booking's seat on ``flight`` and keep the offer (one per booking): the
    fare, and the seats left when it was quoted. It holds no seat. Lapsed holds count
    as free, as the next hold would give them back."""
    row = await tx.fetchone(
        "SELECT flight, fare, seats_left, status FROM quotes WHERE booking = ?", (booking,)
    )
    if row is not None:  # a person's retry after the quote was made
        if row[3] != "QUOTED":
            raise StepFailed(f"the quote of booking {booking} was dropped")
        return {"flight": str(row[0]), "fare": int(row[1]), "seats_left": int(row[2])}
    capacity, _held, sold, base_fare = await _flight(tx, flight)
    live = await tx.fetchone(
        "SELECT COUNT(*) FROM holds WHERE flight = ? AND status = 'HELD' AND expires_at > ?",
        (flight, at),
    )
    left = capacity - sold - int(live[0] if live else 0)
    if left <= 0:
        raise StepFailed(f"flight {flight} is sold out")
    fare = base_fare if left > LAST_SEATS else int(base_fare * LAST_SEATS_MARKUP)
    await tx.execute(
        "INSERT INTO quotes (booking, flight, fare, seats_left, status, quoted_at) "
        "VALUES (?, ?, ?, ?, 'QUOTED', ?)",
        (booking, flight, fare, left, at),
    )
    return {"flight": flight, "fare": fare, "seats_left": left}


# --8<-- [start:take]
async def take_seat(tx: Tx, booking: str, flight: str, at: float, bug: str | None) -> None:
    """Set one seat of ``flight`` aside for ``booking`` (StepFailed when none is left).

    ``bug`` plants one of the two wrong ways of :func:`_take_seat_planted`.
    """
    if bug is not None:
        return await _take_seat_planted(tx, booking, flight, bug)
    # The sweeper's work for this flight first: the seat of a lapsed hold is free again.
    await release_lapsed(tx, flight, at)
    # One conditional statement: no other transaction can come between the check and
    # the write, so the last seat goes to exactly one booking.
    taken = await tx.execute(
        "UPDATE flights SET held = held + 1 WHERE flight = ? AND held + sold < capacity",
        (flight,),
    )
    if not taken:
        await _flight(tx, flight)  # an unknown flight says so
        raise StepFailed(f"flight {flight} is sold out")


# --8<-- [end:take]


# --8<-- [start:planted]
async def _take_seat_planted(tx: Tx, booking: str, flight: str, bug: str) -> None:
    """The planted bugs (:mod:`sagakit_airline.planted`): a check by a read, then a
    write without a condition."""
    if bug == "read_then_write":
        # BUG: the check reads the seats left from the booking's quote, written by an
        # earlier transaction; another booking may have taken the seat since. The
        # write trusts the read.
        row = await tx.fetchone("SELECT seats_left FROM quotes WHERE booking = ?", (booking,))
        if row is None or int(row[0]) <= 0:
            raise StepFailed(f"flight {flight} is sold out")
        await tx.execute("UPDATE flights SET held = held + 1 WHERE flight = ?", (flight,))
    elif bug == "read_then_write_in_tx":
        # BUG: read the counts, check in Python, write the computed count back. Run
        # alone it is right; two transactions interleaved under READ COMMITTED both
        # read the last seat free and both write the same "held": a hold is lost from
        # the count, and the seat is held twice.
        capacity, held, sold, _fare = await _flight(tx, flight)
        if held + sold >= capacity:
            raise StepFailed(f"flight {flight} is sold out")
        await tx.execute("UPDATE flights SET held = ? WHERE flight = ?", (held + 1, flight))
    else:
        raise ValueError(f"unknown planted bug {bug!r}")


# --8<-- [end:planted]


def build_seats(*, bug: str | None = None) -> Service:
    """The seats service (``bug``: a planted bug of :mod:`sagakit_airline.planted`)."""
    seats = Service(NAME, migrations=MIGRATIONS)

    @seats.handles("QuoteFare")
    async def quote_fare(tx: Tx, env: Envelope) -> dict[str, Any]:
        """Price the booking's seat and say how many are left (holds nothing)."""
        return await quote(tx, _text(env, "booking"), _text(env, "flight"), now())

    @seats.handles("DropQuote")
    async def drop_quote(tx: Tx, env: Envelope) -> dict[str, Any]:
        """The compensation of the quote: the offer is withdrawn."""
        changed = await tx.execute(
            "UPDATE quotes SET status = 'DROPPED' WHERE booking = ? AND status = 'QUOTED'",
            (_text(env, "booking"),),
        )
        return {"dropped": bool(changed)}

    @seats.handles("HoldSeat")
    async def hold_seat(tx: Tx, env: Envelope) -> dict[str, Any]:
        """Set a seat aside for the booking, at its quoted fare, for :data:`HOLD_TTL`."""
        booking, flight = _text(env, "booking"), _text(env, "flight")
        at = now()
        row = await tx.fetchone(
            "SELECT status, expires_at FROM holds WHERE booking = ?", (booking,)
        )
        if row is not None:  # a person's retry after the hold was taken and settled
            if row[0] in ("HELD", "SOLD"):
                return {"flight": flight, "expires_at": float(row[1])}
            raise StepFailed(f"the hold of booking {booking} was {str(row[0]).lower()}")
        quoted = await tx.fetchone(
            "SELECT fare FROM quotes WHERE booking = ? AND flight = ? AND status = 'QUOTED'",
            (booking, flight),
        )
        if quoted is None:
            raise StepFailed(f"booking {booking} has no fare quoted on {flight}")
        await take_seat(tx, booking, flight, at, bug)
        expires = at + HOLD_TTL
        await tx.execute(
            "INSERT INTO holds (booking, flight, status, fare, held_at, expires_at, "
            "sold_at, updated_at) VALUES (?, ?, 'HELD', ?, ?, ?, NULL, ?)",
            (booking, flight, int(quoted[0]), at, expires, at),
        )
        return {"flight": flight, "expires_at": expires}

    @seats.handles("ConfirmSeat")
    async def confirm_seat(tx: Tx, env: Envelope) -> dict[str, Any]:
        """Sell the held seat, if the hold is still alive; a lapsed hold is refused."""
        booking = _text(env, "booking")
        at = now()
        for _ in range(3):  # a status changed by another transaction: read it again
            row = await tx.fetchone(
                "SELECT flight, status, expires_at, sold_at FROM holds WHERE booking = ?",
                (booking,),
            )
            if row is None:
                raise StepFailed(f"booking {booking} holds no seat")
            flight, status, expires_at = str(row[0]), str(row[1]), float(row[2])
            if status == "SOLD":
                return {"flight": flight, "sold_at": float(row[3])}
            if status != "HELD":
                raise StepFailed(f"the hold of booking {booking} was {status.lower()}")
            if expires_at <= at:
                await _expire(tx, [(booking, flight)], at)
                raise StepFailed(f"the hold of booking {booking} expired before it was confirmed")
            sold = await tx.execute(
                "UPDATE holds SET status = 'SOLD', sold_at = ?, updated_at = ? "
                "WHERE booking = ? AND status = 'HELD' AND expires_at > ?",
                (at, at, booking, at),
            )
            if sold:
                await tx.execute(
                    "UPDATE flights SET held = held - 1, sold = sold + 1 WHERE flight = ?",
                    (flight,),
                )
                return {"flight": flight, "sold_at": at}
        raise RuntimeError(f"the hold of booking {booking} keeps changing")  # redelivered

    @seats.handles("ReleaseSeat")
    async def release_seat(tx: Tx, env: Envelope) -> dict[str, Any]:
        """The compensation of the hold and of the confirmation: give the seat back,
        held or sold (nothing held is a success: never held, expired, released)."""
        booking = _text(env, "booking")
        at = now()
        for _ in range(3):
            row = await tx.fetchone(
                "SELECT flight, status FROM holds WHERE booking = ?", (booking,)
            )
            if row is None or row[1] not in ("HELD", "SOLD"):
                return {"released": False}
            flight, status = str(row[0]), str(row[1])
            changed = await tx.execute(
                "UPDATE holds SET status = 'RELEASED', updated_at = ? "
                "WHERE booking = ? AND status = ?",
                (at, booking, status),
            )
            if changed:
                bucket = "held" if status == "HELD" else "sold"
                await tx.execute(
                    f"UPDATE flights SET {bucket} = {bucket} - 1 WHERE flight = ?", (flight,)
                )
                return {"released": True, "was": status}
        raise RuntimeError(f"the hold of booking {booking} keeps changing")  # redelivered

    seats.every(SWEEP_EVERY, "sweep", due=next_expiry)(sweep)
    return seats
