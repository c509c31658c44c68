"""Chaos against real servers: the production checkout under kill -9 and server restarts.

Each test starts its own servers (``_cluster``): a private PostgreSQL 15, and a private
nats-server with JetStream or a private RabbitMQ node, on free ports of 127.0.0.1 --
never the shared ones. The checkout runs as separate production processes
(``python -m sagakit.cli_processes``): two workers, two relays and the four services.
The test process places the orders in waves through an :class:`Orchestrator` on the
orchestrator's store (the saga and its first command go to the outbox; the relays
publish them). Meanwhile a process is killed with SIGKILL every 1-3 s and restarted
after a short pause, PostgreSQL is restarted once (fast stop + start) and the broker
once (SIGKILL + start on the same data). Then the killing stops, every saga must end,
and DESIGN.md's invariants are checked from the services' own databases.

Knobs (environment): ``SAGAKIT_CHAOS_ORDERS`` (500), ``SAGAKIT_CHAOS_SEED`` (order mix
and fault schedule; random when unset, printed), ``SAGAKIT_CHAOS_SECONDS`` (how long
orders are placed and processes killed, 45), ``SAGAKIT_CHAOS_MAX_MANUAL`` (fail when
more than this fraction of the sagas ends in the manual queue; off by default, the
invariants allow it), ``SAGAKIT_CHAOS_KEEP=1`` (keep the temp directory with every log
and the data; it is also kept when a test fails).

Run: ``.venv/bin/pytest -m slow tests/e2e/test_chaos.py -s`` (``-s`` shows the
progress lines and the summary).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _cluster import (
    Cluster,
    NatsServer,
    PostgresServer,
    Proc,
    RabbitNode,
    tail,
)
from sagakit_checkout import deploy, inventory, order, payment, shipping
from sagakit_checkout.demo import OrderSpec, make_orders
from sagakit_checkout.invariants import InvariantReport, check_invariants
from sagakit_checkout.sagas import CHECKOUT, checkout_definition

from sagakit import SagaInstance, SagaState
from sagakit.runtime.orchestrator import Orchestrator

pytest.importorskip("psycopg", reason="needs the sagakit[postgres] extra")

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ORDERS = int(os.environ.get("SAGAKIT_CHAOS_ORDERS", "500"))
CHAOS_SECONDS = float(os.environ.get("SAGAKIT_CHAOS_SECONDS", "45"))
WAVE = 20
"""Orders per ``start_many`` transaction; the waves are spread over the chaos window so
that sagas are in flight at every kill and at both server restarts."""
SETTLE_LIMIT = 240.0
"""Seconds, after the last kill, within which every saga must be terminal."""
UNCHANGED_EVENTS = frozenset({"reply.stale", "timer.stale", "cancel.refused", "cancel.duplicate"})
"""History events of inputs that moved nothing (they keep the instance's version)."""
MODULES = {"order": order, "payment": payment, "inventory": inventory, "shipping": shipping}


def _seed() -> int:
    raw = os.environ.get("SAGAKIT_CHAOS_SEED")
    return int(raw) if raw else random.SystemRandom().randrange(1, 10**6)


def say(*parts: object) -> None:
    print("[chaos]", *parts, flush=True)


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A private directory (traversable by the postgres and rabbitmq users) and cleanup.

    The directory (logs of every process and server, and the data) is removed after a
    test that passed, kept (and printed) after one that failed or with
    ``SAGAKIT_CHAOS_KEEP=1``.
    """
    if not PostgresServer(Path("/nonexistent")).available():
        pytest.skip("needs PostgreSQL 15 binaries (postgresql-15) and a postgres user")
    base = Path(tempfile.mkdtemp(prefix="sagakit-chaos-"))
    base.chmod(0o755)
    c = Cluster(base)
    try:
        yield c
    finally:
        c.cleanup()
        if not c.passed or os.environ.get("SAGAKIT_CHAOS_KEEP") == "1":
            print(f"\n[chaos] kept logs and data in {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)


# -- the deployment --------------------------------------------------------------------


@dataclass
class Site:
    """The servers, the processes and the test process's view of the stores."""

    cluster: Cluster
    store_url: str
    broker_url: str
    broker: str  # "nats" | "rabbitmq"
    provider_path: Path
    dep: deploy.Deployment
    orchestrator: Orchestrator

    @property
    def orch_store(self) -> Any:
        return self.dep.stores["orchestrator"]


@contextlib.asynccontextmanager
async def site(
    cluster: Cluster,
    broker: str,
    stock: Mapping[str, int],
    *,
    workers: int = 2,
    relays: int = 2,
) -> AsyncIterator[Site]:
    """Servers up, tables migrated, stock seeded, every process running and ready."""
    t0 = time.monotonic()
    store_url = await asyncio.to_thread(cluster.start_postgres)
    broker_url = await asyncio.to_thread(
        cluster.start_nats if broker == "nats" else cluster.start_rabbitmq
    )
    say(f"servers up in {time.monotonic() - t0:.1f}s: {store_url} {broker_url}")
    provider_path = cluster.base / "provider.db"
    dep = deploy.deployment(store_url, provider_path)
    for name, store in dep.stores.items():
        await store.open()
        if name in MODULES:
            await store.apply_migrations(MODULES[name].NAMESPACE, MODULES[name].MIGRATIONS)
    await inventory.seed_stock(dep.stores["inventory"], stock)
    # The checkout app names its stream / queue prefix "checkout"; this test inspects the
    # broker under the name "sagakit", which the URL sets (the override users have too).
    named = f"{broker_url}?{'stream' if broker == 'nats' else 'prefix'}=sagakit"
    common = ["--app", "sagakit_checkout:app", "--store", store_url, "--broker", named]
    for i in range(1, workers + 1):
        cluster.add(f"worker-{i}", "worker", *common)
    for i in range(1, relays + 1):
        cluster.add(f"relay-{i}", "relay", *common)
    for name in deploy.SERVICES:
        extra = ["--provider", str(provider_path)] if name == "payment" else []
        cluster.add(name, "service", name, *common, *extra)
    t1 = time.monotonic()
    await asyncio.to_thread(cluster.start_all)
    say(f"{len(cluster.procs)} processes ready in {time.monotonic() - t1:.1f}s")
    try:
        yield Site(
            cluster,
            store_url,
            broker_url,
            broker,
            provider_path,
            dep,
            Orchestrator(dep.stores["orchestrator"], [checkout_definition()]),
        )
    finally:
        for store in dep.stores.values():
            with contextlib.suppress(Exception):
                await store.close()


async def place(s: Site, specs: Sequence[OrderSpec], limit: float = 60.0) -> None:
    """Start the sagas of ``specs`` (one transaction), retrying while the database is away."""
    requests = [(CHECKOUT, o.order_id, o.data) for o in specs]
    end = time.monotonic() + limit
    while True:
        try:
            await s.orchestrator.start_many(requests)
            return
        except Exception as exc:  # idempotent by business key: just try again
            if time.monotonic() > end:
                raise
            say(f"placing {len(specs)} orders failed ({type(exc).__name__}: {exc}); retrying")
            await asyncio.sleep(0.5)


async def reopen(s: Site) -> None:
    for store in s.dep.stores.values():
        with contextlib.suppress(Exception):
            await store.close()
        await store.open()


async def counts(s: Site) -> Counter[str]:
    c = await s.orch_store.count_sagas()
    return Counter({state.value: n for state, n in c.items()})


def running(c: Mapping[str, int]) -> int:
    return sum(n for state, n in c.items() if not SagaState(state).terminal)


async def all_sagas(store: Any) -> list[SagaInstance]:
    out: list[SagaInstance] = []
    while True:
        page = await store.list_sagas(limit=500, offset=len(out))
        out.extend(page)
        if len(page) < 500:
            return out


async def wait_terminal(s: Site, n: int, limit: float) -> float:
    """Wait until ``n`` sagas exist and none runs; returns the time it took."""
    t0 = time.monotonic()
    last_print = 0.0
    while True:
        try:
            c = await counts(s)
        except Exception as exc:
            c = Counter()
            say(f"counting sagas failed: {exc}")
        total, busy = sum(c.values()), running(c)
        if total >= n and busy == 0:
            return time.monotonic() - t0
        if time.monotonic() - t0 > limit:
            raise AssertionError(
                f"after {limit:.0f}s {busy} of {total} sagas still run ({dict(c)})"
                f"\n{await stuck_report(s)}\n{logs_report(s.cluster)}"
            )
        if time.monotonic() - last_print > 10:
            last_print = time.monotonic()
            say(f"  settling: {busy} running, {dict(c)}")
        await asyncio.sleep(0.2)


async def stuck_report(s: Site, limit: int = 5) -> str:
    """The last history rows of a few sagas that still run (for a failure message)."""
    lines = []
    with contextlib.suppress(Exception):
        states = [st for st in SagaState if not st.terminal]
        stuck = await s.orch_store.list_sagas(states=states, limit=limit)
        for inst in stuck:
            hist = await s.orch_store.history(inst.saga_id)
            lines.append(
                f"saga {inst.saga_id} ({inst.business_key}) v{inst.version} "
                f"{inst.state.value} {inst.status}:"
            )
            lines += [f"    v{h.version} {h.event} {h.step} {h.detail}" for h in hist[-6:]]
    return "\n".join(lines)


def log_stats(cluster: Cluster) -> dict[str, dict[str, int]]:
    """What went wrong, by kind: PostgreSQL's ERROR lines and the processes' ERROR logs."""
    pg: Counter[str] = Counter()
    if cluster.postgres is not None:
        with contextlib.suppress(OSError):
            for line in cluster.postgres.log.read_text(errors="replace").splitlines():
                if "ERROR:" in line:
                    pg[line.split("ERROR:", 1)[1].strip()[:70]] += 1
    procs: Counter[str] = Counter()
    for p in cluster.procs.values():
        with contextlib.suppress(OSError):
            for line in p.log.read_text(errors="replace").splitlines():
                role = p.name.split("-")[0]
                if line.startswith("{") and '"level":"ERROR"' in line:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        entry = {"message": line[:70]}
                    cause = str(entry.get("exception", "")).strip().splitlines()
                    error = cause[-1].split(":")[0] if cause else ""
                    procs[f"{role}: {str(entry.get('message'))[:60]} {error}".strip()] += 1
                elif line.startswith(("psycopg.errors.", "sagakit.errors.")):
                    procs[f"{role}: {line.split(':')[0]}"] += 1
    return {
        "postgres_errors": dict(pg.most_common(10)),
        "process_errors": dict(procs.most_common(12)),
    }


def logs_report(cluster: Cluster, lines: int = 15) -> str:
    return "\n".join(
        f"--- {p.name} ({p.log}):\n{tail(p.log, lines)}" for p in cluster.procs.values()
    )


# -- broker views ----------------------------------------------------------------------


async def broker_depth(s: Site) -> dict[str, int]:
    """What the broker still has to deliver or hear an ack for, per queue/consumer.

    NATS: ``pending`` + ``ack_pending`` of every durable consumer (``consumer:<name>``),
    and, for information, the message counts of the streams (``stream:<name>``; a work
    queue stream should be empty once everything was acknowledged). RabbitMQ: the ready
    messages of every queue (unacknowledged ones are counted again once the consumers
    stopped and gave them back).
    """
    if s.broker == "nats":
        import nats

        nc = await nats.connect(s.broker_url, connect_timeout=3, allow_reconnect=False)
        try:
            js = nc.jetstream()
            out = {}
            for stream in ("sagakit", "sagakit_dlq"):
                with contextlib.suppress(Exception):
                    out[f"stream:{stream}"] = (await js.stream_info(stream)).state.messages
            with contextlib.suppress(Exception):
                for c in await js.consumers_info("sagakit"):
                    out[f"consumer:{c.name}"] = (c.num_pending or 0) + (c.num_ack_pending or 0)
            return out
        finally:
            await nc.close()
    import aio_pika

    conn = await aio_pika.connect(s.broker_url, timeout=5)
    try:
        out = {}
        names = ["sagakit.dead"]
        for e in deploy.ENDPOINTS:
            names += [f"sagakit.{e}", f"sagakit.{e}.retry"]
        for name in names:
            channel = await conn.channel()
            try:
                q = await channel.declare_queue(name, passive=True)
                out[name] = q.declaration_result.message_count or 0
            except Exception:
                pass
            with contextlib.suppress(Exception):
                await channel.close()
        return out
    finally:
        await conn.close()


def busy_queues(depth: Mapping[str, int]) -> dict[str, int]:
    """The entries of :func:`broker_depth` that mean "not yet handled"."""
    return {
        k: v
        for k, v in depth.items()
        if v and not k.startswith("stream:") and not k.endswith(("_dlq", ".dead"))
    }


async def nats_consumers(s: Site) -> str:
    """``name ack_pending/pending`` of each JetStream consumer (progress lines)."""
    import nats

    nc = await nats.connect(s.broker_url, connect_timeout=2, allow_reconnect=False)
    try:
        infos = await nc.jetstream().consumers_info("sagakit")
        return " ".join(
            f"{c.name}={c.num_ack_pending}/{c.num_pending}"
            for c in infos
            if c.num_ack_pending or c.num_pending
        )
    finally:
        await nc.close()


async def nats_ghost_pending(s: Site) -> dict[str, int]:
    """Ack-pending entries of each consumer whose message the stream no longer stores.

    A work-queue stream removes a message when its ack arrives. After ``kill -9`` of
    nats-server the consumer's state file can be older than the stream's (both are
    written lazily), so the consumer may still count as "awaiting ack" a message that
    was acknowledged and removed: nats-server 2.9 never redelivers such an entry (there
    is nothing to deliver) and never clears it. Such an entry holds nothing; a message
    the stream still stores is checked by :func:`nats_stream_leftovers` instead.
    Returns ``{"consumer:<name>": count}``, only for consumers with no stored message
    in their ack-pending range.
    """
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(s.broker_url, connect_timeout=3, allow_reconnect=False)
    out: dict[str, int] = {}
    try:
        js = nc.jetstream()
        for c in await js.consumers_info("sagakit"):
            if not c.num_ack_pending or c.num_pending:
                continue
            floor = c.ack_floor.stream_seq if c.ack_floor else 0
            top = c.delivered.stream_seq if c.delivered else 0
            wanted = c.config.filter_subject
            stored = 0
            for seq in range((floor or 0) + 1, (top or 0) + 1):
                try:
                    raw = await js.get_msg("sagakit", seq)
                except NotFoundError:
                    continue
                if wanted is None or raw.subject == wanted:
                    stored += 1
            if not stored:
                out[f"consumer:{c.name}"] = c.num_ack_pending
    finally:
        await nc.close()
    return out


async def nats_stream_leftovers(s: Site) -> list[str]:
    """Message ids still stored in the work-queue stream after everything was acked."""
    import nats
    from nats.js.errors import NotFoundError

    from sagakit.transports.nats import HEADER_MESSAGE_ID

    nc = await nats.connect(s.broker_url, connect_timeout=3, allow_reconnect=False)
    ids: list[str] = []
    try:
        js = nc.jetstream()
        state = (await js.stream_info("sagakit")).state
        if not state.messages:
            return ids
        for seq in range(state.first_seq, state.last_seq + 1):
            try:
                raw = await js.get_msg("sagakit", seq)
            except NotFoundError:
                continue
            headers = dict(raw.headers or {})
            ids.append(headers.get(HEADER_MESSAGE_ID) or headers.get("Nats-Msg-Id", f"seq {seq}"))
    finally:
        await nc.close()
    return ids


async def broker_dead_letters(s: Site) -> list[dict[str, Any]]:
    """The broker's own dead letters (NATS ``sagakit_dlq``, RabbitMQ ``sagakit.dead``)."""
    out: list[dict[str, Any]] = []
    if s.broker == "nats":
        from sagakit.transports.nats import NatsTransport

        t = NatsTransport(s.broker_url, endpoints=deploy.ENDPOINTS, connect_timeout=3)
        try:
            for d in await t.dead_letters(limit=10_000):
                out.append({"message_id": d.message_id, "endpoint": d.endpoint, "reason": d.reason})
        finally:
            await t.close()
        return out
    import aio_pika

    conn = await aio_pika.connect(s.broker_url, timeout=5)
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue("sagakit.dead", passive=True)
        while (msg := await queue.get(no_ack=False, fail=False)) is not None:
            deaths = (msg.headers or {}).get("x-death") or [{}]
            out.append(
                {
                    "message_id": msg.message_id,
                    "endpoint": str(deaths[0].get("queue", "?")),
                    "reason": str(deaths[0].get("reason", "?")),
                }
            )
        # Not acknowledged: they go back to the queue when the channel closes.
    finally:
        await conn.close()
    return out


async def nothing_lost_with_broker(s: Site) -> tuple[bool, list[str], dict[str, int]]:
    """DESIGN.md invariant 6 for a broker deployment.

    Every outbox row was published; every published message addressed to an endpoint
    was handled by that endpoint (its id is in the destination store's inbox), or sits
    in a dead-letter place: the producer's or the consumer's dead-letter table, or the
    broker's dead-letter stream/queue; and the broker holds no message any more.
    Returns (holds, violations, counts).
    """
    stores = s.dep.stores
    routes = {
        "orchestrator": stores["orchestrator"],
        "orchestrator.local": stores["orchestrator"],
        **{name: stores[name] for name in deploy.SERVICES},
    }
    dead: set[str] = set()
    for store in stores.values():
        dead |= {d.message_id for d in await store.dead_letters() if d.message_id}
    broker_dead = await broker_dead_letters(s)
    dead |= {d["message_id"] for d in broker_dead if d["message_id"]}
    inboxes: dict[str, set[str]] = {}
    problems: list[str] = []
    n = Counter[str]()
    for name, store in stores.items():
        for env, published_at in await store.outbox_all():
            n["outbox rows"] += 1
            what = f"{env.message_id} ({env.type}) {name} -> {env.destination}"
            if published_at is None:
                problems.append(f"{what}: never published")
                continue
            if env.destination is None:
                continue
            if env.destination not in inboxes:
                inboxes[env.destination] = await routes[env.destination].inbox_ids(env.destination)
            if env.message_id in inboxes[env.destination]:
                n["handled"] += 1
            elif env.message_id in dead:
                n["dead-lettered"] += 1
            else:
                problems.append(f"{what}: published, neither handled nor dead-lettered")
    waiting = busy_queues(await broker_depth(s))
    if s.broker == "nats" and waiting:
        ghosts = await nats_ghost_pending(s)
        n["ack-pending entries for messages already removed"] = sum(ghosts.values())
        waiting = {k: v - ghosts.get(k, 0) for k, v in waiting.items() if v - ghosts.get(k, 0) > 0}
    if waiting:
        problems.append(f"the broker still holds messages to deliver: {waiting}")
    if s.broker == "nats":
        # Messages the stream still stores although no consumer has them pending: all
        # must have been handled (they are copies of acknowledged messages).
        handled = set().union(*inboxes.values()) if inboxes else set()
        leftovers = await nats_stream_leftovers(s)
        n["stream leftovers"] = len(leftovers)
        n["stream leftovers handled"] = sum(1 for i in leftovers if i in handled or i in dead)
        unhandled = [i for i in leftovers if i not in handled and i not in dead]
        if unhandled:
            problems.append(f"{len(unhandled)} stream leftovers never handled: {unhandled[:5]}")
    n["broker dead letters"] = len(broker_dead)
    return not problems, problems, dict(n)


# -- history checks --------------------------------------------------------------------


async def history_problems(
    store: Any, sagas: Sequence[SagaInstance]
) -> tuple[list[str], Counter[str]]:
    """Versions without gaps, one transition per version, no step applied twice."""
    problems: list[str] = []
    events: Counter[str] = Counter()
    for inst in sagas:
        hist = await store.history(inst.saga_id)
        causes: dict[int, set[str | None]] = defaultdict(set)
        succeeded: Counter[str] = Counter()
        compensated: Counter[tuple[str | None, Any]] = Counter()
        for h in hist:
            events[h.event] += 1
            if h.event in UNCHANGED_EVENTS:
                continue
            causes[h.version].add(h.message_id)
            if h.event == "step.succeeded":
                succeeded[h.step or ""] += 1
            if h.event == "compensation.succeeded":
                compensated[(h.step, h.detail.get("rung"))] += 1
        versions = sorted(causes)
        tag = f"saga {inst.saga_id} ({inst.business_key})"
        if versions and versions != list(range(versions[0], versions[-1] + 1)):
            problems.append(f"{tag}: history versions skip: {versions}")
        if versions and versions[-1] != inst.version:
            problems.append(
                f"{tag}: last history version {versions[-1]} != instance {inst.version}"
            )
        for v, cs in causes.items():
            if len(cs) > 1:
                problems.append(f"{tag}: version {v} written by {len(cs)} transitions {cs}")
        for step, k in succeeded.items():
            if k > 1:
                problems.append(f"{tag}: step {step} succeeded {k} times")
        for key, k in compensated.items():
            if k > 1:
                problems.append(f"{tag}: compensation {key} succeeded {k} times")
    return problems, events


# -- chaos -----------------------------------------------------------------------------


@dataclass
class Chaos:
    """Kills processes at random and restarts them; restarts the servers once each."""

    site: Site
    rng: random.Random
    kill_every: tuple[float, float] = (1.0, 3.0)
    pause: tuple[float, float] = (0.3, 1.5)
    kills: Counter[str] = field(default_factory=Counter)
    restarts: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    server_restarts: list[str] = field(default_factory=list)
    last_kill: float = 0.0
    last_fault: float = 0.0
    stopping: bool = False
    down: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) wall-clock windows of the server restarts."""
    restarting: bool = False
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def _later(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, p: Proc, after: float) -> None:
        await asyncio.sleep(after)
        if not p.alive:
            p.start()
            self.restarts[p.name] += 1

    async def kill_loop(self) -> None:
        procs = list(self.site.cluster.procs.values())
        while not self.stopping:
            await asyncio.sleep(self.rng.uniform(*self.kill_every))
            if self.stopping:
                break
            alive = [p for p in procs if p.alive]
            if not alive:
                continue
            victim = self.rng.choice(alive)
            victim.kill9()
            self.kills[victim.name] += 1
            self.last_kill = self.last_fault = time.time()
            self._later(self._restart(victim, self.rng.uniform(*self.pause)))

    async def supervise(self) -> None:
        """Restart processes that exited by themselves (like systemd's Restart=always)."""
        while True:
            for p in self.site.cluster.procs.values():
                code = p.unexpected_exit()
                if code is not None:
                    now = time.time()
                    overlap = any(a - 1 <= now and b + 1 >= p.started_at for a, b in self.down)
                    down = " (a server was down)" if overlap or self.restarting else ""
                    self.crashes.append(
                        f"{p.name} exited by itself with {code} at {time.time():.1f}{down}:\n"
                        f"{tail(p.log, 12)}"
                    )
                    say(f"{p.name} exited by itself with code {code}{down}; restarting")
                    self._later(self._restart(p, 0.5))
            await asyncio.sleep(0.25)

    async def restart_postgres(self) -> None:
        pg = self.site.cluster.postgres
        assert pg is not None
        t0, began = time.monotonic(), time.time()
        self.restarting = True
        try:
            await asyncio.to_thread(pg.restart)
        finally:
            self.restarting = False
            self.down.append((began, time.time()))
        self.last_fault = time.time()
        self.server_restarts.append(f"postgres (fast stop + start, {time.monotonic() - t0:.1f}s)")
        say(self.server_restarts[-1])

    async def restart_broker(self) -> None:
        cl = self.site.cluster
        t0, began = time.monotonic(), time.time()
        self.restarting = True
        try:
            if cl.nats is not None:
                await asyncio.to_thread(cl.nats.kill)
                await asyncio.sleep(0.5)
                await asyncio.to_thread(cl.nats.start)
                what = "nats-server (kill -9 + start on the same store)"
            else:
                assert cl.rabbit is not None
                await asyncio.to_thread(cl.rabbit.kill)
                await asyncio.sleep(0.5)
                await asyncio.to_thread(cl.rabbit.start)
                what = "rabbitmq node (kill -9 + start on the same data)"
        finally:
            self.restarting = False
            self.down.append((began, time.time()))
        self.last_fault = time.time()
        self.server_restarts.append(f"{what}, {time.monotonic() - t0:.1f}s")
        say(self.server_restarts[-1])

    async def wind_down(self) -> None:
        """Stop killing; wait for pending restarts so every process runs again."""
        self.stopping = True
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for p in self.site.cluster.procs.values():
            if not p.alive:
                p.start()
                self.restarts[p.name] += 1


async def progress(s: Site, chaos: Chaos, t0: float, placed: list[int]) -> None:
    import psycopg

    while True:
        await asyncio.sleep(5)
        conns = "?"
        with contextlib.suppress(Exception):
            async with await psycopg.AsyncConnection.connect(s.store_url, autocommit=True) as c:
                cur = await c.execute("SELECT count(*) FROM pg_stat_activity")
                row = await cur.fetchone()
                conns = str(row[0]) if row else "?"
        try:
            c = await counts(s)
            done = sum(c.values()) - running(c)
        except Exception:
            done = -1
        consumers = ""
        if s.broker == "nats":
            with contextlib.suppress(Exception):
                consumers = " ack_pending/pending " + await nats_consumers(s)
        say(
            f"t={time.monotonic() - t0:5.1f}s placed {placed[0]} terminal {done} "
            f"kills {sum(chaos.kills.values())} pg-connections {conns}{consumers}"
        )


async def run_chaos(cluster: Cluster, broker: str) -> dict[str, Any]:
    seed = _seed()
    rng = random.Random(seed)
    specs, stock = make_orders(ORDERS, seed)
    say(f"{broker}: {ORDERS} orders, seed {seed}, chaos for {CHAOS_SECONDS:.0f}s")
    started = time.monotonic()
    async with site(cluster, broker, stock) as s:
        chaos = Chaos(s, rng)
        placed = [0]
        t0 = time.monotonic()
        reporter = asyncio.create_task(progress(s, chaos, t0, placed))
        supervisor = asyncio.create_task(chaos.supervise())
        killer = asyncio.create_task(chaos.kill_loop())
        pg_at = rng.uniform(0.2, 0.35) * CHAOS_SECONDS
        broker_at = rng.uniform(0.5, 0.7) * CHAOS_SECONDS

        async def servers() -> None:
            await asyncio.sleep(pg_at)
            await chaos.restart_postgres()
            await asyncio.sleep(max(0.0, broker_at - (time.monotonic() - t0)))
            await chaos.restart_broker()

        server_task = asyncio.create_task(servers())
        waves = [specs[i : i + WAVE] for i in range(0, len(specs), WAVE)]
        every = CHAOS_SECONDS / len(waves)
        for n, wave in enumerate(waves):
            await asyncio.sleep(max(0.0, n * every - (time.monotonic() - t0)))
            await place(s, wave)
            placed[0] += len(wave)
        await server_task
        # One more kill interval after the last wave, so its sagas meet the chaos too.
        await asyncio.sleep(max(0.0, CHAOS_SECONDS + 1.0 - (time.monotonic() - t0)))
        await chaos.wind_down()
        killer.cancel()
        chaos_end = time.time()
        # PostgresStore's pool does not check connections: those cut by the restart
        # would fail once each. Start this process's view afresh (see the report).
        await reopen(s)
        say(
            f"chaos over after {time.monotonic() - t0:.1f}s: kills {dict(chaos.kills)}, "
            f"restarts {dict(chaos.restarts)}"
        )
        settle = await wait_terminal(s, len(specs), SETTLE_LIMIT)
        say(f"every saga terminal {settle:.1f}s after the chaos ended")
        # Quiet: nothing in an outbox, nothing in the broker, for a moment.
        await drain(s)
        supervisor.cancel()
        reporter.cancel()
        codes = await asyncio.to_thread(cluster.stop_all)
        result = await verify(s, stock, len(specs))
        sagas = result.pop("_sagas")
        last_finished = max(x.updated_at for x in sagas)
        result.update(log_stats(cluster))
        result.update(
            broker=broker,
            seed=seed,
            orders=len(specs),
            kills=sum(chaos.kills.values()),
            kills_by_process=dict(chaos.kills),
            restarts=sum(chaos.restarts.values()),
            server_restarts=chaos.server_restarts,
            unexpected_exits=len(chaos.crashes),
            exit_codes_on_sigterm=codes,
            last_kill_to_last_saga_s=round(last_finished - chaos.last_kill, 2),
            last_fault_to_last_saga_s=round(last_finished - chaos.last_fault, 2),
            chaos_end_to_all_terminal_s=round(settle, 2),
            chaos_end_wall=chaos_end,
            total_s=round(time.monotonic() - started, 1),
        )
        say("summary " + json.dumps(result, indent=1, default=str))
        for crash in chaos.crashes:
            say("unexpected exit: " + crash)
        assert_result(result, codes)
        cluster.passed = True
        return result


async def drain(s: Site, quiet_for: float = 2.0, limit: float = 60.0) -> None:
    end = time.monotonic() + limit
    calm_since: float | None = None
    while time.monotonic() < end:
        busy = 0
        try:
            for store in s.dep.stores.values():
                busy += await store.outbox_pending()
            depth = busy_queues(await broker_depth(s))
            if depth and not busy and s.broker == "nats":
                ghosts = await nats_ghost_pending(s)  # never go away: do not wait on them
                depth = {k: v - ghosts.get(k, 0) for k, v in depth.items()}
            busy += sum(depth.values())
        except Exception as exc:
            say(f"drain: {exc}")
            busy = 1
        if busy:
            calm_since = None
        elif calm_since is None:
            calm_since = time.monotonic()
        elif time.monotonic() - calm_since >= quiet_for:
            return
        await asyncio.sleep(0.2)
    say(f"drain: still busy after {limit}s")


async def verify(s: Site, stock: Mapping[str, int], n: int) -> dict[str, Any]:
    report: InvariantReport = await check_invariants(
        **s.dep.invariant_stores(), initial_stock=stock
    )
    lost_ok, lost_problems, lost_counts = await nothing_lost_with_broker(s)
    sagas = await all_sagas(s.orch_store)
    hist_problems, events = await history_problems(s.orch_store, sagas)
    outcomes = Counter(x.state.value for x in sagas)
    return {
        "_sagas": sagas,
        "sagas": len(sagas),
        "outcomes": dict(outcomes),
        "manual_reasons": dict(
            Counter(
                (x.reason or "")[:90]
                for x in sagas
                if x.state in (SagaState.FAILED_NEEDS_MANUAL, SagaState.TIMED_OUT)
            ).most_common(8)
        ),
        "invariants": report.invariants,
        "violations": report.violations[:30],
        "violation_count": len(report.violations),
        "notes": len(report.notes),
        "nothing_lost_with_broker": lost_ok,
        "nothing_lost_problems": lost_problems[:30],
        "messages": lost_counts,
        "history_problems": hist_problems[:30],
        "stale_inputs": {k: v for k, v in events.items() if k in UNCHANGED_EVENTS},
        "expected_sagas": n,
    }


def assert_result(result: Mapping[str, Any], codes: Mapping[str, int | None]) -> None:
    assert result["sagas"] == result["expected_sagas"], result["outcomes"]
    limit = os.environ.get("SAGAKIT_CHAOS_MAX_MANUAL")
    if limit is not None:  # off by default: the invariants allow the manual queue
        manual = result["outcomes"].get("FAILED_NEEDS_MANUAL", 0) + result["outcomes"].get(
            "TIMED_OUT", 0
        )
        assert manual <= float(limit) * result["sagas"], (manual, result["manual_reasons"])
    assert all(SagaState(k).terminal for k in result["outcomes"]), result["outcomes"]
    failed = {k: v for k, v in result["invariants"].items() if not v}
    # "nothing_lost" of check_invariants reads the stores only; with a broker the
    # broker-aware check below is the one that decides (see nothing_lost_with_broker).
    assert set(failed) <= {"nothing_lost"}, (failed, result["violations"])
    assert result["nothing_lost_with_broker"], result["nothing_lost_problems"]
    assert not result["history_problems"], result["history_problems"]
    assert all(code == 0 for code in codes.values()), f"exit codes on SIGTERM: {codes}"


# -- the tests -------------------------------------------------------------------------


@pytest.mark.nats
@pytest.mark.timeout(600)
@pytest.mark.fault("F-KILL9", "F-DB-RESTART", "F-BROKER-RESTART")
async def test_chaos_postgres_nats(cluster: Cluster) -> None:
    pytest.importorskip("nats", reason="needs the sagakit[nats] extra")
    if not NatsServer.available():
        pytest.skip("needs the nats-server binary")
    await run_chaos(cluster, "nats")


@pytest.mark.rabbitmq
@pytest.mark.timeout(600)
@pytest.mark.fault("F-KILL9", "F-DB-RESTART", "F-BROKER-RESTART")
async def test_chaos_postgres_rabbitmq(cluster: Cluster) -> None:
    pytest.importorskip("aio_pika", reason="needs the sagakit[rabbitmq] extra")
    if not RabbitNode.available():
        pytest.skip("needs rabbitmq-server and a rabbitmq user")
    await run_chaos(cluster, "rabbitmq")


HA_ORDERS = 200
HA_WAVE, HA_WAVE_EVERY = 5, 1.0
"""Orders keep arriving (5 a second) before, during and after the pause."""
HA_PAUSE = 35.0
"""Longer than JetStream's ack_wait (30 s): what the paused worker pulled is redelivered."""


@pytest.mark.nats
@pytest.mark.timeout(400)
@pytest.mark.fault("F-PAUSE")
async def test_a_paused_worker_applies_no_stale_transition(cluster: Cluster) -> None:
    """Two workers on one store; one is frozen (SIGSTOP) mid-run while the other moves
    the sagas on, then thawed (SIGCONT): nothing it had in hand may move a saga.

    Safety (asserted): every invariant holds, history versions have no gaps, no version
    is written by two transitions, no step or compensation succeeds twice. Liveness:
    the other worker must keep moving sagas; when it is instead found waiting on a row
    lock held by the frozen worker's open transaction, the test ends as xfail with the
    evidence (a known bug, see the message).
    """
    pytest.importorskip("nats", reason="needs the sagakit[nats] extra")
    if not NatsServer.available():
        pytest.skip("needs the nats-server binary")
    seed = _seed()
    specs, stock = make_orders(HA_ORDERS, seed)
    say(f"high availability: {HA_ORDERS} orders, seed {seed}")
    async with site(cluster, "nats", stock, workers=2, relays=1) as s:
        frozen, other = s.cluster.procs["worker-1"], s.cluster.procs["worker-2"]

        async def arrivals() -> None:
            for i in range(0, len(specs), HA_WAVE):
                await place(s, specs[i : i + HA_WAVE])
                await asyncio.sleep(HA_WAVE_EVERY)

        placing = asyncio.create_task(arrivals())
        await asyncio.sleep(3.0)  # mid-run: sagas in every stage
        # Freeze it inside a transaction if we can (it has read a saga and holds its
        # lock): the stalest state a worker can wake up with. A few tries.
        rng = random.Random(seed)
        in_tx: list[tuple[Any, ...]] = []
        for _ in range(25):
            frozen.pause()
            await asyncio.sleep(0.3)
            in_tx = await sessions_in_transaction(s, frozen.local_ports())
            if in_tx:
                break
            frozen.resume()
            await asyncio.sleep(rng.uniform(0.05, 0.4))
        else:
            frozen.pause()
        before = await transitions(s)
        versions_before = {x.saga_id: x.version for x in await all_sagas(s.orch_store)}
        paused_at = time.time()
        c = await counts(s)
        say(
            f"SIGSTOP {frozen.name} (pid {frozen.pid}) at {dict(c)}, "
            + (
                "inside a transaction:\n" + "\n".join(format_session(r) for r in in_tx)
                if in_tx
                else "outside any transaction"
            )
        )
        blocked: list[str] = []
        while time.time() - paused_at < HA_PAUSE:
            await asyncio.sleep(min(5.0, max(0.0, HA_PAUSE - (time.time() - paused_at))))
            rows = await lock_report(s)
            stuck = {r[0] for r in rows if r[1] == "idle in transaction" and r[4] >= 5}
            waiting = [r for r in rows if r[2] == "Lock" and set(r[3]) & stuck]
            if waiting:
                blocked = [format_session(r) for r in rows]
        during = await transitions(s)
        c_mid = await counts(s)
        after = {x.saga_id: x for x in await all_sagas(s.orch_store)}
        unmoved = sum(
            1
            for sid, v in versions_before.items()
            if not after[sid].terminal and after[sid].version == v
        )
        say(
            f"while it was frozen the other worker applied {during - before} transitions; "
            f"{unmoved} running sagas did not move: {dict(c_mid)}"
        )
        if blocked:
            say("sessions waiting on the frozen worker's transaction:\n" + "\n".join(blocked))
        frozen.resume()
        say(f"SIGCONT {frozen.name} after {time.time() - paused_at:.1f}s")
        assert other.alive and frozen.alive
        await placing
        settle = await wait_terminal(s, HA_ORDERS, 180)
        say(f"every saga terminal {settle:.1f}s after the thaw")
        await drain(s)
        codes = await asyncio.to_thread(cluster.stop_all)
        result = await verify(s, stock, HA_ORDERS)
        sagas = result.pop("_sagas")
        result.update(log_stats(cluster))
        result["frozen_inside_a_transaction"] = bool(in_tx)
        result["transitions_while_frozen"] = during - before
        result["running_sagas_unmoved_while_frozen"] = unmoved
        result["stale_inputs_after_pause"] = await stale_after(s, sagas, paused_at)
        say("summary " + json.dumps(result, indent=1, default=str))
        assert_result(result, codes)
        cluster.passed = True
        if blocked:
            pytest.xfail(
                "known bug (liveness): the healthy worker waited on a row lock held by the "
                f"frozen worker's open transaction; {unmoved} running sagas did not move for "
                f"{HA_PAUSE:.0f}s. Safety held. Sessions:\n" + "\n".join(blocked)
            )
        assert during > before, "the other worker moved nothing while one was frozen"


async def lock_report(s: Site) -> list[tuple[Any, ...]]:
    """Sessions long in a transaction (a frozen client) and sessions waiting on a lock:
    (pid, state, wait_event_type, blocking pids, transaction age in s, query)."""
    import psycopg

    sql = """
        SELECT pid, state, wait_event_type, pg_blocking_pids(pid),
               coalesce(extract(epoch FROM now() - xact_start), 0)::float8,
               left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
        FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND (wait_event_type = 'Lock' OR now() - xact_start > interval '5 seconds')
        ORDER BY xact_start
    """
    async with await psycopg.AsyncConnection.connect(s.store_url, autocommit=True) as conn:
        cur = await conn.execute(sql)
        return list(await cur.fetchall())


async def sessions_in_transaction(s: Site, ports: set[int]) -> list[tuple[Any, ...]]:
    """The database sessions of a process (by its client ports) that are in a transaction."""
    import psycopg

    if not ports:
        return []
    sql = """
        SELECT pid, state, wait_event_type, pg_blocking_pids(pid),
               coalesce(extract(epoch FROM now() - xact_start), 0)::float8,
               left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
        FROM pg_stat_activity
        WHERE client_port = ANY(%s) AND xact_start IS NOT NULL
    """
    async with await psycopg.AsyncConnection.connect(s.store_url, autocommit=True) as conn:
        cur = await conn.execute(sql, (sorted(ports),))
        return list(await cur.fetchall())


def format_session(r: Sequence[Any]) -> str:
    return f"  pid {r[0]} {r[1]} wait={r[2]} blocked_by={r[3]} in_tx={r[4]:.1f}s: {r[5]}"


async def transitions(s: Site) -> int:
    async with s.orch_store.transaction() as tx:
        row = await tx.fetchone("SELECT count(*) FROM saga_history")
    return int(row[0]) if row else 0


async def stale_after(s: Site, sagas: Sequence[SagaInstance], since: float) -> int:
    """Inputs recorded as stale after the pause began (what fencing refused)."""
    n = 0
    for inst in sagas:
        for h in await s.orch_store.history(inst.saga_id):
            if h.event in UNCHANGED_EVENTS and h.at >= since:
                n += 1
    return n
