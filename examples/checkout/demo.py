"""`sagakit demo`: place N orders through the checkout, under faults, and check the
invariants from the four services' own ledgers.

``mode`` picks how the checkout runs (see :mod:`.modes`): orchestrated, choreographed
(outcomes from the tracker's saga views) or hybrid; the checks and the report are the
same for all three, plus messages written and handled and saga latency.

The order mix and the fault schedule come from ``--seed``. With ``--data-dir`` the
databases are kept: running the same command again after a ``kill -9`` finishes the
interrupted sagas, places only the orders not placed yet, and reports on all N. On
PostgreSQL (``--store``) the same holds without ``--data-dir``: the stores and the card
provider's records are all in the database.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sagakit import App, SagaState
from sagakit.app_demo import DemoRequest, drain
from sagakit.runtime.lockfile import data_dir_lock, private_dir
from sagakit.testing.faults import Faults

from .event_audit import check_event_delivery
from .invariants import InvariantReport, check_invariants
from .inventory import seed_stock
from .modes import build_system, measure

SCENARIOS = (
    # (name, weight)
    ("success", 40),
    ("card_declined", 8),
    ("out_of_stock", 8),
    ("last_item_race", 10),
    ("shipping_failure", 6),
    ("carrier_flaky", 4),
    ("provider_timeout", 4),
    ("void_refused", 2),
    # After the pivot (the money is taken): forward recovery, or a person.
    ("commit_flaky", 3),  # the warehouse confirms the pick on the third try
    ("commit_stuck", 2),  # the warehouse never confirms the pick
    ("commit_refused", 2),  # the SKU was recalled: the pick is refused for good
    ("complete_flaky", 3),  # the customer's account is locked on the first tries
    ("complete_refused", 2),  # the customer's account is frozen: no completing
    # A card provider that answers nothing (its effect happened, its answer never comes).
    ("void_unanswered", 2),  # a void, and the question what became of it
    ("capture_unanswered", 2),  # a capture; asked afterwards, the provider tells
    ("provider_dark", 2),  # a capture, and the question what became of it
    # A card provider out of reach while the card is authorized: nothing happens, and
    # neither the calls nor the question what became of them are answered (a person's).
    ("authorize_outage", 2),
)
"""The demo's order mix: each scenario with its weight (see :func:`make_orders`)."""
REGULAR_SKUS = [f"sku-{i:02d}" for i in range(8)]
REGULAR_STOCK = 1_000_000
WAREHOUSE_SKUS = {
    "commit_flaky": "sku-wh-flaky-01",
    "commit_stuck": "sku-wh-down-01",
    "commit_refused": "sku-recalled-01",
}
"""The SKU of each scenario that fails at the warehouse's commit (see :mod:`.inventory`)."""
WAVE = 100  # orders placed per start_many transaction
WINDOW = 300  # place more orders while fewer than this many sagas run


@dataclass(frozen=True, slots=True)
class OrderSpec:
    """One order of the demo, and the scenario it was drawn for."""

    order_id: str
    scenario: str
    data: dict[str, Any]


def make_orders(
    n: int, seed: int, *, scenarios: Sequence[tuple[str, int]] = SCENARIOS
) -> tuple[list[OrderSpec], dict[str, int]]:
    """The order mix and the initial stock, both determined by ``seed``.

    ``scenarios`` are the ``(name, weight)`` pairs to draw from (default
    :data:`SCENARIOS`); every scenario is chosen by tokens in the order's data only
    (card, address, customer and SKU tokens: never personal data).
    """
    known = {s for s, _ in SCENARIOS}
    if unknown := [s for s, _ in scenarios if s not in known]:
        raise ValueError(f"unknown scenarios {unknown}; choose from {sorted(known)}")
    rng = random.Random(seed)
    names = [s for s, _ in scenarios]
    weights = [w for _, w in scenarios]
    stock = dict.fromkeys(REGULAR_SKUS, REGULAR_STOCK)
    stock["sku-sold-out"] = 0
    stock |= dict.fromkeys(WAREHOUSE_SKUS.values(), REGULAR_STOCK)
    orders: list[OrderSpec] = []
    race = 0
    while len(orders) < n:
        scenario = rng.choices(names, weights)[0]
        group = 1
        sku = rng.choice(REGULAR_SKUS)
        card, ship_to = f"card-ok-{rng.randrange(10**6)}", f"addr-ok-{rng.randrange(10**6)}"
        customer = "cust"
        if scenario == "card_declined":
            card = f"card-decline-{rng.randrange(10**6)}"
        elif scenario == "out_of_stock":
            sku = "sku-sold-out"
        elif scenario == "last_item_race":
            # Three orders race for the last unit of a SKU: exactly one may win.
            race += 1
            sku = f"sku-last-{race:04d}"
            stock[sku] = 1
            group = 3
        elif scenario == "shipping_failure":
            ship_to = f"addr-bad-{rng.randrange(10**6)}"
        elif scenario == "carrier_flaky":
            ship_to = f"addr-flaky-{rng.randrange(10**6)}"
        elif scenario == "provider_timeout":
            card = f"card-slow-{rng.randrange(10**6)}"
        elif scenario == "void_refused":
            # Declined later at the shipping step, so the void must be tried -- and fails.
            card, ship_to = (
                f"card-novoid-{rng.randrange(10**6)}",
                f"addr-bad-{rng.randrange(10**6)}",
            )
        elif scenario in WAREHOUSE_SKUS:
            sku = WAREHOUSE_SKUS[scenario]
        elif scenario == "complete_flaky":
            customer = "cust-locked"
        elif scenario == "complete_refused":
            customer = "cust-frozen"
        elif scenario == "void_unanswered":
            # Declined at the shipping step, so the void must be tried -- and is never
            # answered, nor is the question what became of it.
            card, ship_to = (
                f"card-mutevoid-nolookup-{rng.randrange(10**6)}",
                f"addr-bad-{rng.randrange(10**6)}",
            )
        elif scenario == "capture_unanswered":
            card = f"card-mutecapture-{rng.randrange(10**6)}"
        elif scenario == "provider_dark":
            card = f"card-mutecapture-nolookup-{rng.randrange(10**6)}"
        elif scenario == "authorize_outage":
            card = f"card-outage-{rng.randrange(10**6)}"
        for _ in range(group):
            if len(orders) == n:
                break
            i = len(orders)
            orders.append(
                OrderSpec(
                    order_id=f"order-{seed}-{i:06d}",
                    scenario=scenario,
                    data={
                        "customer": f"{customer}-{rng.randrange(10**6):06d}",
                        "sku": sku,
                        "qty": 1,
                        "amount": rng.randrange(500, 50_000),
                        "currency": "EUR",
                        "card": card,
                        "ship_to": ship_to,
                    },
                )
            )
    return orders, stock


@dataclass
class DemoResult:
    """What the demo measured."""

    mode: str
    orders: int
    outcomes: dict[str, int]
    report: InvariantReport
    elapsed_s: float
    faults_injected: dict[str, int]
    seed: int
    data_dir: str
    placed_now: int
    scenarios: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` report."""
        return {
            "orders": self.orders,
            "mode": self.mode,
            "outcomes": self.outcomes,
            "invariants": self.report.invariants,
            "violations": self.report.violations,
            "in_broker": self.in_broker(),
            "elapsed_s": round(self.elapsed_s, 3),
            "sagas_per_s": round(self.orders / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "seed": self.seed,
            "faults_injected": self.faults_injected,
            "placed_this_run": self.placed_now,
            "scenarios": self.scenarios,
            "metrics": self.metrics,
            "data_dir": self.data_dir,
        }

    @property
    def ok(self) -> bool:
        """True when every invariant holds."""
        return all(self.report.invariants.values()) and not self.report.violations

    def in_broker(self) -> dict[str, Any] | None:
        """What the broker still held when the run was checked (None: no broker).

        ``late``: published messages not yet processed that the broker holds (not
        lost); ``held``: everything it holds, per endpoint (duplicates and copies of
        messages already processed included).
        """
        broker = self.report.broker
        if broker is None:
            return None
        return {
            "total": broker.total,
            "held": {e.endpoint: e.total for e in broker.endpoints if e.total},
            "complete": broker.complete,
            "late": list(self.report.in_broker),
        }

    def render(self) -> str:
        """The report for a terminal."""
        return render(self)


async def run_for_app(app: App, req: DemoRequest) -> DemoResult:
    """``sagakit demo --app sagakit_checkout:app`` (the checkout app's ``demo`` hook)."""
    return await run_demo(
        orders=req.orders,
        faults=req.faults,
        seed=req.seed,
        data_dir=req.data_dir,
        progress=req.progress,
        synchronous=req.synchronous,
        timeout=req.timeout,
        store_url=req.store_url,
        broker_url=req.broker_url,
        mode=req.options.get("mode") or "orchestration",
        app=app,
        options=req.options,
    )


async def run_demo(
    *,
    orders: int = 200,
    faults: str = "default",
    seed: int = 0,
    data_dir: Path | None = None,
    progress: TextIO | None = None,
    synchronous: str = "FULL",
    timeout: float = 600.0,
    store_url: str | None = None,
    broker_url: str | None = None,
    mode: str = "orchestration",
    app: App | None = None,
    options: Mapping[str, Any] | None = None,
) -> DemoResult:
    """Run the demo; returns the result (the caller prints it).

    Embedded by default (SQLite files in ``data_dir``, no broker). With ``store_url``
    and ``broker_url`` it runs on PostgreSQL (a schema per service) and NATS or
    RabbitMQ instead, all roles in this one process; the card provider then keeps its
    records with the stores (its own schema, ``<prefix>_card_provider``), so that a
    rerun on the same database resumes. ``mode``: ``orchestration``, ``choreography``
    or ``hybrid``.
    Orchestrated, the checkout runs as ``app`` (default: the checkout app) with its
    ``options``, through the same deployment path as ``sagakit worker --app``.
    """
    if orders < 1:
        raise ValueError("--orders must be at least 1")
    if (store_url is None) != (broker_url is None):
        raise ValueError("--store and --broker go together")
    keep = data_dir is not None
    base = (
        Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="sagakit-demo-"))
    )
    private_dir(base)  # 0700: the databases hold customers and cards
    lock = data_dir_lock(base)
    lock.acquire()
    try:
        return await _run(
            orders,
            faults,
            seed,
            base,
            progress,
            synchronous,
            timeout,
            store_url,
            broker_url,
            mode,
            app,
            options,
        )
    finally:
        lock.release()
        if not keep:
            import shutil

            shutil.rmtree(base, ignore_errors=True)


async def _run(
    n: int,
    fault_name: str,
    seed: int,
    base: Path,
    progress: TextIO | None,
    synchronous: str,
    timeout: float,
    store_url: str | None,
    broker_url: str | None,
    mode: str,
    app: App | None,
    options: Mapping[str, Any] | None,
) -> DemoResult:
    specs, stock = make_orders(n, seed)
    fault_plan = Faults.named(fault_name, seed)
    started = time.monotonic()
    placed_now = 0
    system = build_system(
        mode,
        base,
        fault_plan,
        synchronous=synchronous,
        store_url=store_url,
        broker_url=broker_url,
        app=app,
        options=options,
    )
    engine, stores = system.engine, system.invariant_stores
    inventory_store = stores["inventory_store"]
    async with engine:
        await seed_stock(inventory_store, stock)
        # Orders arrive as customers click: a new wave whenever fewer than WINDOW sagas
        # are in flight. (It also means a run killed midway has orders left to place.)
        deadline = time.monotonic() + timeout
        placed = 0
        while True:
            counts = await engine.store.count_sagas()
            done = sum(v for k, v in counts.items() if k.terminal)
            in_flight = sum(counts.values()) - done
            if placed < n and in_flight < WINDOW:
                chunk = specs[placed : placed + WAVE]
                placed_now += await system.place(chunk)
                placed += len(chunk)
                continue
            _bar(progress, done, n, time.monotonic() - started)
            if (placed >= n and done >= n) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        # Let the relays hand over the last replies and acks before checking.
        broker = await drain(engine)
        elapsed = time.monotonic() - started
        if progress is not None:
            progress.write("\n")
        report = await check_invariants(**stores, initial_stock=stock, broker=broker)
        await check_event_delivery(report, system.endpoints, engine.event_routes)
        await check_dead_letters(report, [*engine.stores, *system.endpoints.values()])
        if system.audit is not None:
            await system.audit(report)
        counts = await engine.store.count_sagas()
        metrics = await measure(system, n)
    outcomes = {s.value: counts.get(s, 0) for s in SagaState if s.terminal}
    running = sum(v for k, v in counts.items() if not k.terminal)
    if running:
        outcomes["RUNNING"] = running
    return DemoResult(
        mode=system.mode,
        orders=n,
        outcomes=outcomes,
        report=report,
        elapsed_s=elapsed,
        faults_injected=dict(sorted(fault_plan.counts.items())),
        seed=seed,
        data_dir=str(base),
        placed_now=placed_now,
        scenarios=dict(Counter(s.scenario for s in specs)),
        metrics=metrics,
    )


EXPECTED_PARKED = "no endpoint subscribes to event"
"""The reason a relay parks an event nobody subscribes to: the one dead letter the demo
expects (the design parks such an event rather than lose it)."""


async def check_dead_letters(report: InvariantReport, stores: Iterable[Any]) -> None:
    """Count every unexpected dead letter in ``stores`` as a ``dead_letters`` violation.

    The demo sends no poison messages, and its crash faults are far too rare to exhaust
    a consumer's redeliveries: a parked command, reply or fact means a handler or the
    runtime failed on a legitimate message (the invariants' own check only notes dead
    letters, since "nothing lost" holds for a parked message). Events parked because
    nobody subscribes to them are expected.
    """
    for store in {id(s): s for s in stores}.values():
        for d in await store.dead_letters():
            if d.reason.startswith(EXPECTED_PARKED):
                continue
            report.fail(
                "dead_letters",
                f"{store.name} ({d.endpoint or 'no endpoint'}) parked message "
                f"{d.message_id}: {d.reason[:300]}",
            )


def _bar(out: TextIO | None, done: int, total: int, elapsed: float) -> None:
    if out is None:
        return
    width = 32
    filled = int(width * done / total) if total else width
    rate = done / elapsed if elapsed > 0 else 0.0
    out.write(
        f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} sagas terminal  {rate:7.1f}/s"
    )
    out.flush()


def render(result: DemoResult) -> str:
    """The human-readable summary table."""
    lines = [
        f"sagakit demo: {result.orders} orders, {result.mode}, seed {result.seed}",
        "",
        "  outcome               sagas",
        "  --------------------  -----",
    ]
    for k, v in result.outcomes.items():
        lines.append(f"  {k:<20}  {v:>5}")
    lines += [
        "",
        "  invariant (from the services' own ledgers)",
        "  ------------------------------------------",
    ]
    for k, ok in result.report.invariants.items():
        lines.append(f"  {k:<20}  {'ok' if ok else 'VIOLATED'}")
    if result.faults_injected:
        lines += [
            "",
            "  faults injected: "
            + ", ".join(f"{k}={v}" for k, v in result.faults_injected.items()),
        ]
    broker = result.report.broker
    if broker is not None and broker.total:
        lines += [
            "",
            f"  still in the broker: {broker.summary()} "
            f"({len(result.report.in_broker)} of them not yet processed: late, not lost)",
        ]
    for violation in result.report.violations[:20]:
        lines.append(f"  ! {violation}")
    if len(result.report.violations) > 20:
        lines.append(f"  ! ... and {len(result.report.violations) - 20} more")
    rate = result.orders / result.elapsed_s if result.elapsed_s else 0.0
    m = result.metrics
    if m:
        lat = m["latency_ms"]
        lines += [
            "",
            f"  messages per order: {m['written_per_order']} written, "
            f"{m['handled_per_order']} handled; saga latency p50 {lat['p50']} ms, "
            f"p95 {lat['p95']} ms",
        ]
    lines += ["", f"  {result.elapsed_s:.2f} s, {rate:.1f} sagas/s; data in {result.data_dir}"]
    return "\n".join(lines)


def stderr_progress() -> TextIO | None:
    """stderr when it is a terminal (a progress bar makes no sense in a log file)."""
    return sys.stderr if sys.stderr.isatty() or os.environ.get("SAGAKIT_PROGRESS") == "1" else None
