"""What the example apps' tests share: the ``sagakit`` command line, run as a user runs
it, the demo's common verdict, and a saga's steps by history event."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from sagakit.testing.kit import SagaHarness


def sagakit(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run the sagakit command line as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "sagakit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def chaos_demo(spec: str, *, orders: int = 60, seed: int = 7) -> dict[str, Any]:
    """``sagakit demo --app spec --faults chaos --json``: checks what every app's demo
    must show (exit 0, every saga ended, every invariant held, no dead letter, faults
    injected) and returns the report for the app's own checks."""
    done = sagakit(
        "demo", "--app", spec, "--faults", "chaos", "--orders", str(orders),
        "--json", "--seed", str(seed),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["ok"] is True and report["violations"] == []
    assert all(report["invariants"].values()), report["invariants"]
    assert report["sagas"] == orders and sum(report["outcomes"].values()) == orders
    assert report["open_dead_letters"] == 0
    assert sum(report["faults_injected"].values()) > 0
    return report


async def steps(h: SagaHarness, saga_id: str, event: str) -> list[str | None]:
    """The steps of the saga's history rows of ``event``, in order."""
    return [e.step for e in await h.history(saga_id) if e.event == event]
