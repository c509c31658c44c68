"""The demo's three ways to run the same checkout, behind one shape.

* ``orchestration``: :mod:`.sagas`' saga drives the four services by command;
* ``choreography``: the services react to each other's facts (:mod:`.choreography`);
  the tracker's views are the sagas the demo counts and checks;
* ``hybrid``: orchestrated across services, choreographed inside shipping
  (:mod:`.hybrid`).

Each mode gives the demo an engine, a way to place orders, the stores the invariants
read and every endpoint's store, so the same checks and the same report cover all
three. :func:`measure` counts the messages a run wrote and handled, and the latency
of its sagas (first fact or start, to the terminal fact or transition).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagakit import App, Deployment, Engine, SagaInstance
from sagakit.testing.faults import Faults

from .event_audit import message_counts
from .invariants import InvariantReport
from .inventory import expire_reservations
from .personal import migrate_personal
from .sagas import CHECKOUT

if TYPE_CHECKING:
    from .demo import OrderSpec

MODES = ("orchestration", "choreography", "hybrid")


@dataclass(slots=True)
class DemoSystem:
    """One mode of the checkout, ready to run."""

    mode: str
    engine: Engine
    invariant_stores: dict[str, Any]
    """Keyword arguments of ``check_invariants`` (the saga store: sagas or views)."""
    endpoints: dict[str, Any]
    """Every endpoint's store (for the event audit and message counts)."""
    place: Callable[[Sequence[OrderSpec]], Awaitable[int]]
    """Place orders; returns how many were new."""
    audit: Callable[[InvariantReport], Awaitable[None]] | None = None
    """Checks of this mode's own ledgers, added to the invariant report."""


def build_system(
    mode: str,
    base: Path,
    faults: Faults,
    *,
    synchronous: str = "FULL",
    store_url: str | None = None,
    broker_url: str | None = None,
    app: App | None = None,
    options: Mapping[str, Any] | None = None,
) -> DemoSystem:
    """The checkout in ``mode`` on the files of ``base`` (or PostgreSQL and a broker).

    Orchestrated, it is the checkout app (``app``, by default :data:`~.app.app`) on a
    deployment like any app's: SQLite files in ``base``, or ``store_url`` and
    ``broker_url``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if store_url is not None and broker_url is not None:
        if mode != "orchestration":
            raise ValueError("--store/--broker run the orchestrated checkout only (--mode)")
        return _deployed(app, base, faults, store_url, broker_url, options)
    if mode != "orchestration":
        try:
            import pydantic  # noqa: F401 - the choreography validates every message
        except ModuleNotFoundError:
            raise ValueError(
                f"--mode {mode} needs pydantic: pip install 'sagakit[schemas]'"
            ) from None
        build = _choreography if mode == "choreography" else _hybrid
        system = build(base, faults, synchronous)
        inventory = system.invariant_stores["inventory_store"]
        # Reservations whose saga died are returned to stock (a sweeper, as in production;
        # the app's inventory service runs it as a job in the orchestrated mode).
        system.engine.every(
            5.0, "expire-reservations", lambda: expire_reservations(inventory, time.time())
        )
        return system
    url = f"sqlite:///{base.resolve()}?synchronous={synchronous}"
    return _deployed(app, base, faults, url, None, options)


def _starter(engine: Engine, definition: str) -> Callable[[Sequence[OrderSpec]], Awaitable[int]]:
    async def place(chunk: Sequence[OrderSpec]) -> int:
        results = await engine.orchestrator.start_many(
            [(definition, s.order_id, s.data) for s in chunk]
        )
        return sum(1 for _, created in results if created)

    return place


def _with_orchestrator(engine: Engine, endpoints: dict[str, Any]) -> dict[str, Any]:
    o = engine.orchestrator
    return {o.endpoint: engine.store, o.local_endpoint: engine.store, **endpoints}


def _deployed(
    app: App | None,
    base: Path,
    faults: Faults,
    store_url: str,
    broker_url: str | None,
    options: Mapping[str, Any] | None,
) -> DemoSystem:
    from .app import app as checkout_app
    from .app import provider_of

    # On stores of the caller's (--store), the provider keeps its records with them (its
    # own PostgreSQL schema, or the SQLite store's directory), not in the demo's data
    # directory, which is temporary unless --data-dir: a rerun must find them.
    data_dir = base if broker_url is None else None
    dep = Deployment(app or checkout_app, store_url, broker_url, options=options, data_dir=data_dir)
    engine = dep.everything(faults=faults)
    stores: dict[str, Any] = {f"{name}_store": s for name, s in dep.stores().items()}
    stores["provider"] = provider_of(dep.ctx)
    endpoints = {p.name: p.store for p in engine.participants}
    return DemoSystem(
        "orchestration",
        engine,
        stores,
        _with_orchestrator(engine, endpoints),
        _starter(engine, CHECKOUT),
    )


def _choreography(base: Path, faults: Faults, synchronous: str) -> DemoSystem:
    from .choreography import open_choreography, place_orders

    ch = open_choreography(base, synchronous=synchronous)
    engine = ch.engine(faults=faults)

    async def place(chunk: Sequence[OrderSpec]) -> int:
        return await place_orders(ch, [(s.order_id, s.data) for s in chunk])

    endpoints = {p.name: p.store for p in ch.participants}
    return DemoSystem("choreography", engine, ch.invariant_stores(), endpoints, place)


def _hybrid(base: Path, faults: Faults, synchronous: str) -> DemoSystem:
    from .hybrid import HYBRID, open_hybrid
    from .shipping_domain import check_bookings

    h = open_hybrid(base, synchronous=synchronous)
    engine = h.engine(faults=faults)
    engine.before_start(lambda: migrate_personal(h.checkout.order_store, h.checkout.payment_store))
    endpoints = {p.name: p.store for p in h.participants}

    async def audit(report: InvariantReport) -> None:
        await check_bookings(report, h.checkout.shipping_store, h.carrier_store)

    return DemoSystem(
        "hybrid",
        engine,
        h.checkout.invariant_stores(),
        _with_orchestrator(engine, endpoints),
        _starter(engine, HYBRID),
        audit,
    )


async def measure(system: DemoSystem, orders: int) -> dict[str, Any]:
    """Messages written and handled, and saga latency (ms) over the terminal sagas."""
    counts = await message_counts(system.engine.stores, system.endpoints)
    sagas: list[SagaInstance] = []
    store = system.engine.store
    while True:
        page = await store.list_sagas(limit=500, offset=len(sagas))
        sagas.extend(page)
        if len(page) < 500:
            break
    durations = sorted(1000.0 * (_finished(s) - s.created_at) for s in sagas if s.terminal)
    written = sum(counts["written"].values())
    handled = sum(counts["handled"].values())
    return {
        "messages_written": counts["written"],
        "messages_handled": counts["handled"],
        "written_per_order": round(written / orders, 2),
        "handled_per_order": round(handled / orders, 2),
        "latency_ms": {
            "p50": round(statistics.median(durations), 1) if durations else None,
            "p95": round(durations[int(0.95 * (len(durations) - 1))], 1) if durations else None,
            "max": round(durations[-1], 1) if durations else None,
        },
    }


def _finished(s: SagaInstance) -> float:
    # A tracker's view records when the terminal fact happened (its updated_at is when
    # the tracker last saw progress); an orchestrated saga ends at its last transition.
    finished = s.data.get("finished_at") if isinstance(s.data, dict) else None
    return float(finished) if isinstance(finished, int | float) else s.updated_at
