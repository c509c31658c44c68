"""The checkout through the path every app takes: ``App(load=, setup=, invariants=)``.

``sagakit simulate --app sagakit_checkout:app`` (and the testing kit's
``SagaHarness.for_app``) run the checkout as they run any app: the sagas of
:func:`load`, the stock of :func:`setup`, and the design's invariants read from the
services' ledgers by :func:`invariants`. (``sagakit demo`` keeps the checkout's own
demo, with its scenario report.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagakit.app import StartRequest
from sagakit.deployment import Deployment
from sagakit.errors import ConfigurationError
from sagakit.testing.app_checks import settled_by_hand

from .demo import REGULAR_SKUS, REGULAR_STOCK, WAREHOUSE_SKUS, make_orders
from .inventory import seed_stock
from .sagas import CHECKOUT

MAX_ORDERS = 600
"""The most orders :func:`load` draws: :func:`setup` seeds the SKUs their races contend
for (one unit each) without knowing the count, so the count is bounded."""
RACE_SKUS = MAX_ORDERS // 3
"""Races of three orders for one unit: at most this many in :data:`MAX_ORDERS` orders."""


def load(count: int, seed: int) -> list[StartRequest]:
    """``count`` orders of the demo's scenario mix for ``seed`` (races for the last unit
    of a SKU included): one checkout saga each."""
    if count > MAX_ORDERS:
        raise ConfigurationError(
            f"the checkout's load draws at most {MAX_ORDERS} orders, not {count} "
            "(sagakit demo runs larger ones)"
        )
    specs, _ = make_orders(count, seed)
    return [(CHECKOUT, spec.order_id, spec.data) for spec in specs]


def stock() -> dict[str, int]:
    """The stock :func:`setup` seeds: every SKU any load of up to :data:`MAX_ORDERS`
    orders names, races' SKUs with one unit each."""
    levels = dict.fromkeys(REGULAR_SKUS, REGULAR_STOCK) | {"sku-sold-out": 0}
    levels |= dict.fromkeys(WAREHOUSE_SKUS.values(), REGULAR_STOCK)
    levels |= {f"sku-last-{i:04d}": 1 for i in range(1, RACE_SKUS + 1)}
    return levels


async def setup(dep: Deployment) -> None:
    """Seed the stock (idempotent: a SKU that exists keeps its numbers)."""
    await seed_stock(dep.store("inventory"), stock())


async def invariants(dep: Deployment) -> Sequence[str]:
    """The design's invariants from the ledgers (money, stock, terminal, effect once,
    honest status); the caller accounts for the messages (the simulator knows its
    deliberate drops)."""
    from .app import provider_of
    from .invariants import check_invariants

    provider = provider_of(dep.ctx)
    try:
        report = await check_invariants(
            orchestrator_store=dep.store("orchestrator"),
            order_store=dep.store("order"),
            payment_store=dep.store("payment"),
            inventory_store=dep.store("inventory"),
            shipping_store=dep.store("shipping"),
            provider=provider,
            initial_stock=await _initial_stock(dep),
            settled_by_hand=await settled_by_hand(dep, CHECKOUT),
            messages=False,
        )
    finally:
        provider.close()
    return list(report.violations)


async def _initial_stock(dep: Deployment) -> dict[str, int]:
    async with dep.store("inventory").transaction() as tx:
        rows: list[Any] = await tx.fetchall("SELECT sku, initial FROM stock")
    return {str(sku): int(initial) for sku, initial in rows}
