"""Any app as a simulator world: ``sagakit simulate --app module:attribute``.

The app's real definitions (every version it declares) and real participants (each
service's handlers, their SQL on the service's own SQLite file, migrated by the
service's migrations) run under the seeded scheduler of
:mod:`sagakit.testing.sim.scheduler`, with the same fault menu and the same simulated
operator as the checkout. A world is built from the app alone:

* its stores are those of a :class:`~sagakit.deployment.Deployment` on SQLite files in
  a scratch directory (``/dev/shm`` when it exists), opened once per process and
  emptied between seeds;
* ``App.setup`` seeds its reference data for each seed, and ``App.load(orders, seed)``
  names the sagas the seed starts (all of them at the start, one after the other);
* two orchestrator workers share the saga store; the ticks fire its timers and the
  services' periodic jobs (at the time their ``due`` function gives, else every
  ``seconds``), everything on the virtual clock that handlers and jobs read with
  :func:`sagakit.now`.

Checked after every step: each saga's user-visible status never goes back and a
terminal state never changes (except by a person's decision), and the app's
``watch``. Checked at the end, once the run is quiescent: every saga terminal, each
idempotency key's effect carried out once and never after its undo (recorded beside
every handler run, :mod:`sagakit.testing.sim.handler_runs`), nothing lost (knowing the
network's deliberate drops), no dead letters, compensations in reverse order, stale
inputs moving nothing, and the app's own ``invariants`` from its ledgers.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import itertools
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sagakit.app import App
from sagakit.clock import using
from sagakit.core.definition import SagaDefinition
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState
from sagakit.deployment import Deployment
from sagakit.runtime.orchestrator import Orchestrator
from sagakit.runtime.participant import Participant
from sagakit.runtime.relay import Relay
from sagakit.stores.base import SQLStore, Store
from sagakit.testing.coverage import exercised
from sagakit.testing.jobs import VirtualJob, app_jobs
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
from sagakit.testing.sim.systems import RUNS_TABLE
from sagakit.testing.sim.timers import OrchestratorTimers
from sagakit.testing.sim.world import Verdict
from sagakit.transports.base import BatchHandler

WORKERS = 2
"""Orchestrator workers per world (two ``sagakit worker`` processes)."""
REPLIES_TO = "orchestrator"
"""The endpoint the workers take replies at."""
_KEEP = ("schema_migrations", "sqlite_stat1")


def _scratch_base() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


class _Slot:
    """An app's stores and participants, open on SQLite files, that worlds take turns on."""

    def __init__(self, app: App, options: Mapping[str, Any] | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"sagakit-sim-{app.name}-", dir=_scratch_base()))
        atexit.register(shutil.rmtree, self.dir, True)  # in case close is never called
        self.dep = Deployment(
            app, f"sqlite:///{self.dir}?synchronous=NORMAL", options=options, data_dir=self.dir
        )
        self.app = app
        self.stores: dict[str, SQLStore] = {n: self.dep.store(n) for n in app.store_names}
        self.participants: list[Participant] = [
            s.participant(self.stores[s.name], self.dep.ctx) for s in app.services.values()
        ]
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine_tables: set[str] = set()
        self.seeded: dict[str, dict[str, list[tuple[Any, ...]]]] = {}
        self.clean = True

    @property
    def saga_store(self) -> SQLStore:
        return self.stores["orchestrator"]

    async def open(self) -> None:
        self.loop = asyncio.get_running_loop()
        for store in self.stores.values():
            await store.open()
        self.engine_tables = set(await _tables(self.saga_store))
        for service in self.app.services.values():
            store = self.stores[service.name]
            await service.migrate(store)
            await store.apply_migrations("sagakit.sim", [RUNS_TABLE])
        for p in self.participants:
            record_runs(p)
        # Rows the migrations wrote (reference data seeded by a migration): put back
        # after each run, as a fresh migration would have them.
        for name, store in self.stores.items():
            async with store.transaction() as tx:
                for table in await _tables(store, tx):
                    if table in _KEEP:
                        continue
                    rows = await tx.fetchall(f'SELECT * FROM "{table}"')
                    if rows:
                        self.seeded.setdefault(name, {})[table] = [tuple(r) for r in rows]

    async def reset(self) -> None:
        """Every table as the migrations left it (row ids restart)."""
        for name, store in self.stores.items():
            seeded = self.seeded.get(name, {})
            async with store.transaction() as tx:
                for table in await _tables(store, tx):
                    if table in _KEEP:
                        continue
                    await tx.execute(f'DELETE FROM "{table}"')
                    rows = seeded.get(table)
                    if rows:
                        marks = ", ".join("?" * len(rows[0]))
                        for row in rows:
                            await tx.execute(f'INSERT INTO "{table}" VALUES ({marks})', row)
        self.clean = True

    def reusable(self) -> bool:
        """True when the app kept nothing beside its stores: emptying the stores then
        gives the next seed the same start as a fresh slot. (An app whose services keep
        files of their own in the data directory, a fake partner's, holds them open in
        objects the world cannot reset: such a slot serves one seed.)"""
        ours = {f"{name}.db{suffix}" for name in self.stores for suffix in ("", "-wal", "-shm")}
        return all(p.name in ours or p.name.endswith(".lock") for p in self.dir.iterdir())

    async def close(self) -> None:
        for store in self.stores.values():
            with contextlib.suppress(Exception):
                await store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def ledgers(self) -> list[tuple[Store, str]]:
        """The services' own tables (what their migrations created), for fingerprints."""
        out: list[tuple[Store, str]] = []
        skip = self.engine_tables | set(_KEEP) | {"sim_handler_runs", "sqlite_sequence"}
        for name in self.app.services:
            store = self.stores[name]
            out += [(store, t) for t in await _tables(store) if t not in skip]
        return out


async def _tables(store: Store, tx: Any = None) -> list[str]:
    sql = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    if tx is not None:
        return [r[0] for r in await tx.fetchall(sql)]
    async with store.transaction() as own:
        return [r[0] for r in await own.fetchall(sql)]


class AppTimers:
    """What ticks fire in an app's world: the saga timers (one worker fires them; the
    fenced faults apply to them) and the services' periodic jobs."""

    def __init__(self, saga: OrchestratorTimers, jobs: Sequence[VirtualJob]) -> None:
        self.saga = saga
        self.jobs = list(jobs)
        self.point = saga.point
        self.stores = tuple(dict.fromkeys([*saga.stores, *(j.store.name for j in self.jobs)]))
        self.fenced = True

    async def next_due(self) -> float | None:
        """The earliest saga timer or job."""
        times = [await self.saga.next_due()]
        times += [await j.due() for j in self.jobs]
        found = [t for t in times if t is not None]
        return min(found) if found else None

    async def due_after_end(self) -> float | None:
        """The earliest job that says something waits for it (its ``due`` function);
        jobs that only run every few seconds do not count once every saga ended."""
        times = [await j.due() for j in self.jobs if j.due_fn is not None]
        found = [t for t in times if t is not None]
        return min(found) if found else None

    async def fire(self) -> int:
        """Fire the due saga timers (a crash raises before their commit), then run the
        due jobs; how many timers fired and jobs ran."""
        fired = 0
        now = self.saga.orchestrator.clock()
        due = await self.saga.next_due()
        if due is not None and due <= now:
            fired += await self.saga.fire()
        for job in self.jobs:
            at = await job.due()
            if at is not None and at <= now:
                await job.run()
                fired += 1
        return fired

    async def fired(self) -> list[tuple[str, ...]]:
        """The saga timers that fired (see :class:`OrchestratorTimers`)."""
        return await self.saga.fired()

    async def fire_again(self, target: Sequence[str]) -> bool:
        """A saga timer again, with its old fence."""
        return await self.saga.fire_again(target)

    async def superseded(self) -> list[tuple[str, ...]]:
        """Saga timers replaced before they fired."""
        return await self.saga.superseded()

    async def fire_late(self, target: Sequence[str]) -> bool:
        """A replaced saga timer, applied late."""
        return await self.saga.fire_late(target)


class AppWorld(OrchestratorControls):
    """One seed of an app (see the module docstring)."""

    def __init__(self, seed: int, orders: int, slot: _Slot, pool: AppWorlds) -> None:
        self.seed = seed
        self.orders = orders
        self.slot = slot
        self.pool = pool
        self.app = slot.app
        self.dep = slot.dep
        self.clock = VirtualClock()
        self.hook = SimFaultHook()
        self.network = SimNetwork(self.clock)
        self.event_routes: dict[str, list[str]] = {}
        for p in slot.participants:
            for event_type in sorted(p.subscriptions):
                self.event_routes.setdefault(event_type, []).append(p.name)
        self.stores = list(slot.stores.values())
        self.relays = {
            s.name: Relay(
                s, self.network, clock=self.clock, lease=0.0, event_routes=self.event_routes
            )
            for s in self.stores
        }
        counter = itertools.count(1)
        definitions = slot.dep.definitions
        self.workers = [
            Orchestrator(
                slot.saga_store,
                definitions,
                clock=self.clock,
                faults=self.hook,
                id_factory=lambda: f"s{seed}-{next(counter)}",
                canary=self.app.canary or None,
            )
            for _ in range(WORKERS)
        ]
        self.orchestrator = o = self.workers[0]
        self.pick = random.Random(f"workers:{seed}")
        self.routes: dict[str, Store] = {}
        self._subscribe(o.endpoint, o.store, AnyWorker(self.workers, self.pick, lambda w: w))
        self._subscribe(
            o.local_endpoint, o.store, AnyWorker(self.workers, self.pick, lambda w: w.local)
        )
        for p in slot.participants:
            p.clock = self.clock
            p.faults = self.hook
            self._subscribe(p.name, p.store, p)
        jobs = app_jobs(self.app, slot.stores, self.clock)
        self.timers = AppTimers(OrchestratorTimers(self.workers, self.pick), jobs)
        self.started = 0
        self.checked = False
        self._seen: dict[str, tuple[str, SagaState]] = {}
        self._decided: set[str] = set()

    def _subscribe(self, endpoint: str, store: Store, consumer: BatchHandler) -> None:
        self.routes[endpoint] = store
        self.network.subscribe(endpoint, consumer)

    async def open(self) -> None:
        """Seed the app's reference data (the stores are open and empty)."""
        self.slot.clean = False
        if self.app.setup is not None:
            with using(self.clock):
                await self.app.setup(self.dep)

    async def begin(self) -> int:
        """Start the sagas of the app's load for this seed, one after the other."""
        assert self.app.load is not None
        requests = list(self.app.load(self.orders, self.seed))
        if not requests:
            raise ValueError(f"app {self.app.name!r}: its load driver returned no sagas")
        with using(self.clock):
            for definition, key, data in requests:
                await self.orchestrator.start(definition, key, dict(data))
        self.started = len(requests)
        return self.started

    async def all_terminal(self) -> bool:
        """True when every saga is terminal."""
        counts = await self.orchestrator.store.count_sagas()
        return all(state.terminal for state in counts)

    async def resolve(self, saga_id: str, action: str, rung: int | None, reason: str) -> str:
        """A person's decision (it may move the saga's status anywhere: the status check
        starts again from where the decision left it)."""
        wrote = await super().resolve(saga_id, action, rung, reason)
        self._decided.add(saga_id)
        return wrote

    # -- checks -----------------------------------------------------------------------
    async def watch(self) -> list[str]:
        """Each saga's status moved forward only, terminal states stay; the app's watch."""
        problems: list[str] = []
        for inst in await self.orchestrator.store.list_sagas(limit=10_000):
            before = self._seen.get(inst.saga_id)
            self._seen[inst.saga_id] = (inst.status, inst.state)
            if before is None or inst.saga_id in self._decided:
                self._decided.discard(inst.saga_id)
                continue
            status, state = before
            if state.terminal and inst.state is not state:
                problems.append(
                    f"terminal: saga {inst.saga_id} ({inst.business_key}) left its terminal "
                    f"state {state.value} for {inst.state.value}"
                )
            definition = self._definition(inst)
            if not definition.status_may_follow(status, inst.status):
                problems.append(
                    f"honest_status: saga {inst.saga_id} ({inst.business_key}) showed "
                    f"{status} then {inst.status}"
                )
        if self.app.watch is not None:
            problems += [f"app_watch: {v}" for v in await self.app.watch(self.dep)]
        return problems

    def _definition(self, inst: SagaInstance) -> SagaDefinition:
        return self.orchestrator.machine_for(inst).definition

    async def check(self) -> Verdict:
        """Every saga terminal, effect once, nothing lost, no dead letters, compensation
        order, stale inputs, and the app's invariants (see the module docstring)."""
        store = self.orchestrator.store
        sagas = sorted(await store.list_sagas(limit=10_000), key=lambda s: s.saga_id)
        histories: list[tuple[SagaInstance, list[HistoryEntry]]] = [
            (s, await store.history(s.saga_id)) for s in sagas
        ]
        violations: list[str] = []
        invariants: dict[str, bool] = {}
        running = [s for s in sagas if not s.terminal]
        violations += [
            f"terminal: saga {s.saga_id} ({s.business_key}) is still {s.state.value} at {s.status}"
            for s in running
        ]
        if len(sagas) != self.started:
            violations.append(f"terminal: {self.started} sagas started, {len(sagas)} stored")
        invariants["terminal"] = not running and len(sagas) == self.started
        lost = await nothing_lost(self.routes, self.network, self.event_routes)
        invariants["nothing_lost"] = not lost
        violations += lost
        runs: list[str] = []
        for p in self.slot.participants:
            runs += await handler_runs(p)
        invariants["effect_once"] = not runs
        violations += runs
        parked = await no_dead_letters(self.routes)
        invariants["dead_letters"] = not parked
        violations += parked
        order: list[str] = []
        stale: list[str] = []
        seen: Counter[str] = Counter()
        replies = await answers(self.stores, REPLIES_TO)
        for inst, entries in histories:
            definition = self._definition(inst)
            order += compensation_order(entries, [s.name for s in definition.steps])
            stale += stale_inputs(entries, replies)
            seen.update(exercised(entries, definition))
        invariants["compensation_order"] = not order
        invariants["stale_inputs"] = not stale
        violations += order + stale
        if self.app.invariants is not None:
            own = [f"app: {v}" for v in await self.app.invariants(self.dep)]
            invariants["app"] = not own
            violations += own
        counts = await store.count_sagas()
        waiting = counts.get(SagaState.FAILED_NEEDS_MANUAL, 0)
        notes = [f"{waiting} saga(s) wait in the manual queue"] if waiting else []
        self.checked = True
        return Verdict(
            invariants,
            violations,
            outcomes={state.value: n for state, n in counts.items()},
            notes=notes,
            exercised=seen,
        )

    async def fingerprint(self) -> str:
        """A digest of the sagas, their histories and the services' own tables."""
        h = hashlib.sha256()
        store = self.orchestrator.store
        for s in sorted(await store.list_sagas(limit=10_000), key=lambda s: s.saga_id):
            h.update(repr((s.saga_id, s.state, s.status, s.version, s.reason)).encode())
            for e in await store.history(s.saga_id):
                h.update(repr((e.version, e.at, e.event, e.step, e.status)).encode())
        for st, table in await self.slot.ledgers():
            async with st.transaction() as tx:
                rows = await tx.fetchall(f'SELECT * FROM "{table}"')
            h.update(repr((table, sorted(map(repr, rows)))).encode())
        h.update(repr((sorted(self.network.dropped), self.network.delivered)).encode())
        return h.hexdigest()[:16]

    async def close(self) -> None:
        """Hand the stores to the next world (closed if this run broke off, or if the
        app keeps files of its own beside them)."""
        await self.pool.release(self.slot, reusable=self.checked and self.slot.reusable())


class AppWorlds(SlotPool[_Slot, AppWorld]):
    """The :data:`~sagakit.testing.sim.WorldFactory` of an app: ``orders`` sagas of its
    load per seed, on stores that worlds take turns on (emptied between runs). Call
    :meth:`aclose` when done."""

    def __init__(self, app: App, orders: int = 3, options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if app.load is None:
            raise ValueError(
                f"app {app.name!r} ships no load driver: give it App(load=...) so that the "
                "simulator knows which sagas to start"
            )
        if orders < 1:
            raise ValueError("a simulated run of an app needs at least 1 saga (--orders)")
        self.app = app
        self.orders = orders
        self.options = dict(options or {})

    async def _new_slot(self, loop: asyncio.AbstractEventLoop) -> _Slot:
        slot = _Slot(self.app, self.options)
        try:
            await slot.open()
        except BaseException:
            await slot.close()
            raise
        return slot

    async def _world(self, seed: int, slot: _Slot) -> AppWorld:
        world = AppWorld(seed, self.orders, slot, self)
        await world.open()
        return world
