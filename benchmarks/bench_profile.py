"""Where the time goes: the engine's concurrent phase under cProfile.

Runs the same workload as ``bench_engine`` (4 local steps, ``start_many``) with the
profiler on, and returns the top functions by own time, by cumulative time, and the
own time grouped by area (SQLite driver, psycopg, JSON, the state machine, the
runtime, asyncio, ...). cProfile measures wall-clock time, so time spent waiting in
epoll (for the server, or for work) shows up as its own "idle" area. Numbers under the
profiler are slower than without it; the shares are what matter.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
from typing import Any

AREAS: tuple[tuple[str, str], ...] = (
    ("opentelemetry", "tracing (opentelemetry + sagakit.observability)"),
    ("sagakit/observability", "tracing (opentelemetry + sagakit.observability)"),
    ("sagakit/stores/rows", "sagakit row codecs (stores/rows.py)"),
    ("psycopg/types/array", "psycopg array dumping (Python, per element)"),
    ("re/_parser", "re (regex substitution templates)"),
    ("re/__init__", "re (regex substitution templates)"),
    ("/enum.py", "enum"),
    ("contextlib", "contextlib"),
    ("sagakit/core/machine", "sagakit state machine"),
    ("sagakit/core/envelope", "sagakit envelopes (build/parse)"),
    ("sagakit/core/instance", "sagakit instance (copy, (de)serialise)"),
    ("sagakit/core", "sagakit core (other)"),
    ("sagakit/stores/sqlite", "sagakit SQLite store (Python)"),
    ("sagakit/stores/postgres", "sagakit PostgreSQL store (Python)"),
    ("sagakit/runtime/orchestrator", "sagakit orchestrator"),
    ("sagakit/runtime/consumer", "sagakit batch consumer"),
    ("sagakit/runtime", "sagakit runtime (other)"),
    ("sagakit/transports", "sagakit embedded transport"),
    ("psycopg_pool", "psycopg pool"),
    ("psycopg", "psycopg (driver, Python + C)"),
    ("sqlite3", "sqlite3 (C: statements, fsync on COMMIT)"),
    ("json", "json"),
    ("asyncio", "asyncio event loop"),
    ("selectors", "asyncio event loop"),
    ("uuid", "uuid"),
    ("hashlib", "hashlib"),
    ("logging", "logging"),
    ("dataclasses", "dataclasses"),
    ("copy", "copy"),
)


def _area(filename: str, name: str) -> str:
    key = f"{filename}:{name}"
    if filename == "~":
        # C functions: attribute by their qualified name.
        if "sqlite3" in name:
            return "sqlite3 (C: statements, fsync on COMMIT)"
        if "json" in name or "encode" in name or "decode" in name:
            return "json"
        if "select" in name or "epoll" in name:
            return "idle: waiting in epoll (server round trips, wake-ups)"
        if "re.Pattern" in name:
            return "re (regex substitution templates)"
        if "psycopg" in name or "pq" in name:
            return "psycopg (driver, Python + C)"
        return "builtins (C)"
    for needle, label in AREAS:
        if needle in key:
            return label
    if "benchmarks/" in filename:
        return "benchmark harness"
    return "other Python"


def _label(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    short = filename.split("site-packages/")[-1].split("src/")[-1].split("lib/python3")[-1]
    return f"{short}:{line}({name})"


def main(params: dict[str, Any]) -> dict[str, Any]:
    import bench_engine

    prof = cProfile.Profile()
    holder: dict[str, Any] = {}

    async def run() -> None:
        prof.enable()
        try:
            holder.update(await bench_engine.measure({**params, "seq_n": params.get("seq_n", 20)}))
        finally:
            prof.disable()

    asyncio.run(run())
    stats = pstats.Stats(prof)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1.0
    by_own = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)
    by_cum = sorted(raw.items(), key=lambda kv: kv[1][3], reverse=True)
    areas: dict[str, float] = {}
    for func, (_cc, _nc, tt, _ct, _callers) in raw.items():
        area = _area(func[0], func[2])
        areas[area] = areas.get(area, 0.0) + tt
    top = int(params.get("top", 25))
    return {
        "backend": params["backend"],
        "measured": {k: v for k, v in holder.items() if k != "patched"},
        "total_s": total,
        "areas": sorted(
            ({"area": a, "own_s": t, "share": t / total} for a, t in areas.items()),
            key=lambda r: -r["own_s"],
        ),
        "top_own": [
            {"function": _label(f), "calls": v[1], "own_s": v[2], "cum_s": v[3]}
            for f, v in by_own[:top]
        ],
        "top_cum": [
            {"function": _label(f), "calls": v[1], "own_s": v[2], "cum_s": v[3]}
            for f, v in by_cum
            if "sagakit" in f[0]
        ][:top],
    }
