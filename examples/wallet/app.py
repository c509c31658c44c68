"""The wallet app: every sagakit process loads it with ``--app sagakit_wallet:app``.

    sagakit demo     --app sagakit_wallet:app --faults chaos --orders 100
    sagakit simulate --app sagakit_wallet:app --seeds 300
    sagakit service wallet --app sagakit_wallet:app --store ... --broker ...

Three services, each with its own store and ledger: ``wallet`` (:mod:`.wallet`),
``merchant`` (:mod:`.merchant`) and ``bank``, a fake external bank (:mod:`.bank`). The
saga is in :mod:`.sagas`, the load and reference data in :mod:`.load`, the checks in
:mod:`.invariants`.
"""

from __future__ import annotations

from sagakit import App
from sagakit.errors import ConfigurationError

from .bank import bank_service
from .invariants import invariants, watch
from .load import load, setup
from .merchant import merchant_service
from .sagas import transfer_definition
from .wallet import wallet_service

BUGS = ("double_credit",)
"""The bugs :func:`build_app` can plant (see :mod:`.planted`)."""


def build_app(*, bug: str | None = None) -> App:
    """The wallet app; ``bug`` plants one of :data:`BUGS` in the real code."""
    if bug is not None and bug not in BUGS:
        raise ConfigurationError(f"unknown bug {bug!r}; the wallet app plants {list(BUGS)}")
    return App(
        "wallet",
        [transfer_definition()],
        services=[
            wallet_service(double_refund=bug == "double_credit"),
            merchant_service(),
            bank_service(),
        ],
        load=load,
        setup=setup,
        invariants=invariants,
        watch=watch,
        description="a wallet pays a merchant; the bank pays it on (the pivot), then settles",
    )


app = build_app()
