"""Composition of the checkout's services: stores, provider and participants in one place.

Each service has its own SQLite file in ``data_dir``; the card provider, being an
external system, has one too. The stores are *not* opened here: the :class:`Engine`
opens them. Business tables are created by :func:`migrate`, which must run after the
engine opened the stores and before the first saga starts::

    checkout = open_checkout(data_dir)
    async with checkout_engine(checkout) as engine:
        await migrate(checkout, initial_stock={"sku-1": 10})
        await engine.start(CHECKOUT, "order-1", {...})

Migrations are recorded per service namespace, so running :func:`migrate` on every
start is cheap and safe; seeding stock is idempotent too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagakit import Engine, Participant, SagaDefinition
from sagakit.runtime.lockfile import private_dir
from sagakit.stores.sqlite import SQLiteStore

from . import inventory, order, payment, shipping
from .provider import FakeCardProvider
from .sagas import checkout_definition


@dataclass(slots=True)
class Checkout:
    """Everything the checkout runs on: five stores, the provider and four participants."""

    data_dir: Path
    orchestrator_store: SQLiteStore
    order_store: SQLiteStore
    payment_store: SQLiteStore
    inventory_store: SQLiteStore
    shipping_store: SQLiteStore
    provider: FakeCardProvider
    order: Participant
    payment: Participant
    inventory: Participant
    shipping: Participant

    @property
    def participants(self) -> list[Participant]:
        """The four participants, for :class:`Engine`'s ``participants=``."""
        return [self.order, self.payment, self.inventory, self.shipping]

    @property
    def service_stores(self) -> dict[str, SQLiteStore]:
        """The participants' stores by endpoint name."""
        return {
            order.NAME: self.order_store,
            payment.NAME: self.payment_store,
            inventory.NAME: self.inventory_store,
            shipping.NAME: self.shipping_store,
        }

    def invariant_stores(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~sagakit_checkout.invariants.check_invariants`."""
        return {
            "orchestrator_store": self.orchestrator_store,
            "order_store": self.order_store,
            "payment_store": self.payment_store,
            "inventory_store": self.inventory_store,
            "shipping_store": self.shipping_store,
            "provider": self.provider,
        }


def open_checkout(
    data_dir: str | Path,
    *,
    synchronous: str = "FULL",
    carrier_down_fraction: float = 0.0,
    provider_clock: Callable[[], float] = time.time,
) -> Checkout:
    """Build the checkout on the files of ``data_dir`` (created if missing); opens nothing.

    Files: ``orchestrator.db`` (saga store), ``order.db``, ``payment.db``,
    ``inventory.db``, ``shipping.db`` and ``provider.db`` (the fake card provider).
    """
    d = Path(data_dir)
    private_dir(d)  # 0700: the databases hold customers and cards

    def store(name: str) -> SQLiteStore:
        return SQLiteStore(d / f"{name}.db", name=name, synchronous=synchronous)

    stores = {
        name: store(name) for name in ("orchestrator", "order", "payment", "inventory", "shipping")
    }
    provider = FakeCardProvider(d / "provider.db", clock=provider_clock)
    return checkout_on(d, stores, provider, carrier_down_fraction=carrier_down_fraction)


def checkout_on(
    data_dir: Path,
    stores: Mapping[str, Any],
    provider: FakeCardProvider,
    *,
    carrier_down_fraction: float = 0.0,
) -> Checkout:
    """The checkout's four participants on ``stores`` (by name: ``orchestrator``,
    ``order``, ``payment``, ``inventory``, ``shipping``), with ``provider``."""
    return Checkout(
        data_dir=data_dir,
        orchestrator_store=stores["orchestrator"],
        order_store=stores["order"],
        payment_store=stores["payment"],
        inventory_store=stores["inventory"],
        shipping_store=stores["shipping"],
        provider=provider,
        order=order.build_order(stores["order"]),
        payment=payment.build_payment(stores["payment"], provider),
        inventory=inventory.build_inventory(stores["inventory"]),
        shipping=shipping.build_shipping(
            stores["shipping"], carrier_down_fraction=carrier_down_fraction
        ),
    )


async def migrate(checkout: Checkout, *, initial_stock: Mapping[str, int] | None = None) -> None:
    """Create (or upgrade) the business tables of the four services; seed stock if given.

    The stores must be open (the engine opens them). Idempotent: applied steps are
    skipped, and seeding never changes a SKU that already exists.
    """
    for module, store in (
        (order, checkout.order_store),
        (payment, checkout.payment_store),
        (inventory, checkout.inventory_store),
        (shipping, checkout.shipping_store),
    ):
        await store.apply_migrations(module.NAMESPACE, module.MIGRATIONS)
    if initial_stock:
        await inventory.seed_stock(checkout.inventory_store, initial_stock)


def checkout_engine(
    checkout: Checkout, *, definition: SagaDefinition | None = None, **kwargs: Any
) -> Engine:
    """An embedded :class:`Engine` running the orchestrated checkout on these stores."""
    return Engine(
        checkout.orchestrator_store,
        [definition or checkout_definition()],
        participants=checkout.participants,
        **kwargs,
    )
