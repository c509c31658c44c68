"""What ``sagakit serve`` runs: the checkout in a mode, on SQLite files or on a deployment.

* Embedded (the default): the checkout on SQLite files in the data directory, every
  role in this process, in one of three modes (see ``sagakit_checkout.modes``):
  ``orchestration`` (files in the data directory itself), ``choreography`` and
  ``hybrid`` (files in ``<data_dir>/choreography`` and ``<data_dir>/hybrid``, so that
  switching modes never mixes two checkouts' tables).
* Deployed (``store_url`` and ``broker_url``): the orchestrated checkout on PostgreSQL
  (a schema per service) and a broker, either with every role in this process, or
  ``api_only``: no loop at all, next to ``sagakit worker|relay|service`` processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sagakit.api.http import OrderStarter
from sagakit.api.records import CheckoutStores
from sagakit.errors import ConfigurationError
from sagakit.runtime.engine import Engine

if TYPE_CHECKING:
    from sagakit_checkout.demo import OrderSpec

MODES = ("orchestration", "choreography", "hybrid")
"""The checkout's shapes ``sagakit serve --mode`` runs (on a deployment: orchestration only)."""


@dataclass(slots=True)
class Served:
    """One checkout ready to serve: its engine and what the API needs of it."""

    engine: Engine
    checkout: CheckoutStores | None
    """The services' stores for the order and ledger routes (None: no such routes)."""
    order_definition: str
    seed: Callable[[Mapping[str, int]], Awaitable[object]]
    """Create the stock rows once the engine is open (idempotent)."""
    place: Callable[[Sequence[OrderSpec]], Awaitable[object]]
    """Place demo orders once the engine is open (idempotent by order id)."""
    where: str
    """Where the data lives, for the banner."""
    start_order: OrderStarter | None = None
    """How ``POST /orders`` starts an order (None: the ``order_definition`` saga)."""


@dataclass(frozen=True, slots=True)
class Ledgers:
    """The services' stores the ledger routes read (see ``CheckoutStores``)."""

    payment_store: Any
    inventory_store: Any
    shipping_store: Any


def embedded(base: Path, mode: str, synchronous: str) -> Served:
    """The checkout in ``mode`` on the SQLite files of ``base``, every role here."""
    if mode == "choreography":
        return _choreography(base / mode, synchronous)
    if mode == "hybrid":
        return _hybrid(base / mode, synchronous)
    if mode != "orchestration":
        raise ConfigurationError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    from sagakit_checkout.inventory import expire_reservations
    from sagakit_checkout.sagas import CHECKOUT
    from sagakit_checkout.services import checkout_engine, migrate, open_checkout

    checkout = open_checkout(base, synchronous=synchronous)
    engine = checkout_engine(checkout)
    engine.every(
        5.0,
        "expire-reservations",
        lambda: expire_reservations(checkout.inventory_store, time.time()),
    )

    async def seed(stock: Mapping[str, int]) -> None:
        await migrate(checkout, initial_stock=stock)

    return Served(engine, checkout, CHECKOUT, seed, _starter(engine, CHECKOUT), str(base))


def deployed(
    base: Path,
    store_url: str,
    broker_url: str | None,
    *,
    api_only: bool,
    command_timeout: float | None = None,
) -> Served:
    """The orchestrated checkout on PostgreSQL (or ``sqlite:///dir``) and a broker.

    ``api_only``: this process runs no orchestrator, relay, timer or participant; it
    only reads the stores and starts sagas (instance and first command committed in
    one transaction, relayed and driven by the other processes). No broker is needed.
    """
    from sagakit_checkout import deploy
    from sagakit_checkout.inventory import expire_reservations
    from sagakit_checkout.sagas import CHECKOUT

    provider = base / "provider.db"
    shown = shown_url(store_url)
    if api_only:
        engine, dep = deploy.build_api(store_url, provider, command_timeout=command_timeout)
        where = f"{shown}, API only: run sagakit worker, relay and service processes"
    else:
        if broker_url is None:
            raise ConfigurationError(
                "--store without --api-only runs every role here and needs --broker too "
                "(or SAGAKIT_BROKER_URL)"
            )
        engine, dep = deploy.build_all(store_url, broker_url, provider)
        inventory = dep.stores["inventory"]
        engine.every(
            5.0, "expire-reservations", lambda: expire_reservations(inventory, time.time())
        )
        where = f"{shown} and {shown_url(broker_url)}, every role in this process"

    async def seed(stock: Mapping[str, int]) -> None:
        from sagakit_checkout.inventory import seed_stock

        await seed_stock(dep.stores["inventory"], stock)

    return Served(engine, dep, CHECKOUT, seed, _starter(engine, CHECKOUT), where)


def _starter(engine: Engine, definition: str) -> Callable[[Sequence[OrderSpec]], Awaitable[object]]:
    async def place(specs: Sequence[OrderSpec]) -> None:
        for i in range(0, len(specs), 100):
            await engine.start_many([(definition, s.order_id, s.data) for s in specs[i : i + 100]])

    return place


def _choreography(base: Path, synchronous: str) -> Served:
    from sagakit_checkout.choreography import CHOREOGRAPHY, open_choreography, place_orders
    from sagakit_checkout.inventory import expire_reservations, seed_stock

    ch = open_choreography(base, synchronous=synchronous)
    engine = ch.engine()
    inventory = ch.stores["inventory"]
    engine.every(5.0, "expire-reservations", lambda: expire_reservations(inventory, time.time()))

    async def seed(stock: Mapping[str, int]) -> None:
        await seed_stock(inventory, stock)

    async def place(specs: Sequence[OrderSpec]) -> None:
        for i in range(0, len(specs), 100):
            await place_orders(ch, [(s.order_id, s.data) for s in specs[i : i + 100]])

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
    return Served(engine, ledgers, CHOREOGRAPHY, seed, place, str(base), start_order)


def _hybrid(base: Path, synchronous: str) -> Served:
    from sagakit_checkout.hybrid import HYBRID, open_hybrid
    from sagakit_checkout.inventory import expire_reservations, seed_stock
    from sagakit_checkout.personal import migrate_personal

    h = open_hybrid(base, synchronous=synchronous)
    engine = h.engine()
    engine.before_start(lambda: migrate_personal(h.checkout.order_store, h.checkout.payment_store))
    inventory = h.checkout.inventory_store
    engine.every(5.0, "expire-reservations", lambda: expire_reservations(inventory, time.time()))

    async def seed(stock: Mapping[str, int]) -> None:
        await seed_stock(inventory, stock)

    return Served(engine, h.checkout, HYBRID, seed, _starter(engine, HYBRID), str(base))


def shown_url(url: str) -> str:
    """``url`` without its password, for banners and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return parts._replace(netloc=f"{user}@{netloc[-1]}").geturl()
