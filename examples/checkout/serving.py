"""How ``sagakit serve`` runs the checkout app (``App(serve=...)``).

Besides the generic shape (the app's engine and the operator API), the checkout adds
``POST /orders``, the order status routes and the services' ledgers, seeds its stock,
and places the demo's seeded orders with ``--orders``. ``--mode`` picks its shape:

* ``orchestration``: the app's deployment, embedded on SQLite files in the data
  directory, or on ``--store``/``--broker`` (every role here, or ``--api-only``);
* ``choreography`` and ``hybrid`` (embedded only): files in ``<data_dir>/choreography``
  and ``<data_dir>/hybrid``, so that switching modes never mixes two checkouts' tables.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sagakit import App, Engine
from sagakit.api.serve_setup import Served, ServeRequest, deploy
from sagakit.errors import ConfigurationError

from .demo import REGULAR_SKUS, REGULAR_STOCK, OrderSpec, make_orders
from .inventory import expire_reservations, seed_stock
from .sagas import CHECKOUT

WAVE = 100


@dataclass(frozen=True, slots=True)
class Ledgers:
    """The services' stores the ledger routes read (``sagakit.api.records.CheckoutStores``)."""

    payment_store: Any
    inventory_store: Any
    shipping_store: Any


def served(app: App, req: ServeRequest) -> Served:
    """The checkout in the mode ``req`` asks for."""
    mode = req.options.get("mode") or "orchestration"
    if req.store_url is None and mode == "choreography":
        return _choreography(req)
    if req.store_url is None and mode == "hybrid":
        return _hybrid(req)
    if mode != "orchestration":
        raise ConfigurationError(
            f"--store runs the orchestrated checkout only; --mode {mode} is embedded only"
        )
    return _orchestrated(app, req)


def _stock_and_orders(count: int, seed: int) -> tuple[list[OrderSpec], dict[str, int]]:
    specs, stock = make_orders(count, seed) if count else ([], {})
    stock.update(dict.fromkeys(REGULAR_SKUS, REGULAR_STOCK), **{"sku-sold-out": 0})
    return specs, stock


def _orchestrated(app: App, req: ServeRequest) -> Served:
    dep, engine, where = deploy(app, req)
    inventory = dep.store("inventory")

    async def prepare(count: int, seed: int) -> None:
        specs, stock = _stock_and_orders(count, seed)
        await seed_stock(inventory, stock)
        await _start(engine, CHECKOUT, specs)

    ledgers = Ledgers(dep.store("payment"), inventory, dep.store("shipping"))
    return Served(engine, ledgers, CHECKOUT, prepare, where)


async def _start(engine: Engine, definition: str, specs: Sequence[OrderSpec]) -> None:
    for i in range(0, len(specs), WAVE):
        await engine.start_many([(definition, s.order_id, s.data) for s in specs[i : i + WAVE]])


def _sweeper(engine: Engine, inventory: Any) -> None:
    engine.every(5.0, "expire-reservations", lambda: expire_reservations(inventory, time.time()))


def _choreography(req: ServeRequest) -> Served:
    from .choreography import CHOREOGRAPHY, open_choreography, place_orders

    base = req.data_dir / "choreography"
    ch = open_choreography(base, synchronous=req.synchronous)
    engine = ch.engine()
    inventory = ch.stores["inventory"]
    _sweeper(engine, inventory)

    async def prepare(count: int, seed: int) -> None:
        specs, stock = _stock_and_orders(count, seed)
        await seed_stock(inventory, stock)
        for i in range(0, len(specs), WAVE):
            await place_orders(ch, [(s.order_id, s.data) for s in specs[i : i + WAVE]])

    async def start_order(order_id: str, data: dict[str, Any]) -> tuple[str, str]:
        # An order of the choreography is placed with the order service; its OrderCreated
        # starts the flow, and the tracker's view (id: the order id) follows in a moment.
        await place_orders(ch, [(order_id, data)])
        tracker, flow = ch.tracker, ch.tracker.flow
        for _ in range(100):  # so that GET /orders/{id} right after the answer finds it
            inst = await tracker.store.get_saga(order_id)
            if inst is not None:
                return order_id, inst.status
            await asyncio.sleep(0.02)
        return order_id, flow.started_status

    ledgers = Ledgers(ch.stores["payment"], inventory, ch.stores["shipping"])
    return Served(engine, ledgers, CHOREOGRAPHY, prepare, str(base), start_order)


def _hybrid(req: ServeRequest) -> Served:
    from .hybrid import HYBRID, open_hybrid
    from .personal import migrate_personal

    base = req.data_dir / "hybrid"
    h = open_hybrid(base, synchronous=req.synchronous)
    engine = h.engine()
    engine.before_start(lambda: migrate_personal(h.checkout.order_store, h.checkout.payment_store))
    inventory = h.checkout.inventory_store
    _sweeper(engine, inventory)

    async def prepare(count: int, seed: int) -> None:
        specs, stock = _stock_and_orders(count, seed)
        await seed_stock(inventory, stock)
        await _start(engine, HYBRID, specs)

    return Served(engine, h.checkout, HYBRID, prepare, str(base))
