"""`sagakit demo --mode`: the same invariants and report for all three ways to run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sagakit_checkout.demo import render, run_demo

from sagakit.cli import build_parser

MODES = ("orchestration", "choreography", "hybrid")


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
def test_300_orders_under_chaos_in_every_mode(mode: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    proc = subprocess.run(
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
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["mode"] == mode
    assert all(report["invariants"].values()) and report["violations"] == []
    assert sum(report["outcomes"].values()) == 300
