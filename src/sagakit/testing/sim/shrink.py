"""Shrinking a failing schedule to a minimal one (delta debugging over its faults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sagakit.testing.sim.scheduler import Action, RunResult, SimConfig, WorldFactory, replay


@dataclass
class Shrunk:
    """A minimal failing schedule found by :func:`shrink`."""

    seed: int
    schedule: list[Action]
    invariants: list[str]
    faults_before: int
    faults_after: int
    replays: int
    violations: list[str]

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly summary (the schedule as lists)."""
        return {
            "seed": self.seed,
            "invariants": self.invariants,
            "faults_before": self.faults_before,
            "faults_after": self.faults_after,
            "replays": self.replays,
            "schedule": [a.to_json() for a in self.schedule],
            "violations": self.violations,
        }


async def shrink(
    factory: WorldFactory,
    failing: RunResult,
    *,
    config: SimConfig | None = None,
    max_replays: int = 120,
) -> Shrunk:
    """Remove faults (then other actions) from a failing run's schedule while it fails.

    Delta debugging: the schedule is first cut after its last fault (fair mode finishes
    the run), then chunks of faults are removed (halves, quarters, ... single faults)
    and kept out whenever the replay still violates one of the invariants the original
    violated, with no more faults than before (without a delay, say, the timers that
    fired while it held a message back become timeouts: faults too); finally the same
    is tried on the remaining non-fault actions. Returns the smallest failing schedule
    found within ``max_replays`` replays, as the actions that applied in its replay.
    """
    target = failing.failed_invariants
    replays = 0
    best = failing

    async def fails(candidate: list[Action]) -> RunResult | None:
        nonlocal replays
        replays += 1
        result = await replay(factory, failing.seed, candidate, config=config)
        if result.failed_invariants & target and result.fault_count() <= best.fault_count():
            return result
        return None

    current = list(failing.schedule)
    last_fault = max((i for i, a in enumerate(current) if a.fault), default=-1)
    if last_fault + 1 < len(current):
        found = await fails(current[: last_fault + 1])
        if found is not None:
            current, best = found.applied, found

    for want_fault in (True, False):
        n = 2
        while replays < max_replays:
            idx = [i for i, a in enumerate(current) if a.fault is want_fault]
            if not idx:
                break
            n = min(n, len(idx))
            size = -(-len(idx) // n)
            chunks = [set(idx[k : k + size]) for k in range(0, len(idx), size)]
            for chunk in chunks:
                if replays >= max_replays:
                    break
                found = await fails([a for i, a in enumerate(current) if i not in chunk])
                if found is not None:
                    current, best = found.applied, found
                    n = max(n - 1, 2)
                    break
            else:
                if n >= len(idx):
                    break
                n = min(2 * n, len(idx))
    return Shrunk(
        seed=failing.seed,
        schedule=current,
        invariants=sorted(best.failed_invariants & target),
        faults_before=failing.fault_count(),
        faults_after=sum(1 for a in current if a.fault),
        replays=replays,
        violations=best.verdict.violations,
    )
