"""The distributed checkout: PostgreSQL (a schema per service) + NATS JetStream.

The checkout runs as the production processes, each its own OS process: ``sagakit
worker`` (orchestrator and timers), ``sagakit relay`` (the five outboxes) and ``sagakit
service order|payment|inventory|shipping`` (``python -m sagakit.cli_processes ...``,
configured by ``SAGAKIT_APP=sagakit_checkout:app``, ``SAGAKIT_STORE_URL`` and
``SAGAKIT_BROKER_URL``). This (driver) process
places the orders with ``sagakit_checkout.deploy.build_api`` (the engine ``sagakit serve
--api-only`` uses: it commits the saga and its first command, it runs no loop) and
watches the orchestrator's table. Every measurement gets a fresh PostgreSQL database and
fresh JetStream streams; the processes are stopped and both removed afterwards, also
when the measurement fails. ``params["mode"] = "one-process"`` keeps the older variant
(every role in this process, ``build_all``), bounded by one core; it is not run by
default.

Orders are all of the happy kind (a good card, stock, a good address). Phases:

* sequential: one order at a time, placed -> terminal on the client's clock;
* steady: N orders with at most W in flight (new ones placed as others finish);
  throughput = N / time until all are terminal;
* burst (full runs): N orders placed at once with one ``start_many``.

End-to-end latency of an order in the steady and burst phases is its saga's
``updated_at - created_at`` (placed -> the final, COMPLETED transition committed), read
from the orchestrator's table. Messages per checkout = new outbox rows of the five
stores / orders. Commits per checkout = write transactions committed by the six
processes (each started through ``_counted_process.py``, which wraps the stores' commit
paths as the in-process count does) and by the driver (one per order placed) / orders;
``idle_commits_per_s`` is what the processes commit doing nothing. CPU per
checkout = user + system time of the six processes (``/proc/PID/stat``) / orders, in
all and per process. Under steady load, when py-spy is installed (the ``bench``
extra), each process is sampled from outside and its busiest functions reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from _common import (
    COUNTER,
    NATS_URL,
    cpu_seconds,
    install_commit_counter,
    log,
    percentile,
    pg_drop_database,
    pg_dsn,
    pg_exec,
    scratch_name,
)

ROLES: tuple[tuple[str, ...], ...] = (
    ("worker",),
    ("relay",),
    ("service", "order"),
    ("service", "payment"),
    ("service", "inventory"),
    ("service", "shipping"),
)
_TICK = os.sysconf("SC_CLK_TCK")
_LAUNCHER = Path(__file__).with_name("_counted_process.py")


def _die_with_parent() -> None:
    """In the child: SIGTERM when the bench process dies (even by SIGKILL on a timeout)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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


class Processes:
    """The worker, the relay and the four services, each ``python -m sagakit.cli_processes``."""

    def __init__(self, store_url: str, broker_url: str, provider: Path, logs: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
        self.env.update(
            PYTHONUNBUFFERED="1",
            SAGAKIT_APP="sagakit_checkout:app",
            SAGAKIT_STORE_URL=store_url,
            SAGAKIT_BROKER_URL=broker_url,
            SAGAKIT_PROVIDER_DB=str(provider),
        )
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, timeout: float = 90) -> None:
        """Start every process, then wait until each printed ``sagakit <role> ready``."""
        for role in ROLES:
            name = role[-1]
            with open(self.logs / f"{name}.log", "wb") as out:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, str(_LAUNCHER), str(self.counts(name)), *role],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self.env,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
        deadline = time.monotonic() + timeout
        for name, p in self.procs.items():
            log_file = self.logs / f"{name}.log"
            while b" ready" not in log_file.read_bytes():
                if p.poll() is not None or time.monotonic() > deadline:
                    why = "exited" if p.poll() is not None else f"not ready in {timeout}s"
                    tail = log_file.read_bytes()[-2000:].decode(errors="replace")
                    raise RuntimeError(f"sagakit {name} {why}:\n{tail}")
                time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """User + system time of the processes so far (``/proc/PID/stat``)."""
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[str, float]:
        """User + system time of each process so far, by role name."""
        out: dict[str, float] = {}
        for name, p in self.procs.items():
            with contextlib.suppress(OSError), open(f"/proc/{p.pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
        return out

    def counts(self, name: str) -> Path:
        return self.logs / f"{name}.counts.json"

    def commits(self) -> int:
        """Write transactions the processes committed so far (their own counters)."""
        total = 0
        for name in self.procs:
            with contextlib.suppress(OSError, ValueError):
                total += int(json.loads(self.counts(name).read_text())["durable"])
        return total

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def stop(self, timeout: float = 20) -> dict[str, int | None]:
        """SIGTERM them all, wait, SIGKILL whoever is left; their exit codes."""
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        codes: dict[str, int | None] = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
                codes[name] = None
        return codes


def _costs_counter(procs: Processes | None) -> Callable[[], dict[str, float]]:
    """CPU seconds and write commits so far: the child processes' plus this driver's
    commits (placing an order is one), or, in one process, this process's."""

    def costs() -> dict[str, float]:
        mine = COUNTER.snapshot()["durable"]
        if procs is None:
            return {"cpu": cpu_seconds(), "commits": mine}
        time.sleep(0.3)  # the children write their counts every 0.1 s
        split = {f"cpu:{name}": cpu for name, cpu in procs.cpu_by_process().items()}
        return {"cpu": sum(split.values()), "commits": mine + procs.commits(), **split}

    return costs


async def _phase(
    engine: Any,
    orch: Any,
    stores: dict[str, Any],
    costs: Callable[[], dict[str, float]],
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
    msgs0 = sum([len(await st.outbox_all()) for st in stores.values()])
    k0 = costs()
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
    k1 = costs()
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
        "cpu_ms_per_checkout": (k1["cpu"] - k0["cpu"]) / n * 1000,
        **{
            f"cpu_ms_per_checkout_{key[4:]}": (k1[key] - k0.get(key, 0.0)) / n * 1000
            for key in k1
            if key.startswith("cpu:")
        },
        "commits_per_checkout": (k1["commits"] - k0["commits"]) / n,
        "messages_per_checkout": (msgs1 - msgs0) / n,
    }
    if done != n:
        out["error"] = f"only {done} of {n} orders completed"
    return out


@contextlib.asynccontextmanager
async def _deployment(
    mode: str, dbname: str, broker_url: str, work: Path, out: dict[str, Any]
) -> AsyncIterator[tuple[Any, dict[str, Any], Processes | None]]:
    """The driver's engine and stores, and the processes (``None`` in one process)."""
    from sagakit_checkout.deploy import build_all, build_api
    from sagakit_checkout.inventory import seed_stock

    provider = work / "provider.db"
    if mode == "one-process":
        engine, dep = build_all(pg_dsn(dbname), broker_url, provider)
        async with engine:
            await seed_stock(
                dep.stores["inventory"], {f"sku-{k:02d}": 10_000_000 for k in range(8)}
            )
            yield engine, dep.stores, None
        return
    if mode != "processes":
        raise ValueError(f"mode must be 'processes' or 'one-process', not {mode!r}")
    # The driver only places orders and reads; a short poll so that ``wait`` sees the
    # workers' commits soon (the sequential latency is on this clock).
    engine, dep = build_api(pg_dsn(dbname), provider)
    engine.wait_poll = 0.005
    procs = Processes(pg_dsn(dbname), broker_url, provider, work)
    try:
        async with engine:  # migrates the services' tables before stock is seeded
            await seed_stock(
                dep.stores["inventory"], {f"sku-{k:02d}": 10_000_000 for k in range(8)}
            )
            t0 = time.perf_counter()
            procs.start()  # in the main thread: PR_SET_PDEATHSIG follows the forking thread
            out["processes_start_s"] = time.perf_counter() - t0
            yield engine, dep.stores, procs
            dead = [n for n in procs.procs if n not in procs.alive()]
            if dead:
                out["error"] = f"processes ended during the run: {dead}"
    finally:
        codes = procs.stop()
        out["exit_codes"] = codes
        if any(c not in (0, None) for c in codes.values()) or None in codes.values():
            for name in codes:
                tail = (work / f"{name}.log").read_bytes()[-1500:].decode(errors="replace")
                log(f"checkout: sagakit {name} exited {codes[name]}:\n{tail}")


async def _hops(stores: dict[str, Any], since: float) -> dict[str, float]:
    """Where a message's time goes, from the stores' own stamps (messages since ``since``).

    ``hop_outbox_ms``: the writer's transaction start (the outbox row's ``created_at``)
    -> the relay's publish acknowledged (``published_at``): the rest of the writer's
    transaction, its commit, the wake-up and the relay's lock and publish.
    ``hop_delivery_ms``: acknowledged -> the consumer's transaction started (its inbox
    row's ``at``): the broker and the consumer's pull. Medians over every message.
    """
    outbox: dict[tuple[str, str], tuple[float, float | None]] = {}
    inbox: dict[tuple[str, str], float] = {}
    for store in stores.values():
        async with store.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT message_id, destination, created_at, published_at FROM outbox "
                "WHERE created_at >= ?",
                (since,),
            )
            outbox.update(((r[0], r[1]), (r[2], r[3])) for r in rows)
            rows = await tx.fetchall(
                "SELECT message_id, consumer, at FROM inbox WHERE at >= ?", (since,)
            )
            inbox.update(((r[0], r[1]), r[2]) for r in rows)
    wait = [(p - c) * 1000 for c, p in outbox.values() if p is not None]
    delivery = [
        (inbox[key] - p) * 1000 for key, (_, p) in outbox.items() if p is not None and key in inbox
    ]
    if not wait or not delivery:
        return {}
    return {
        "hop_outbox_ms": percentile(wait, 0.5),
        "hop_delivery_ms": percentile(delivery, 0.5),
        "hop_messages": float(len(delivery)),
    }


PROFILE_RATE = 200
"""py-spy samples per second in each process."""
PROFILE_TOP = 8
"""Functions listed per process (by their own samples)."""


@contextlib.contextmanager
def _sampled(procs: Processes | None, work: Path, out: dict[str, Any]) -> Iterator[None]:
    """Sample every process's Python stacks with py-spy while the block runs.

    py-spy reads another process's memory from outside (no code in it, no slowdown
    beyond the reads), so the numbers of the phase stay comparable. Puts into
    ``out["profile"]``, per process: samples taken, the share that was idle (waiting in
    the event loop's selector) and the functions with the most samples of their own.
    Without py-spy (``pip install py-spy``) or permission to attach, says why instead.
    """
    if procs is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        out["profile_skipped"] = "py-spy is not installed (pip install py-spy)"
        yield
        return
    samplers: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for name, p in procs.procs.items():
        raw = work / f"{name}.spy.txt"
        cmd = [spy, "record", "--pid", str(p.pid), "--rate", str(PROFILE_RATE)]
        cmd += ["--format", "raw", "--output", str(raw), "--nonblocking", "--idle"]
        samplers[name] = (
            subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
            ),
            raw,
        )
    try:
        yield
    finally:
        profile: dict[str, Any] = {}
        for name, (sampler, raw) in samplers.items():
            sampler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                _, err = sampler.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                sampler.kill()
                _, err = sampler.communicate()
            if raw.exists():
                profile[name] = _top_functions(raw.read_text(errors="replace"))
            else:
                profile[name] = {"error": err.decode(errors="replace")[-300:]}
        out["profile"] = profile


# A thread waiting for work: the event loop in its selector, a pool thread on its queue.
_IDLE = re.compile(
    r"^(\w+\.)?(select|poll|wait|get|_worker) \(.*(selectors|threading|queue|thread)\.py"
)


_LINE = re.compile(r":\d+\)$")


def _top_functions(collapsed: str) -> dict[str, Any]:
    """From py-spy's collapsed stacks (``frame;frame;leaf count`` per line): samples,
    the idle share and the leaf functions with the most samples."""
    leaves: dict[str, int] = {}
    total = idle = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if "_dump (_counted_process.py" in stack:
            continue  # the bench's own thread that writes the commit counts
        n = int(count)
        total += n
        leaf = stack.rsplit(";", 1)[-1]
        if _IDLE.search(leaf):
            idle += n
            continue
        fn = _LINE.sub(")", leaf)  # one entry per function, not per line
        leaves[fn] = leaves.get(fn, 0) + n
    top = sorted(leaves.items(), key=lambda kv: -kv[1])[:PROFILE_TOP]
    return {
        "samples": total,
        "idle_share": idle / total if total else None,
        "top": [[fn, n / total] for fn, n in top] if total else [],
    }


async def measure(params: dict[str, Any]) -> dict[str, Any]:
    from sagakit_checkout.sagas import CHECKOUT

    from sagakit import SagaState

    install_commit_counter()
    mode = params.get("mode", "processes")
    dbname = scratch_name("sagakit_bench_checkout")
    stream = scratch_name("bench").replace("_", "")
    timeout = float(params.get("timeout", 600))
    out: dict[str, Any] = {"mode": mode}
    pg_exec(f'CREATE DATABASE "{dbname}"')
    try:
        with tempfile.TemporaryDirectory(prefix="sagakit-checkout-") as d:
            broker_url = f"{NATS_URL}?stream={stream}"
            async with _deployment(mode, dbname, broker_url, Path(d), out) as (
                engine,
                stores,
                procs,
            ):
                orch = stores["orchestrator"]
                costs = _costs_counter(procs)
                tag = str(os.getpid())
                # Warm-up: connections, prepared statements, consumers.
                warm = [(CHECKOUT, f"warm-{tag}-{i}", order_data(i)) for i in range(10)]
                for inst in await engine.start_many(warm):
                    await engine.wait(inst.saga_id, timeout=120)
                if procs is not None:
                    # What the six processes commit and burn doing nothing (their polls).
                    k0, t0 = costs(), time.perf_counter()
                    await asyncio.sleep(2.0)
                    k1, dt = costs(), time.perf_counter() - t0
                    out["idle_commits_per_s"] = (k1["commits"] - k0["commits"]) / dt
                    out["idle_cpu_pct"] = (k1["cpu"] - k0["cpu"]) / dt * 100
                # Sequential: one order at a time, placed -> terminal, client's clock.
                seq: list[float] = []
                seq_started = time.time()
                for i in range(params.get("seq_n", 20)):
                    t0 = time.perf_counter()
                    one = await engine.start(CHECKOUT, f"seq-{tag}-{i}", order_data(i))
                    done = await engine.wait(one.saga_id, timeout=120)
                    seq.append((time.perf_counter() - t0) * 1000)
                    if done.state is not SagaState.SUCCEEDED:
                        out["seq_error"] = f"order {i} ended {done.state.value}: {done.reason}"
                out["seq_p50_ms"] = percentile(seq, 0.5)
                out["seq_p99_ms"] = percentile(seq, 0.99)
                out.update(await _hops(stores, seq_started))
                # Steady load: a bounded number of orders in flight (sampled by py-spy,
                # when it is installed, process by process).
                with _sampled(procs, Path(d), out):
                    win = await _phase(
                        engine,
                        orch,
                        stores,
                        costs,
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
                        stores,
                        costs,
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
