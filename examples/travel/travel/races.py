"""The hotel's handlers side by side: ``sagakit check travel.app:trip --races travel.races:races``.

Each race runs the real hotel service (its handlers, the participant runtime's inbox and
idempotency records) in every interleaving of two transactions on SQLite, as two hotel
processes on PostgreSQL could run them, and checks the hotel's books afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagakit import AppContext, Outcome
from sagakit.runtime.participant import Participant
from sagakit.stores.sqlite import SQLiteStore
from sagakit.testing.races import Race, command, delivering

from .hotel import hotel

# --8<-- [start:races]
HOTEL = "htl-tiny-1"  # 3 rooms (migration 2)


def hotel_process(store: Any) -> Participant:
    """The hotel service on ``store``, as ``sagakit service hotel`` builds it."""
    from .app import app

    return hotel.participant(store, AppContext(app))


def book(trip: str) -> Any:
    """An actor: a hotel process handling the trip's BookHotel."""
    payload = {"trip": trip, "hotel": HOTEL, "nights": 2}
    return delivering(
        hotel_process, command("hotel", "BookHotel", payload, saga_id=trip, step="hotel")
    )


def cancel(trip: str) -> Any:
    """An actor: a hotel process handling the trip's CancelHotel (the compensation)."""
    cmd = command("hotel", "CancelHotel", {"trip": trip}, saga_id=trip, step="hotel", rung=0)
    return delivering(hotel_process, cmd)


def with_rooms_left(left: int) -> Any:
    """A setup: the hotel's tables, with ``left`` rooms of :data:`HOTEL` free."""

    async def setup(store: SQLiteStore) -> None:
        for namespace, steps in hotel.migrations.items():
            await store.apply_migrations(namespace, steps)
        async with store.transaction() as tx:
            await tx.execute(
                "UPDATE hotels SET booked = rooms - ? WHERE hotel_id = ?", (left, HOTEL)
            )

    return setup


async def books_balance(store: SQLiteStore, outcomes: Sequence[object]) -> list[str]:
    """Rooms booked = BOOKED bookings, never more than the rooms; one answer per trip."""
    async with store.transaction() as tx:
        row = await tx.fetchone("SELECT rooms, booked FROM hotels WHERE hotel_id = ?", (HOTEL,))
        held = await tx.fetchone(
            "SELECT COUNT(*) FROM bookings WHERE hotel_id = ? AND status = 'BOOKED'", (HOTEL,)
        )
    assert row is not None and held is not None
    rooms, booked = row
    problems = []
    if booked > rooms or booked - (rooms - 1) != held[0]:  # one room was free
        problems.append(f"{booked} of {rooms} rooms booked, {held[0]} bookings hold one")
    problems += [f"no answer recorded: {o}" for o in outcomes if not isinstance(o, Outcome)]
    return problems


def races() -> list[Race]:
    """The hotel's races: two trips for the last room; a booking and its cancellation."""
    return [
        Race(
            "last-room",
            with_rooms_left(1),
            [("trip-1", book("trip-1")), ("trip-2", book("trip-2"))],
            books_balance,
        ),
        Race(
            "cancel-beside-book",
            with_rooms_left(1),
            [("book", book("trip-1")), ("cancel", cancel("trip-1"))],
            books_balance,
        ),
    ]


# --8<-- [end:races]
