"""`sagakit demo --store postgresql://... --broker URL` resumes after ``kill -9``.

On PostgreSQL the demo keeps no files: its stores are schemas, and the fake card
provider keeps its records in a schema of its own (``checkout_card_provider``), so
rerunning the same command on the same database after a ``kill -9`` finds both the
sagas and what the provider did for them, and reports on every order with every
invariant holding (money included: the provider's ledger is not empty for the orders
of the first run).

Marked ``postgres`` and ``nats`` or ``rabbitmq``: a database of its own on the shared
PostgreSQL and a JetStream stream (or a queue prefix) of its own on the shared broker,
all removed afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from demo_support import demo_cmd, env, fresh_broker, fresh_database

psycopg = pytest.importorskip("psycopg", reason="needs the sagakit[postgres] extra")

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

INVARIANTS = {"money", "stock", "terminal", "effect_once", "honest_status", "nothing_lost"}
TERMINAL = ("SUCCEEDED", "COMPENSATED", "FAILED_NEEDS_MANUAL", "TIMED_OUT", "PARTIAL_ACCEPTED")
ORDERS = 40
SLOW_SCENARIOS = {
    # A provider or a warehouse that never answers holds its saga for its whole retry
    # budget (up to a minute): the resume is the point here, not those scenarios.
    "void_unanswered",
    "capture_unanswered",
    "provider_dark",
    "authorize_outage",
    "commit_stuck",
}


def _seed() -> int:
    """The first seed whose orders have card provider scenarios but no slow ones."""
    from sagakit_checkout.demo import make_orders

    for seed in range(1, 1000):
        scenarios = {s.scenario for s in make_orders(ORDERS, seed)[0]}
        if not scenarios & SLOW_SCENARIOS and {"provider_timeout", "void_refused"} <= scenarios:
            return seed
    raise AssertionError("no seed gives a fast mix with the provider's scenarios")


def progress(db_url: str) -> tuple[int, int, int]:
    """(sagas, terminal sagas, provider effects) so far; zeros before the tables exist."""
    with psycopg.connect(db_url, autocommit=True, connect_timeout=5) as conn:
        try:
            total, done = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE state = ANY(%s)) "
                "FROM checkout_orchestrator.sagas",
                (list(TERMINAL),),
            ).fetchone()
            (effects,) = conn.execute(
                "SELECT count(*) FROM checkout_card_provider.effects"
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0, 0, 0
    return int(total), int(done), int(effects)


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "broker_kind",
    [
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    ],
)
@pytest.mark.fault("F-KILL9")
def test_kill_minus_9_then_rerun_on_postgresql_reports_every_order(
    tmp_path: Path, broker_kind: str
) -> None:
    seed = _seed()
    log = tmp_path / "first-run.stderr"
    with fresh_database("sagakit_resume") as db_url, fresh_broker(broker_kind) as broker:
        args = (
            *("--orders", str(ORDERS), "--faults", "chaos", "--seed", str(seed), "--json"),
            *("--store", db_url, "--broker", broker, "--timeout", "90"),
        )
        with log.open("w") as stderr:
            proc = subprocess.Popen(
                demo_cmd(*args), stdout=subprocess.DEVNULL, stderr=stderr, env=env()
            )
        try:
            end = time.monotonic() + 40
            seen = (0, 0, 0)
            while time.monotonic() < end and proc.poll() is None:
                seen = progress(db_url)
                # Mid-flight: the provider has done things for some orders, some sagas
                # are over, and others still run.
                if seen[1] >= 5 and seen[2] >= 10:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, (
                f"the demo ended before it could be killed ({seen}): {log.read_text()[-3000:]}"
            )
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()  # a failure above: never leave the demo running
            proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        sagas, done, effects = progress(db_url)
        assert sagas > 0 and effects > 0
        assert done < ORDERS, "every saga was already terminal: nothing left to resume"

        rerun = subprocess.run(
            demo_cmd(*args), capture_output=True, text=True, timeout=120, env=env()
        )
        report: dict[str, Any] = json.loads(rerun.stdout) if rerun.stdout.strip() else {}
        (tmp_path / "rerun.json").write_text(rerun.stdout)  # the whole report, for a post-mortem
        assert rerun.returncode == 0, (report.get("violations", [])[:10], rerun.stderr[-3000:])
        assert report["orders"] == ORDERS
        assert report["violations"] == [], report["violations"][:10]
        assert set(report["invariants"]) == INVARIANTS
        assert all(report["invariants"].values()), report["invariants"]
        assert set(report["outcomes"]) <= set(TERMINAL), report["outcomes"]
        assert sum(report["outcomes"].values()) == ORDERS, report["outcomes"]
        assert report["placed_this_run"] == ORDERS - sagas
        # The first run's provider records are still there, now with the rest of them.
        assert progress(db_url)[:2] == (ORDERS, ORDERS)
        assert progress(db_url)[2] >= effects
