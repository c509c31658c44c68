"""`sagakit demo` as a user runs it: a subprocess, its JSON report and its exit status.

Covers the documented ``--json`` shape under chaos, resuming after ``kill -9`` with
``--data-dir``, the seed fixing the scenario mix, and clear errors for bad input.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

TERMINAL = {"SUCCEEDED", "COMPENSATED", "FAILED_NEEDS_MANUAL", "TIMED_OUT", "PARTIAL_ACCEPTED"}
DOCUMENTED_OUTCOMES = {"SUCCEEDED", "COMPENSATED", "FAILED_NEEDS_MANUAL", "TIMED_OUT"}
INVARIANTS = {"money", "stock", "terminal", "effect_once", "honest_status", "nothing_lost"}


def demo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sagakit.cli", "demo", *args]


def env() -> dict[str, str]:
    """The caller's environment without SAGAKIT_* settings that would change defaults."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    out["PYTHONUNBUFFERED"] = "1"
    return out


def run_demo(*args: str, timeout: float = 90.0) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        demo_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env()
    )
    report: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, report, proc.stderr


def assert_report(report: dict[str, Any], orders: int) -> None:
    """The documented JSON shape, every saga terminal, every invariant holding."""
    required = {
        "orders",
        "mode",
        "outcomes",
        "invariants",
        "violations",
        "elapsed_s",
        "sagas_per_s",
    }
    assert required <= set(report), sorted(required - set(report))
    assert report["orders"] == orders
    assert report["mode"] == "orchestration"
    outcomes = report["outcomes"]
    assert set(outcomes) >= DOCUMENTED_OUTCOMES, outcomes
    assert set(outcomes) <= TERMINAL, f"non-terminal sagas reported: {outcomes}"
    assert all(isinstance(v, int) and v >= 0 for v in outcomes.values())
    assert sum(outcomes.values()) == orders
    assert set(report["invariants"]) == INVARIANTS
    assert all(v is True for v in report["invariants"].values()), report["invariants"]
    assert report["violations"] == []
    assert isinstance(report["elapsed_s"], float) and report["elapsed_s"] > 0
    assert isinstance(report["sagas_per_s"], float) and report["sagas_per_s"] > 0
    assert abs(report["sagas_per_s"] - orders / report["elapsed_s"]) < 0.1 + 0.01 * orders


# The demo runs below spend most of their wall time waiting out retry backoffs (a card
# provider that never answers holds its saga for about 24 attempts of up to 2 s each),
# not computing. So the module starts every run it will check at once, when its first
# test begins, and each test then checks its own run: the runs overlap each other and
# the kill -9 test, and the module costs about its longest run instead of their sum.
# Each run keeps the budget it had when it ran alone, counted from its start.


@dataclass
class BackgroundRun:
    """A ``sagakit demo --json`` subprocess started for the test named ``test``."""

    test: str
    args: tuple[str, ...]
    timeout: float
    proc: subprocess.Popen[str] | None = None
    started: float = 0.0
    output: tuple[int, str, str] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            demo_cmd(*self.args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        self.started = time.monotonic()

    def result(self) -> tuple[int, str, str]:
        """(exit status, stdout, stderr), waiting at most ``timeout`` from the start."""
        assert self.proc is not None, f"{self.test} was not selected when the module began"
        if self.output is None:
            left = max(1.0, self.started + self.timeout - time.monotonic())
            out, err = self.proc.communicate(timeout=left)
            self.output = (self.proc.returncode, out, err)
        return self.output

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.communicate()


CHAOS_ARGS = ("--orders", "120", "--faults", "chaos", "--json", "--seed", "7")
SCENARIO_SEEDS = (11, 11, 12)


def _background_runs() -> dict[str, BackgroundRun]:
    chaos = "test_chaos_run_reports_the_documented_json_and_exits_zero"
    mix = "test_same_seed_gives_the_same_scenario_mix"
    # Some sagas take their full retry budget before a person gets them (a card provider
    # that answers nothing: 12 capture attempts, then 12 status queries), about half a
    # minute without faults and up to about a minute under chaos.
    runs = {"chaos": BackgroundRun(chaos, CHAOS_ARGS, 180)}
    for i, seed in enumerate(SCENARIO_SEEDS):
        args = ("--orders", "50", "--faults", "none", "--json", "--seed", str(seed))
        runs[f"mix-{i}"] = BackgroundRun(mix, args, 120)
    return runs


@pytest.fixture(scope="module", autouse=True)
def background(request: pytest.FixtureRequest) -> Iterator[dict[str, BackgroundRun]]:
    """The background runs of the tests selected in this module, all started now."""
    selected = {
        getattr(item, "originalname", item.name)
        for item in request.session.items
        if getattr(item, "module", None) is request.module
    }
    runs = _background_runs()
    try:
        for run in runs.values():
            if run.test in selected:
                run.start()
        yield runs
    finally:
        for run in runs.values():
            run.stop()


def _progress(db: Path) -> tuple[int, int] | None:
    """(sagas, terminal sagas) read-only from the demo's orchestrator database."""
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)
        try:
            total, done = conn.execute(
                "SELECT count(*), coalesce(sum(state NOT IN ('RUNNING', 'COMPENSATING')), 0) "
                "FROM sagas"
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None  # not created yet, or locked for a moment
    return int(total), int(done)


@pytest.mark.slow
@pytest.mark.fault("F-KILL9")
def test_kill_minus_9_then_rerun_resumes_and_finishes_all(tmp_path: Path) -> None:
    data = tmp_path / "demo-data"
    args = ("--orders", "1000", "--faults", "default", "--seed", "3", "--data-dir", str(data))
    proc = subprocess.Popen(
        demo_cmd(*args, "--json"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env(),
    )
    seen: tuple[int, int] | None = None
    try:
        end = time.monotonic() + 30
        while time.monotonic() < end and proc.poll() is None:
            seen = _progress(data / "orchestrator.db")
            # Kill it mid-flight: some sagas finished, most still running.
            if seen is not None and seen[1] >= 10:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the demo finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    at_kill = _progress(data / "orchestrator.db")
    assert at_kill is not None and at_kill[0] > 0
    assert at_kill[1] < 1000, "every saga was already terminal: nothing left to resume"

    code, report, stderr = run_demo(*args, "--json")
    assert code == 0, stderr
    assert_report(report, 1000)
    assert report["placed_this_run"] < 1000, "the rerun placed every order again"
    assert report["placed_this_run"] > 0, "the kill came after every order was placed"
    assert report["placed_this_run"] == 1000 - at_kill[0]
    assert _progress(data / "orchestrator.db") == (1000, 1000)


@pytest.mark.slow
@pytest.mark.fault(
    "F-CRASH-BEFORE-COMMIT",
    "F-CRASH-AFTER-PUBLISH",
    "F-PUBLISH-LOST",
    "F-ACK-LOST",
    "F-DUPLICATE",
    "F-DELAY",
)
def test_chaos_run_reports_the_documented_json_and_exits_zero(
    background: dict[str, BackgroundRun],
) -> None:
    # The run (CHAOS_ARGS, budget 180 s) was started with the module; see above.
    code, out, stderr = background["chaos"].result()
    assert code == 0, stderr
    report: dict[str, Any] = json.loads(out) if out.strip() else {}
    assert_report(report, 120)
    # Under chaos, faults were actually injected, and both success and compensation occur.
    assert sum(report["faults_injected"].values()) > 0
    assert report["outcomes"]["SUCCEEDED"] > 0 and report["outcomes"]["COMPENSATED"] > 0
    assert report["placed_this_run"] == 120


def test_same_seed_gives_the_same_scenario_mix(background: dict[str, BackgroundRun]) -> None:
    # Three runs (seeds SCENARIO_SEEDS) started with the module; see above.
    reports = []
    for i in range(len(SCENARIO_SEEDS)):
        code, out, err = background[f"mix-{i}"].result()
        assert code == 0, err
        reports.append(json.loads(out))
    a, b, c = reports
    for r in reports:
        assert_report(r, 50)
        assert sum(r["scenarios"].values()) == 50
        assert r["faults_injected"] == {}
    assert a["scenarios"] == b["scenarios"]
    assert a["scenarios"] != c["scenarios"]


@pytest.mark.parametrize("orders", ["0", "-3"])
def test_too_few_orders_exit_2_with_a_clear_message(orders: str) -> None:
    proc = subprocess.run(
        demo_cmd("--orders", orders, "--json"),
        capture_output=True,
        text=True,
        env=env(),
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "--orders must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--faults", "hurricane"], "invalid choice: 'hurricane'"),
        (["--orders", "many"], "invalid int value: 'many'"),
    ],
)
def test_bad_arguments_are_rejected_by_argparse(args: list[str], complaint: str) -> None:
    proc = subprocess.run(demo_cmd(*args), capture_output=True, text=True, env=env(), timeout=30)
    assert proc.returncode == 2
    assert complaint in proc.stderr
    assert "usage: sagakit demo" in proc.stderr
    assert "Traceback" not in proc.stderr
