"""`sagakit demo --mode`: the same invariants and report for all three ways to run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sagakit_checkout.demo import render, run_demo

from sagakit.cli import build_parser

MODES = ("orchestration", "choreography", "hybrid")
CHAOS_TEST = "test_300_orders_under_chaos_in_every_mode"
CHAOS_TIMEOUT = 600.0
"""Seconds each 300-order chaos run may take, counted from its start."""


@pytest.fixture(scope="module", autouse=True)
def chaos_runs(
    request: pytest.FixtureRequest,
) -> Iterator[dict[str, tuple[float, subprocess.Popen[str]]]]:
    """The 300-order chaos runs of the modes selected in this module, all started at once
    when the module begins.

    A run spends most of its wall time waiting out retry backoffs rather than computing,
    so the three overlap each other and the in-process runs below: the module costs
    about its longest run instead of their sum. Each test checks its own mode's run.
    """
    modes = [
        item.callspec.params["mode"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        and getattr(item, "originalname", None) == CHAOS_TEST
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    runs: dict[str, tuple[float, subprocess.Popen[str]]] = {}
    try:
        for mode in modes:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sagakit.cli",
                    "demo",
                    "--orders",
                    "300",
                    "--faults",
                    "chaos",
                    "--mode",
                    mode,
                    "--json",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            runs[mode] = (time.monotonic(), proc)
        yield runs
    finally:
        for _, proc in runs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.mark.parametrize("mode", MODES)
async def test_each_mode_keeps_every_invariant_under_faults(mode: str, tmp_path: Path) -> None:
    result = await run_demo(
        orders=60,
        faults="default",
        seed=5,
        data_dir=tmp_path,
        synchronous="NORMAL",
        timeout=120,
        mode=mode,
    )
    report = result.to_json()
    assert result.ok, report["violations"]
    assert report["mode"] == mode
    assert sum(report["outcomes"].values()) == 60 and "RUNNING" not in report["outcomes"]
    assert report["outcomes"]["SUCCEEDED"] > 0 and report["outcomes"]["COMPENSATED"] > 0
    metrics = report["metrics"]
    assert metrics["latency_ms"]["p50"] > 0 and metrics["written_per_order"] > 0
    kinds = set(metrics["messages_written"])
    # Seed 5's mix has cards whose provider never answers a capture: the orchestrator
    # then asks the payment service what became of it (a status query).
    assert (
        kinds
        == {
            "orchestration": {"command", "query", "reply"},
            "choreography": {"event"},
            "hybrid": {"command", "query", "reply", "event"},
        }[mode]
    )
    assert f"60 orders, {mode}" in render(result)


def test_the_demo_command_takes_a_mode() -> None:
    args = build_parser().parse_args(["demo", "--mode", "choreography"])
    assert args.mode == "choreography"
    assert build_parser().parse_args(["demo"]).mode == "orchestration"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--mode", "telepathy"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_300_orders_under_chaos_in_every_mode(
    mode: str, chaos_runs: dict[str, tuple[float, subprocess.Popen[str]]]
) -> None:
    # `sagakit demo --orders 300 --faults chaos --mode MODE --json`, started with the
    # module (see chaos_runs).
    started, proc = chaos_runs[mode]
    out, err = proc.communicate(timeout=max(1.0, started + CHAOS_TIMEOUT - time.monotonic()))
    assert proc.returncode == 0, err[-2000:]
    report = json.loads(out)
    assert report["mode"] == mode
    assert all(report["invariants"].values()) and report["violations"] == []
    assert sum(report["outcomes"].values()) == 300
