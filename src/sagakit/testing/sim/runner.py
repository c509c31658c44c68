"""Many seeds of the checkout (in one of its modes) or of any app (``--app``), on one or
more processes: what ``sagakit simulate`` runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagakit.app import App
from sagakit.testing.coverage import KINDS, render_exercised
from sagakit.testing.sim import checkout as _checkout
from sagakit.testing.sim.checkout import checkout_world
from sagakit.testing.sim.scheduler import RunResult, SimConfig, WorldFactory, simulate
from sagakit.testing.sim.shrink import Shrunk, shrink

CHOREOGRAPHY_NOTE = (
    ": the tracker's views; no orchestrator runs, so only the manual escalations its "
    "SLA check makes can show"
)


@dataclass
class SimSummary:
    """What ``sagakit simulate`` reports."""

    seeds: int
    orders: int
    budget: int
    sagas: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    exercised: Counter[str] = field(default_factory=Counter)
    """Kinds of transition the sagas' histories show (:mod:`sagakit.testing.coverage`),
    summed over the seeds."""
    failing: list[RunResult] = field(default_factory=list)
    shrunk: Shrunk | None = None
    elapsed_s: float = 0.0
    first_seed: int = 0
    mode: str = "orchestration"
    app: str | None = None
    """The app simulated (``module:attribute``), None for the checkout in ``mode``."""

    @property
    def ok(self) -> bool:
        """True when no seed failed."""
        return not self.failing

    def add(self, other: SimSummary) -> None:
        """Fold another (partial) summary into this one."""
        self.sagas += other.sagas
        self.faults.update(other.faults)
        self.outcomes.update(other.outcomes)
        self.exercised.update(other.exercised)
        self.failing.extend(other.failing)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object."""
        out: dict[str, Any] = {
            "seeds": self.seeds,
            "sagas": self.sagas,
            "faults_injected": dict(sorted(self.faults.items())),
            "exercised": {k: self.exercised.get(k, 0) for k in KINDS}
            | {k: v for k, v in sorted(self.exercised.items()) if k not in KINDS},
            "violations": len(self.failing),
            "failing_seeds": [r.seed for r in self.failing],
        }
        if self.app is not None:
            out["app"] = self.app
        if self.shrunk is not None:
            out["shrunk"] = self.shrunk.to_json()
        return out


class _Factory:
    """The world factory of one run: the checkout in a mode, or an app by its spec."""

    def __init__(self, orders: int, mode: str, app: str | App | None) -> None:
        self.factory: Any
        if app is None:
            self.factory = checkout_world(orders, mode)
        else:
            from sagakit.app import load_app
            from sagakit.testing.sim.app_world import AppWorlds

            self.factory = AppWorlds(load_app(app) if isinstance(app, str) else app, orders)

    @property
    def worlds(self) -> WorldFactory:
        factory: WorldFactory = self.factory
        return factory

    async def aclose(self) -> None:
        await self.factory.aclose()


async def run_seeds_async(
    seeds: Sequence[int],
    *,
    orders: int = 3,
    faults: int = 8,
    shrink_first: bool = True,
    mode: str = "orchestration",
    app: str | App | None = None,
) -> SimSummary:
    """Simulate every seed in this process, one after the other; shrink the first failure.

    ``app``: an app's ``module:attribute``, or the :class:`~sagakit.app.App` itself."""
    made = _Factory(orders, mode, app)
    factory = made.worlds
    config = SimConfig(budget=faults)
    summary = SimSummary(seeds=len(seeds), orders=orders, budget=faults, mode=mode, app=_shown(app))
    started = time.monotonic()
    try:
        for seed in seeds:
            result = await simulate(factory, seed, config=config)
            summary.sagas += result.sagas
            summary.faults.update(result.faults)
            summary.outcomes.update(result.verdict.outcomes)
            summary.exercised.update(result.verdict.exercised)
            if not result.ok:
                summary.failing.append(result)
        if summary.failing and shrink_first:
            summary.shrunk = await shrink(factory, summary.failing[0], config=config)
    finally:
        await made.aclose()
    summary.elapsed_s = time.monotonic() - started
    return summary


def _shown(app: str | App | None) -> str | None:
    return app if app is None or isinstance(app, str) else f"<app {app.name}>"


def _chunk(args: tuple[str | None, list[int], int, int, str, str | None]) -> SimSummary:
    template, seeds, orders, faults, mode, app = args
    if template is not None:
        _checkout.use_template(Path(template), mode)
    return asyncio.run(
        run_seeds_async(seeds, orders=orders, faults=faults, shrink_first=False, mode=mode, app=app)
    )


def run_seeds(
    seeds: Sequence[int],
    *,
    orders: int = 3,
    faults: int = 8,
    jobs: int = 1,
    shrink_first: bool = True,
    mode: str = "orchestration",
    app: str | None = None,
) -> SimSummary:
    """Simulate ``seeds`` of the checkout in ``mode`` (or of the app ``app``,
    ``module:attribute``) on ``jobs`` processes; shrink the first failing seed.

    Every seed runs alone and sequentially inside its process, so the result of a seed
    does not depend on ``jobs``. Call from synchronous code (it runs its own event loops).
    """
    seeds = list(seeds)
    jobs = max(1, min(jobs, len(seeds) // 20 or 1))
    if "fork" not in multiprocessing.get_all_start_methods():
        jobs = 1  # the workers rely on inheriting the parent's modules and template
    if jobs == 1:
        summary = asyncio.run(
            run_seeds_async(
                seeds, orders=orders, faults=faults, shrink_first=shrink_first, mode=mode, app=app
            )
        )
        summary.first_seed = seeds[0] if seeds else 0
        return summary
    started = time.monotonic()
    template = None if app is not None else str(asyncio.run(_checkout.template_dir(mode)))
    size = max(10, min(100, len(seeds) // (jobs * 4) or 1))
    chunks = [
        (template, seeds[i : i + size], orders, faults, mode, app)
        for i in range(0, len(seeds), size)
    ]
    summary = SimSummary(seeds=len(seeds), orders=orders, budget=faults, mode=mode, app=app)
    summary.first_seed = seeds[0]
    # fork: the workers inherit the imported modules and the template; each runs its own
    # event loop over whole seeds, so a seed's run is the same as in a single process.
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        for part in pool.map(_chunk, chunks):
            summary.add(part)
    if summary.failing and shrink_first:
        summary.shrunk = asyncio.run(_shrink(summary.failing[0], orders, faults, mode, app))
    summary.elapsed_s = time.monotonic() - started
    return summary


async def _shrink(
    failing: RunResult, orders: int, faults: int, mode: str, app: str | None
) -> Shrunk:
    made = _Factory(orders, mode, app)
    try:
        return await shrink(made.worlds, failing, config=SimConfig(budget=faults))
    finally:
        await made.aclose()


def render(summary: SimSummary) -> str:
    """The human-readable summary of a multi-seed run."""
    last = summary.first_seed + summary.seeds - 1
    rate = summary.seeds / summary.elapsed_s if summary.elapsed_s else 0.0
    what = f"--app {summary.app}" if summary.app else f"--mode {summary.mode}"
    unit = "sagas" if summary.app else "orders"
    lines = [
        f"sagakit simulate {what}: {summary.seeds} seeds "
        f"({summary.first_seed}..{last}), {summary.orders} {unit} each, "
        f"fault budget {summary.budget}",
        "",
        f"  sagas       {summary.sagas}  ("
        + ", ".join(f"{k} {v}" for k, v in sorted(summary.outcomes.items()))
        + ")",
        "  faults      "
        + (", ".join(f"{k}={v}" for k, v in sorted(summary.faults.items())) or "none"),
        f"  violations  {len(summary.failing)} failing seed(s)",
        "",
        "  exercised (kinds of transition in the sagas' histories)"
        + (CHOREOGRAPHY_NOTE if summary.mode == "choreography" else ""),
        *render_exercised(summary.exercised, indent="    "),
    ]
    for r in summary.failing[:5]:
        lines.append(f"  ! seed {r.seed}: " + "; ".join(r.verdict.violations[:3]))
    if len(summary.failing) > 5:
        lines.append(f"  ! ... and {len(summary.failing) - 5} more failing seeds")
    if summary.shrunk is not None:
        sh = summary.shrunk
        lines += [
            "",
            f"  seed {sh.seed} shrunk from {sh.faults_before} to {sh.faults_after} faults "
            f"({len(sh.schedule)} actions, {sh.replays} replays); it violates "
            + ", ".join(sh.invariants),
        ]
        lines += [f"    {a.to_json()}" for a in sh.schedule if a.fault] or ["    (no fault)"]
        lines.append(
            f"  replay: sagakit simulate {what} --replay {sh.seed} "
            f"--orders {summary.orders} --faults {summary.budget}"
        )
    lines += ["", f"  {summary.elapsed_s:.1f} s, {rate:.1f} seeds/s"]
    return "\n".join(lines)


def replay_seed(
    seed: int,
    *,
    orders: int = 3,
    faults: int = 8,
    mode: str = "orchestration",
    app: str | None = None,
) -> tuple[SimSummary, RunResult]:
    """Run one seed again (exactly as in a multi-seed run); shrink it if it fails."""
    config = SimConfig(budget=faults, fingerprint=True)

    async def go() -> tuple[SimSummary, RunResult]:
        made = _Factory(orders, mode, app)
        try:
            return await attempt(made.worlds)
        finally:
            await made.aclose()

    async def attempt(factory: WorldFactory) -> tuple[SimSummary, RunResult]:
        started = time.monotonic()
        result = await simulate(factory, seed, config=config)
        summary = SimSummary(
            seeds=1, orders=orders, budget=faults, first_seed=seed, mode=mode, app=app
        )
        summary.sagas = result.sagas
        summary.faults.update(result.faults)
        summary.outcomes.update(result.verdict.outcomes)
        summary.exercised.update(result.verdict.exercised)
        if not result.ok:
            summary.failing.append(result)
            summary.shrunk = await shrink(factory, result, config=config)
        summary.elapsed_s = time.monotonic() - started
        return summary, result

    return asyncio.run(go())


def render_replay(summary: SimSummary, result: RunResult) -> str:
    """The human-readable account of one seed: its schedule, then the summary."""
    lines = [f"seed {result.seed}: {len(result.schedule)} actions, {result.fault_count()} faults"]
    lines += [f"  {i:4d} {a.to_json()}" for i, a in enumerate(result.schedule)]
    lines += ["", "  " + ("ok" if result.ok else "FAILED")]
    lines += [f"  ! {v}" for v in result.verdict.violations]
    lines += [f"  - {n}" for n in result.verdict.notes]
    return "\n".join(lines) + "\n\n" + render(summary)
