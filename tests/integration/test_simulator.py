"""The deterministic simulator: the real checkout under a seeded scheduler.

* a seed determines its run: same schedule, same outcome, and a schedule replays it;
* a few hundred seeds keep every invariant while every fault kind is injected;
* a planted bug in the participant runtime is caught, reported, replayed and shrunk;
* ``sagakit simulate --json`` prints the documented object.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from sagakit.core.envelope import Envelope, Outcome
from sagakit.runtime.participant import Handler, Participant
from sagakit.stores.base import Tx
from sagakit.stores.sqlite import SQLiteTx
from sagakit.testing.sim import (
    FAULT_KINDS,
    Action,
    RunResult,
    SimConfig,
    replay,
    shrink,
    simulate,
)
from sagakit.testing.sim.checkout import CheckoutWorlds, checkout_world
from sagakit.testing.sim.runner import run_seeds, run_seeds_async

JOBS = min(os.cpu_count() or 1, 4)
FINGERPRINT = SimConfig(fingerprint=True)


@pytest.fixture
def worlds() -> Iterator[CheckoutWorlds]:
    factory = checkout_world(3)
    yield factory
    # The test's event loop is gone; closing the idle stores needs no loop of its own.
    asyncio.run(factory.aclose())


def _bypass_idempotency(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted bug 1: the participant runtime forgets its idempotency records.

    Every keyed command runs its handler as if it were new and nothing is recorded: no
    stored outcome answers a retry, no tombstone stops an action that arrives after its
    compensation. (The checkout's handlers look at their own ledgers first, so most
    repeats change nothing there; an action after its undo does.)
    """

    async def handle_keyed(
        self: Participant, handler: Handler, tx: Tx, env: Envelope, now: float
    ) -> Outcome:
        return await self._call(handler, tx, env)

    monkeypatch.setattr(Participant, "_handle_keyed", handle_keyed)


def _lookup_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted bug 2: the idempotency lookup always misses (records are still written)."""

    async def idempotency_get(self: SQLiteTx, consumer: str, key: str) -> None:
        return None

    monkeypatch.setattr(SQLiteTx, "idempotency_get", idempotency_get)


PLANTED = {
    # bug -> the invariants it must break
    "bypass_idempotency": (_bypass_idempotency, {"effect_once", "money", "stock"}),
    "lookup_misses": (_lookup_misses, {"dead_letters", "effect_once", "money", "stock"}),
}


async def test_a_seed_replays_exactly(worlds: CheckoutWorlds) -> None:
    first = await simulate(worlds, 11, config=FINGERPRINT)
    again = await simulate(worlds, 11, config=FINGERPRINT)
    assert first.schedule == again.schedule
    assert first.fingerprint == again.fingerprint
    assert first.verdict.violations == again.verdict.violations
    assert first.faults == again.faults
    assert first.fault_count() > 0

    # From the schedule instead of the seed, on freshly opened stores: the same run.
    fresh = checkout_world(3)
    try:
        replayed = await replay(fresh, 11, first.schedule, config=FINGERPRINT)
    finally:
        await fresh.aclose()
    assert replayed.schedule == first.schedule
    assert replayed.applied == first.schedule
    assert replayed.fingerprint == first.fingerprint

    # The schedule survives JSON (the form a failing seed is reported in).
    wire = json.loads(json.dumps([a.to_json() for a in first.schedule]))
    assert [Action.from_json(a) for a in wire] == first.schedule

    # Another seed is another run.
    other = await simulate(worlds, 12, config=FINGERPRINT)
    assert other.schedule != first.schedule


def test_seeds_keep_every_invariant_under_every_fault_kind() -> None:
    summary = run_seeds(range(300), orders=3, faults=8, jobs=JOBS)
    assert summary.ok, [(r.seed, r.verdict.violations) for r in summary.failing[:5]]
    assert summary.to_json()["violations"] == 0
    assert summary.sagas == 900
    missing = [k for k in FAULT_KINDS if summary.faults[k] == 0]
    assert not missing, f"never injected: {missing} ({dict(summary.faults)})"
    assert summary.faults["reorder"] > 0
    # The sagas end in every way the checkout can end, not only happily.
    assert {"SUCCEEDED", "COMPENSATED"} <= set(summary.outcomes)


@pytest.mark.parametrize("bug", sorted(PLANTED))
async def test_planted_bug_is_caught_reported_replayed_and_shrunk(
    bug: str, monkeypatch: pytest.MonkeyPatch, worlds: CheckoutWorlds
) -> None:
    plant, breaks = PLANTED[bug]
    plant(monkeypatch)
    failing: RunResult | None = None
    for seed in range(100):
        result = await simulate(worlds, seed)
        if not result.ok:
            failing = result
            break
    assert failing is not None, f"planted bug {bug} went unnoticed in 100 seeds"
    assert failing.failed_invariants & breaks, failing.verdict.violations

    # Reported: the multi-seed runner lists the seed.
    summary = await run_seeds_async([failing.seed], orders=3, faults=8, shrink_first=False)
    report = summary.to_json()
    assert report["failing_seeds"] == [failing.seed]
    assert report["violations"] == 1

    # Replayed: the seed fails the same way again, and so does its schedule.
    again = await simulate(worlds, failing.seed)
    assert again.schedule == failing.schedule
    assert again.verdict.violations == failing.verdict.violations
    replayed = await replay(worlds, failing.seed, failing.schedule)
    assert replayed.verdict.violations == failing.verdict.violations

    # Shrunk: no more faults than the original, and the minimal schedule still fails.
    shrunk = await shrink(worlds, failing, max_replays=40)
    assert shrunk.faults_after <= shrunk.faults_before == failing.fault_count()
    assert set(shrunk.invariants) & breaks
    minimal = await replay(worlds, failing.seed, shrunk.schedule)
    assert minimal.failed_invariants & set(shrunk.invariants)
    assert minimal.fault_count() == shrunk.faults_after
    assert minimal.schedule[: len(shrunk.schedule)] == shrunk.schedule

    # The bug, not the simulator, is to blame: with the real participant runtime the
    # same seed (same faults, same order of events) keeps every invariant.
    monkeypatch.undo()
    fixed = await simulate(worlds, failing.seed)
    assert fixed.ok, fixed.verdict.violations


def test_cli_simulate_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sagakit.cli", "simulate", "--seeds", "50", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert list(out) == ["seeds", "sagas", "faults_injected", "violations", "failing_seeds"]
    assert out["seeds"] == 50
    assert out["sagas"] == 150
    assert out["violations"] == 0
    assert out["failing_seeds"] == []
    assert all(isinstance(v, int) and v > 0 for v in out["faults_injected"].values())
    assert set(FAULT_KINDS) & set(out["faults_injected"])


def test_a_replay_in_another_process_is_the_same_run() -> None:
    # Another interpreter, another hash seed: the same schedule, the same outcome.
    outs = []
    for hash_seed in ("1", "2"):
        proc = subprocess.run(
            [sys.executable, "-m", "sagakit.cli", "simulate", "--replay", "7", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout))
    assert outs[0] == outs[1]
    assert outs[0]["replay"]["fingerprint"]
    assert len(outs[0]["replay"]["schedule"]) > 20


def test_the_engine_does_not_import_the_examples() -> None:
    code = (
        "import sys, sagakit.testing.sim.runner, sagakit.cli; "
        "assert 'sagakit_checkout' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
def test_two_thousand_seeds() -> None:
    started = time.monotonic()
    summary = run_seeds(range(2000), orders=3, faults=8, jobs=JOBS)
    elapsed = time.monotonic() - started
    assert summary.ok, [(r.seed, r.verdict.violations) for r in summary.failing[:5]]
    assert summary.sagas == 6000
    print(f"2000 seeds in {elapsed:.1f} s ({2000 / elapsed:.1f} seeds/s, {JOBS} jobs)")
