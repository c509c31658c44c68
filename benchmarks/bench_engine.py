"""sagakit's engine: a 4-step saga of local steps (and the same saga failing at step 3
with two compensations), on SQLite (WAL, synchronous=FULL) or PostgreSQL.

Run in a child process per measurement (``run.py`` starts it), so that CPU time,
commit counts and memory belong to this measurement only. Phases:

* warm-up (a few sagas, not measured);
* sequential: one saga at a time, ``engine.start`` -> terminal (``engine.wait``);
* concurrent: ``engine.start_many`` of N sagas in one call, then until all are
  terminal; throughput = N / wall time, client CPU = process CPU time / N.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

from _common import (
    COUNTER,
    cpu_seconds,
    install_commit_counter,
    percentile,
    pg_drop_schema,
    pg_dsn,
    poll_until,
    runqueue_wait_s,
    scratch_name,
)

from sagakit import Engine, SagaDefinition, SagaState, Step, StepContext, StepFailed, StepKind
from sagakit.stores.base import Store

DEFINITION = "bench4"
OPEN_STATES = ("RUNNING", "COMPENSATING")


def _step(n: int) -> Any:
    def run(ctx: StepContext) -> dict[str, int]:
        if ctx.data.get("fail_at") == n:
            raise StepFailed(f"step {n} fails on purpose")
        return {"n": n}

    run.__name__ = f"step{n}"
    return run


def _undo(n: int) -> Any:
    def run(ctx: StepContext) -> None:
        return None

    run.__name__ = f"undo{n}"
    return run


def definition() -> SagaDefinition:
    """4 local steps; steps 1-3 compensatable, step 4 the pivot (trivial work)."""
    return SagaDefinition(
        DEFINITION,
        steps=[
            Step("s1", _step(1), _undo(1)),
            Step("s2", _step(2), _undo(2)),
            Step("s3", _step(3), _undo(3)),
            Step("s4", _step(4), kind=StepKind.PIVOT),
        ],
    )


@contextlib.asynccontextmanager
async def open_store(backend: str, workdir: str) -> AsyncIterator[tuple[Store, Any]]:
    """The orchestrator store and an async "how many are still open" probe."""
    if backend == "sqlite":
        import sqlite3

        from sagakit.stores.sqlite import SQLiteStore

        path = os.path.join(workdir, "engine.db")
        store: Store = SQLiteStore(path, name="orchestrator", synchronous="FULL")
        await store.open()
        probe = sqlite3.connect(path)

        async def open_count() -> int:
            row = probe.execute(
                "SELECT count(*) FROM sagas WHERE state IN (?, ?)", OPEN_STATES
            ).fetchone()
            return int(row[0])

        try:
            yield store, open_count
        finally:
            probe.close()
            await store.close()
        return
    import psycopg

    from sagakit.stores.postgres import PostgresStore

    schema = scratch_name("bench_engine")
    pstore = PostgresStore(pg_dsn(), name="orchestrator", schema=schema)
    try:
        await pstore.open()
        conn = await psycopg.AsyncConnection.connect(pg_dsn(), autocommit=True)
        await conn.execute(f'SET search_path TO "{schema}"')

        async def pg_open_count() -> int:
            cur = await conn.execute(
                "SELECT count(*) FROM sagas WHERE state IN (%s, %s)", OPEN_STATES
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        try:
            yield pstore, pg_open_count
        finally:
            await conn.close()
            await pstore.close()
    finally:
        pg_drop_schema(schema)


async def measure(params: dict[str, Any]) -> dict[str, Any]:
    backend: str = params["backend"]
    fail_at = 3 if params.get("variant") == "fail" else None
    seq_n: int = params["seq_n"]
    conc_n: int = params["conc_n"]
    data: dict[str, Any] = {"fail_at": fail_at} if fail_at else {}
    expected = SagaState.COMPENSATED if fail_at else SagaState.SUCCEEDED
    install_commit_counter()
    out: dict[str, Any] = {"backend": backend, "variant": params.get("variant", "ok")}
    with tempfile.TemporaryDirectory(prefix="sagakit-bench-") as workdir:
        async with open_store(backend, workdir) as (store, open_count):
            engine = Engine(store, [definition()])
            async with engine:
                tag = os.getpid()
                # Warm-up: prepared statements, caches, first-connection costs.
                for i in range(10):
                    s = await engine.start(DEFINITION, f"warm-{tag}-{i}", data)
                    await engine.wait(s.saga_id, timeout=60)
                # Sequential latency.
                lat: list[float] = []
                c0 = dict(COUNTER.snapshot())
                cpu0 = cpu_seconds()
                for i in range(seq_n):
                    t0 = time.perf_counter()
                    s = await engine.start(DEFINITION, f"seq-{tag}-{i}", data)
                    done = await engine.wait(s.saga_id, timeout=60)
                    lat.append(time.perf_counter() - t0)
                    if done.state is not expected:
                        raise RuntimeError(f"saga ended {done.state}, expected {expected}")
                seq_cpu = cpu_seconds() - cpu0
                c1 = dict(COUNTER.snapshot())
                out["seq_p50_ms"] = percentile(lat, 0.5) * 1000
                out["seq_p99_ms"] = percentile(lat, 0.99) * 1000
                out["seq_cpu_ms_per_saga"] = seq_cpu / seq_n * 1000
                out["seq_commits_per_saga"] = (c1["durable"] - c0["durable"]) / seq_n
                # Concurrent throughput: N started at once, one start_many transaction.
                requests = [(DEFINITION, f"conc-{tag}-{i}", data) for i in range(conc_n)]
                c0 = dict(COUNTER.snapshot())
                cpu0 = cpu_seconds()
                rq0 = runqueue_wait_s()
                t0 = time.perf_counter()
                await engine.start_many(requests)

                async def finished() -> bool:
                    left: int = await open_count()
                    return left == 0

                await poll_until(finished, 0.01)
                wall = time.perf_counter() - t0
                cpu = cpu_seconds() - cpu0
                out["conc_runqueue_wait_share"] = (runqueue_wait_s() - rq0) / wall
                c1 = dict(COUNTER.snapshot())
                counts = await store.count_sagas()
                got = counts.get(expected, 0)
                if got != conc_n + seq_n + 10:
                    raise RuntimeError(f"expected {conc_n + seq_n + 10} {expected}, got {counts}")
                out["conc_n"] = conc_n
                out["conc_sagas_per_s"] = conc_n / wall
                out["conc_wall_s"] = wall
                out["conc_cpu_ms_per_saga"] = cpu / conc_n * 1000
                out["conc_cpu_util"] = cpu / wall  # of one core
                out["conc_commits_per_saga"] = (c1["durable"] - c0["durable"]) / conc_n
                out["conc_tx_per_saga"] = (c1["tx"] - c0["tx"]) / conc_n
                out["conc_single_per_saga"] = (c1["single"] - c0["single"]) / conc_n
                out["conc_noop_per_saga"] = (c1["single_noop"] - c0["single_noop"]) / conc_n
                out["conc_reads_per_saga"] = (c1["reads"] - c0["reads"]) / conc_n
    out["patched"] = COUNTER.patched
    return out


def main(params: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(measure(params))
