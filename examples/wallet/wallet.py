"""The wallet service: customers' wallets and a ledger of what each payment took or gave back.

Its own store keeps every wallet's opening balance and current balance, and one ledger
row per (payment, kind): the ``debit`` that paid for a transfer and the ``refund`` that
gave it back. The primary key makes a second row of a kind for one payment impossible,
and each handler reads the ledger first, so a repeated command finds what it did.

A debit is one conditional ``UPDATE ... WHERE balance >= amount`` checked by its row
count: two payments racing for the last euros of a wallet cannot both win, and no
balance ever goes below zero (never read the balance and then write it).
"""

from __future__ import annotations

from typing import Any

from sagakit import Envelope, Service, StepFailed, now
from sagakit.stores.base import Tx

from .payloads import amount_of, text_of

MIGRATIONS = [
    # Applied once each, in order: append new scripts, never edit these.
    """
    CREATE TABLE wallets (
        wallet_id TEXT NOT NULL PRIMARY KEY,
        opening   BIGINT NOT NULL CHECK (opening >= 0),
        balance   BIGINT NOT NULL CHECK (balance >= 0)
    );
    CREATE TABLE wallet_entries (
        payment   TEXT NOT NULL,
        kind      TEXT NOT NULL CHECK (kind IN ('debit', 'refund')),
        wallet_id TEXT NOT NULL,
        amount    BIGINT NOT NULL CHECK (amount > 0),
        at        DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (payment, kind)
    );
    """,
]
"""The wallet's tables (portable SQL: the same text on SQLite and PostgreSQL)."""


def wallet_service(*, double_refund: bool = False) -> Service:
    """The wallet service with its handlers.

    ``double_refund`` plants a bug (:mod:`sagakit_wallet.planted`): the refund puts the
    amount back twice, so the wallet's balance no longer follows its ledger.
    """
    wallet = Service("wallet", migrations=MIGRATIONS)

    # --8<-- [start:debit]
    @wallet.handles("DebitWallet")
    async def debit(tx: Tx, env: Envelope) -> dict[str, Any]:
        """Take the payment's amount from the wallet, if the balance covers it."""
        payment = text_of(env, "payment")
        wallet_id = text_of(env, "wallet")
        amount = amount_of(env)
        done = await _entry(tx, payment, "debit")
        if done is not None:
            return {"debited": done[1], "wallet": done[0]}
        if await _entry(tx, payment, "refund") is not None:
            raise StepFailed(f"payment {payment} was refunded before its debit arrived")
        # One statement decides: the row changes only if the money is there.
        taken = await tx.execute(
            "UPDATE wallets SET balance = balance - ? WHERE wallet_id = ? AND balance >= ?",
            (amount, wallet_id, amount),
        )
        if not taken:
            known = await tx.fetchone("SELECT 1 FROM wallets WHERE wallet_id = ?", (wallet_id,))
            if known is None:
                raise StepFailed(f"there is no wallet {wallet_id}")
            raise StepFailed(f"insufficient funds in {wallet_id} for {amount}")
        await tx.execute(
            "INSERT INTO wallet_entries (payment, kind, wallet_id, amount, at) "
            "VALUES (?, 'debit', ?, ?, ?)",
            (payment, wallet_id, amount, now()),
        )
        return {"debited": amount, "wallet": wallet_id}

    # --8<-- [end:debit]

    @wallet.handles("RefundWallet")
    async def refund(tx: Tx, env: Envelope) -> dict[str, Any]:
        """Give the payment's debit back (the compensation of DebitWallet).

        With no debit in the ledger there is nothing to give back: the debit failed, or
        never arrived (the runtime then refuses it if it comes late).
        """
        payment = text_of(env, "payment")
        done = await _entry(tx, payment, "refund")
        if done is not None:
            return {"refunded": done[1], "wallet": done[0]}
        debit = await _entry(tx, payment, "debit")
        if debit is None:
            return {"refunded": 0}
        wallet_id, amount = debit
        back = 2 * amount if double_refund else amount
        await tx.execute(
            "UPDATE wallets SET balance = balance + ? WHERE wallet_id = ?", (back, wallet_id)
        )
        await tx.execute(
            "INSERT INTO wallet_entries (payment, kind, wallet_id, amount, at) "
            "VALUES (?, 'refund', ?, ?, ?)",
            (payment, wallet_id, amount, now()),
        )
        return {"refunded": amount, "wallet": wallet_id}

    return wallet


async def _entry(tx: Tx, payment: str, kind: str) -> tuple[str, int] | None:
    """(wallet, amount) of the payment's ledger row of ``kind``, if there is one."""
    row = await tx.fetchone(
        "SELECT wallet_id, amount FROM wallet_entries WHERE payment = ? AND kind = ?",
        (payment, kind),
    )
    return None if row is None else (str(row[0]), int(row[1]))
