"""Planted bugs, for proving that the simulator catches them.

    sagakit simulate --app sagakit_wallet.planted:double_credit --seeds 200   # exits 1

Each is the real app with one flag turned on (:func:`sagakit_wallet.app.build_app`),
not a copy of its code.
"""

from __future__ import annotations

from sagakit import App

from .app import build_app


def double_credit() -> App:
    """The wallet's refund puts the amount back twice: money appears from nowhere.

    Caught by the watch: a wallet's balance no longer matches its ledger, and the
    money in wallets, at merchants and in flight no longer adds up.
    """
    return build_app(bug="double_credit")
