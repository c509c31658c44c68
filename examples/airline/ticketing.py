"""The ticketing service: issues the e-ticket of a paid booking, once.

Ticketing comes after the payment, the booking's point of no return: it is never undone
and it must happen. When the ticketing system is down, the saga tries again (same
booking, so never two tickets); when it stays down longer than the step's retries, the
booking goes to a person, who retries once the system is back or settles it by hand.
The money is not given back on its own.

The ticketing system is a fake kept in this service's tables, and the traveller token
chooses how it behaves (see :mod:`.load`):

* ``pax-ok-*``: issued at once;
* ``pax-flaky-*``: the first :data:`FLAKY_TRIES` tries find the system busy;
* ``pax-outage-*``: the system is down for this booking for
  :data:`OUTAGE` seconds after the first try, longer than every retry: a person.
"""

from __future__ import annotations

from typing import Any

from sagakit import Envelope, Service, StepFailed, now
from sagakit.stores.base import Tx

NAME = "ticketing"
"""The service's endpoint name."""

FLAKY_TRIES = 2
"""Tries a ``pax-flaky-*`` booking fails before its ticket is issued."""

OUTAGE = 120.0
"""Seconds the ticketing system stays down for a ``pax-outage-*`` booking."""

MIGRATIONS: list[str] = [
    """
    CREATE TABLE tickets (
        booking    TEXT NOT NULL PRIMARY KEY,
        flight     TEXT NOT NULL,
        ticket_no  TEXT NOT NULL UNIQUE,
        issued_at  DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE ticketing_tries (
        booking    TEXT NOT NULL PRIMARY KEY,
        tries      BIGINT NOT NULL,
        first_at   DOUBLE PRECISION NOT NULL
    );
    """,
]
"""Schema steps (append, never edit)."""


def _text(env: Envelope, name: str) -> str:
    value = env.payload.get(name)
    if not isinstance(value, str) or not value:
        raise StepFailed(f"{env.type}: {name!r} must be a non-empty string, got {value!r}")
    return value


def build_ticketing() -> Service:
    """The ticketing service."""
    ticketing = Service(NAME, migrations=MIGRATIONS)

    @ticketing.handles("IssueTicket")
    async def issue(tx: Tx, env: Envelope) -> dict[str, Any]:
        """Issue the booking's ticket (once); "try again" while the system is down."""
        booking, flight = _text(env, "booking"), _text(env, "flight")
        traveller = _text(env, "traveller")
        at = now()
        row = await tx.fetchone("SELECT ticket_no FROM tickets WHERE booking = ?", (booking,))
        if row is not None:
            return {"ticket": str(row[0])}
        await tx.execute(
            "INSERT INTO ticketing_tries (booking, tries, first_at) VALUES (?, 0, ?) "
            "ON CONFLICT (booking) DO NOTHING",
            (booking, at),
        )
        await tx.execute(
            "UPDATE ticketing_tries SET tries = tries + 1 WHERE booking = ?", (booking,)
        )
        tried = await tx.fetchone(
            "SELECT tries, first_at FROM ticketing_tries WHERE booking = ?", (booking,)
        )
        assert tried is not None  # inserted above
        tries, first_at = int(tried[0]), float(tried[1])
        if traveller.startswith("pax-flaky-") and tries <= FLAKY_TRIES:
            raise StepFailed("the ticketing system is busy", retryable=True)
        if traveller.startswith("pax-outage-") and at - first_at < OUTAGE:
            raise StepFailed("the ticketing system is down", retryable=True)
        ticket = f"TK-{booking}"
        await tx.execute(
            "INSERT INTO tickets (booking, flight, ticket_no, issued_at) VALUES (?, ?, ?, ?)",
            (booking, flight, ticket, at),
        )
        return {"ticket": ticket}

    return ticketing
