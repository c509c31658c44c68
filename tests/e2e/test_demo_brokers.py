"""The chaos demo on PostgreSQL with a real broker, several runs on fresh seeds.

``sagakit demo --orders 200 --faults chaos --json --store postgresql://... --broker
nats://...`` (and ``amqp://...``) as a user runs it: each run with a database, a
stream or queue prefix of its own, a seed never used before (printed, to replay it),
and all of them must exit 0 with every invariant holding. The run's final check waits
until the stores and the broker are quiet and reports what the broker still holds
apart from what is lost (``in_broker``); before it did, 8 of 9 such runs on NATS
reported messages still held by the broker as lost.

CI runs ``SAGAKIT_DEMO_BROKER_RUNS`` (2) runs per broker, ``SAGAKIT_DEMO_BROKER_PARALLEL``
(2) at a time: the runs mostly wait out retry delays, so they overlap well (each holds about
25 PostgreSQL connections: five at once exceed the shared server's 100). The issue's
bar is 20 in a row per broker::

    SAGAKIT_DEMO_BROKER_RUNS=20 .venv/bin/pytest -m slow tests/e2e/test_demo_brokers.py -s
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from demo_support import demo_cmd, env, fresh_broker, fresh_database

pytest.importorskip("psycopg", reason="needs the sagakit[postgres] extra")

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

RUNS = int(os.environ.get("SAGAKIT_DEMO_BROKER_RUNS", "2"))
PARALLEL = int(os.environ.get("SAGAKIT_DEMO_BROKER_PARALLEL", "2"))
ORDERS = int(os.environ.get("SAGAKIT_DEMO_BROKER_ORDERS", "200"))
TIMEOUT = 420.0
"""Seconds per run: a run takes about a minute alone, longer when several overlap."""
INVARIANTS = {"money", "stock", "terminal", "effect_once", "honest_status", "nothing_lost"}
BROKERS = ("nats", "rabbitmq")
WAIT = TIMEOUT * -(-len(BROKERS) * RUNS // max(1, PARALLEL)) + 60.0
"""What a test may wait for its runs: every run of the module may be ahead of its own
(the suite's 300 s default is too short for 20 runs)."""


@dataclass(frozen=True)
class Outcome:
    """One finished run: how to replay it and what it said."""

    broker: str
    seed: int
    code: int
    report: dict[str, Any]
    stderr: str

    def replay(self) -> str:
        return f"sagakit demo --orders {ORDERS} --faults chaos --seed {self.seed} ({self.broker})"


def run_once(broker: str, seed: int) -> Outcome:
    with fresh_database("sagakit_demo") as store, fresh_broker(broker) as broker_url:
        args = ("--orders", str(ORDERS), "--faults", "chaos", "--seed", str(seed), "--json")
        proc = subprocess.run(
            demo_cmd(*args, "--store", store, "--broker", broker_url),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env(),
        )
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return Outcome(broker, seed, proc.returncode, report, proc.stderr[-3000:])


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, list[Future[Outcome]]]]:
    """Every run of the module, started when its first test begins (they overlap)."""
    seeds = random.SystemRandom()
    with ThreadPoolExecutor(max_workers=max(1, PARALLEL)) as pool:
        started = {
            broker: [
                pool.submit(run_once, broker, seeds.randrange(10_000, 10**9)) for _ in range(RUNS)
            ]
            for broker in BROKERS
        }
        yield started
        for futures in started.values():
            for f in futures:
                f.cancel()


@pytest.mark.fault(
    "F-CRASH-BEFORE-COMMIT",
    "F-CRASH-AFTER-PUBLISH",
    "F-PUBLISH-LOST",
    "F-ACK-LOST",
    "F-DUPLICATE",
    "F-DELAY",
    "F-LAST-ITEM",
    "F-PROVIDER-OUTAGE",
)
@pytest.mark.parametrize(
    "broker",
    [
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    ],
)
@pytest.mark.timeout(WAIT)
def test_chaos_demo_on_postgres_and_a_broker_passes_every_run(
    broker: str, runs: dict[str, list[Future[Outcome]]]
) -> None:
    failed: list[str] = []
    late = 0
    for future in runs[broker]:
        outcome = future.result()
        print(f"[demo] {outcome.replay()}: exit {outcome.code}", flush=True)
        report = outcome.report
        if outcome.code != 0 or not report:
            failed.append(
                f"{outcome.replay()} exited {outcome.code}: "
                f"{report.get('violations', [])[:5]} {outcome.stderr[-800:]}"
            )
            continue
        assert set(report["invariants"]) == INVARIANTS
        assert all(report["invariants"].values()), (outcome.replay(), report["violations"])
        assert sum(report["outcomes"].values()) == ORDERS, outcome.replay()
        in_broker = report["in_broker"]
        assert in_broker is not None and {"total", "held", "complete", "late"} <= set(in_broker)
        late += len(in_broker["late"])
    assert not failed, "\n".join(failed)
    print(f"[demo] {broker}: {RUNS} runs passed, {late} late messages still in the broker")
