"""Shared helpers of the benchmark suite: statistics, result lines, commit counting,
PostgreSQL scratch schemas/databases, machine facts.

Nothing here asserts anything about speed: the suite measures and reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import platform
import resource
import sqlite3
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

PG_HOST = os.environ.get("SAGAKIT_BENCH_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("SAGAKIT_BENCH_PG_PORT", "5432"))
PG_USER = os.environ.get("SAGAKIT_BENCH_PG_USER", "postgres")
PG_DB = os.environ.get("SAGAKIT_BENCH_PG_DB", "test")
NATS_URL = os.environ.get("SAGAKIT_BENCH_NATS_URL", "nats://127.0.0.1:4222")


def pg_dsn(database: str = PG_DB) -> str:
    """A libpq URL for ``database`` on the benchmark server."""
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def scratch_name(prefix: str) -> str:
    """A fresh, lower-case identifier for a schema, database or file."""
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


# -- statistics --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median, min and max of the runs that produced a number."""
    got = [v for v in values if v is not None and v == v]
    if not got:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(got), "min": min(got), "max": max(got)}


# -- result lines ------------------------------------------------------------------------

RESULT_KEYS = (
    "bench",
    "name",
    "metric",
    "unit",
    "median",
    "min",
    "max",
    "runs",
    "values",
    "status",
    "note",
)


@dataclass
class Result:
    """One line of the suite's output: a metric over ``runs`` runs (median/min/max)."""

    bench: str
    name: str
    metric: str
    unit: str
    values: list[float | None] = field(default_factory=list)
    status: str = "ok"  # ok | skipped | failed
    note: str = ""
    target: str | None = None  # a human-readable target, e.g. ">= 3000"
    better: str = "higher"  # higher | lower (for the report's "met" column)
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> dict[str, Any]:
        s = summary(self.values)
        out: dict[str, Any] = {
            "bench": self.bench,
            "name": self.name,
            "metric": self.metric,
            "unit": self.unit,
            **s,
            "runs": len([v for v in self.values if v is not None]),
            "values": self.values,
            "status": self.status if s["median"] is not None or self.status != "ok" else "failed",
            "note": self.note,
        }
        if self.target is not None:
            out["target"] = self.target
        out.update(self.extra)
        return out


def emit(obj: dict[str, Any]) -> None:
    """Print one JSON line on stdout (the suite's machine-readable output)."""
    print(json.dumps(obj, sort_keys=False), flush=True)


def log(msg: str) -> None:
    """Progress on stderr, so stdout stays JSON lines only."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def poll_until(done: Callable[[], Awaitable[bool]], interval: float) -> None:
    """Await ``done()`` every ``interval`` seconds until it is true.

    Polling, on purpose: the benchmark watches the store from outside the engine, as a
    client would, rather than hooking into the engine's own wake-ups.
    """
    while not await done():  # noqa: ASYNC110 - see the docstring
        await asyncio.sleep(interval)


# -- CPU and memory ----------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all threads."""
    return time.process_time()


def runqueue_wait_s() -> float:
    """Seconds this process's threads spent runnable but waiting for a CPU.

    From ``/proc/self/task/*/schedstat`` (second field, ns). Divided by wall time it
    says how much the machine's other load held this measurement back.
    """
    total = 0
    try:
        for task in os.listdir("/proc/self/task"):
            with (
                contextlib.suppress(OSError),
                open(f"/proc/self/task/{task}/schedstat", encoding="ascii") as f,
            ):
                total += int(f.read().split()[1])
    except OSError:
        return float("nan")
    return total / 1e9


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (VmRSS)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- commit counting ---------------------------------------------------------------------


@dataclass
class CommitCounter:
    """Write transactions committed by sagakit's stores in this process.

    ``tx`` counts ``async with store.transaction()`` blocks that committed;
    ``single`` counts single-statement writes that run as their own transaction
    (relay claims and marks, mailbox push/fetch/ack); ``single_noop`` those of them
    that changed no row (SQLite writes nothing to the WAL for them). ``reads`` counts
    autocommit reads (a transaction on PostgreSQL, not a durable commit).
    """

    tx: int = 0
    single: int = 0
    single_noop: int = 0
    reads: int = 0
    patched: list[str] = field(default_factory=list)

    @property
    def commits(self) -> int:
        return self.tx + self.single

    @property
    def durable(self) -> int:
        return self.tx + self.single - self.single_noop

    def snapshot(self) -> dict[str, int]:
        return {
            "tx": self.tx,
            "single": self.single,
            "single_noop": self.single_noop,
            "reads": self.reads,
            "commits": self.commits,
            "durable": self.durable,
        }


COUNTER = CommitCounter()


def install_commit_counter() -> CommitCounter:
    """Wrap the commit paths of SQLiteStore and PostgresStore (in this process only).

    The wrapped methods are private and may be renamed by the engine's authors; a
    method that is missing is skipped and listed as not counted.
    """
    targets: list[tuple[str, str, str, str]] = [
        ("sagakit.stores.sqlite.tx", "_Transaction", "__aexit__", "tx"),
        ("sagakit.stores.sqlite", "SQLiteStore", "_write", "single"),
        ("sagakit.stores.sqlite", "SQLiteStore", "queue_push", "push"),
        ("sagakit.stores.sqlite", "SQLiteStore", "_read", "read"),
    ]
    with contextlib.suppress(ImportError):
        import sagakit.stores.postgres  # noqa: F401  (optional driver)

        targets += [
            ("sagakit.stores.postgres.transaction", "_Transaction", "__aexit__", "tx"),
            ("sagakit.stores.postgres", "PostgresStore", "_write", "single"),
            ("sagakit.stores.postgres", "PostgresStore", "_read", "read"),
        ]
    for module_name, cls_name, meth, kind in targets:
        module = sys.modules.get(module_name) or __import__(module_name, fromlist=["x"])
        cls = getattr(module, cls_name, None)
        orig = getattr(cls, meth, None) if cls is not None else None
        if orig is None or getattr(orig, "_bench_wrapped", False):
            continue
        wrapper = _wrap(orig, kind)
        setattr(cls, meth, wrapper)
        COUNTER.patched.append(f"{module_name}.{cls_name}.{meth}")
    return COUNTER


def _wrap(orig: Callable[..., Any], kind: str) -> Callable[..., Any]:
    if kind == "tx":

        @functools.wraps(orig)
        async def tx_exit(self: Any, exc_type: Any, exc: Any, tb: Any) -> Any:
            out = await orig(self, exc_type, exc, tb)
            if exc_type is None:
                COUNTER.tx += 1
            return out

        tx_exit._bench_wrapped = True  # type: ignore[attr-defined]
        return tx_exit
    if kind == "single":

        @functools.wraps(orig)
        async def single(self: Any, *args: Any, **kw: Any) -> Any:
            out = await orig(self, *args, **kw)
            COUNTER.single += 1
            with contextlib.suppress(Exception):
                if out[0] == 0:
                    COUNTER.single_noop += 1
            return out

        single._bench_wrapped = True  # type: ignore[attr-defined]
        return single
    if kind == "push":

        @functools.wraps(orig)
        async def push(self: Any, endpoint: str, bodies: Sequence[str], *a: Any, **kw: Any) -> Any:
            out = await orig(self, endpoint, bodies, *a, **kw)
            if bodies:
                COUNTER.single += 1
            return out

        push._bench_wrapped = True  # type: ignore[attr-defined]
        return push
    if kind == "read":
        if asyncio.iscoroutinefunction(orig):

            @functools.wraps(orig)
            async def aread(self: Any, *args: Any, **kw: Any) -> Any:
                COUNTER.reads += 1
                return await orig(self, *args, **kw)

            aread._bench_wrapped = True  # type: ignore[attr-defined]
            return aread

        @functools.wraps(orig)
        def read(self: Any, *args: Any, **kw: Any) -> Any:
            COUNTER.reads += 1
            return orig(self, *args, **kw)

        read._bench_wrapped = True  # type: ignore[attr-defined]
        return read
    raise ValueError(kind)


# -- PostgreSQL helpers ------------------------------------------------------------------


def pg_available() -> str | None:
    """None when the benchmark server answers; otherwise why not."""
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc})"
    try:
        with psycopg.connect(pg_dsn(), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at {PG_HOST}:{PG_PORT}/{PG_DB} is not reachable: {exc}"
    return None


def pg_exec(sql: str, params: Sequence[Any] = (), *, database: str = PG_DB) -> list[Any]:
    """Run one statement in autocommit mode; return its rows (if any)."""
    import psycopg

    with psycopg.connect(pg_dsn(database), autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []


def pg_drop_schema(schema: str) -> None:
    """Drop a scratch schema (and everything in it)."""
    from psycopg import sql

    with contextlib.suppress(Exception):
        pg_exec(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))  # type: ignore[arg-type]


def pg_drop_database(name: str) -> None:
    """Drop a scratch database, disconnecting whoever is still on it."""
    from psycopg import sql

    with contextlib.suppress(Exception):
        pg_exec(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
    with contextlib.suppress(Exception):
        pg_exec(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))  # type: ignore[arg-type]


@contextlib.contextmanager
def pg_schema(prefix: str = "bench") -> Iterator[str]:
    """A fresh schema name, dropped afterwards (the store creates it)."""
    name = scratch_name(prefix)
    try:
        yield name
    finally:
        pg_drop_schema(name)


# -- machine facts -----------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return float("nan")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Machine facts, versions and durability settings, for the report's header."""
    env: dict[str, Any] = {
        "cores": os.cpu_count(),
        "memory_gib": _mem_total_gib(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sagakit": _version("sagakit"),
        "dbos": _version("dbos"),
        "psycopg": _version("psycopg"),
        "nats_py": _version("nats-py"),
        "opentelemetry_api": _version("opentelemetry-api"),
        "sqlite_settings": "sagakit: journal_mode=WAL, synchronous=FULL (SQLiteStore default)",
    }
    with contextlib.suppress(Exception):
        rows = pg_exec(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
            (
                [
                    "server_version",
                    "synchronous_commit",
                    "fsync",
                    "wal_sync_method",
                    "full_page_writes",
                    "shared_buffers",
                    "commit_delay",
                    "max_connections",
                ],
            ),
        )
        settings = dict(rows)
        env["postgresql"] = settings.pop("server_version", None)
        env["postgresql_settings"] = settings
    return env
