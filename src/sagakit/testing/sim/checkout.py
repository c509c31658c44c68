"""The reference checkout as a simulator world, in any of its three modes.

Worlds take turns on one set of open SQLite stores (in ``/dev/shm`` when it exists,
``synchronous=NORMAL``: a simulation needs no durability), first copied from a
template migrated once per process and mode and emptied between runs. Each world has
the participants of its mode (:mod:`sagakit.testing.sim.systems`) and the fake card
provider from ``sagakit_checkout`` on its virtual clock; an orchestrated or hybrid
world two orchestrator workers on its saga store (each delivery to the orchestrator
and each timer firing is handled by one of them, chosen by the seed), a simulated
operator who decides on the sagas in the manual queue through
:meth:`Orchestrator.resolve`, its definition and seeded saga ids; a choreographed one
the tracker (its views are the sagas, its SLA check the one timer); and a few
orders: scenarios drawn from ``sagakit_checkout.demo.make_orders`` plus two orders
racing for the last unit of a SKU. After the run the design's invariants
(docs/design.md) are checked from the services' ledgers with
``sagakit_checkout.invariants.check_invariants``, except "nothing lost", which is
computed by :func:`sagakit.testing.sim.nothing_lost` so that the network's deliberate
drops count as accounted for, and every copy of an event its relay fanned out is
accounted for on its own. Every saga's history is read once more, to check that its
compensations ran in reverse order of the steps they undo
(:func:`~sagakit.testing.sim.checks.compensation_order`) and to count what the run
exercised (:func:`sagakit.testing.coverage.exercised`).

``sagakit_checkout`` is imported lazily, when a world is built: the engine does not
depend on its examples.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import itertools
import os
import random
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Any

from sagakit.core.instance import HistoryEntry, SagaInstance
from sagakit.errors import SagaNotFound
from sagakit.runtime.orchestrator import Orchestrator
from sagakit.runtime.relay import Relay
from sagakit.stores.base import Store
from sagakit.testing.coverage import exercised
from sagakit.testing.sim.checks import (
    answers,
    compensation_order,
    no_dead_letters,
    nothing_lost,
    stale_inputs,
)
from sagakit.testing.sim.handler_runs import handler_runs, record_runs
from sagakit.testing.sim.network import SimFaultHook, SimNetwork, VirtualClock
from sagakit.testing.sim.operator import AnyWorker, OrchestratorControls
from sagakit.testing.sim.slots import SlotPool
from sagakit.testing.sim.systems import MODES, System, migrate_system, open_system
from sagakit.testing.sim.timers import Job, JobTimers, OrchestratorTimers, Timers, tracker_sla
from sagakit.testing.sim.world import Verdict
from sagakit.transports.base import BatchHandler

_RANDOM_IDS = re.compile(r"auth-[0-9a-f]{16}")
WORKERS = 2
"""Orchestrator workers per orchestrated world."""
REPLIES_TO = "orchestrator"
"""The endpoint the orchestrator workers take replies at (the default)."""
VOUCHING = frozenset({"mark_done", "mark_compensated", "accept_partial"})
"""A person's decisions that vouch for the books (done or undone by hand, or accepted
as they stand): the simulated person does nothing by hand, so the ledger checks leave
such an order to them (as they leave an order in the manual queue)."""
_templates: dict[str, Path] = {}


def _scratch_base() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def use_template(path: Path, mode: str = "orchestration") -> None:
    """Use ``path`` (made by :func:`template_dir` in a parent process) as ``mode``'s template."""
    _templates[mode] = path


def _have_template(mode: str) -> Path | None:
    path = _templates.get(mode)
    return path if path is not None and path.is_dir() else None


async def template_dir(mode: str = "orchestration") -> Path:
    """A directory of migrated, stocked, closed SQLite files of ``mode`` (built once per
    process and mode)."""
    if (ready := _have_template(mode)) is not None:
        return ready
    from sagakit_checkout.demo import REGULAR_SKUS, REGULAR_STOCK

    base = Path(tempfile.mkdtemp(prefix=f"sagakit-sim-{mode}-", dir=_scratch_base()))
    atexit.register(shutil.rmtree, base, True)
    system = open_system(mode, base)
    for s in system.stores.values():
        await s.open()
    stock = dict.fromkeys(REGULAR_SKUS, REGULAR_STOCK) | {"sku-sold-out": 0}
    await migrate_system(system, stock)
    system.provider.close()
    for s in system.stores.values():
        await s.close()
    _templates[mode] = base
    return base


def sim_orders(seed: int, orders: int) -> tuple[list[Any], dict[str, int]]:
    """The orders of one seed: ``orders - 2`` drawn scenarios plus a race for stock 1.

    The drawn orders take every scenario of the demo but its race (every seed has one)
    equally often: the rare, risky ones (failures after the pivot, a provider that
    answers nothing, a refused void) as often as a plain success. The first one's
    scenario goes round them with the seed, so that any run of as many consecutive
    seeds as there are scenarios meets each one (a few hundred seeds: each many times);
    the others are drawn. (The race's winner is a plain success.)
    """
    from sagakit_checkout.demo import SCENARIOS, OrderSpec, make_orders

    if orders < 2:
        raise ValueError("a simulated run needs at least 2 orders (two race for the last item)")
    specs: list[OrderSpec] = []
    stock: dict[str, int] = {}
    if orders > 2:
        mix = [name for name, _ in SCENARIOS if name != "last_item_race"]
        specs, stock = make_orders(1, seed, scenarios=[(mix[seed % len(mix)], 1)])
        if orders > 3:
            more, more_stock = make_orders(orders - 2, seed, scenarios=[(n, 1) for n in mix])
            specs += more[1:]  # order ids count up from 0 in each draw: skip the first
            stock |= more_stock
    rng = random.Random(f"race:{seed}")
    stock["sku-race"] = 1
    for j in range(2):
        specs.append(
            OrderSpec(
                order_id=f"order-{seed}-race-{j}",
                scenario="last_item_race",
                data={
                    "customer": f"cust-{rng.randrange(10**6):06d}",
                    "sku": "sku-race",
                    "qty": 1,
                    "amount": rng.randrange(500, 50_000),
                    "currency": "EUR",
                    "card": f"card-ok-{rng.randrange(10**6)}",
                    "ship_to": f"addr-ok-{rng.randrange(10**6)}",
                },
            )
        )
    return specs, stock


class _Slot:
    """An open checkout of one mode (stores, provider, participants) that worlds take
    turns on."""

    def __init__(self, system: System, loop: asyncio.AbstractEventLoop, template: Path) -> None:
        self.system = system
        self.loop = loop
        self.template = template
        self.clean = True

    @property
    def stores(self) -> list[Store]:
        return list(self.system.stores.values())

    async def reset(self) -> None:
        """Empty every table but the migrations, row ids included (the next world seeds
        the stock again): the same state as a fresh copy of the template."""
        for store in self.stores:
            async with store.transaction() as tx:
                names = await tx.fetchall(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT IN "
                    "('schema_migrations', 'sqlite_stat1') ORDER BY name"
                )
                for (name,) in names:
                    await tx.execute(f'DELETE FROM "{name}"')
        provider = self.system.provider
        provider.close()  # reopens (on the template's copy) at first use
        _copy_db(self.template / "provider.db", Path(provider.path))
        self.clean = True

    async def close(self) -> None:
        self.system.provider.close()
        for s in self.stores:
            with contextlib.suppress(Exception):
                await s.close()
        shutil.rmtree(self.system.data_dir, ignore_errors=True)


def _copy_db(src: Path, dst: Path) -> None:
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{dst}{suffix}")
    shutil.copyfile(src, dst)


class CheckoutWorld(ABC):
    """One simulated checkout: the stores, the provider and the participants of a mode.

    Subclasses add what drives the sagas (:class:`OrchestratedWorld`: the orchestrator;
    :class:`ChoreographedWorld`: the orders placed and the tracker's SLA check).
    """

    timers: Timers

    def __init__(self, seed: int, orders: int, slot: _Slot, pool: CheckoutWorlds) -> None:
        self.seed = seed
        self.slot = slot
        self.pool = pool
        self.system = slot.system
        self.clock = VirtualClock()
        self.hook = SimFaultHook()
        self.network = SimNetwork(self.clock)
        self.specs, self.stock = sim_orders(seed, orders)
        self.system.provider.clock = self.clock
        self.routes: dict[str, Store] = {}
        # As the embedded engine derives them: each event type to its subscribers.
        self.event_routes: dict[str, list[str]] = {}
        for p in self.system.participants:
            for event_type in sorted(p.subscriptions):
                self.event_routes.setdefault(event_type, []).append(p.name)
        self.stores: list[Store] = slot.stores
        self.relays: dict[str, Relay] = {
            s.name: Relay(
                s, self.network, clock=self.clock, lease=0.0, event_routes=self.event_routes
            )
            for s in self.stores
        }
        self.checked = False

    def _subscribe(self, endpoint: str, store: Store, consumer: BatchHandler) -> None:
        self.routes[endpoint] = store
        self.network.subscribe(endpoint, consumer)

    def _subscribe_participants(self) -> None:
        for p in self.system.participants:
            p.clock = self.clock
            p.faults = self.hook
            self._subscribe(p.name, p.store, p)

    async def open(self) -> None:
        """Seed this run's stock (the stores are open and empty)."""
        from sagakit_checkout.demo import REGULAR_SKUS, REGULAR_STOCK
        from sagakit_checkout.inventory import seed_stock

        self.slot.clean = False
        stock = dict.fromkeys(REGULAR_SKUS, REGULAR_STOCK) | {"sku-sold-out": 0} | self.stock
        self.stock = stock
        await seed_stock(self.system.stores["inventory"], stock)

    @abstractmethod
    async def begin(self) -> int:
        """Start the sagas of this run; return how many."""

    async def all_terminal(self) -> bool:
        """True when every saga is terminal."""
        counts = await self.system.saga_store.count_sagas()
        return all(state.terminal for state in counts)

    @abstractmethod
    async def running(self) -> list[str]:
        """The ids of the sagas a customer may cancel now, sorted."""

    @abstractmethod
    async def cancel(self, saga_id: str, reason: str) -> str:
        """Cancel a saga; return the store it wrote to."""

    async def check(self) -> Verdict:
        """The design's invariants from the ledgers; "nothing lost" knows the simulated drops."""
        from sagakit_checkout.invariants import check_invariants

        # "nothing lost" is computed below, knowing the drops: hide the outboxes from
        # check_invariants' own version rather than check every message twice.
        stores = {
            k: _NoOutbox(v) if k.endswith("_store") else v
            for k, v in self.system.invariant_stores.items()
        }
        histories = await self._histories()
        # The simulated operator does nothing by hand: what they vouched for is theirs.
        by_hand = {
            saga.business_key
            for saga, entries in histories
            if any(
                e.event == "manual.resolved" and e.detail.get("action") in VOUCHING for e in entries
            )
        }
        report = await check_invariants(**stores, initial_stock=self.stock, settled_by_hand=by_hand)
        if self.system.audit is not None:
            await self.system.audit(report)
        await self._more_checks(report)
        lost = await nothing_lost(self.routes, self.network, self.event_routes)
        violations = [v for v in report.violations if not v.startswith("nothing_lost:")]
        invariants = dict(report.invariants)
        invariants["nothing_lost"] = not lost
        # The ledgers show effects the business code let through; the handler runs show
        # what the runtime let through (the checkout's handlers would hide a runtime
        # that forgot its idempotency records: they look at their ledgers first).
        services = {id(s) for s in self.system.service_stores}
        for p in self.system.participants:
            runs = await handler_runs(p) if id(p.store) in services else []
            if runs:
                invariants["effect_once"] = False
                violations += runs
        parked = await no_dead_letters(self.routes)
        invariants["dead_letters"] = not parked
        violations += parked
        counts = await self.system.saga_store.count_sagas()
        seen: Counter[str] = Counter()
        definition = self.system.definition
        if definition is not None:
            names = [s.name for s in definition.steps]
            order: list[str] = []
            stale: list[str] = []
            replies = await answers(self.stores, REPLIES_TO)
            for _, entries in histories:
                order += compensation_order(entries, names)
                stale += stale_inputs(entries, replies)
            invariants["compensation_order"] = not order
            invariants["stale_inputs"] = not stale
            violations += order + stale
        for _, entries in histories:
            seen.update(exercised(entries, definition))
        self.checked = True
        return Verdict(
            invariants,
            [_normal(v) for v in violations + lost],
            outcomes={state.value: n for state, n in counts.items()},
            notes=[_normal(n) for n in report.notes],
            exercised=seen,
        )

    async def watch(self) -> list[str]:
        """Nothing: the checkout's invariants are checked at the end of a run."""
        return []

    async def _histories(self) -> list[tuple[SagaInstance, list[HistoryEntry]]]:
        """Every saga (the tracker's views in a choreography) with its history, by id."""
        store = self.system.saga_store
        sagas = sorted(await store.list_sagas(limit=10_000), key=lambda s: s.saga_id)
        return [(s, await store.history(s.saga_id)) for s in sagas]

    async def manual(self) -> list[str]:
        """The sagas a person may decide on (none by default: no one owns them)."""
        return []

    async def manual_options(self, saga_id: str) -> list[tuple[str, int | None]]:
        """None by default (see :meth:`manual`)."""
        return []

    async def resolve(self, saga_id: str, action: str, rung: int | None, reason: str) -> str:
        """Never by default (see :meth:`manual`)."""
        raise SagaNotFound(f"no one decides on saga {saga_id} in this world")

    async def _more_checks(self, report: Any) -> None:  # noqa: B027 - optional hook
        """The checks only this mode needs (none by default)."""

    async def fingerprint(self) -> str:
        """A digest of sagas, histories and every service's ledger (random ids masked)."""
        h = hashlib.sha256()
        store = self.system.saga_store
        for s in sorted(await store.list_sagas(limit=10_000), key=lambda s: s.saga_id):
            h.update(_normal(repr((s.saga_id, s.state, s.status, s.version, s.reason))).encode())
            for e in await store.history(s.saga_id):
                h.update(repr((e.version, e.at, e.event, e.step, e.status)).encode())
        for st, table in self.system.ledgers:
            async with st.transaction() as tx:
                rows = await tx.fetchall(f"SELECT * FROM {table}")
            h.update(_normal(repr(sorted(map(repr, rows)))).encode())
        for e in await self.system.provider.effects():
            h.update(repr((e.key, e.order_id, e.op, e.amount, e.at)).encode())
        h.update(repr((sorted(self.network.dropped), self.network.delivered)).encode())
        return h.hexdigest()[:16]

    async def close(self) -> None:
        """Hand the stores to the next world; close them if this run broke off."""
        await self.pool.release(self.slot, reusable=self.checked)


class OrchestratedWorld(OrchestratorControls, CheckoutWorld):
    """The orchestrated checkout, or the hybrid: the orchestrator starts and drives the
    sagas, its timers are what ticks fire, and a customer may cancel."""

    def __init__(self, seed: int, orders: int, slot: _Slot, pool: CheckoutWorlds) -> None:
        super().__init__(seed, orders, slot, pool)
        definition = self.system.definition
        assert definition is not None, "an orchestrated mode has a saga definition"
        counter = itertools.count(1)
        # Two workers on one saga store, as two `sagakit worker` processes would run:
        # whatever one of them keeps in memory, the other does not know.
        self.workers = [
            Orchestrator(
                self.system.saga_store,
                [definition],
                clock=self.clock,
                faults=self.hook,
                id_factory=lambda: f"s{seed}-{next(counter)}",
            )
            for _ in range(WORKERS)
        ]
        self.orchestrator = o = self.workers[0]
        self.pick = random.Random(f"workers:{seed}")
        self._subscribe(o.endpoint, o.store, AnyWorker(self.workers, self.pick, lambda w: w))
        self._subscribe(
            o.local_endpoint, o.store, AnyWorker(self.workers, self.pick, lambda w: w.local)
        )
        self._subscribe_participants()
        self.timers = OrchestratorTimers(self.workers, self.pick)

    async def begin(self) -> int:
        """Place every order (one saga each), one after the other."""
        for spec in self.specs:
            await self.orchestrator.start(self.system.business_key, spec.order_id, spec.data)
        return len(self.specs)


class ChoreographedWorld(CheckoutWorld):
    """The choreographed checkout: orders placed with the order service, the services
    reacting to each other's facts, the tracker's views as the sagas; the tracker's SLA
    check and the order service's announcing again of unanswered orders are the timers.
    There is no cancelling: no one owns a choreographed saga."""

    def __init__(self, seed: int, orders: int, slot: _Slot, pool: CheckoutWorlds) -> None:
        from sagakit_checkout.choreography import announce_again, next_announcement

        super().__init__(seed, orders, slot, pool)
        tracker = self.system.tracker
        assert tracker is not None, "a choreography has a tracker"
        self.tracker = tracker
        self._subscribe_participants()
        app = self.system.app
        announce = Job(
            "order-announce",
            self.system.stores["order"].name,
            lambda: next_announcement(app),
            lambda: announce_again(app, self.clock()),
        )
        self.timers = JobTimers("jobs", [tracker_sla(tracker), announce], self.hook, self.clock)

    async def begin(self) -> int:
        """Place every order in one order-service transaction (each emits OrderCreated)."""
        from sagakit_checkout.choreography import place_orders

        orders = [(spec.order_id, spec.data) for spec in self.specs]
        await place_orders(self.system.app, orders, now=self.clock())
        return len(self.specs)

    async def all_terminal(self) -> bool:
        """True when the tracker has a view of every order and each one is terminal."""
        counts = await self.system.saga_store.count_sagas()
        return sum(counts.values()) == len(self.specs) and all(s.terminal for s in counts)

    async def running(self) -> list[str]:
        """None: a choreographed saga has no owner to cancel it."""
        return []

    async def cancel(self, saga_id: str, reason: str) -> str:
        """Never: see :meth:`running`."""
        raise SagaNotFound(f"a choreographed saga cannot be cancelled ({saga_id})")

    async def _more_checks(self, report: Any) -> None:
        """Every order has a view (the tracker heard of it), and no service applied one
        fact of an order twice (under two message ids: the inbox would not see it)."""
        views = {s.business_key for s in await self.system.saga_store.list_sagas(limit=10_000)}
        for spec in self.specs:
            if spec.order_id not in views:
                report.fail("terminal", f"order {spec.order_id}: the tracker has no view of it")
        for name, store in self.system.stores.items():
            if store is self.system.saga_store:
                continue
            async with store.transaction() as tx:
                twice = await tx.fetchall(
                    "SELECT order_id, event, COUNT(*) FROM choreography_log "
                    "WHERE verdict = 'applied' GROUP BY order_id, event HAVING COUNT(*) > 1 "
                    "ORDER BY order_id, event"
                )
            for oid, event, n in twice:
                report.fail("effect_once", f"order {oid}: {name} applied {event} {n} times")


class _NoOutbox:
    """A store as check_invariants sees it, minus the outbox (checked separately)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def outbox_all(self) -> list[Any]:
        return []


def _normal(text: str) -> str:
    # The fake provider names authorizations with uuid4: mask them so a replay's
    # violations read the same.
    return _RANDOM_IDS.sub("auth-*", text)


class CheckoutWorlds(SlotPool[_Slot, "CheckoutWorld"]):
    """The :data:`~sagakit.testing.sim.WorldFactory` of the checkout in one ``mode``.

    Worlds take turns on one set of open stores: when a run ends, its tables are emptied
    (row ids restart, as in a fresh copy) instead of copying and opening the databases
    again. The first set is copied from a template that was migrated once per process.
    Call :meth:`aclose` when done (a set that outlives its event loop is reopened).
    """

    def __init__(self, orders: int = 3, mode: str = "orchestration") -> None:
        super().__init__()
        sim_orders(0, orders)  # validates ``orders``
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        self.orders = orders
        self.mode = mode

    async def _world(self, seed: int, slot: _Slot) -> CheckoutWorld:
        kind = ChoreographedWorld if self.mode == "choreography" else OrchestratedWorld
        world = kind(seed, self.orders, slot, self)
        await world.open()
        return world

    async def _new_slot(self, loop: asyncio.AbstractEventLoop) -> _Slot:
        template = await template_dir(self.mode)
        run_dir = Path(tempfile.mkdtemp(prefix="sagakit-sim-", dir=template.parent))
        atexit.register(shutil.rmtree, run_dir, True)  # in case aclose is never called
        for db in sorted(template.glob("*.db")):
            shutil.copyfile(db, run_dir / db.name)
        system = open_system(self.mode, run_dir)
        slot = _Slot(system, loop, template)
        try:
            for s in slot.stores:
                await s.open()
        except BaseException:
            await slot.close()
            raise
        services = {id(s) for s in system.service_stores}
        for p in system.participants:
            if id(p.store) in services:
                record_runs(p)
        return slot


def checkout_world(orders: int = 3, mode: str = "orchestration") -> CheckoutWorlds:
    """A world factory for the checkout in ``mode`` with ``orders`` orders per seed."""
    return CheckoutWorlds(orders, mode)
