"""The merchant service: merchants' accounts and a ledger of credits and their reversals.

One ledger row per (payment, kind): the ``credit`` of a payment to the merchant's
account and its ``reversal`` when the transfer is called off before it leaves. A
closed merchant takes no credit (the saga then refunds the wallet).
"""

from __future__ import annotations

from typing import Any

from sagakit import Envelope, Service, StepFailed, now
from sagakit.stores.base import Tx

from .payloads import amount_of, text_of

MIGRATIONS = [
    """
    CREATE TABLE merchants (
        merchant_id TEXT NOT NULL PRIMARY KEY,
        status      TEXT NOT NULL CHECK (status IN ('open', 'closed')),
        opening     BIGINT NOT NULL CHECK (opening >= 0),
        balance     BIGINT NOT NULL CHECK (balance >= 0)
    );
    CREATE TABLE merchant_entries (
        payment     TEXT NOT NULL,
        kind        TEXT NOT NULL CHECK (kind IN ('credit', 'reversal')),
        merchant_id TEXT NOT NULL,
        amount      BIGINT NOT NULL CHECK (amount > 0),
        at          DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (payment, kind)
    );
    """,
]
"""The merchant's tables (portable SQL)."""


def merchant_service() -> Service:
    """The merchant service with its handlers."""
    merchant = Service("merchant", migrations=MIGRATIONS)

    @merchant.handles("CreditMerchant")
    async def credit(tx: Tx, env: Envelope) -> dict[str, Any]:
        """Credit the payment to the merchant's account (an open account only)."""
        payment = text_of(env, "payment")
        merchant_id = text_of(env, "merchant")
        amount = amount_of(env)
        done = await _entry(tx, payment, "credit")
        if done is not None:
            return {"credited": done[1], "merchant": done[0]}
        if await _entry(tx, payment, "reversal") is not None:
            raise StepFailed(f"payment {payment} was reversed before its credit arrived")
        credited = await tx.execute(
            "UPDATE merchants SET balance = balance + ? WHERE merchant_id = ? AND status = 'open'",
            (amount, merchant_id),
        )
        if not credited:
            raise StepFailed(f"merchant {merchant_id} is closed or unknown: no credit")
        await tx.execute(
            "INSERT INTO merchant_entries (payment, kind, merchant_id, amount, at) "
            "VALUES (?, 'credit', ?, ?, ?)",
            (payment, merchant_id, amount, now()),
        )
        return {"credited": amount, "merchant": merchant_id}

    @merchant.handles("ReverseCredit")
    async def reverse(tx: Tx, env: Envelope) -> dict[str, Any]:
        """Take the payment's credit back (the compensation of CreditMerchant)."""
        payment = text_of(env, "payment")
        done = await _entry(tx, payment, "reversal")
        if done is not None:
            return {"reversed": done[1], "merchant": done[0]}
        credit = await _entry(tx, payment, "credit")
        if credit is None:
            return {"reversed": 0}  # never credited: nothing to take back
        merchant_id, amount = credit
        taken = await tx.execute(
            "UPDATE merchants SET balance = balance - ? WHERE merchant_id = ? AND balance >= ?",
            (amount, merchant_id, amount),
        )
        if not taken:
            # The credit is in the ledger, so the balance holds it, unless the books are
            # broken: a person must look, not a retry.
            raise StepFailed(f"merchant {merchant_id}'s balance no longer holds {amount}")
        await tx.execute(
            "INSERT INTO merchant_entries (payment, kind, merchant_id, amount, at) "
            "VALUES (?, 'reversal', ?, ?, ?)",
            (payment, merchant_id, amount, now()),
        )
        return {"reversed": amount, "merchant": merchant_id}

    return merchant


async def _entry(tx: Tx, payment: str, kind: str) -> tuple[str, int] | None:
    """(merchant, amount) of the payment's ledger row of ``kind``, if there is one."""
    row = await tx.fetchone(
        "SELECT merchant_id, amount FROM merchant_entries WHERE payment = ? AND kind = ?",
        (payment, kind),
    )
    return None if row is None else (str(row[0]), int(row[1]))
