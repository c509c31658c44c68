"""``sagakit demo --app``: run an app's load under faults and check its invariants.

The app ships a load driver (``App(load=...)``: the sagas to start for a count and a
seed), optionally a ``setup`` (reference data) and ``invariants`` (checks of its own
ledgers). The demo runs every role of the app in one process, on SQLite files by
default (or ``--store``/``--broker``), injects the named fault profile, starts the
sagas, waits until every one is terminal, lets the outboxes drain, and reports the
outcomes, the open dead letters and the broken invariants. An app with its own demo
(``App(demo=...)``, the reference checkout) replaces all of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from sagakit.app import App
from sagakit.core.instance import SagaState
from sagakit.deployment import Deployment
from sagakit.errors import ConfigurationError
from sagakit.runtime.engine import Engine
from sagakit.runtime.lockfile import data_dir_lock, private_dir
from sagakit.stores.base import SagaQuery
from sagakit.transports.base import Backlog, backlog_of

WAVE = 100
"""Sagas started per transaction."""


@dataclass(frozen=True, slots=True)
class DemoRequest:
    """What ``sagakit demo`` was asked to do (the command line, parsed)."""

    orders: int = 200
    faults: str = "default"
    seed: int = 0
    data_dir: Path | None = None
    synchronous: str = "FULL"
    timeout: float = 600.0
    store_url: str | None = None
    broker_url: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    progress: TextIO | None = None


class DemoOutcome(Protocol):
    """What a demo run reports: ``sagakit demo`` prints it and exits 1 unless ``ok``."""

    @property
    def ok(self) -> bool:
        """True when every saga ended and every invariant holds."""
        ...

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` report."""
        ...

    def render(self) -> str:
        """The report for a terminal."""
        ...


@dataclass(slots=True)
class AppDemoResult:
    """The generic demo's report."""

    app: str
    sagas: int
    outcomes: dict[str, int]
    broken: list[str]
    """The app's own invariants broken at the end of the run."""
    dead_letters: int
    elapsed_s: float
    seed: int
    faults_injected: dict[str, int]
    data_dir: str
    watched: list[str] = field(default_factory=list)
    """Violations of the app's ``watch`` seen while the run went on."""
    backlog: Backlog | None = None
    """What the broker still held at the end (None: the embedded transport)."""

    @property
    def invariants(self) -> dict[str, bool]:
        """Each check of the run and whether it held: every saga ``terminal``, no
        ``dead_letters``, the app's own invariants (``app``) and its ``watch``."""
        running = sum(self.outcomes.get(s.value, 0) for s in SagaState if not s.terminal)
        return {
            "terminal": running == 0 and sum(self.outcomes.values()) == self.sagas,
            "dead_letters": self.dead_letters == 0,
            "app": not self.broken,
            "watch": not self.watched,
        }

    @property
    def violations(self) -> list[str]:
        """Every broken invariant: the app's own, then its watch's ("at some moment")."""
        return self.broken + [f"at some moment: {v}" for v in self.watched]

    @property
    def ok(self) -> bool:
        """Every saga terminal, no dead letter, and no invariant broken."""
        return all(self.invariants.values())

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` report: the checkout demo's fields that every app has (``orders``
        counts the sagas), and the app's name, open dead letters and verdict."""
        return {
            "app": self.app,
            "orders": self.sagas,
            "sagas": self.sagas,
            "outcomes": self.outcomes,
            "invariants": self.invariants,
            "violations": self.violations,
            "in_broker": _held(self.backlog),
            "open_dead_letters": self.dead_letters,
            "elapsed_s": round(self.elapsed_s, 3),
            "sagas_per_s": round(self.sagas / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "seed": self.seed,
            "faults_injected": self.faults_injected,
            "data_dir": self.data_dir,
            "ok": self.ok,
        }

    def render(self) -> str:
        """A short report for a terminal."""
        lines = [
            f"sagakit demo --app {self.app}: {self.sagas} sagas in {self.elapsed_s:.1f}s "
            f"(seed {self.seed}, data in {self.data_dir})",
            "  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()) if v),
            f"  open dead letters: {self.dead_letters}",
        ]
        if self.faults_injected:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(self.faults_injected.items()))
            lines.append(f"  faults injected: {shown}")
        if self.dead_letters:
            lines.append("  DEAD LETTERS: a message of the run could not be handled")
        if self.violations:
            lines.append(f"  {len(self.violations)} INVARIANT(S) BROKEN:")
            lines += [f"    - {v}" for v in self.violations]
        else:
            lines.append("  invariants: all hold")
        lines.append("  OK" if self.ok else "  FAILED")
        return "\n".join(lines)


def _held(backlog: Backlog | None) -> dict[str, Any] | None:
    """What the broker held at the end, per endpoint (None without a broker)."""
    if backlog is None:
        return None
    return {
        "total": backlog.total,
        "held": {e.endpoint: e.total for e in backlog.endpoints if e.total},
        "complete": backlog.complete,
    }


async def run_app_demo(app: App, req: DemoRequest) -> DemoOutcome:
    """Run ``app``'s demo as ``req`` says (its own demo if it ships one)."""
    if req.orders < 1:
        raise ConfigurationError("--orders must be at least 1")
    if app.demo is not None:
        outcome: DemoOutcome = await app.demo(app, req)
        return outcome
    return await run_generic_demo(app, req)


async def run_generic_demo(app: App, req: DemoRequest) -> AppDemoResult:
    """The generic demo of ``app`` (see the module docstring), whatever ``app.demo``
    says: for an app's own demo that only adjusts the request (e.g. a time scale of
    its own for the real clock) and then runs this."""
    if req.orders < 1:
        raise ConfigurationError("--orders must be at least 1")
    if app.load is None:
        raise ConfigurationError(
            f"app {app.name!r} ships no load driver: give it App(load=...) to run "
            "`sagakit demo --app` (or run its processes with your own traffic)"
        )
    if (req.store_url is None) != (req.broker_url is None):
        raise ConfigurationError("--store and --broker go together")
    keep = req.data_dir is not None
    # sqlite:///DIR names an absolute path: a relative --data-dir is resolved here.
    base = (req.data_dir or Path(tempfile.mkdtemp(prefix=f"sagakit-{app.name}-"))).resolve()
    private_dir(base)  # 0700: databases and logs are the owner's
    try:
        with data_dir_lock(base):
            return await _run(app, req, base)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


async def _run(app: App, req: DemoRequest, base: Path) -> AppDemoResult:
    from sagakit.testing.faults import Faults

    assert app.load is not None
    store_url = req.store_url or f"sqlite:///{base}?synchronous={req.synchronous}"
    dep = Deployment(app, store_url, req.broker_url, options=req.options, data_dir=base)
    faults = Faults.named(req.faults, req.seed)
    requests = list(app.load(req.orders, req.seed))
    if not requests:
        raise ConfigurationError(f"app {app.name!r}: its load driver returned no sagas")
    started = time.monotonic()
    engine = dep.everything(faults=faults)
    async with engine:
        if app.setup is not None:
            await app.setup(dep)
        watched: list[str] = []
        watcher = asyncio.create_task(_watch(app, dep, watched)) if app.watch else None
        try:
            ids: list[str] = []
            for i in range(0, len(requests), WAVE):
                started_now = await engine.start_many(requests[i : i + WAVE])
                ids += [inst.saga_id for inst in started_now]
            await _wait_terminal(engine, ids, req, started)
            backlog = await drain(engine)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        elapsed = time.monotonic() - started
        broken = list(await app.invariants(dep)) if app.invariants is not None else []
        if app.watch is not None:
            watched += [v for v in await app.watch(dep) if v not in watched]
        outcomes: Counter[str] = Counter()
        for i in range(0, len(ids), 500):
            page = await engine.store.find_sagas(
                SagaQuery(saga_ids=tuple(ids[i : i + 500])), limit=500
            )
            outcomes.update(inst.state.value for inst in page.items)
        dead = 0
        for store in engine.stores:
            dead += await store.dead_letter_count()
    return AppDemoResult(
        app=app.name,
        sagas=len(ids),
        outcomes=dict(outcomes),
        broken=broken,
        dead_letters=dead,
        elapsed_s=elapsed,
        seed=req.seed,
        faults_injected=dict(sorted(faults.counts.items())),
        data_dir=str(base),
        watched=watched,
        backlog=backlog,
    )


WATCH_EVERY = 0.2
"""Seconds between two checks of an app's :data:`~sagakit.app.Watch` during a demo."""


async def _watch(app: App, dep: Deployment, found: list[str]) -> None:
    """Check ``app.watch`` every :data:`WATCH_EVERY` seconds until cancelled; keep each
    distinct violation once, in the order seen."""
    assert app.watch is not None
    while True:
        for v in await app.watch(dep):
            if v not in found:
                found.append(v)
        await asyncio.sleep(WATCH_EVERY)


async def _wait_terminal(engine: Engine, ids: list[str], req: DemoRequest, t0: float) -> None:
    running = (SagaState.RUNNING, SagaState.COMPENSATING)
    deadline = time.monotonic() + req.timeout
    while time.monotonic() < deadline:
        left = 0
        for i in range(0, len(ids), 500):
            page = await engine.store.find_sagas(
                SagaQuery(states=running, saga_ids=tuple(ids[i : i + 500])), limit=1
            )
            left += page.total
        if req.progress is not None:
            req.progress.write(
                f"\r  {len(ids) - left}/{len(ids)} sagas done, {time.monotonic() - t0:.1f}s "
            )
            req.progress.flush()
        if not left:
            break
        await asyncio.sleep(0.1)
    if req.progress is not None:
        req.progress.write("\n")


async def drain(engine: Engine, quiet_for: float = 0.3, limit: float = 30.0) -> Backlog | None:
    """Wait until nothing is in flight for ``quiet_for`` seconds (at most ``limit``): no
    outbox row pending, no message in a mailbox of ``engine``'s stores and, with a broker,
    nothing the broker still holds (waiting, unacknowledged, held for a retry or delayed).

    The last replies and acknowledgements of a run are handed over before its
    invariants are checked. Returns what the broker still holds at the end, with the
    ids it can name (None with the embedded transport): messages there are late, not
    lost, and a check reports them apart.
    """
    end = time.monotonic() + limit
    calm_since: float | None = None
    while True:
        busy = 0
        for s in engine.stores:
            busy += await s.outbox_pending() + await s.queue_depth()
        backlog = await backlog_of(engine.transport, names=False)
        if backlog is not None:
            busy += backlog.total
        if busy:
            calm_since = None
        elif calm_since is None:
            calm_since = time.monotonic()
        elif time.monotonic() - calm_since >= quiet_for:
            break
        if time.monotonic() >= end:
            break
        await asyncio.sleep(0.05)
    return await backlog_of(engine.transport)
