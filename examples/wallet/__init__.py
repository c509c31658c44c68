"""sagakit_wallet: a customer pays a merchant from a wallet, and the bank pays it on.

debit the wallet -> credit the merchant -> order the bank transfer -> release it (the
pivot: money that left cannot be called back) -> confirm its settlement. See
docs/examples/wallet.md and :mod:`sagakit_wallet.app`.
"""

from __future__ import annotations

from .app import app, build_app

__all__ = ["app", "build_app"]
