"""The reference checkout as a simulator world.

Worlds take turns on one set of open SQLite stores (in ``/dev/shm`` when it exists,
``synchronous=NORMAL``: a simulation needs no durability), first copied from a
template migrated once per process and emptied between runs. Each world has the four
participants and the fake card provider from ``sagakit_checkout`` on its virtual
clock, the orchestrator with the checkout definition and seeded saga ids, and a few
orders: scenarios drawn from ``sagakit_checkout.demo.make_orders`` plus two orders
racing for the last unit of a SKU. After the run DESIGN's invariants are checked from
the services' ledgers with ``sagakit_checkout.invariants.check_invariants``, except
"nothing lost", which is computed by :func:`sagakit.testing.sim.nothing_lost` so that
the network's deliberate drops count as accounted for.

``sagakit_checkout`` is imported lazily, when a world is built: the engine does not
depend on its examples.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import inspect
import itertools
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sagakit.core.envelope import Envelope, MessageKind, Outcome
from sagakit.runtime.orchestrator import Orchestrator
from sagakit.runtime.participant import Handler, HandlerResult, Participant
from sagakit.runtime.relay import Relay
from sagakit.stores.base import Store, Tx
from sagakit.testing.sim.checks import no_dead_letters, nothing_lost
from sagakit.testing.sim.network import SimFaultHook, SimNetwork, VirtualClock
from sagakit.testing.sim.scheduler import Verdict

_RUNS_TABLE = """
CREATE TABLE sim_handler_runs (
    id          INTEGER PRIMARY KEY,
    key         TEXT NOT NULL,
    compensates TEXT,
    type        TEXT NOT NULL
);
"""
"""Where the simulator records, in each handler's own transaction, every keyed command
that a participant's handler carried out (see :func:`_record_runs`)."""

_FILES = ("orchestrator", "order", "payment", "inventory", "shipping", "provider")
_RANDOM_IDS = re.compile(r"auth-[0-9a-f]{16}")
_template: Path | None = None


def _scratch_base() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def use_template(path: Path) -> None:
    """Use ``path`` (made by :func:`template_dir` in a parent process) as the template."""
    global _template
    _template = path


def _have_template() -> Path | None:
    return _template if _template is not None and _template.is_dir() else None


async def template_dir() -> Path:
    """A directory of migrated, stocked, closed SQLite files (built once per process)."""
    global _template
    if (ready := _have_template()) is not None:
        return ready
    from sagakit_checkout.demo import REGULAR_SKUS, REGULAR_STOCK
    from sagakit_checkout.services import migrate, open_checkout

    base = Path(tempfile.mkdtemp(prefix="sagakit-sim-template-", dir=_scratch_base()))
    atexit.register(shutil.rmtree, base, True)
    checkout = open_checkout(base, synchronous="NORMAL")
    stores = [checkout.orchestrator_store, *checkout.service_stores.values()]
    for s in stores:
        await s.open()
    stock = dict.fromkeys(REGULAR_SKUS, REGULAR_STOCK) | {"sku-sold-out": 0}
    await migrate(checkout, initial_stock=stock)
    for service in checkout.service_stores.values():
        await service.apply_migrations("sagakit.sim", [_RUNS_TABLE])
    await checkout.provider.effects()  # creates the provider's tables
    checkout.provider.close()
    for s in stores:
        await s.close()
    _template = base
    return base


def sim_orders(seed: int, orders: int) -> tuple[list[Any], dict[str, int]]:
    """The orders of one seed: ``orders - 2`` drawn scenarios plus a race for stock 1."""
    from sagakit_checkout.demo import OrderSpec, make_orders

    if orders < 2:
        raise ValueError("a simulated run needs at least 2 orders (two race for the last item)")
    specs: list[OrderSpec] = []
    stock: dict[str, int] = {}
    if orders > 2:
        specs, stock = make_orders(orders - 2, seed)
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
    """An open checkout (stores, provider, participants) that worlds take turns on."""

    def __init__(self, checkout: Any, loop: asyncio.AbstractEventLoop, template: Path) -> None:
        self.checkout = checkout
        self.loop = loop
        self.template = template
        self.clean = True

    @property
    def stores(self) -> list[Store]:
        c = self.checkout
        return [c.orchestrator_store, *c.service_stores.values()]

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
        provider = self.checkout.provider
        provider.close()  # reopens (on the template's copy) at first use
        _copy_db(self.template / "provider.db", Path(provider.path))
        self.clean = True

    async def close(self) -> None:
        self.checkout.provider.close()
        for s in self.stores:
            with contextlib.suppress(Exception):
                await s.close()
        shutil.rmtree(self.checkout.data_dir, ignore_errors=True)


def _record_runs(participant: Participant) -> None:
    """Wrap every handler to record each keyed command it carried out, in its transaction.

    A rolled-back attempt leaves no row; a failure (raised or returned) is no effect.
    What the rows must show, whatever the business code does on its own: each key's
    handler succeeded at most once, and never after a compensation of that key ran.
    """
    # The runtime offers no hook around handlers; the table of handlers is private to
    # Participant, but this module belongs to the engine.
    handlers = participant._handlers
    for message_type, handler in list(handlers.items()):
        handlers[message_type] = _recording(handler)


def _recording(handler: Handler) -> Handler:
    async def run(tx: Tx, env: Envelope) -> HandlerResult:
        result = handler(tx, env)
        if inspect.isawaitable(result):
            result = await result
        failed = isinstance(result, Outcome) and not result.ok
        if env.kind is not MessageKind.QUERY and env.idempotency_key and not failed:
            await tx.execute(
                "INSERT INTO sim_handler_runs (key, compensates, type) VALUES (?, ?, ?)",
                (env.idempotency_key, env.compensates, env.type),
            )
        return result

    return run


async def _handler_runs(participant: Participant) -> list[str]:
    """Violations of "each key's effect once, never after its undo" in one participant."""
    async with participant.store.transaction() as tx:
        rows = await tx.fetchall(
            "SELECT id, key, compensates, type FROM sim_handler_runs ORDER BY id"
        )
    problems: list[str] = []
    runs: dict[str, list[str]] = {}
    undone: dict[str, str] = {}
    for _, key, compensates, mtype in rows:
        runs.setdefault(key, []).append(mtype)
        if compensates is not None:
            undone.setdefault(compensates, mtype)
        elif key in undone:
            problems.append(
                f"effect_once: {participant.name} carried out {mtype} (key {key}) after "
                f"its compensation {undone[key]} had run"
            )
    for key, types in runs.items():
        if len(types) > 1:
            problems.append(
                f"effect_once: {participant.name} carried out {types[0]} (key {key}) "
                f"{len(types)} times"
            )
    return problems


def _copy_db(src: Path, dst: Path) -> None:
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{dst}{suffix}")
    shutil.copyfile(src, dst)


class CheckoutWorld:
    """One simulated checkout: five stores, the provider, four participants, orchestrator."""

    def __init__(self, seed: int, orders: int, slot: _Slot, pool: CheckoutWorlds) -> None:
        from sagakit_checkout.sagas import checkout_definition

        self.seed = seed
        self.slot = slot
        self.pool = pool
        self.clock = VirtualClock()
        self.hook = SimFaultHook()
        self.network = SimNetwork(self.clock)
        self.specs, self.stock = sim_orders(seed, orders)
        self.checkout = slot.checkout
        self.checkout.provider.clock = self.clock
        counter = itertools.count(1)
        self.orchestrator = Orchestrator(
            self.checkout.orchestrator_store,
            [checkout_definition()],
            clock=self.clock,
            faults=self.hook,
            id_factory=lambda: f"s{seed}-{next(counter)}",
        )
        o = self.orchestrator
        self.routes: dict[str, Store] = {o.endpoint: o.store, o.local_endpoint: o.store}
        self.network.subscribe(o.endpoint, o)
        self.network.subscribe(o.local_endpoint, o.local)
        for p in self.checkout.participants:
            p.clock = self.clock
            p.faults = self.hook
            self.routes[p.name] = p.store
            self.network.subscribe(p.name, p)
        self.stores: list[Store] = slot.stores
        self.relays: dict[str, Relay] = {
            s.name: Relay(s, self.network, clock=self.clock, lease=0.0) for s in self.stores
        }
        self.checked = False

    async def open(self) -> None:
        """Seed this run's stock (the stores are open and empty)."""
        from sagakit_checkout.demo import REGULAR_SKUS, REGULAR_STOCK
        from sagakit_checkout.inventory import seed_stock

        self.slot.clean = False
        stock = dict.fromkeys(REGULAR_SKUS, REGULAR_STOCK) | {"sku-sold-out": 0} | self.stock
        self.stock = stock
        await seed_stock(self.checkout.inventory_store, stock)

    async def begin(self) -> int:
        """Place every order (one saga each), one after the other."""
        from sagakit_checkout.sagas import CHECKOUT

        for spec in self.specs:
            await self.orchestrator.start(CHECKOUT, spec.order_id, spec.data)
        return len(self.specs)

    async def all_terminal(self) -> bool:
        """True when every saga is terminal."""
        counts = await self.orchestrator.store.count_sagas()
        return all(state.terminal for state in counts)

    async def check(self) -> Verdict:
        """DESIGN's invariants from the ledgers; "nothing lost" knows the simulated drops."""
        from sagakit_checkout.invariants import check_invariants

        # "nothing lost" is computed below, knowing the drops: hide the outboxes from
        # check_invariants' own version rather than check every message twice.
        stores = {
            k: _NoOutbox(v) if k.endswith("_store") else v
            for k, v in self.checkout.invariant_stores().items()
        }
        report = await check_invariants(**stores, initial_stock=self.stock)
        lost = await nothing_lost(self.routes, self.network)
        violations = [v for v in report.violations if not v.startswith("nothing_lost:")]
        invariants = dict(report.invariants)
        invariants["nothing_lost"] = not lost
        # The ledgers show effects the business code let through; the handler runs show
        # what the runtime let through (the checkout's handlers would hide a runtime
        # that forgot its idempotency records: they look at their ledgers first).
        for p in self.checkout.participants:
            runs = await _handler_runs(p)
            if runs:
                invariants["effect_once"] = False
                violations += runs
        parked = await no_dead_letters(self.routes)
        invariants["dead_letters"] = not parked
        violations += parked
        counts = await self.orchestrator.store.count_sagas()
        self.checked = True
        return Verdict(
            invariants,
            [_normal(v) for v in violations + lost],
            outcomes={state.value: n for state, n in counts.items()},
            notes=[_normal(n) for n in report.notes],
        )

    async def fingerprint(self) -> str:
        """A digest of sagas, histories and every service's ledger (random ids masked)."""
        h = hashlib.sha256()
        store = self.orchestrator.store
        for s in sorted(await store.list_sagas(limit=10_000), key=lambda s: s.saga_id):
            h.update(_normal(repr((s.saga_id, s.state, s.status, s.version, s.reason))).encode())
            for e in await store.history(s.saga_id):
                h.update(repr((e.version, e.at, e.event, e.step, e.status)).encode())
        for st, table in (
            (self.checkout.payment_store, "payment_ledger"),
            (self.checkout.inventory_store, "reservations"),
            (self.checkout.inventory_store, "stock"),
            (self.checkout.shipping_store, "shipments"),
            (self.checkout.order_store, "orders"),
            (self.checkout.order_store, "order_status_history"),
        ):
            async with st.transaction() as tx:
                rows = await tx.fetchall(f"SELECT * FROM {table}")
            h.update(_normal(repr(sorted(map(repr, rows)))).encode())
        for e in await self.checkout.provider.effects():
            h.update(repr((e.key, e.order_id, e.op, e.amount, e.at)).encode())
        h.update(repr((sorted(self.network.dropped), self.network.delivered)).encode())
        return h.hexdigest()[:16]

    async def close(self) -> None:
        """Hand the stores to the next world; close them if this run broke off."""
        await self.pool.release(self.slot, reusable=self.checked)


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


class CheckoutWorlds:
    """The :data:`~sagakit.testing.sim.WorldFactory` of the checkout.

    Worlds take turns on one set of open stores: when a run ends, its tables are emptied
    (row ids restart, as in a fresh copy) instead of copying and opening five databases
    again. The first set is copied from a template that was migrated once per process.
    Call :meth:`aclose` when done (a set that outlives its event loop is reopened).
    """

    def __init__(self, orders: int = 3) -> None:
        sim_orders(0, orders)  # validates ``orders``
        self.orders = orders
        self._idle: list[_Slot] = []

    async def __call__(self, seed: int) -> CheckoutWorld:
        loop = asyncio.get_running_loop()
        slot: _Slot | None = None
        while self._idle and slot is None:
            slot = self._idle.pop()
            if slot.loop is not loop:
                await slot.close()
                slot = None
            elif not slot.clean:
                await slot.reset()
        if slot is None:
            slot = await self._new_slot(loop)
        world = CheckoutWorld(seed, self.orders, slot, self)
        try:
            await world.open()
        except BaseException:
            await slot.close()
            raise
        return world

    async def _new_slot(self, loop: asyncio.AbstractEventLoop) -> _Slot:
        from sagakit_checkout.services import open_checkout

        template = await template_dir()
        run_dir = Path(tempfile.mkdtemp(prefix="sagakit-sim-", dir=template.parent))
        atexit.register(shutil.rmtree, run_dir, True)  # in case aclose is never called
        for name in _FILES:
            shutil.copyfile(template / f"{name}.db", run_dir / f"{name}.db")
        checkout = open_checkout(run_dir, synchronous="NORMAL")
        slot = _Slot(checkout, loop, template)
        try:
            for s in slot.stores:
                await s.open()
        except BaseException:
            await slot.close()
            raise
        for p in checkout.participants:
            _record_runs(p)
        return slot

    async def release(self, slot: _Slot, *, reusable: bool) -> None:
        """Take a slot back from a finished world."""
        if reusable:
            self._idle.append(slot)
        else:
            await slot.close()

    async def aclose(self) -> None:
        """Close every idle slot and delete its files."""
        while self._idle:
            await self._idle.pop().close()


def checkout_world(orders: int = 3) -> CheckoutWorlds:
    """A world factory for the checkout with ``orders`` orders per seed."""
    return CheckoutWorlds(orders)
