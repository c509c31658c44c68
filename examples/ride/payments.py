"""The payments service: holds on the riders' cards, their release, and the fare's capture.

Its own database stands for the card network as well (a fake external system): the
``holds`` table is the hold each ride placed, and ``card_ledger`` records every
operation on a card, one row each, for the invariants to add up. The card token decides
how the network behaves, as a real test card would:

* ``card-declined-*``: the hold is declined (a business failure before the pivot: the
  saga compensates, nothing to release);
* ``card-flaky-*``: the network is busy for the first two captures (retried with the
  same idempotency key, then captured);
* any other card is accepted.

A capture above the hold is refused for good (the trip took a long detour): after the
pivot that goes to a person, who charges the difference by other means.

The SQL is portable (``?`` placeholders, ``BIGINT`` cents, ``DOUBLE PRECISION`` epoch
seconds): the same statements run on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from sagakit import Envelope, Service, StepFailed, now
from sagakit.stores.base import Tx

NAME = "payments"
"""The service's endpoint name."""

FLAKY_CAPTURES = 2
"""How many captures of a ``card-flaky-*`` card the network leaves unanswered."""

MIGRATIONS = [
    """
    CREATE TABLE holds (
        ride          TEXT NOT NULL PRIMARY KEY,
        card          TEXT NOT NULL,
        amount        BIGINT NOT NULL CHECK (amount > 0),
        status        TEXT NOT NULL CHECK (status IN ('HELD', 'RELEASED', 'CAPTURED')),
        captured      BIGINT,
        capture_tries BIGINT NOT NULL DEFAULT 0,
        updated_at    DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE card_ledger (
        ride   TEXT NOT NULL,
        op     TEXT NOT NULL CHECK (op IN ('hold', 'release', 'capture')),
        amount BIGINT NOT NULL CHECK (amount >= 0),
        at     DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX card_ledger_ride ON card_ledger (ride);
    """,
]
"""Schema steps (append new ones, never edit these). ``card_ledger`` has no unique key
on purpose: a second capture of one ride must show up as a second row, for the
invariants to catch, rather than fail the handler."""


def _text(env: Envelope, name: str) -> str:
    value = env.payload.get(name)
    if not isinstance(value, str) or not value:
        raise StepFailed(f"{env.type}: payload field {name!r} must be a non-empty string")
    return value


def _cents(env: Envelope, name: str) -> int:
    value = env.payload.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise StepFailed(f"{env.type}: payload field {name!r} must be a positive whole number")
    return value


def build_payments() -> Service:
    """A new payments service (each app gets its own: its handlers are registered on it)."""
    payments = Service(NAME, migrations=MIGRATIONS)

    @payments.handles("HoldFare")
    async def hold_fare(tx: Tx, env: Envelope) -> dict[str, Any]:
        ride, card, amount = _text(env, "ride"), _text(env, "card"), _cents(env, "amount")
        row = await tx.fetchone("SELECT amount, status FROM holds WHERE ride = ?", (ride,))
        if row is not None:  # placed before (a person retried): the same hold
            return {"hold": f"H-{ride}", "amount": int(row[0])}
        if card.startswith("card-declined-"):
            raise StepFailed("the card was declined")  # a final answer: compensate
        at = now()
        await tx.execute(
            "INSERT INTO holds (ride, card, amount, status, updated_at) "
            "VALUES (?, ?, ?, 'HELD', ?)",
            (ride, card, amount, at),
        )
        await tx.execute(
            "INSERT INTO card_ledger (ride, op, amount, at) VALUES (?, 'hold', ?, ?)",
            (ride, amount, at),
        )
        return {"hold": f"H-{ride}", "amount": amount}

    @payments.handles("ReleaseHold")
    async def release_hold(tx: Tx, env: Envelope) -> dict[str, Any]:
        # The compensation of the hold. It must accept "nothing to release": the hold
        # was declined, or never arrived (the runtime then tombstones its key, so a
        # HoldFare arriving late is refused rather than placed).
        ride = _text(env, "ride")
        row = await tx.fetchone("SELECT amount, status FROM holds WHERE ride = ?", (ride,))
        if row is None or row[1] != "HELD":
            return {"released": False, "status": None if row is None else row[1]}
        at = now()
        await tx.execute(
            "UPDATE holds SET status = 'RELEASED', updated_at = ? WHERE ride = ? "
            "AND status = 'HELD'",
            (at, ride),
        )
        await tx.execute(
            "INSERT INTO card_ledger (ride, op, amount, at) VALUES (?, 'release', ?, ?)",
            (ride, int(row[0]), at),
        )
        return {"released": True, "amount": int(row[0])}

    @payments.handles("CaptureFare")
    async def capture_fare(tx: Tx, env: Envelope) -> dict[str, Any]:
        ride = _text(env, "ride")
        fare = env.payload.get("fare")
        row = await tx.fetchone(
            "SELECT card, amount, status, captured, capture_tries FROM holds WHERE ride = ?",
            (ride,),
        )
        if row is None:
            raise StepFailed(f"ride {ride} has no hold to capture from")
        card, held, status, captured, tries = row
        if status == "CAPTURED":  # captured before (a person retried): the same capture
            return {"captured": int(captured)}
        if status != "HELD":
            raise StepFailed(f"the hold of ride {ride} was {status.lower()}; nothing to capture")
        if not isinstance(fare, int) or isinstance(fare, bool) or fare <= 0:
            raise StepFailed(f"no fare known for ride {ride} (got {fare!r})")
        if fare > held:
            raise StepFailed(
                f"the fare ({fare} cents) is above the hold ({held} cents): "
                "a person charges the difference"
            )
        if card.startswith("card-flaky-") and tries < FLAKY_CAPTURES:
            # The network did not answer: nothing was taken. The count is kept (this
            # transaction commits with the failure), so the third try goes through.
            await tx.execute(
                "UPDATE holds SET capture_tries = capture_tries + 1 WHERE ride = ?", (ride,)
            )
            raise StepFailed("the card network is busy", retryable=True)
        at = now()
        await tx.execute(
            "UPDATE holds SET status = 'CAPTURED', captured = ?, "
            "capture_tries = capture_tries + 1, updated_at = ? WHERE ride = ? AND status = 'HELD'",
            (fare, at, ride),
        )
        await tx.execute(
            "INSERT INTO card_ledger (ride, op, amount, at) VALUES (?, 'capture', ?, ?)",
            (ride, fare, at),
        )
        return {"captured": fare}

    return payments
