"""The peer: the same 4-step workflow on DBOS Transact (``pip install dbos==3.4.0``).

DBOS has no compensation primitive; the failing variant is written the way its users
write sagas: try/except around the steps, compensation steps in reverse order.

Run in a child process per measurement: DBOS is a process-wide singleton with
background threads. Its system database is fresh per measurement (a new PostgreSQL
database, or a new SQLite file) and removed afterwards.

Backends: ``postgres`` (synchronous_commit as the server has it), ``sqlite`` (DBOS's
default: rollback journal, synchronous=FULL) and ``sqlite-wal`` (the file switched to
WAL before DBOS opens it; synchronous stays at SQLite's default, FULL).

The concurrent phase measures DBOS at its best: each way of driving it runs in turn on
the same system database, and the report's throughput is the fastest (``conc_driver``
names it; ``conc_<driver>_sagas_per_s`` keeps each):

- ``asyncio_all``: every workflow started at once with ``asyncio.gather``;
- ``asyncio_32``: async workflows, at most 32 in flight;
- ``threads_32``: the same workflow written synchronously, 32 threads calling it;
- ``queue_32``: async workflows enqueued on a DBOS ``Queue`` with concurrency 32,
  polled every 10 ms (its default is 1 s).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import (
    cpu_seconds,
    percentile,
    pg_drop_database,
    pg_dsn,
    runqueue_wait_s,
    scratch_name,
)

IN_FLIGHT = 32
"""Workflows in flight for the bounded drivers."""

DRIVERS = {
    "asyncio_all": "async workflows, all started at once",
    "asyncio_32": f"async workflows, at most {IN_FLIGHT} in flight",
    "threads_32": f"the workflow written synchronously, {IN_FLIGHT} threads",
    "queue_32": f"a DBOS queue, worker concurrency {IN_FLIGHT}, polled every 10 ms",
}
"""The ways the concurrent phase drives DBOS, by name (the report shows each)."""


def _count_commits() -> dict[str, int]:
    """Count SQLAlchemy commits (DBOS's write transactions) in this process."""
    import sqlalchemy as sa

    counts = {"commits": 0}

    def on_commit(conn: Any) -> None:
        counts["commits"] += 1

    sa.event.listen(sa.engine.Engine, "commit", on_commit)
    return counts


async def measure(params: dict[str, Any]) -> dict[str, Any]:
    backend: str = params["backend"]
    fail = params.get("variant") == "fail"
    seq_n: int = params["seq_n"]
    conc_n: int = params["conc_n"]
    commits = _count_commits()
    from dbos import DBOS

    out: dict[str, Any] = {"backend": backend, "variant": params.get("variant", "ok")}
    workdir = tempfile.mkdtemp(prefix="dbos-bench-")
    dbname: str | None = None
    if backend == "postgres":
        dbname = scratch_name("dbos_bench")
        url = pg_dsn(dbname)
        out["settings"] = "PostgreSQL, synchronous_commit as configured on the server"
    else:
        path = os.path.join(workdir, "dbos.sqlite")
        url = f"sqlite:///{path}"
        conn = sqlite3.connect(path)
        if backend == "sqlite-wal":
            conn.execute("PRAGMA journal_mode=WAL")
        out["journal_mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
        out["synchronous"] = conn.execute("PRAGMA synchronous").fetchone()[0]
        conn.close()
    DBOS(config={"name": "sagakit-bench", "system_database_url": url, "log_level": "ERROR"})

    @DBOS.step()
    async def step(n: int, fail_at: int) -> dict[str, int]:
        if n == fail_at:
            raise RuntimeError(f"step {n} fails on purpose")
        return {"n": n}

    @DBOS.step()
    async def undo(n: int) -> None:
        return None

    @DBOS.workflow()
    async def bench4(key: str, fail_at: int) -> str:
        done: list[int] = []
        try:
            for n in (1, 2, 3, 4):
                await step(n, fail_at)
                done.append(n)
        except RuntimeError:
            for n in reversed(done):
                await undo(n)
            return "COMPENSATED"
        return "SUCCEEDED"

    @DBOS.step()
    def step_sync(n: int, fail_at: int) -> dict[str, int]:
        if n == fail_at:
            raise RuntimeError(f"step {n} fails on purpose")
        return {"n": n}

    @DBOS.step()
    def undo_sync(n: int) -> None:
        return None

    @DBOS.workflow()
    def bench4_sync(key: str, fail_at: int) -> str:
        done: list[int] = []
        try:
            for n in (1, 2, 3, 4):
                step_sync(n, fail_at)
                done.append(n)
        except RuntimeError:
            for n in reversed(done):
                undo_sync(n)
            return "COMPENSATED"
        return "SUCCEEDED"

    fail_at = 3 if fail else 0
    expected = "COMPENSATED" if fail else "SUCCEEDED"
    try:
        DBOS.launch()
        queue = await DBOS.register_queue_async(
            "sagakit-bench", worker_concurrency=IN_FLIGHT, polling_interval_sec=0.01
        )
        tag = os.getpid()
        for i in range(10):
            await bench4(f"warm-{tag}-{i}", fail_at)
        lat: list[float] = []
        c0, cpu0 = commits["commits"], cpu_seconds()
        for i in range(seq_n):
            t0 = time.perf_counter()
            got = await bench4(f"seq-{tag}-{i}", fail_at)
            lat.append(time.perf_counter() - t0)
            if got != expected:
                raise RuntimeError(f"workflow returned {got}, expected {expected}")
        out["seq_p50_ms"] = percentile(lat, 0.5) * 1000
        out["seq_p99_ms"] = percentile(lat, 0.99) * 1000
        out["seq_cpu_ms_per_saga"] = (cpu_seconds() - cpu0) / seq_n * 1000
        out["seq_commits_per_saga"] = (commits["commits"] - c0) / seq_n
        pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="dbos-bench")
        loop = asyncio.get_running_loop()
        bounded = asyncio.Semaphore(IN_FLIGHT)

        async def at_most_32(key: str) -> str:
            async with bounded:
                return await bench4(key, fail_at)

        async def in_thread(key: str) -> str:
            return await loop.run_in_executor(pool, bench4_sync, key, fail_at)

        async def queued(key: str) -> str:
            handle = await queue.enqueue_async(bench4, key, fail_at)
            return await handle.get_result()

        runners: dict[str, Callable[[str], Awaitable[str]]] = {
            "asyncio_all": lambda key: bench4(key, fail_at),
            "asyncio_32": at_most_32,
            "threads_32": in_thread,
            "queue_32": queued,
        }
        best: dict[str, Any] = {}
        try:
            for driver, run in runners.items():
                got = await _concurrent(driver, run, conc_n, tag, expected, commits)
                out[f"conc_{driver}_sagas_per_s"] = got["conc_sagas_per_s"]
                if not best or got["conc_sagas_per_s"] > best["conc_sagas_per_s"]:
                    best = got
        finally:
            pool.shutdown()
        assert runners.keys() == DRIVERS.keys(), "every driver is described for the report"
        out.update(best)
    finally:
        DBOS.destroy(destroy_registry=True)
        if dbname is not None:
            pg_drop_database(dbname)
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    return out


async def _concurrent(
    driver: str,
    run: Callable[[str], Awaitable[str]],
    conc_n: int,
    tag: int,
    expected: str,
    commits: dict[str, int],
) -> dict[str, Any]:
    """``conc_n`` workflows through ``driver``, all started at once (the bounded drivers
    hold back what is over their limit): throughput, CPU and commits per workflow."""
    c0, cpu0, rq0 = commits["commits"], cpu_seconds(), runqueue_wait_s()
    t0 = time.perf_counter()
    results = await asyncio.gather(*(run(f"conc-{driver}-{tag}-{i}") for i in range(conc_n)))
    wall = time.perf_counter() - t0
    if any(r != expected for r in results):
        raise RuntimeError(f"a workflow driven by {driver} did not end as expected")
    return {
        "conc_driver": driver,
        "conc_runqueue_wait_share": (runqueue_wait_s() - rq0) / wall,
        "conc_n": conc_n,
        "conc_sagas_per_s": conc_n / wall,
        "conc_wall_s": wall,
        "conc_cpu_ms_per_saga": (cpu_seconds() - cpu0) / conc_n * 1000,
        "conc_cpu_util": (cpu_seconds() - cpu0) / wall,
        "conc_commits_per_saga": (commits["commits"] - c0) / conc_n,
    }


def main(params: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(measure(params))
