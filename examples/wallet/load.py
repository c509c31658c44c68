"""What ``sagakit demo`` and ``sagakit simulate`` run: reference data and a seeded mix of
transfers.

:func:`setup` opens :data:`WALLETS` wallets of :data:`OPENING` cents each and two
merchants, one of them closed. :func:`load` draws the transfers for a count and a seed:
every scenario is chosen by the data (the wallet, the merchant, the bank account), and a
few wallets are shared by many transfers, so that payments race for the same money
(three transfers per seed share one wallet whose balance covers only some of them).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from . import bank
from .sagas import TRANSFER

if TYPE_CHECKING:
    from sagakit import Deployment

WALLETS = 100
"""Wallets ``wal-000`` ... ``wal-099``."""
OPENING = 10_000
"""Each wallet's opening balance, in cents."""
SHOP, CLOSED = "m-shop", "m-closed"
"""The open merchant, and one whose account is closed (it takes no credit)."""
TOO_MUCH = 25_000
"""An amount no wallet covers: the debit is refused."""

SCENARIOS = ("ok", "closed", "slow", "frozen", "review", "stuck", "too_much", "hold")
"""Each transfer's story, decided by its data:

``ok``: settled. ``closed``: the merchant's account is closed (the wallet is refunded).
``slow``: the bank books the settlement but its answer never comes (a status query
finds it). ``frozen``: the bank rejects the release (the credit is reversed and the
wallet refunded). ``review``: the bank screens the order for a few seconds. ``stuck``:
the settlement fails past the saga's tries (a person's retry settles it).
``too_much``: the wallet does not cover it (refused, nothing to undo). ``hold``: the
bank holds the order past the saga's deadline (TIMED_OUT, everything given back).
Wallets shared between transfers make debits refused for insufficient funds too."""

WEIGHTS = (60, 6, 8, 6, 8, 4, 4, 4)
"""How often each scenario comes up past the first eight transfers of a load."""


def load(count: int, seed: int) -> list[tuple[str, str, dict[str, Any]]]:
    """``count`` transfers ``(definition, business key, data)``: the same for a seed.

    The first eight go through the scenarios in turn from a point the seed picks, so even
    three transfers mix success, failure before the pivot and trouble after it; the
    rest are drawn by :data:`WEIGHTS`. About two transfers share each wallet
    (all three of a three-transfer load share one).
    """
    rng = random.Random(f"wallet-load:{seed}")
    wallets = min(WALLETS, max(1, count // 2))
    first = rng.randrange(len(SCENARIOS))
    out: list[tuple[str, str, dict[str, Any]]] = []
    for i in range(count):
        n = f"{seed}-{i:05d}"
        if i < len(SCENARIOS):
            scenario = SCENARIOS[(first + i) % len(SCENARIOS)]
        else:
            scenario = rng.choices(SCENARIOS, WEIGHTS)[0]
        data: dict[str, Any] = {
            "wallet": f"wal-{rng.randrange(wallets):03d}",
            "merchant": CLOSED if scenario == "closed" else SHOP,
            "account": _account(scenario, n),
            "amount": TOO_MUCH if scenario == "too_much" else rng.randrange(2_000, 6_001, 100),
            "currency": "EUR",
            "scenario": scenario,
        }
        out.append((TRANSFER, f"pay-{n}", data))
    return out


def _account(scenario: str, n: str) -> str:
    """The merchant's bank account token, which tells the fake bank what to do."""
    prefix = {
        "slow": bank.SLOW,
        "frozen": bank.FROZEN,
        "review": bank.REVIEW,
        "stuck": bank.STUCK,
        "hold": bank.HOLD,
    }.get(scenario, "acct-ok-")
    return f"{prefix}{n}"


async def setup(dep: Deployment) -> None:
    """Open the wallets and the merchants (idempotent: a second run changes nothing)."""
    async with dep.store("wallet").transaction() as tx:
        for i in range(WALLETS):
            await tx.execute(
                "INSERT INTO wallets (wallet_id, opening, balance) VALUES (?, ?, ?) "
                "ON CONFLICT (wallet_id) DO NOTHING",
                (f"wal-{i:03d}", OPENING, OPENING),
            )
    async with dep.store("merchant").transaction() as tx:
        for merchant_id, status in ((SHOP, "open"), (CLOSED, "closed")):
            await tx.execute(
                "INSERT INTO merchants (merchant_id, status, opening, balance) "
                "VALUES (?, ?, 0, 0) ON CONFLICT (merchant_id) DO NOTHING",
                (merchant_id, status),
            )
