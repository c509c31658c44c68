"""The payments service: the traveller's card, through a fake bank kept in its own tables.

Two commands reach the bank. ``AuthenticateCard`` is the 3-D Secure challenge: the
traveller approves the payment in the bank's app, which takes the traveller a while;
until then the bank answers "not yet" (a retryable failure: the saga asks again after
a backoff). ``ChargeFare`` takes the fare: the booking's point of no return. The bank
keeps one charge per booking, so a repeated charge gets the first answer, never a
second debit. There is no refund command: past the pivot the booking only goes
forward, and money is given back only by a person.

The card token chooses how the bank behaves (the load mixes them, see :mod:`.load`):

* ``card-ok-*``: approved at once, charged;
* ``card-slow-*``: the traveller approves after :data:`SLOW_APPROVAL` seconds, longer
  than a seat hold lives: the seat is gone by then;
* ``card-gone-*``: the traveller never approves; the bank ends the challenge after
  :data:`CHALLENGE_TIMEOUT` seconds;
* ``card-declined-*``: authenticated, then the charge is declined;
* ``card-lost-*``: charged, but the bank's first :data:`LOST_ANSWERS` answers are lost
  (the charge happened; the retry with the same booking gets it).
"""

from __future__ import annotations

from typing import Any

from sagakit import Envelope, Service, StepFailed, now
from sagakit.stores.base import Tx

NAME = "payments"
"""The service's endpoint name."""

SLOW_APPROVAL = 8.0
"""Seconds a ``card-slow-*`` traveller takes to approve (more than a hold's TTL)."""

CHALLENGE_TIMEOUT = 12.0
"""Seconds after which the bank gives up on a challenge nobody answered."""

LOST_ANSWERS = 2
"""How many first answers to a ``card-lost-*`` charge the bank loses."""

MIGRATIONS: list[str] = [
    # The bank's books (an external system, kept here in tables of its own): the
    # challenges it opened, and the charges, one per booking.
    """
    CREATE TABLE bank_challenges (
        booking    TEXT NOT NULL PRIMARY KEY,
        card       TEXT NOT NULL,
        status     TEXT NOT NULL CHECK (status IN ('OPEN', 'SPENT', 'CANCELLED')),
        opened_at  DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE bank_charges (
        booking    TEXT NOT NULL PRIMARY KEY,
        card       TEXT NOT NULL,
        amount     BIGINT NOT NULL CHECK (amount >= 0),
        status     TEXT NOT NULL CHECK (status IN ('CHARGED', 'DECLINED')),
        requests   BIGINT NOT NULL,
        at         DOUBLE PRECISION NOT NULL
    );
    """,
]
"""Schema steps (append, never edit)."""


def _text(env: Envelope, name: str) -> str:
    value = env.payload.get(name)
    if not isinstance(value, str) or not value:
        raise StepFailed(f"{env.type}: {name!r} must be a non-empty string, got {value!r}")
    return value


def build_payments() -> Service:
    """The payments service."""
    payments = Service(NAME, migrations=MIGRATIONS)

    @payments.handles("AuthenticateCard")
    async def authenticate(tx: Tx, env: Envelope) -> dict[str, Any]:
        """The 3-D Secure challenge: approved, not yet (retryable), or given up."""
        booking, card = _text(env, "booking"), _text(env, "card")
        at = now()
        await tx.execute(
            "INSERT INTO bank_challenges (booking, card, status, opened_at) "
            "VALUES (?, ?, 'OPEN', ?) ON CONFLICT (booking) DO NOTHING",
            (booking, card, at),
        )
        row = await tx.fetchone(
            "SELECT status, opened_at FROM bank_challenges WHERE booking = ?", (booking,)
        )
        assert row is not None  # inserted above
        if row[0] == "CANCELLED":
            raise StepFailed("the payment approval was withdrawn")
        waited = at - float(row[1])
        if card.startswith("card-gone-"):
            if waited >= CHALLENGE_TIMEOUT:
                raise StepFailed("the traveller did not approve the payment in time")
            raise StepFailed("waiting for the traveller to approve", retryable=True)
        if card.startswith("card-slow-") and waited < SLOW_APPROVAL:
            raise StepFailed("waiting for the traveller to approve", retryable=True)
        return {"authenticated": True}

    @payments.handles("CancelChallenge")
    async def cancel_challenge(tx: Tx, env: Envelope) -> dict[str, Any]:
        """The compensation of the approval: the bank withdraws the challenge, so a
        traveller approving late approves nothing, and a charge arriving late (a person
        cancelled a booking whose charge was stuck) is refused. An approval a charge
        already spent stays spent: that money moved, and only a person gives it back."""
        changed = await tx.execute(
            "UPDATE bank_challenges SET status = 'CANCELLED' WHERE booking = ? AND status = 'OPEN'",
            (_text(env, "booking"),),
        )
        return {"cancelled": bool(changed)}

    @payments.handles("ChargeFare")
    async def charge(tx: Tx, env: Envelope) -> dict[str, Any]:
        """Take the fare (once per booking): the booking's point of no return."""
        booking, card = _text(env, "booking"), _text(env, "card")
        amount = env.payload.get("amount")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise StepFailed(f"ChargeFare: 'amount' must be a positive integer, got {amount!r}")
        # The charge spends the traveller's approval, in one conditional statement: a
        # withdrawal (CancelChallenge) handled beside it either comes first and the
        # charge is refused, or finds the approval spent.
        spent = await tx.execute(
            "UPDATE bank_challenges SET status = 'SPENT' "
            "WHERE booking = ? AND status IN ('OPEN', 'SPENT')",
            (booking,),
        )
        if not spent and await tx.fetchone(
            "SELECT 1 FROM bank_challenges WHERE booking = ?", (booking,)
        ):
            raise StepFailed("the payment approval was withdrawn")
        # (No challenge at all: a person vouched for the approval.)
        row = await tx.fetchone(
            "SELECT status, amount, requests FROM bank_charges WHERE booking = ?", (booking,)
        )
        if row is None:
            status = "DECLINED" if card.startswith("card-declined-") else "CHARGED"
            requests = 1
            await tx.execute(
                "INSERT INTO bank_charges (booking, card, amount, status, requests, at) "
                "VALUES (?, ?, ?, ?, 1, ?)",
                (booking, card, amount, status, now()),
            )
        else:
            status, amount, requests = str(row[0]), int(row[1]), int(row[2]) + 1
            await tx.execute(
                "UPDATE bank_charges SET requests = ? WHERE booking = ?", (requests, booking)
            )
        if status == "DECLINED":
            raise StepFailed("card declined")
        if card.startswith("card-lost-") and requests <= LOST_ANSWERS:
            # The debit is booked (this transaction commits it), the answer is lost.
            raise StepFailed("the bank did not answer in time", retryable=True)
        return {"charge": f"CH-{booking}", "amount": amount}

    @payments.handles("GetCharge")
    async def charge_status(tx: Tx, env: Envelope) -> dict[str, Any]:
        """The status query of the charge: what became of it at the bank."""
        booking = _text(env, "booking")
        row = await tx.fetchone(
            "SELECT status, amount FROM bank_charges WHERE booking = ?", (booking,)
        )
        if row is None:
            return {"state": "not_found"}
        if row[0] == "DECLINED":
            return {"state": "failed", "reason": "card declined"}
        return {"state": "done", "result": {"charge": f"CH-{booking}", "amount": int(row[1])}}

    return payments
