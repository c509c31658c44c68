"""The distributed checkout: PostgreSQL (a schema per service) + NATS JetStream.

Uses ``sagakit_checkout.deploy.build_all(store_url, broker_url, provider_path)``: every
role (orchestrator, relays, the four services) in one engine process, the services
talking only through the broker. Every measurement gets a fresh PostgreSQL database
and fresh JetStream streams, both removed afterwards.

Orders are all of the happy kind (a good card, stock, a good address). Phases:

* sequential: one order at a time, placed -> terminal on the client's clock;
* steady: N orders with at most W in flight (new ones placed as others finish);
  throughput = N / time until all are terminal;
* burst (full runs): N orders placed at once with one ``start_many``.

End-to-end latency of an order in the steady and burst phases is its saga's
``updated_at - created_at`` (placed -> the final, COMPLETED transition committed), read
from the orchestrator's table. Messages per checkout = new outbox rows of the five
stores / orders; commits per checkout = write transactions of the five stores (counted
in this process) / orders.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    COUNTER,
    NATS_URL,
    cpu_seconds,
    install_commit_counter,
    percentile,
    pg_drop_database,
    pg_dsn,
    pg_exec,
    scratch_name,
)


async def _delete_streams(stream: str) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        for name in (stream, f"{stream}_dlq", f"{stream}_adv"):
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
    finally:
        await nc.close()


def order_data(i: int) -> dict[str, Any]:
    return {
        "customer": f"cust-{i:06d}",
        "sku": f"sku-{i % 8:02d}",
        "qty": 1,
        "amount": 1000 + i % 5000,
        "currency": "EUR",
        "card": f"card-ok-{i}",
        "ship_to": f"addr-ok-{i}",
    }


async def _phase(
    engine: Any,
    orch: Any,
    stores: dict[str, Any],
    tag: str,
    n: int,
    window: int,
    timeout: float,
) -> dict[str, Any]:
    """Place ``n`` orders keeping at most ``window`` in flight; wait until all are terminal.

    ``window >= n`` places them all at once (a burst).
    """
    from sagakit_checkout.sagas import CHECKOUT

    from sagakit import SagaState

    ids: set[str] = set()
    placed = 0
    c0 = COUNTER.snapshot()
    cpu0 = cpu_seconds()
    msgs0 = sum([len(await st.outbox_all()) for st in stores.values()])
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = await orch.count_sagas()
        in_flight = sum(v for k, v in counts.items() if not k.terminal)
        if placed < n and in_flight < window:
            k = min(window - in_flight, n - placed)
            reqs = [(CHECKOUT, f"{tag}-{i}", order_data(i)) for i in range(placed, placed + k)]
            ids.update(s.saga_id for s in await engine.start_many(reqs))
            placed += k
            continue
        if placed >= n and in_flight == 0:
            break
        await asyncio.sleep(0.01)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    c1 = COUNTER.snapshot()
    msgs1 = sum([len(await st.outbox_all()) for st in stores.values()])
    mine = [s for s in await orch.list_sagas(limit=100_000) if s.saga_id in ids]
    lat = [(s.updated_at - s.created_at) * 1000 for s in mine if s.terminal]
    reasons: dict[str, int] = {}
    for s in mine:
        if s.state is not SagaState.SUCCEEDED:
            why = (s.reason or s.state.value)[:160]
            reasons[why] = reasons.get(why, 0) + 1
    done = sum(1 for s in mine if s.state is SagaState.SUCCEEDED)
    out: dict[str, Any] = {
        "orders": n,
        "window": window,
        "per_s": n / wall,
        "wall_s": wall,
        "e2e_p50_ms": percentile(lat, 0.5),
        "e2e_p99_ms": percentile(lat, 0.99),
        "completed": done,
        "states": {
            k: sum(1 for s in mine if s.state.value == k) for k in {s.state.value for s in mine}
        },
        "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:5]),
        "cpu_ms_per_checkout": cpu / n * 1000,
        "commits_per_checkout": (c1["durable"] - c0["durable"]) / n,
        "messages_per_checkout": (msgs1 - msgs0) / n,
    }
    if done != n:
        out["error"] = f"only {done} of {n} orders completed"
    return out


async def measure(params: dict[str, Any]) -> dict[str, Any]:
    from sagakit_checkout.deploy import build_all
    from sagakit_checkout.inventory import seed_stock
    from sagakit_checkout.sagas import CHECKOUT

    from sagakit import SagaState

    install_commit_counter()
    dbname = scratch_name("sagakit_bench_checkout")
    stream = scratch_name("bench").replace("_", "")
    pg_exec(f'CREATE DATABASE "{dbname}"')
    timeout = float(params.get("timeout", 600))
    out: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="sagakit-checkout-") as d:
            engine, dep = build_all(
                pg_dsn(dbname), f"{NATS_URL}?stream={stream}", Path(d) / "provider.db"
            )
            async with engine:
                inventory = dep.stores["inventory"]
                await seed_stock(inventory, {f"sku-{k:02d}": 10_000_000 for k in range(8)})
                orch = dep.stores["orchestrator"]
                tag = str(os.getpid())
                # Warm-up: connections, prepared statements, consumers.
                warm = [(CHECKOUT, f"warm-{tag}-{i}", order_data(i)) for i in range(10)]
                for inst in await engine.start_many(warm):
                    await engine.wait(inst.saga_id, timeout=120)
                # Sequential: one order at a time, placed -> terminal, client's clock.
                seq: list[float] = []
                for i in range(params.get("seq_n", 20)):
                    t0 = time.perf_counter()
                    one = await engine.start(CHECKOUT, f"seq-{tag}-{i}", order_data(i))
                    done = await engine.wait(one.saga_id, timeout=120)
                    seq.append((time.perf_counter() - t0) * 1000)
                    if done.state is not SagaState.SUCCEEDED:
                        out["seq_error"] = f"order {i} ended {done.state.value}: {done.reason}"
                out["seq_p50_ms"] = percentile(seq, 0.5)
                out["seq_p99_ms"] = percentile(seq, 0.99)
                # Steady load: a bounded number of orders in flight.
                win = await _phase(
                    engine,
                    orch,
                    dep.stores,
                    f"win-{tag}",
                    params["orders"],
                    params["window"],
                    timeout,
                )
                out.update({f"win_{k}": v for k, v in win.items()})
                # A burst: every order placed at once (full runs only).
                if params.get("burst", 0):
                    burst = await _phase(
                        engine,
                        orch,
                        dep.stores,
                        f"burst-{tag}",
                        params["burst"],
                        params["burst"],
                        timeout,
                    )
                    out.update({f"burst_{k}": v for k, v in burst.items()})
    finally:
        pg_drop_database(dbname)
        await _delete_streams(stream)
    return out


def main(params: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(measure(params))
