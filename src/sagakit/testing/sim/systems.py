"""The checkout's three modes, as simulator worlds build them.

* ``orchestration``: the orchestrator runs ``sagakit_checkout``'s checkout saga over the
  four services;
* ``choreography``: the four services react to each other's facts
  (``sagakit_checkout.choreography``), and the passive tracker builds the saga views;
* ``hybrid``: orchestrated across services, choreographed inside shipping
  (``sagakit_checkout.hybrid``: shipping, labels and carrier react to each other, and
  shipping answers the orchestrator's command when the domain's flow ends).

:func:`open_system` builds a mode on the files of a directory (stores not opened);
:func:`migrate_system` creates its tables. ``sagakit_checkout`` is imported here, lazily:
the engine does not depend on its examples.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagakit.core.definition import SagaDefinition
from sagakit.runtime.participant import Participant
from sagakit.runtime.tracker import Tracker
from sagakit.stores.base import Store

MODES = ("orchestration", "choreography", "hybrid")
"""The ways the simulator can run the checkout (``sagakit simulate --mode``)."""

RUNS_TABLE = """
CREATE TABLE sim_handler_runs (
    id          INTEGER PRIMARY KEY,
    key         TEXT NOT NULL,
    compensates TEXT,
    type        TEXT NOT NULL
);
"""
"""Where the simulator records, in each handler's own transaction, every keyed command
that a participant's handler carried out (see :mod:`sagakit.testing.sim.checkout`)."""


@dataclass
class System:
    """One mode of the checkout: its stores, provider and participants."""

    mode: str
    data_dir: Path
    stores: dict[str, Store]
    """Every store by name, the saga store (orchestrator's, or tracker's) first."""
    provider: Any
    """The fake card provider (``sagakit_checkout.provider.FakeCardProvider``)."""
    participants: list[Participant]
    """Every participant (the tracker included), in the order they subscribe."""
    invariant_stores: dict[str, Any]
    """Keyword arguments of ``sagakit_checkout.invariants.check_invariants``."""
    definition: SagaDefinition | None = None
    """The orchestrated saga (None: a choreography, no orchestrator)."""
    business_key: str = ""
    """The definition name the saga store keeps the orders' sagas (or views) under."""
    tracker: Tracker | None = None
    audit: Callable[[Any], Awaitable[None]] | None = None
    """Checks of this mode's own ledgers, added to the invariant report."""
    ledgers: list[tuple[Store, str]] = field(default_factory=list)
    """Business tables a run's fingerprint covers."""
    app: Any = None
    """The mode's own object: ``Checkout``, ``Choreography`` or ``Hybrid``."""

    @property
    def saga_store(self) -> Store:
        """The store of the sagas (orchestration, hybrid) or the tracker's views."""
        return next(iter(self.stores.values()))

    @property
    def service_stores(self) -> list[Store]:
        """The participants' stores, the tracker's excepted (they get the runs table)."""
        skip = {id(self.saga_store)}
        return [s for s in self.stores.values() if id(s) not in skip]


def open_system(mode: str, data_dir: Path) -> System:
    """``mode`` of the checkout on SQLite files in ``data_dir`` (``synchronous=NORMAL``: a
    simulation needs no durability); the stores are not opened."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "choreography":
        return _choreography(data_dir)
    from sagakit_checkout.sagas import CHECKOUT, checkout_definition
    from sagakit_checkout.services import open_checkout

    if mode == "orchestration":
        c = open_checkout(data_dir, synchronous="NORMAL")
        participants, definition, name = c.participants, checkout_definition(), CHECKOUT
        app: Any = c
        extra: dict[str, Store] = {}
        audit = None
    else:
        from sagakit_checkout.hybrid import HYBRID, hybrid_definition, open_hybrid
        from sagakit_checkout.shipping_domain import check_bookings

        h = open_hybrid(data_dir, synchronous="NORMAL")
        app = h
        c, participants, definition, name = h.checkout, h.participants, hybrid_definition(), HYBRID
        extra = {"labels": h.labels_store, "carrier": h.carrier_store}

        async def audit(report: Any) -> None:
            await check_bookings(report, h.checkout.shipping_store, h.carrier_store)

    stores: dict[str, Store] = {
        "orchestrator": c.orchestrator_store,
        **c.service_stores,
        **extra,
    }
    ledgers = _ledgers(c.payment_store, c.inventory_store, c.shipping_store, c.order_store)
    if mode == "hybrid":
        ledgers += [
            (c.shipping_store, "shipping_requests"),
            (extra["labels"], "labels"),
            (extra["carrier"], "carrier_bookings"),
        ]
    return System(
        mode,
        data_dir,
        stores,
        c.provider,
        list(participants),
        c.invariant_stores(),
        definition=definition,
        business_key=name,
        audit=audit,
        ledgers=ledgers,
        app=app,
    )


def _choreography(data_dir: Path) -> System:
    from sagakit_checkout.choreography import CHOREOGRAPHY, TRACKER, open_choreography

    ch = open_choreography(data_dir, synchronous="NORMAL")
    stores: dict[str, Store] = {TRACKER: ch.stores[TRACKER]}
    stores |= {name: s for name, s in ch.stores.items() if name != TRACKER}
    ledgers = _ledgers(
        ch.stores["payment"], ch.stores["inventory"], ch.stores["shipping"], ch.stores["order"]
    )
    ledgers += [(s, "choreography_log") for name, s in ch.stores.items() if name != TRACKER]
    return System(
        "choreography",
        data_dir,
        stores,
        ch.provider,
        list(ch.participants),
        ch.invariant_stores(),
        business_key=CHOREOGRAPHY,
        tracker=ch.tracker,
        ledgers=ledgers,
        app=ch,
    )


def _ledgers(
    payment: Store, inventory: Store, shipping: Store, order: Store
) -> list[tuple[Store, str]]:
    return [
        (payment, "payment_ledger"),
        (inventory, "reservations"),
        (inventory, "stock"),
        (shipping, "shipments"),
        (order, "orders"),
        (order, "order_status_history"),
    ]


async def migrate_system(system: System, stock: dict[str, int]) -> None:
    """Create ``system``'s tables (the stores are open), seed ``stock`` and the runs table."""
    from sagakit_checkout.inventory import seed_stock

    if system.mode == "orchestration":
        from sagakit_checkout.services import migrate

        await migrate(system.app)
    elif system.mode == "hybrid":
        from sagakit_checkout.hybrid import migrate_hybrid

        await migrate_hybrid(system.app)
    else:
        from sagakit_checkout.choreography import migrate as migrate_choreography

        await migrate_choreography(system.app)
    await seed_stock(system.stores["inventory"], stock)
    for service in system.service_stores:
        sqlite: Any = service  # every mode's stores are SQLite files here
        await sqlite.apply_migrations("sagakit.sim", [RUNS_TABLE])
    await system.provider.effects()  # creates the provider's tables
