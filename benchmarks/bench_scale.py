"""Scale: many sagas waiting on durable timers, and listing at a million rows.

Waiting timers (two child processes on the same store):

* ``timers_create``: starts N sagas whose only step is a command to an endpoint that
  never answers (its mailbox has no consumer), with a one-hour step timeout and one
  attempt: each saga waits on one durable timer. Reports the creating process's RSS.
* ``timers_fire``: a fresh worker process on that store. Its RSS is taken once it is
  open and idle with the N sagas waiting; then its clock is advanced by the timeout
  (the engine's injectable clock), so every timer is due at once, and the time until
  all N sagas are terminal (COMPENSATED: nothing to undo) is the time to fire them all.

Listing: a store filled with N saga rows (cloned in bulk with the store's own SQL from
one real saga row), then p50/p99 of ``list_sagas(..., limit=50)`` with several filters
and of ``count_sagas()``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from typing import Any

from _common import cpu_seconds, peak_rss_mb, percentile, pg_dsn, poll_until, rss_mb

from sagakit import (
    Engine,
    RetryPolicy,
    SagaDefinition,
    SagaState,
    Step,
    command,
)
from sagakit.runtime.wakeup import Wakeups
from sagakit.stores.base import Store
from sagakit.transports.embedded import EmbeddedTransport

WAIT = "wait1"
TIMEOUT = 3600.0
VOID = "void"  # an endpoint nobody consumes: the command is never answered


def wait_definition() -> SagaDefinition:
    return SagaDefinition(
        WAIT,
        steps=[
            Step(
                "ask",
                command(VOID, "NeverAnswered"),
                timeout=TIMEOUT,
                retry=RetryPolicy(max_attempts=1),
            )
        ],
    )


def make_store(params: dict[str, Any]) -> Store:
    if params["backend"] == "sqlite":
        from sagakit.stores.sqlite import SQLiteStore

        return SQLiteStore(os.path.join(params["dir"], "timers.db"), name="orchestrator")
    from sagakit.stores.postgres import PostgresStore

    return PostgresStore(pg_dsn(), name="orchestrator", schema=params["schema"])


def make_engine(store: Store, clock: Any) -> Engine:
    wakeups = Wakeups()
    transport = EmbeddedTransport(
        {"orchestrator": store, "orchestrator.local": store, VOID: store},
        wakeups=wakeups,
        clock=clock,
    )
    return Engine(store, [wait_definition()], transport=transport, wakeups=wakeups, clock=clock)


async def _open_count(store: Store) -> int:
    counts = await store.count_sagas()
    return sum(v for k, v in counts.items() if not k.terminal)


async def _drained(store: Store, limit: float = 600.0) -> None:
    end = time.monotonic() + limit

    async def drained() -> bool:
        return await store.outbox_pending() == 0 or time.monotonic() >= end

    await poll_until(drained, 0.05)


async def timers_create(params: dict[str, Any]) -> dict[str, Any]:
    n: int = params["n"]
    batch = 1000
    store = make_store(params)
    rss0 = rss_mb()
    engine = make_engine(store, time.time)
    t0 = time.perf_counter()
    async with engine:
        rss_open = rss_mb()
        for start in range(0, n, batch):
            reqs: list[tuple[str, str, dict[str, Any]]] = [
                (WAIT, f"w-{i}", {}) for i in range(start, min(n, start + batch))
            ]
            await engine.start_many(reqs)
        await _drained(store)
        created = time.perf_counter() - t0
        gc.collect()
        rss_after = rss_mb()
        waiting = await _open_count(store)
    return {
        "n": n,
        "waiting": waiting,
        "create_s": created,
        "create_per_s": n / created,
        "creator_rss_start_mb": rss0,
        "creator_rss_open_mb": rss_open,
        "creator_rss_after_mb": rss_after,
        "creator_peak_rss_mb": peak_rss_mb(),
    }


async def timers_fire(params: dict[str, Any]) -> dict[str, Any]:
    n: int = params["n"]
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    store = make_store(params)
    engine = make_engine(store, clock)
    async with engine:
        waiting = await _open_count(store)
        await asyncio.sleep(1.0)  # idle, every saga waiting on its timer
        gc.collect()
        rss_idle = rss_mb()
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        offset[0] = TIMEOUT + 1.0  # every timer is due now
        engine.wakeups.notify(f"timers:{store.name}")

        async def all_fired() -> bool:
            return await _open_count(store) == 0

        await poll_until(all_fired, 0.05)
        left = await _open_count(store)
        fire_s = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
        rss_end = rss_mb()
        counts = await store.count_sagas()
    return {
        "n": n,
        "waiting_at_open": waiting,
        "left": left,
        "compensated": counts.get(SagaState.COMPENSATED, 0),
        "worker_rss_idle_mb": rss_idle,
        "worker_rss_after_fire_mb": rss_end,
        "worker_peak_rss_mb": peak_rss_mb(),
        "fire_s": fire_s,
        "fire_per_s": n / fire_s,
        "fire_cpu_ms_per_timer": cpu / n * 1000,
    }


# -- listing --------------------------------------------------------------------------

STATE_MIX = """CASE
  WHEN i % 1000 < 900 THEN 'SUCCEEDED'
  WHEN i % 1000 < 960 THEN 'COMPENSATED'
  WHEN i % 1000 < 980 THEN 'RUNNING'
  WHEN i % 1000 < 990 THEN 'COMPENSATING'
  WHEN i % 1000 < 995 THEN 'FAILED_NEEDS_MANUAL'
  ELSE 'TIMED_OUT' END"""

COLUMNS = (
    "saga_id, definition, definition_version, business_key, state, status, version, "
    "cursor, correlation_id, created_at, updated_at, deadline_at, reason, "
    "cancel_requested, timed_out, data, steps"
)


def _clone_select(series: str, param: str) -> str:
    return (
        f"INSERT INTO sagas ({COLUMNS}) "
        f"SELECT 'bulk-' || i, definition, definition_version, 'key-' || i, {STATE_MIX}, "
        "status, version, cursor, correlation_id, "
        f"created_at - 1e6 + i * 0.01, updated_at - 1e6 + i * 0.01, deadline_at, reason, "
        f"cancel_requested, timed_out, data, steps FROM {series}, sagas "
        f"WHERE saga_id = {param}"
    )


async def _template(store: Store) -> str:
    """One real saga row, written through the engine (the bench4 definition)."""
    from bench_engine import DEFINITION, definition

    engine = Engine(store, [definition()])
    async with engine:
        s = await engine.start(DEFINITION, "template", {"order": "o-1", "amount": 4200})
        await engine.wait(s.saga_id, timeout=60)
    saga_id: str = s.saga_id
    return saga_id


async def fill(params: dict[str, Any], store: Store) -> float:
    rows: int = params["rows"]
    saga_id = await _template(store)
    t0 = time.perf_counter()
    if params["backend"] == "sqlite":
        import sqlite3

        conn = sqlite3.connect(os.path.join(params["dir"], "list.db"), isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            series = (
                "(WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s "
                f"WHERE i + 1 < {rows}) SELECT i FROM s)"
            )
            conn.execute(_clone_select(series, "?"), (saga_id,))
            conn.execute("COMMIT")
            conn.execute("ANALYZE")
        finally:
            conn.close()
    else:
        import psycopg

        async with await psycopg.AsyncConnection.connect(pg_dsn(), autocommit=True) as aconn:
            await aconn.execute(f'SET search_path TO "{params["schema"]}"')
            series = f"generate_series(0, {rows - 1}) AS g(i)"
            sql = _clone_select(series, "%s").replace("%", "%%").replace("%%s", "%s")
            await aconn.execute(sql, (saga_id,))
            await aconn.execute("VACUUM ANALYZE sagas")
    return time.perf_counter() - t0


async def listing(params: dict[str, Any]) -> dict[str, Any]:
    samples: int = params["samples"]
    if params["backend"] == "sqlite":
        from sagakit.stores.sqlite import SQLiteStore

        store: Store = SQLiteStore(os.path.join(params["dir"], "list.db"), name="orchestrator")
    else:
        from sagakit.stores.postgres import PostgresStore

        store = PostgresStore(pg_dsn(), name="orchestrator", schema=params["schema"])
    fill_s = await fill(params, store)  # opens and closes the store (through an engine)
    await store.open()
    try:
        queries: dict[str, Any] = {
            "list_all": lambda: store.list_sagas(limit=50),
            "list_running": lambda: store.list_sagas(states=[SagaState.RUNNING], limit=50),
            "list_manual": lambda: store.list_sagas(
                states=[SagaState.FAILED_NEEDS_MANUAL, SagaState.TIMED_OUT], limit=50
            ),
            "list_succeeded_offset_5000": lambda: store.list_sagas(
                states=[SagaState.SUCCEEDED], limit=50, offset=5000
            ),
            "count": lambda: store.count_sagas(),
        }
        out: dict[str, Any] = {"rows": params["rows"], "fill_s": fill_s}
        for name, q in queries.items():
            await q()  # warm: plans, caches
            lat: list[float] = []
            for _ in range(samples):
                t0 = time.perf_counter()
                got = await q()
                lat.append(time.perf_counter() - t0)
            if name.startswith("list") and len(got) != 50:
                raise RuntimeError(f"{name} returned {len(got)} rows, expected 50")
            out[f"{name}_p50_ms"] = percentile(lat, 0.5) * 1000
            out[f"{name}_p99_ms"] = percentile(lat, 0.99) * 1000
        counts = await store.count_sagas()
        out["total_rows"] = sum(counts.values())
    finally:
        await store.close()
    return out


def main(params: dict[str, Any]) -> dict[str, Any]:
    fn = {"timers_create": timers_create, "timers_fire": timers_fire, "listing": listing}[
        params["what"]
    ]
    return asyncio.run(fn(params))
