"""The hotel service: rooms per hotel and one booking per trip, in its own database.

It runs in its own process (``sagakit service hotel --app travel.app:app``). Every
command is handled in one transaction of the hotel's store, together with the inbox
record, the answer recorded under the command's idempotency key and the reply: the
handlers below are plain business code. The SQL is the same on SQLite and PostgreSQL
(``?`` placeholders, portable types).
"""

from __future__ import annotations

import time
from typing import Any

from sagakit import Envelope, Service, StepFailed
from sagakit.stores.base import SQLStore, Tx

# --8<-- [start:service]
MIGRATIONS = [
    # 1: the tables. Applied once, in order; append new scripts, never edit these.
    """
    CREATE TABLE hotels (
        hotel_id TEXT NOT NULL PRIMARY KEY,
        rooms    BIGINT NOT NULL CHECK (rooms >= 0),
        booked   BIGINT NOT NULL CHECK (booked >= 0 AND booked <= rooms)
    );
    CREATE TABLE bookings (
        trip       TEXT NOT NULL PRIMARY KEY,
        hotel_id   TEXT NOT NULL,
        nights     BIGINT NOT NULL,
        status     TEXT NOT NULL CHECK (status IN ('BOOKED', 'CANCELLED')),
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 2: the hotels on sale (reference data travels with the schema).
    """
    INSERT INTO hotels (hotel_id, rooms, booked) VALUES
        ('htl-par-1', 100000, 0), ('htl-tiny-1', 3, 0), ('htl-full-1', 0, 0);
    """,
]

hotel = Service("hotel", migrations=MIGRATIONS)
# --8<-- [end:service]


# --8<-- [start:handlers]
# --8<-- [start:book]
@hotel.handles("BookHotel")
async def book_hotel(tx: Tx, env: Envelope) -> dict[str, Any]:
    trip, hotel_id = env.payload["trip"], env.payload["hotel"]
    # One conditional UPDATE: two trips racing for the last room cannot both win.
    taken = await tx.execute(
        "UPDATE hotels SET booked = booked + 1 WHERE hotel_id = ? AND booked < rooms",
        (hotel_id,),
    )
    if not taken:
        raise StepFailed(f"no room left at {hotel_id}")  # a final answer: compensate
    await tx.execute(
        "INSERT INTO bookings (trip, hotel_id, nights, status, updated_at) "
        "VALUES (?, ?, ?, 'BOOKED', ?)",
        (trip, hotel_id, env.payload["nights"], time.time()),
    )
    return {"booking": f"BK-{trip}", "hotel": hotel_id}


# --8<-- [end:book]


@hotel.handles("CancelHotel")
async def cancel_hotel(tx: Tx, env: Envelope) -> dict[str, Any]:
    trip = env.payload["trip"]
    row = await tx.fetchone(
        "SELECT hotel_id FROM bookings WHERE trip = ? AND status = 'BOOKED'", (trip,)
    )
    if row is None:
        # Nothing booked: the booking failed, or has not arrived yet. (The runtime
        # left a tombstone: a BookHotel arriving late is refused, not applied.)
        return {"cancelled": False}
    changed = await tx.execute(
        "UPDATE bookings SET status = 'CANCELLED', updated_at = ? "
        "WHERE trip = ? AND status = 'BOOKED'",
        (time.time(), trip),
    )
    if changed:
        await tx.execute("UPDATE hotels SET booked = booked - 1 WHERE hotel_id = ?", (row[0],))
    return {"cancelled": bool(changed)}


@hotel.handles("GetHotelBooking")
async def booking_status(tx: Tx, env: Envelope) -> dict[str, Any]:
    """The status query: what became of the trip's BookHotel (asked when its outcome
    is unknown). The answer's shape is fixed: ``state`` is done, failed, not_found or
    pending."""
    trip = env.payload["trip"]
    row = await tx.fetchone("SELECT hotel_id, status FROM bookings WHERE trip = ?", (trip,))
    if row is None:
        return {"state": "not_found"}
    if row[1] == "BOOKED":
        return {"state": "done", "result": {"booking": f"BK-{trip}", "hotel": row[0]}}
    return {"state": "failed", "reason": "the booking was cancelled"}


# --8<-- [end:handlers]


# --8<-- [start:job]
@hotel.every(3600.0, "forget-old-cancellations")
async def forget_old_cancellations(store: SQLStore) -> None:
    """Runs every hour in each hotel process; safe to run in several at once."""
    async with store.transaction() as tx:
        await tx.execute(
            "DELETE FROM bookings WHERE status = 'CANCELLED' AND updated_at < ?",
            (time.time() - 30 * 86400.0,),
        )


# --8<-- [end:job]
