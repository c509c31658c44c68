"""``sagakit simulate --app``: any app under the deterministic simulator.

The apps of ``sim_apps`` (beside this file) are small on purpose: a correct one, and the
same code with a bug planted by a flag; the simulator must pass the first and catch
each bug with the invariant it breaks. The checkout and the guide's travel app run
through the same path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sim_apps

from sagakit.testing.sim.runner import replay_seed, run_seeds, run_seeds_async

HERE = Path(__file__).parent
TRAVEL = HERE.parent.parent / "examples" / "travel"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(TRAVEL)])}
if str(TRAVEL) not in sys.path:
    sys.path.append(str(TRAVEL))  # the guide's travel app, as `--app travel.app:app` finds it
SIMULATED_FAULTS = pytest.mark.fault(
    "F-CRASH-BEFORE-COMMIT",
    "F-PUBLISH-LOST",
    "F-ACK-LOST",
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sagakit", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=ENV,
    )


@SIMULATED_FAULTS
async def test_an_app_keeps_every_invariant_under_faults() -> None:
    summary = await run_seeds_async(range(80), app=sim_apps.app)
    assert summary.ok, [(r.seed, r.verdict.violations[:3]) for r in summary.failing[:3]]
    assert summary.sagas == 240
    # Its own invariants ran (a sale without a receipt would fail: the job ran on the
    # virtual clock), and what the histories show was exercised, faults included.
    assert summary.outcomes["SUCCEEDED"] > 0 and summary.outcomes["COMPENSATED"] > 0
    assert summary.exercised["compensation"] > 0
    assert summary.exercised["stale_reply"] > 0
    assert {"drop", "duplicate", "crash_before_commit", "partition"} <= set(summary.faults)


@pytest.mark.parametrize(
    ("bug", "found"),
    [
        ("double_refund", "app_watch: at step"),  # caught the moment it happens
        ("negative", "is negative"),
        ("no_receipts", "has no receipt"),  # caught at the end, from the ledger
    ],
)
async def test_each_planted_bug_is_caught_and_shrunk(bug: str, found: str) -> None:
    summary = await run_seeds_async(range(40), app=getattr(sim_apps, bug))
    assert not summary.ok
    violations = [v for r in summary.failing for v in r.verdict.violations]
    assert any(found in v for v in violations), violations[:5]
    shrunk = summary.shrunk
    assert shrunk is not None
    assert shrunk.faults_after <= shrunk.faults_before


async def test_the_watch_reports_the_step_a_violation_first_shows() -> None:
    summary = await run_seeds_async(range(10), app=sim_apps.double_refund, shrink_first=False)
    first = summary.failing[0]
    watched = [v for v in first.verdict.violations if v.startswith("app_watch:")]
    assert watched
    step = int(watched[0].split("at step ")[1].split(":")[0])
    assert 0 < step <= len(first.schedule)


def test_a_seed_of_an_app_replays_exactly() -> None:
    one = replay_seed(7, app="sim_apps:app")[1]
    two = replay_seed(7, app="sim_apps:app")[1]
    assert one.fingerprint and one.fingerprint == two.fingerprint
    assert [a.to_json() for a in one.schedule] == [a.to_json() for a in two.schedule]


def test_cli_simulate_app_json_and_exit_status() -> None:
    good = _cli("--app", "sim_apps:app", "--seeds", "30", "--json", "--jobs", "2")
    assert good.returncode == 0, good.stderr
    out = json.loads(good.stdout)
    assert list(out)[:6] == [
        "seeds",
        "sagas",
        "faults_injected",
        "exercised",
        "violations",
        "failing_seeds",
    ]
    assert out["app"] == "sim_apps:app"
    assert out["violations"] == 0 and out["sagas"] == 90

    bad = _cli("--app", "sim_apps:double_refund", "--seeds", "10", "--json")
    assert bad.returncode == 1
    out = json.loads(bad.stdout)
    assert out["violations"] > 0 and out["failing_seeds"]
    assert out["shrunk"]["seed"] in out["failing_seeds"]

    replay = _cli("--app", "sim_apps:double_refund", "--replay", str(out["shrunk"]["seed"]))
    assert replay.returncode == 1
    assert "FAILED" in replay.stdout and "app_watch" in replay.stdout
    assert f"--app sim_apps:double_refund --replay {out['shrunk']['seed']}" in replay.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--app", "sim_apps:app", "--mode", "hybrid"], "--mode is for the checkout"),
        (["--app", "sim_apps:nowhere"], "has no attribute"),
        (["--app", "no_such_module:app"], "no module named"),
        (["--app", "sim_apps:app", "--orders", "0"], "--orders >= 1"),
    ],
)
def test_cli_simulate_app_refuses_bad_input(args: list[str], message: str) -> None:
    proc = _cli(*args, "--seeds", "1")
    assert proc.returncode == 2
    assert message in proc.stderr


def test_an_app_without_a_load_driver_is_refused(tmp_path: Path) -> None:
    (tmp_path / "loadless.py").write_text(
        "from sagakit import App\napp = App('loadless', [])\n", encoding="utf-8"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "sagakit", "simulate", "--app", "loadless:app"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**ENV, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 2
    assert "ships no load driver" in proc.stderr


@SIMULATED_FAULTS
@pytest.mark.parametrize("spec", ["sagakit_checkout:app", "travel.app:app"])
def test_the_checkout_and_the_guides_app_run_through_the_same_path(spec: str) -> None:
    summary = run_seeds(range(60), app=spec, jobs=2)
    assert summary.ok, [(r.seed, r.verdict.violations[:3]) for r in summary.failing[:3]]
    assert summary.sagas == 180
    assert summary.exercised["compensation"] > 0


def test_check_explores_each_definition_of_an_app_with_its_load_data() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sagakit", "check", "--app", "sim_apps:app", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["complete"] and report["violations"] == []
    assert report["states"] > 1000
    both = subprocess.run(
        [sys.executable, "-m", "sagakit", "check", "checkout", "--app", "sim_apps:app"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=ENV,
    )
    assert both.returncode == 2 and "not both" in both.stderr
