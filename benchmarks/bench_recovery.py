"""Recovery: N sagas in flight, ``kill -9`` of the worker process, restart.

The saga has four steps, two of each style, so both delivery guarantees are visible:

* ``l1``, ``l3``: **local steps** (run in the worker, at least once). Each appends to
  an effects table in a separate SQLite file, keyed by its idempotency key, with a
  counter; a step re-run after the crash shows as a counter > 1. This is allowed by
  design (at least once, same key) and reported as *re-runs*, not hidden.
* ``p2``, ``p4``: **participant steps**: commands to a participant (``svc``, its own
  SQLite file) whose handler increments the counter of the key *inside* the
  participant's transaction, with the inbox record and the idempotency record. A
  counter > 1 there is a *duplicate effect*: it must never happen.

The parent (``orchestrate``) starts the worker, waits until the first effects are
recorded, sends SIGKILL, restarts the worker and measures the time until all N sagas
are terminal: from the restart's spawn (interpreter start included) and from the
moment the restarted engine was open.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from sagakit import Engine, Participant, SagaDefinition, SagaState, Step, StepContext, command
from sagakit.core.envelope import Envelope
from sagakit.stores.base import Tx
from sagakit.stores.sqlite import SQLiteStore

DEFINITION = "recover4"


def _local_effect(effects_path: str) -> Any:
    # A connection per thread: blocking local steps run in the engine's thread pool, and
    # a sqlite3 connection belongs to the thread that opened it.
    local = threading.local()

    def run(ctx: StepContext) -> dict[str, int]:
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = sqlite3.connect(effects_path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        # The effect commits on its own, before sagakit checkpoints the step's result:
        # a crash in between re-runs it (at least once, with the same key).
        conn.execute(
            "INSERT INTO effects (key, n) VALUES (?, 1) ON CONFLICT (key) DO UPDATE SET n = n + 1",
            (ctx.idempotency_key,),
        )
        return {"done": 1}

    return run


def definition(effects_path: str) -> SagaDefinition:
    effect = _local_effect(effects_path)
    return SagaDefinition(
        DEFINITION,
        steps=[
            Step("l1", effect, lambda ctx: None),
            Step("p2", command("svc", "Do"), command("svc", "Undo")),
            Step("l3", effect, lambda ctx: None),
            Step("p4", command("svc", "Do"), command("svc", "Undo")),
        ],
    )


def participant(store: SQLiteStore) -> Participant:
    svc = Participant("svc", store)

    async def do(tx: Tx, cmd: Envelope) -> dict[str, int]:
        # The effect, in the participant's transaction with its inbox and idempotency
        # records: a redelivered command must find the key and never add to the counter.
        await tx.execute(
            "INSERT INTO svc_effects (key, n) VALUES (?, 1) "
            "ON CONFLICT (key) DO UPDATE SET n = n + 1",
            (cmd.idempotency_key,),
        )
        return {"done": 1}

    async def undo(tx: Tx, cmd: Envelope) -> None:
        return None

    svc.add_handler("Do", do)
    svc.add_handler("Undo", undo)
    return svc


def _paths(workdir: str) -> dict[str, str]:
    return {
        "orchestrator": os.path.join(workdir, "orchestrator.db"),
        "svc": os.path.join(workdir, "svc.db"),
        "effects": os.path.join(workdir, "effects.db"),
    }


async def worker(params: dict[str, Any]) -> dict[str, Any]:
    """The worker process: ``start`` places N sagas and runs; ``resume`` finishes them."""
    spawned = time.time()
    paths = _paths(params["dir"])
    n: int = params["n"]
    if params["mode"] == "start":
        conn = sqlite3.connect(paths["effects"])
        conn.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, n INTEGER)")
        conn.commit()
        conn.close()
    orch = SQLiteStore(paths["orchestrator"], name="orchestrator")
    svc_store = SQLiteStore(paths["svc"], name="svc")

    async def migrate() -> None:
        await svc_store.apply_migrations(
            "bench_svc", ["CREATE TABLE svc_effects (key TEXT PRIMARY KEY, n INTEGER NOT NULL)"]
        )

    engine = Engine(orch, [definition(paths["effects"])], participants=[participant(svc_store)])
    engine.before_start(migrate)
    async with engine:
        opened = time.time()
        if params["mode"] == "start":
            await engine.start_many([(DEFINITION, f"r-{i}", {}) for i in range(n)])
            print(json.dumps({"started": n}), flush=True)
        while True:
            counts = await orch.count_sagas()
            if sum(v for k, v in counts.items() if k.terminal) >= n:
                break
            await asyncio.sleep(0.005)
        done = time.time()
    return {
        "spawned": spawned,
        "opened": opened,
        "done": done,
        "succeeded": counts.get(SagaState.SUCCEEDED, 0),
        "counts": {k.value: v for k, v in counts.items()},
    }


def _count(path: str, sql: str) -> int:
    if not os.path.exists(path):
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute(sql).fetchone()[0] or 0)
    except sqlite3.OperationalError:
        return 0  # the table is not created yet
    finally:
        conn.close()


def orchestrate(params: dict[str, Any], child_cmd: Sequence[str]) -> dict[str, Any]:
    """Start, kill -9 once the first effects are in, restart; measure and count effects."""
    n: int = params["n"]
    workdir: str = params["dir"]
    paths = _paths(workdir)
    kill_after_effects: int = params.get("kill_after_effects", n // 2)
    args = {"dir": workdir, "n": n}
    first = subprocess.Popen(
        [*child_cmd, json.dumps({**args, "what": "worker", "mode": "start"})],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert first.stdout is not None
    line = first.stdout.readline()  # {"started": n}: the sagas are committed
    if "started" not in line:
        first.kill()
        raise RuntimeError(f"the worker did not start its sagas: {line!r}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        effects = _count(paths["effects"], "SELECT count(*) FROM effects")
        if effects >= kill_after_effects or first.poll() is not None:
            break
        time.sleep(0.002)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    at_kill = {
        "terminal": _count(
            paths["orchestrator"],
            "SELECT count(*) FROM sagas WHERE state NOT IN ('RUNNING', 'COMPENSATING')",
        ),
        "local_effects": _count(paths["effects"], "SELECT count(*) FROM effects"),
        "participant_effects": _count(paths["svc"], "SELECT count(*) FROM svc_effects"),
    }
    spawned = time.time()
    second = subprocess.run(
        [*child_cmd, json.dumps({**args, "what": "worker", "mode": "resume"})],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if second.returncode != 0:
        raise RuntimeError(f"restarted worker failed: {second.stderr[-2000:]}")
    res = json.loads(second.stdout.strip().splitlines()[-1])["result"]
    local_rows = _count(paths["effects"], "SELECT count(*) FROM effects")
    local_reruns = _count(paths["effects"], "SELECT coalesce(sum(n - 1), 0) FROM effects")
    part_rows = _count(paths["svc"], "SELECT count(*) FROM svc_effects")
    part_dups = _count(paths["svc"], "SELECT coalesce(sum(n - 1), 0) FROM svc_effects")
    return {
        "n": n,
        "in_flight_at_kill": n - at_kill["terminal"],
        "at_kill": at_kill,
        "recovery_s": res["done"] - spawned,
        "recovery_after_open_s": res["done"] - res["opened"],
        "succeeded": res["succeeded"],
        "local_effects": local_rows,
        "local_reruns": local_reruns,
        "participant_effects": part_rows,
        "participant_duplicates": part_dups,
        "expected_effects_each": 2 * n,
    }


def main(params: dict[str, Any]) -> dict[str, Any]:
    if params["what"] == "worker":
        return asyncio.run(worker(params))
    raise ValueError(params["what"])


if __name__ == "__main__":  # pragma: no cover - run through run.py
    sys.exit("run through benchmarks/run.py")
