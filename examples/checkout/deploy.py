"""The checkout as separate processes on PostgreSQL and a broker.

Each service owns its schema (``checkout_order``, ``checkout_payment``, ...) in the
database of ``store_url`` (or its own database, if the URLs differ), and talks to the
others only through the broker. Any number of each process may run:

* ``sagakit worker``: the orchestrator (replies, local steps) and the timers;
* ``sagakit relay``: publishes the outboxes of the stores it is given;
* ``sagakit service NAME``: one participant (order, payment, inventory, shipping).

:func:`build_all` puts every role in one engine (``sagakit demo --store --broker``,
``sagakit serve --store --broker``); :func:`build_api` runs none of them, for
``sagakit serve --api-only`` next to the processes above.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sagakit import Engine, Participant
from sagakit.stores.base import SQLStore
from sagakit.urls import store_from_url, transport_from_url, with_params

from . import inventory, order, payment, shipping
from .provider import FakeCardProvider
from .sagas import checkout_definition

SERVICES = ("order", "payment", "inventory", "shipping")
STORES = ("orchestrator", *SERVICES)
ENDPOINTS = ("orchestrator", "orchestrator.local", *SERVICES)
MODULES: Mapping[str, Any] = {
    "order": order,
    "payment": payment,
    "inventory": inventory,
    "shipping": shipping,
}


def service_store(store_url: str, service: str) -> SQLStore:
    """The store of ``service``: its own schema on PostgreSQL, its own file on SQLite."""
    if service not in STORES:
        raise ValueError(f"unknown service {service!r}; choose from {list(STORES)}")
    parts = urlsplit(store_url)
    if parts.scheme == "sqlite":
        # A directory: one file per service, as in the embedded deployment.
        path = Path(parts.path) / f"{service}.db"
        store = store_from_url(f"sqlite://{path.resolve()}?{parts.query}", name=service)
    else:
        store = store_from_url(with_params(store_url, schema=f"checkout_{service}"), name=service)
    return store  # type: ignore[return-value]  # both adapters implement SQLStore


def participant(name: str, store: SQLStore, provider_path: Path | None) -> Participant:
    """The participant ``name`` on ``store`` (payment needs the card provider's file)."""
    if name == "payment":
        if provider_path is None:
            raise ValueError("the payment service needs --provider PATH (the card provider)")
        return payment.build_payment(store, FakeCardProvider(provider_path))
    builders = {
        "order": order.build_order,
        "inventory": inventory.build_inventory,
        "shipping": shipping.build_shipping,
    }
    try:
        return builders[name](store)
    except KeyError:
        raise ValueError(f"unknown service {name!r}; choose from {list(SERVICES)}") from None


def _migrations(engine: Engine, name: str, store: SQLStore) -> None:
    module = MODULES[name]

    async def migrate() -> None:
        await store.apply_migrations(module.NAMESPACE, module.MIGRATIONS)

    engine.before_start(migrate)


def build_worker(
    store_url: str, broker_url: str, *, command_timeout: float | None = None, **engine_kw: Any
) -> Engine:
    """Orchestrator and timers on the orchestrator's store (housekeeping runs in the relay).

    ``command_timeout``: seconds the first attempt of a command waits for its answer
    (later attempts wait longer; see :data:`~sagakit_checkout.sagas.RETRY`).
    """
    definition = (
        checkout_definition()
        if command_timeout is None
        else checkout_definition(timeout=command_timeout)
    )
    return Engine(
        service_store(store_url, "orchestrator"),
        [definition],
        transport=transport_from_url(broker_url, endpoints=ENDPOINTS),
        roles={"orchestrator", "timers"},
        **engine_kw,
    )


def build_relay(
    store_url: str, broker_url: str, services: Sequence[str] = STORES, **engine_kw: Any
) -> Engine:
    """Relays for the outboxes of ``services`` (all five stores by default), and the
    housekeeping of those stores: inbox and outbox retention, and the broker's own dead
    letters moved into them. The relay is the one process that holds every store."""
    stores = [service_store(store_url, s) for s in services]
    return Engine(
        stores[0],
        [],
        extra_stores=stores[1:],
        transport=transport_from_url(broker_url, endpoints=ENDPOINTS),
        roles={"relays", "housekeeping"},
        **engine_kw,
    )


def build_service(
    name: str, store_url: str, broker_url: str, provider_path: Path | None = None, **engine_kw: Any
) -> Engine:
    """One participant service; its business tables are migrated before it consumes."""
    store = service_store(store_url, name)
    engine = Engine(
        store,
        [],
        participants=[participant(name, store, provider_path)],
        transport=transport_from_url(broker_url, endpoints=ENDPOINTS),
        roles={"participants"},
        **engine_kw,
    )
    _migrations(engine, name, store)
    if name == "inventory":
        engine.every(
            5.0, "expire-reservations", lambda: inventory.expire_reservations(store, time.time())
        )
    return engine


@dataclass
class Deployment:
    """Every store of the checkout on one base URL, for drivers and invariant checks."""

    stores: dict[str, SQLStore]
    provider: FakeCardProvider

    @property
    def payment_store(self) -> SQLStore:
        """The payment service's store (the API's ledger routes read it)."""
        return self.stores["payment"]

    @property
    def inventory_store(self) -> SQLStore:
        """The inventory service's store."""
        return self.stores["inventory"]

    @property
    def shipping_store(self) -> SQLStore:
        """The shipping service's store."""
        return self.stores["shipping"]

    def invariant_stores(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~sagakit_checkout.invariants.check_invariants`."""
        return {
            "orchestrator_store": self.stores["orchestrator"],
            "order_store": self.stores["order"],
            "payment_store": self.stores["payment"],
            "inventory_store": self.stores["inventory"],
            "shipping_store": self.stores["shipping"],
            "provider": self.provider,
        }


def deployment(store_url: str, provider_path: Path) -> Deployment:
    """Every store (not opened) and the provider, e.g. to check invariants afterwards."""
    return Deployment(
        {s: service_store(store_url, s) for s in STORES}, FakeCardProvider(provider_path)
    )


def build_all(
    store_url: str, broker_url: str, provider_path: Path, **engine_kw: Any
) -> tuple[Engine, Deployment]:
    """Every role in one engine: the checkout on PostgreSQL and a broker, one process."""
    dep = deployment(store_url, provider_path)
    parts = [
        order.build_order(dep.stores["order"]),
        payment.build_payment(dep.stores["payment"], dep.provider),
        inventory.build_inventory(dep.stores["inventory"]),
        shipping.build_shipping(dep.stores["shipping"]),
    ]
    engine = Engine(
        dep.stores["orchestrator"],
        [checkout_definition()],
        participants=parts,
        transport=transport_from_url(broker_url, endpoints=ENDPOINTS),
        **engine_kw,
    )
    for s in SERVICES:
        _migrations(engine, s, dep.stores[s])
    return engine, dep


def build_api(
    store_url: str, provider_path: Path, *, command_timeout: float | None = None, **engine_kw: Any
) -> tuple[Engine, Deployment]:
    """An engine that runs no loop at all, for the HTTP API next to the processes.

    It knows the checkout's definition, so that starting a saga commits the instance
    and its first command in the orchestrator store's outbox, in one transaction: the
    relay processes publish the command, the workers drive the rest. It also holds
    the services' stores, for the ledger routes; their tables are migrated at start
    (idempotent, under each store's migration lock) so the API works before the
    services first ran. ``command_timeout`` should match the workers' (the first
    command's timer is set here).
    """
    definition = (
        checkout_definition()
        if command_timeout is None
        else checkout_definition(timeout=command_timeout)
    )
    dep = deployment(store_url, provider_path)
    engine = Engine(
        dep.stores["orchestrator"],
        [definition],
        extra_stores=[dep.stores[s] for s in SERVICES],
        # No consumer, relay, timer or sweeper: the deployment's processes run them.
        # Without a transport the engine has only the embedded one, which stays idle.
        roles=frozenset(),
        **engine_kw,
    )
    for s in SERVICES:
        _migrations(engine, s, dep.stores[s])
    return engine, dep
