"""Turn the runs' raw measurements into result lines and ``RESULTS.md``."""

from __future__ import annotations

import functools
import re
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import Result, summary


@dataclass(frozen=True)
class Target:
    """A goal from the benchmarks issue, checked against one result."""

    label: str
    result: str  # Result.name
    op: str  # ">=" or "<="
    value: float
    unit: str
    next_step: str
    scale_note: str = ""


TARGETS: tuple[Target, ...] = (
    Target(
        "engine on PostgreSQL >= 30x DBOS throughput",
        "compare/throughput/sagakit_pg_vs_dbos_pg",
        ">=",
        30.0,
        "x",
        "see 'Next steps' 1-3: client CPU per transition, the server's own work, "
        "round trips per transaction.",
    ),
    Target(
        "engine on PostgreSQL >= 3,000 sagas/s",
        "engine/postgres/ok/throughput",
        ">=",
        3000.0,
        "sagas/s",
        "see 'Next steps' 1-3.",
    ),
    Target(
        "client CPU <= 0.5 ms per saga (PostgreSQL)",
        "engine/postgres/ok/cpu_per_saga",
        "<=",
        0.5,
        "ms",
        "see 'Next steps' 1-3 (the profile shows where the CPU goes).",
    ),
    Target(
        "sequential p50 <= 2.5 ms (PostgreSQL)",
        "engine/postgres/ok/seq_p50",
        "<=",
        2.5,
        "ms",
        "see 'Next steps' 2: one commit per step, each durable before the next runs.",
    ),
    Target(
        "SQLite WAL+FULL >= 5,000 sagas/s",
        "engine/sqlite/ok/throughput",
        ">=",
        5000.0,
        "sagas/s",
        "see 'Next steps' 1-3.",
    ),
    Target(
        "distributed checkout >= 500 checkouts/s",
        "checkout/throughput",
        ">=",
        500.0,
        "checkouts/s",
        "see 'Next steps' 4.",
    ),
    Target(
        "distributed checkout p50 <= 25 ms (under the steady load above)",
        "checkout/steady_p50",
        "<=",
        25.0,
        "ms",
        "see 'Next steps' 4.",
    ),
    Target(
        "distributed checkout p50 <= 25 ms (one order at a time, idle system)",
        "checkout/seq_p50",
        "<=",
        25.0,
        "ms",
        "see 'Next steps' 4.",
    ),
    Target(
        "100,000 waiting sagas in <= 300 MB (worker RSS, SQLite)",
        "timers/sqlite/worker_rss_idle",
        "<=",
        300.0,
        "MB",
        "",
        scale_note="timers_n",
    ),
    Target(
        "100,000 waiting sagas in <= 300 MB (worker RSS, PostgreSQL)",
        "timers/postgres/worker_rss_idle",
        "<=",
        300.0,
        "MB",
        "",
        scale_note="timers_n",
    ),
    Target(
        "list queries <= 50 ms p99 at 1,000,000 rows (SQLite, worst list query)",
        "listing/sqlite/worst_list_p99",
        "<=",
        50.0,
        "ms",
        "",
        scale_note="list_rows",
    ),
    Target(
        "list queries <= 50 ms p99 at 1,000,000 rows (PostgreSQL, worst list query)",
        "listing/postgres/worst_list_p99",
        "<=",
        50.0,
        "ms",
        "",
        scale_note="list_rows",
    ),
    Target(
        "count_sagas() <= 50 ms p99 at 1,000,000 rows (SQLite)",
        "listing/sqlite/count_p99",
        "<=",
        50.0,
        "ms",
        "see 'Next steps' 5.",
        scale_note="list_rows",
    ),
    Target(
        "count_sagas() <= 50 ms p99 at 1,000,000 rows (PostgreSQL)",
        "listing/postgres/count_p99",
        "<=",
        50.0,
        "ms",
        "see 'Next steps' 5.",
        scale_note="list_rows",
    ),
    Target(
        "recovery after kill -9 (500 in flight) <= 5 s",
        "recovery/sqlite/recovery_s",
        "<=",
        5.0,
        "s",
        "",
    ),
    Target(
        "0 duplicate effects of participant steps after kill -9",
        "recovery/sqlite/participant_duplicates",
        "<=",
        0.0,
        "effects",
        "",
    ),
)


# -- deriving results ----------------------------------------------------------------------


def derive(
    by_key: dict[str, list[Any]], runs: int, skipped: dict[str, str], sizes: Any, *, quick: bool
) -> list[Result]:
    """Result lines (median/min/max over runs) and run-by-run ratios."""
    results: list[Result] = []

    def vals(key: str, field: str) -> list[float | None]:
        out: list[float | None] = []
        for o in by_key.get(key, []):
            v = None if o.value is None else o.value.get(field)
            out.append(float(v) if isinstance(v, int | float) else None)
        return out

    def errors(key: str) -> str:
        errs = [o.error for o in by_key.get(key, []) if o.error]
        return "; ".join(sorted(set(errs)))[:600]

    def add(
        bench: str,
        name: str,
        metric: str,
        unit: str,
        values: list[float | None],
        *,
        key: str | None = None,
        note: str = "",
        better: str = "higher",
    ) -> None:
        status = "ok"
        if key is not None and key not in by_key:
            status, note = "skipped", skipped_reason(key) or note
        elif not any(v is not None for v in values):
            status = "failed"
            note = (errors(key) if key else "") or note or "no value measured"
        elif key is not None and errors(key):
            note = (note + " " if note else "") + "some runs failed: " + errors(key)
        results.append(
            Result(bench, name, metric, unit, values, status=status, note=note, better=better)
        )

    def skipped_reason(key: str) -> str:
        for k, why in skipped.items():
            if key.startswith(k) or k in key:
                return why
        return "not selected (--only)"

    def ratio(
        name: str,
        num: list[float | None],
        den: list[float | None],
        note: str,
        *,
        metric: str = "ratio",
    ) -> None:
        vals_: list[float | None] = []
        for a, b in zip(num, den, strict=False):
            vals_.append(a / b if a is not None and b not in (None, 0) else None)
        if not any(v is not None for v in vals_):
            # A side that was not measured (DBOS not installed, a server missing) or that
            # failed has its own row saying so; the ratio itself is only not computable.
            results.append(
                Result(
                    "compare",
                    name,
                    metric,
                    "x",
                    vals_,
                    status="skipped",
                    note=note + "; a side was not measured (see its own row)",
                )
            )
            return
        add("compare", name, metric, "x", vals_, note=note)

    # -- the limit
    add(
        "raw",
        "raw/sqlite_wal_full",
        "commits",
        "commits/s",
        vals("raw", "sqlite_full_commits_per_s"),
        key="raw",
        note="SQLite WAL, synchronous=FULL, one connection, single-row INSERTs",
    )
    add(
        "raw",
        "raw/pg_1_client",
        "commits",
        "commits/s",
        vals("raw", "pg_1_commits_per_s"),
        key="raw",
        note="PostgreSQL, synchronous_commit=on, psycopg async, 1 connection",
    )
    add(
        "raw",
        "raw/pg_8_clients",
        "commits",
        "commits/s",
        vals("raw", "pg_8_commits_per_s"),
        key="raw",
        note="PostgreSQL, synchronous_commit=on, psycopg async, 8 connections",
    )

    # -- engines
    def engine_rows(prefix: str, system: str, backend: str, variant: str) -> None:
        key = f"{prefix}/{backend}/{variant}"
        base = f"{prefix}/{backend}/{variant}"
        label = f"{system} on {backend}" + (", failing at step 3" if variant == "fail" else "")
        add(
            prefix,
            f"{base}/seq_p50",
            "sequential latency p50",
            "ms",
            vals(key, "seq_p50_ms"),
            key=key,
            note=label,
            better="lower",
        )
        add(
            prefix,
            f"{base}/seq_p99",
            "sequential latency p99",
            "ms",
            vals(key, "seq_p99_ms"),
            key=key,
            note=label,
            better="lower",
        )
        add(
            prefix,
            f"{base}/throughput",
            "concurrent throughput",
            "sagas/s",
            vals(key, "conc_sagas_per_s"),
            key=key,
            note=label,
        )
        add(
            prefix,
            f"{base}/cpu_per_saga",
            "client CPU per saga (concurrent)",
            "ms",
            vals(key, "conc_cpu_ms_per_saga"),
            key=key,
            note=label,
            better="lower",
        )
        add(
            prefix,
            f"{base}/seq_cpu_per_saga",
            "client CPU per saga (sequential)",
            "ms",
            vals(key, "seq_cpu_ms_per_saga"),
            key=key,
            note=label,
            better="lower",
        )
        add(
            prefix,
            f"{base}/runqueue_wait",
            "time waiting for a CPU (concurrent phase)",
            "share of wall",
            vals(key, "conc_runqueue_wait_share"),
            key=key,
            note=label
            + "; summed over the process's threads / wall time: the machine's other load",
            better="lower",
        )
        what = (
            "write transactions committed (sagakit stores, counted in-process)"
            if prefix == "engine"
            else "SQLAlchemy commits (DBOS system database; read transactions included)"
        )
        add(
            prefix,
            f"{base}/commits_per_saga_conc",
            "commits per saga (concurrent)",
            "commits",
            vals(key, "conc_commits_per_saga"),
            key=key,
            note=f"{label}; {what}",
            better="lower",
        )
        add(
            prefix,
            f"{base}/commits_per_saga_seq",
            "commits per saga (sequential)",
            "commits",
            vals(key, "seq_commits_per_saga"),
            key=key,
            note=f"{label}; {what}",
            better="lower",
        )

    for variant in ("ok", "fail"):
        for backend in ("sqlite", "postgres"):
            engine_rows("engine", "sagakit", backend, variant)
        for backend in ("postgres", "sqlite", "sqlite-wal"):
            if variant == "fail" and backend == "sqlite":
                continue
            engine_rows("dbos", "DBOS 3.4", backend, variant)

    # -- comparisons, run by run
    def tp(key: str) -> list[float | None]:
        return vals(key, "conc_sagas_per_s")

    for variant in ("ok", "fail"):
        sfx = "" if variant == "ok" else "_fail"
        ratio(
            f"compare/throughput/sagakit_pg_vs_dbos_pg{sfx}",
            tp(f"engine/postgres/{variant}"),
            tp(f"dbos/postgres/{variant}"),
            f"concurrent sagas/s, sagakit / DBOS, both on PostgreSQL ({variant})",
        )
        ratio(
            f"compare/throughput/sagakit_sqlite_vs_dbos_sqlite_wal{sfx}",
            tp(f"engine/sqlite/{variant}"),
            tp(f"dbos/sqlite-wal/{variant}"),
            f"concurrent sagas/s, sagakit (WAL, FULL) / DBOS (WAL, FULL) ({variant})",
        )
        ratio(
            f"compare/cpu/dbos_pg_vs_sagakit_pg{sfx}",
            vals(f"dbos/postgres/{variant}", "conc_cpu_ms_per_saga"),
            vals(f"engine/postgres/{variant}", "conc_cpu_ms_per_saga"),
            f"client CPU per saga, DBOS / sagakit (how many times less CPU sagakit "
            f"uses), PostgreSQL ({variant})",
        )
        ratio(
            f"compare/seq_p50/dbos_pg_vs_sagakit_pg{sfx}",
            vals(f"dbos/postgres/{variant}", "seq_p50_ms"),
            vals(f"engine/postgres/{variant}", "seq_p50_ms"),
            f"sequential p50, DBOS / sagakit (> 1: sagakit is faster), PostgreSQL ({variant})",
        )
    ratio(
        "compare/throughput/sagakit_sqlite_vs_dbos_sqlite_default",
        tp("engine/sqlite/ok"),
        tp("dbos/sqlite/ok"),
        "concurrent sagas/s, sagakit (WAL, FULL) / DBOS on SQLite in its default "
        "journal mode (DELETE, FULL)",
    )
    ratio(
        "compare/seq_p50/dbos_sqlite_wal_vs_sagakit_sqlite",
        vals("dbos/sqlite-wal/ok", "seq_p50_ms"),
        vals("engine/sqlite/ok", "seq_p50_ms"),
        "sequential p50, DBOS / sagakit (> 1: sagakit is faster), SQLite WAL+FULL",
    )

    # how close to the limit: sagas/s x commits/saga vs raw commits/s
    for backend, raw_field, seq_field, label, seq_label in (
        (
            "sqlite",
            "sqlite_full_commits_per_s",
            "sqlite_full_commits_per_s",
            "SQLite WAL+FULL, 1 connection",
            "SQLite WAL+FULL, 1 connection",
        ),
        (
            "postgres",
            "pg_8_commits_per_s",
            "pg_1_commits_per_s",
            "PostgreSQL, 8 clients",
            "PostgreSQL, 1 client",
        ),
    ):
        key = f"engine/{backend}/ok"
        thr, cps = tp(key), vals(key, "conc_commits_per_saga")
        used = [
            a * b if a is not None and b is not None else None
            for a, b in zip(thr, cps, strict=False)
        ]
        ratio(
            f"compare/limit/{backend}_commit_rate_used",
            used,
            vals("raw", raw_field),
            f"sagakit's durable commits/s while running concurrently / raw commits/s "
            f"({label}); far below 1: the database is not the bottleneck",
            metric="share of the raw commit rate",
        )
        seq_cps = vals(key, "seq_commits_per_saga")
        ceiling = [
            r / c if r is not None and c else None
            for r, c in zip(vals("raw", seq_field), seq_cps, strict=False)
        ]
        add(
            "compare",
            f"compare/limit/{backend}_seq_ceiling",
            "sequential sagas/s if only commits cost time (raw commits/s / commits per saga)",
            "sagas/s",
            ceiling,
            note=f"{seq_label}: the ceiling for one saga at a time with today's commit count",
        )
        add(
            "compare",
            f"compare/limit/{backend}_seq_commit_floor_ms",
            "sequential latency floor from commits alone (commits per saga / raw commits/s)",
            "ms",
            [1000 / c if c else None for c in ceiling],
            better="lower",
            note=f"{seq_label}; compare with engine/{backend}/ok/seq_p50",
        )

    # -- scale: waiting timers
    for backend in ("sqlite", "postgres"):
        key = f"timers/{backend}"
        n = sizes.timers_n
        add(
            "timers",
            f"{key}/worker_rss_idle",
            f"worker RSS with {n:,} sagas waiting",
            "MB",
            vals(key, "worker_rss_idle_mb"),
            key=key,
            better="lower",
            note="a fresh worker process opened on the store, idle, every saga waiting on "
            "its durable timer",
        )
        add(
            "timers",
            f"{key}/worker_peak_rss",
            "worker peak RSS while firing them all",
            "MB",
            vals(key, "worker_peak_rss_mb"),
            key=key,
            better="lower",
        )
        add(
            "timers",
            f"{key}/creator_rss",
            f"RSS of the process that started {n:,}",
            "MB",
            vals(key, "creator_rss_after_mb"),
            key=key,
            better="lower",
        )
        add(
            "timers",
            f"{key}/fire_s",
            f"time to fire {n:,} due timers (all terminal)",
            "s",
            vals(key, "fire_s"),
            key=key,
            better="lower",
            note="the worker's clock jumps past the 1 h step timeout: all due at once",
        )
        add(
            "timers",
            f"{key}/fire_rate",
            "timers fired",
            "timers/s",
            vals(key, "fire_per_s"),
            key=key,
        )
        add(
            "timers",
            f"{key}/create_rate",
            "waiting sagas started (batches of 1,000)",
            "sagas/s",
            vals(key, "create_per_s"),
            key=key,
        )

    # -- scale: listing
    for backend in ("sqlite", "postgres"):
        key = f"listing/{backend}"
        rows = sizes.list_rows
        for q, label in (
            ("list_all", "list_sagas(limit=50)"),
            ("list_running", "list_sagas(states=[RUNNING], limit=50) (2% of rows)"),
            ("list_manual", "list_sagas(states=[FAILED_NEEDS_MANUAL, TIMED_OUT]) (1%)"),
            ("list_succeeded_offset_5000", "list_sagas(states=[SUCCEEDED], offset=5000)"),
            ("count", "count_sagas()"),
        ):
            for p in ("p50", "p99"):
                add(
                    "listing",
                    f"{key}/{q}_{p}",
                    f"{label} {p} at {rows:,} rows",
                    "ms",
                    vals(key, f"{q}_{p}_ms"),
                    key=key,
                    better="lower",
                )
        worst: list[float | None] = []
        for o in by_key.get(key, []):
            if o.value is None:
                worst.append(None)
                continue
            worst.append(
                max(
                    v for k, v in o.value.items() if k.startswith("list_") and k.endswith("_p99_ms")
                )
            )
        add(
            "listing",
            f"{key}/worst_list_p99",
            f"worst list query p99 at {rows:,} rows",
            "ms",
            worst,
            key=key,
            better="lower",
        )
        add(
            "listing",
            f"{key}/fill_s",
            f"bulk insert of {rows:,} rows (setup)",
            "s",
            vals(key, "fill_s"),
            key=key,
            better="lower",
        )

    # -- recovery
    key = "recovery/sqlite"
    n = sizes.recovery_n
    add(
        "recovery",
        f"{key}/recovery_s",
        f"kill -9 with {n} in flight: restart -> all terminal",
        "s",
        vals(key, "recovery_s"),
        key=key,
        better="lower",
        note="from spawning the new worker process (interpreter start included)",
    )
    add(
        "recovery",
        f"{key}/recovery_after_open_s",
        "engine open -> all terminal",
        "s",
        vals(key, "recovery_after_open_s"),
        key=key,
        better="lower",
    )
    add(
        "recovery",
        f"{key}/in_flight_at_kill",
        "sagas not terminal when killed",
        "sagas",
        vals(key, "in_flight_at_kill"),
        key=key,
    )
    add(
        "recovery",
        f"{key}/participant_duplicates",
        "duplicate effects, participant steps",
        "effects",
        vals(key, "participant_duplicates"),
        key=key,
        better="lower",
        note="inbox + idempotency in the participant's transaction: must be 0",
    )
    add(
        "recovery",
        f"{key}/local_reruns",
        "re-runs of local steps (at least once, by design)",
        "effects",
        vals(key, "local_reruns"),
        key=key,
        better="lower",
        note="a local step whose effect committed but whose checkpoint did not runs again "
        "with the same idempotency key",
    )
    add(
        "recovery",
        f"{key}/succeeded",
        "sagas SUCCEEDED after the restart",
        "sagas",
        vals(key, "succeeded"),
        key=key,
    )

    # -- distributed checkout
    key = "checkout/postgres+nats"
    w, nb = sizes.checkout_window, sizes.checkout_burst
    add(
        "checkout",
        "checkout/throughput",
        f"checkouts/s, steady load ({sizes.checkout_orders:,} orders, <= {w} in flight)",
        "checkouts/s",
        vals(key, "win_per_s"),
        key=key,
    )
    add(
        "checkout",
        "checkout/seq_p50",
        "end-to-end p50, one order at a time",
        "ms",
        vals(key, "seq_p50_ms"),
        key=key,
        better="lower",
        note="placed -> COMPLETED on the client's clock, idle system",
    )
    add(
        "checkout",
        "checkout/seq_p99",
        "end-to-end p99, one order at a time",
        "ms",
        vals(key, "seq_p99_ms"),
        key=key,
        better="lower",
    )
    add(
        "checkout",
        "checkout/hop_outbox",
        "a message in the outbox, one order at a time (p50)",
        "ms",
        vals(key, "hop_outbox_ms"),
        key=key,
        better="lower",
        note="writer's transaction start -> publish acknowledged (commit, wake-up, relay)",
    )
    add(
        "checkout",
        "checkout/hop_delivery",
        "a message from broker to consumer, one order at a time (p50)",
        "ms",
        vals(key, "hop_delivery_ms"),
        key=key,
        better="lower",
        note="publish acknowledged -> the consumer's transaction starts",
    )
    add(
        "checkout",
        "checkout/steady_p50",
        f"end-to-end p50 under steady load (<= {w} in flight)",
        "ms",
        vals(key, "win_e2e_p50_ms"),
        key=key,
        better="lower",
        note="saga updated_at - created_at",
    )
    add(
        "checkout",
        "checkout/steady_completed",
        "steady-load orders COMPLETED",
        "orders",
        vals(key, "win_completed"),
        key=key,
    )
    add(
        "checkout",
        "checkout/messages",
        "messages per checkout (outbox rows)",
        "messages",
        vals(key, "win_messages_per_checkout"),
        key=key,
        better="lower",
    )
    add(
        "checkout",
        "checkout/commits",
        "write commits per checkout (5 stores, the 6 processes + the driver)",
        "commits",
        vals(key, "win_commits_per_checkout"),
        key=key,
        better="lower",
    )
    add(
        "checkout",
        "checkout/cpu",
        "CPU per checkout (user + system of the 6 processes)",
        "ms",
        vals(key, "win_cpu_ms_per_checkout"),
        key=key,
        better="lower",
    )
    if nb:
        add(
            "checkout",
            "checkout/burst_throughput",
            f"checkouts/s, {nb:,} placed at once",
            "checkouts/s",
            vals(key, "burst_per_s"),
            key=key,
        )
        add(
            "checkout",
            "checkout/burst_completed",
            f"burst orders COMPLETED (of {nb:,})",
            "orders",
            vals(key, "burst_completed"),
            key=key,
        )
        add(
            "checkout",
            "checkout/burst_p50",
            "end-to-end p50 of the burst",
            "ms",
            vals(key, "burst_e2e_p50_ms"),
            key=key,
            better="lower",
        )

    # targets
    by_name = {r.name: r for r in results}
    for t in TARGETS:
        r = by_name.get(t.result)
        if r is None:
            continue
        r.target = f"{t.op} {t.value:g} {t.unit}"
        r.better = "higher" if t.op == ">=" else "lower"
    return results


# -- writing the report --------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if v == int(v) and abs(v) < 1e6:
        return f"{int(v):,}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _otel_note(env: dict[str, Any]) -> str:
    version = env.get("opentelemetry_api") or _installed("opentelemetry-api")
    if not version:
        return "not installed (sagakit's tracing hooks are no-ops)"
    return f"{version}: sagakit's tracing hooks are live; no tracer provider is configured"


def _installed(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _met(t: Target, median: float | None) -> tuple[str, str]:
    if median is None:
        return "—", "not measured"
    if t.op == ">=":
        ok = median >= t.value
        ratio = median / t.value if t.value else float("inf")
        if ok:
            how = f"{ratio:.2f}x of target"
        elif median:
            how = f"missed: {ratio:.2f}x of target ({t.value / median:.1f}x short)"
        else:
            how = "missed"
    else:
        ok = median <= t.value
        if t.value == 0:
            how = "met" if ok else f"missed by {median:g}"
        else:
            ratio = median / t.value
            how = f"{ratio:.2f}x of the limit" if ok else f"missed: {ratio:.1f}x over the limit"
    return ("yes" if ok else "**no**"), how


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def write_report(
    path: Path,
    *,
    results: list[Result],
    env: dict[str, Any],
    runs: int,
    quick: bool,
    sizes: Any,
    raw: dict[str, list[Any]],
    profiles: list[dict[str, Any]],
    skipped: dict[str, str],
) -> None:
    by_name = {r.name: r for r in results}
    L: list[str] = []
    add = L.append
    add("# sagakit benchmark results")
    add("")
    add(
        f"Generated by `python benchmarks/run.py{' --quick' if quick else ''} --runs {runs}` "
        f"on {time.strftime('%Y-%m-%d %H:%M %Z')} in {env.get('elapsed_s', '?')} s. "
        "Every number is the **median of "
        f"{runs} run{'s' if runs != 1 else ''}** (min and max beside it); each run measures "
        "every variant one after the other in fresh processes, and every ratio is taken run "
        "by run (sagakit's run *i* against the peer's or the limit's run *i*), so a "
        "comparison is always side by side under the same conditions."
    )
    if quick:
        add("")
        add(
            "**Quick mode** (what CI runs): small sizes, so scale targets are *not* "
            "checked at their stated scale; use the full run for the numbers that count."
        )
    add("")
    add("## Machine, versions, settings")
    add("")
    pg = env.get("postgresql_settings", {})
    facts = [
        ("CPU", f"{env.get('cores')} cores, {env.get('cpu_model')}"),
        ("memory", f"{env.get('memory_gib')} GiB"),
        ("kernel", str(env.get("kernel"))),
        ("load average before / after", f"{env.get('load_before')} / {env.get('load_after')}"),
        ("Python", str(env.get("python"))),
        ("SQLite", str(env.get("sqlite"))),
        ("PostgreSQL", str(env.get("postgresql", "not reachable"))),
        ("sagakit", str(env.get("sagakit"))),
        ("DBOS Transact", str(env.get("dbos", "not installed"))),
        ("psycopg", str(env.get("psycopg"))),
        ("opentelemetry-api", _otel_note(env)),
        ("sagakit on SQLite", "journal_mode=WAL, synchronous=FULL (the SQLiteStore default)"),
        (
            "DBOS on SQLite",
            "`dbos/sqlite`: DBOS's default (journal_mode=DELETE, synchronous=FULL); "
            "`dbos/sqlite-wal`: the file switched to WAL first, synchronous=FULL",
        ),
        (
            "PostgreSQL",
            ", ".join(f"{k}={v}" for k, v in sorted(pg.items())) or "—",
        ),
        ("sagakit on PostgreSQL", "its own schema in database `test`, dropped after each run"),
        ("DBOS on PostgreSQL", "a fresh system database per run, dropped after"),
    ]
    L += _table([(k, v) for k, v in facts], ("", ""))
    add("")
    load = env.get("load_before") or [0.0]
    if load and load[0] > 1.0:
        add(
            f"> The machine was shared while this ran (load average {load[0]:.1f} on "
            f"{env.get('cores')} cores at the start): other processes competed for the CPUs "
            "and the disk's fsyncs. Absolute numbers are depressed and noisy; the ratios, "
            "measured side by side, are the robust part."
        )
        add("")
    sizes_d = sizes.__dict__
    add(
        "Sizes: "
        + ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in sizes_d.items())
    )
    add("")

    # -- targets
    add("## Targets")
    add("")
    rows = []
    for t in TARGETS:
        r = by_name.get(t.result)
        med = None if r is None else summary(r.values)["median"]
        met, how = _met(t, med)
        scale = ""
        if t.scale_note:
            n = sizes_d[t.scale_note]
            stated = 100_000 if t.scale_note == "timers_n" else 1_000_000
            if n != stated:
                scale = f" (measured at {n:,}, not {stated:,})"
        status = "" if r is None or r.status == "ok" else f" ({r.status}: {r.note[:200]})"
        rows.append(
            (
                t.label + scale,
                f"{t.op} {t.value:g} {t.unit}",
                f"{_fmt(med)} {t.unit}" + status,
                met,
                how,
            )
        )
    L += _table(rows, ("target", "goal", "measured (median)", "met", "ratio"))
    add("")

    # -- result tables per bench
    titles = {
        "raw": "The limit: raw durable commits/s (same run)",
        "engine": "sagakit engine: 4 local steps (and failing at step 3, 2 compensations)",
        "dbos": "DBOS Transact 3.4: the same workflow (try/except compensations)",
        "compare": "Comparisons (ratios taken run by run)",
        "timers": "Scale: sagas waiting on durable timers",
        "listing": "Scale: listing and counting sagas",
        "recovery": "Recovery after kill -9",
        "checkout": (
            "Distributed checkout (PostgreSQL + NATS JetStream; worker, relay and 4 services "
            "as separate processes)"
        ),
    }
    for bench, title in titles.items():
        rs = [r for r in results if r.bench == bench]
        if not rs:
            continue
        add(f"## {title}")
        add("")
        rows8: list[tuple[str, ...]] = []
        for r in rs:
            s = summary(r.values)
            note = r.note if r.status == "ok" else f"{r.status}: {r.note}"
            rows8.append(
                (
                    f"`{r.name}`",
                    r.metric,
                    r.unit,
                    _fmt(s["median"]),
                    _fmt(s["min"]),
                    _fmt(s["max"]),
                    str(len([v for v in r.values if v is not None])),
                    note.replace("|", "/")[:300],
                )
            )
        L += _table(rows8, ("result", "metric", "unit", "median", "min", "max", "runs", "note"))
        add("")
        if bench == "checkout":
            _checkout_notes(L, raw.get("checkout/postgres+nats", []), skipped)
        if bench == "recovery":
            _recovery_notes(L, raw.get("recovery/sqlite", []))

    # -- profiles
    if profiles:
        add("## Where the time goes (cProfile of the concurrent phase)")
        add("")
        add(
            "The engine's concurrent phase (`start_many` of "
            f"{sizes_d['engine_conc']:,} sagas, 4 local steps) under cProfile. Own time "
            "grouped by area, then the top functions by own time and sagakit's by "
            "cumulative time. The profiler measures wall-clock time and slows everything "
            "down, so the shares are the point; for a coroutine, each resumption after an "
            "`await` counts as a call."
        )
        add("")
        for p in profiles:
            m = p.get("measured", {})
            add(
                f"### {p['backend']} — {_fmt(m.get('conc_sagas_per_s'))} sagas/s and "
                f"{_fmt(m.get('conc_cpu_ms_per_saga'))} ms CPU/saga under the profiler; "
                f"{_fmt(p['total_s'])} s profiled"
            )
            add("")
            L += _table(
                [
                    (a["area"], _fmt(a["own_s"]), f"{a['share'] * 100:.1f}%")
                    for a in p["areas"][:14]
                ],
                ("area", "own s", "share"),
            )
            add("")
            L += _table(
                [
                    (f"`{f['function']}`", str(f["calls"]), _fmt(f["own_s"]), _fmt(f["cum_s"]))
                    for f in p["top_own"][:15]
                ],
                ("top by own time", "calls", "own s", "cum s"),
            )
            add("")
            L += _table(
                [
                    (f"`{f['function']}`", str(f["calls"]), _fmt(f["own_s"]), _fmt(f["cum_s"]))
                    for f in p["top_cum"][:15]
                ],
                ("sagakit by cumulative time", "calls", "own s", "cum s"),
            )
            add("")

    add(_reflow(findings(by_name, profiles, sizes)))
    path.write_text("\n".join(L) + "\n", encoding="utf-8")


def _checkout_notes(L: list[str], outcomes: list[Any], skipped: dict[str, str]) -> None:
    if "checkout" in skipped:
        L.append(f"Not measured: {skipped['checkout']}.")
        L.append("")
        return
    for i, o in enumerate(outcomes, 1):
        if o.value is None:
            L.append(f"- run {i}: **failed**: {o.error}")
            continue
        v = o.value
        for phase in ("win", "burst"):
            if f"{phase}_orders" not in v:
                continue
            name = "steady" if phase == "win" else "burst"
            bits = [f"{v[f'{phase}_completed']} of {v[f'{phase}_orders']} COMPLETED"]
            bits.append(f"states {v.get(f'{phase}_states')}")
            if v.get(f"{phase}_failure_reasons"):
                bits.append(f"reasons {v[f'{phase}_failure_reasons']}")
            L.append(f"- run {i}, {name}: " + "; ".join(bits))
        if v.get("seq_error"):
            L.append(f"- run {i}, sequential: {v['seq_error'][:300]}")
    L.append("")


def _recovery_notes(L: list[str], outcomes: list[Any]) -> None:
    for i, o in enumerate(outcomes, 1):
        if o.value is None:
            L.append(f"- run {i}: **failed**: {o.error}")
            continue
        v = o.value
        L.append(
            f"- run {i}: at the kill {v['at_kill']}; after the restart "
            f"{v['local_effects']} local effects ({v['local_reruns']} re-runs) and "
            f"{v['participant_effects']} participant effects ({v['participant_duplicates']} "
            f"duplicates) for {v['expected_effects_each']} expected each"
        )
    L.append("")


def _reflow(text: str, width: int = 92) -> str:
    """Re-wrap paragraphs and numbered items after the numbers were filled in."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        starts_item = bool(re.match(r"\d+\. ", line))
        if not line.strip() or line.startswith("#"):
            blocks.append([line])
            blocks.append([])
        elif starts_item or not blocks or not blocks[-1]:
            blocks.append([line])
        else:
            blocks[-1].append(line.strip())
    out: list[str] = []
    for block in blocks:
        if not block:
            continue
        first = block[0]
        if not first.strip() or first.startswith("#"):
            out.append(first)
            continue
        item = re.match(r"(\d+\. )", first)
        indent = " " * len(item.group(1)) if item else ""
        joined = " ".join([first.strip(), *block[1:]])
        out.append(textwrap.fill(joined, width, subsequent_indent=indent, break_on_hyphens=False))
    return "\n".join(out)


def _m(by_name: dict[str, Result], name: str) -> str:
    r = by_name.get(name)
    return "—" if r is None else _fmt(summary(r.values)["median"])


def _area_share(profiles: list[dict[str, Any]], backend: str, needle: str) -> str:
    for p in profiles:
        if p["backend"] == backend:
            share = sum(a["share"] for a in p["areas"] if needle in a["area"])
            return f"{share * 100:.0f}%"
    return "—"


def _cum(profiles: list[dict[str, Any]], backend: str, *needles: str) -> str:
    """Cumulative seconds of sagakit functions matching ``needles``, as a share of all."""
    for p in profiles:
        if p["backend"] == backend:
            total = p["total_s"] or 1.0
            got = sum(f["cum_s"] for f in p["top_cum"] if any(n in f["function"] for n in needles))
            return f"{got / total * 100:.0f}%"
    return "—"


def findings(by_name: dict[str, Result], profiles: list[dict[str, Any]], sizes: Any) -> str:
    """The analysis, with this run's numbers filled in."""
    m = functools.partial(_m, by_name)

    def pct(name: str) -> str:
        r = by_name.get(name)
        v = None if r is None else summary(r.values)["median"]
        return "—" if v is None else f"{v * 100:.1f}%"

    cpu = by_name.get("checkout/cpu")
    cpu_ms = None if cpu is None else summary(cpu.values)["median"]
    cap = "—" if not cpu_ms else f"{2000 / cpu_ms:.0f}"
    ratio = by_name.get("compare/throughput/sagakit_pg_vs_dbos_pg")
    vs_dbos = None if ratio is None else summary(ratio.values)["median"]
    target = (
        "the 30x target: not measured"
        if vs_dbos is None
        else ("meeting the 30x target" if vs_dbos >= 30 else "short of the 30x target")
    )
    return f"""## Findings and next steps

Proposals with this run's evidence. In short: the databases' commit rates are not the
limit (sagakit commits in batches: it uses {pct("compare/limit/postgres_commit_rate_used")}
of PostgreSQL's and {pct("compare/limit/sqlite_commit_rate_used")} of SQLite's raw commit
rate while running flat out); CPU is, the client's Python per transition and, on
PostgreSQL, the server's own work per statement, on the same two cores; for the
distributed checkout, the time a message spends between two processes. sagakit beats DBOS
on throughput ({m("compare/throughput/sagakit_pg_vs_dbos_pg")}x on PostgreSQL,
{m("compare/throughput/sagakit_sqlite_vs_dbos_sqlite_wal")}x on SQLite WAL) and on CPU
({m("compare/cpu/dbos_pg_vs_sagakit_pg")}x less per saga), {target}.

**Done since the first full run** (each measured side by side before and after when it
landed; see git log): local steps run inline (5 commits per 4-step saga instead of ~25,
no relay or mailbox hand-off), up to 4 batches at once (one's commit overlaps the next's
work: PostgreSQL ~920 -> ~1,360 sagas/s side by side); reply batches record their inbox
entries and lock their sagas in one round trip; a transaction's writes are buffered and
sent as one statement (one CTE per table, rows as a JSON array, mailbox ids reserved in
blocks) that checks its own saga writes, so COMMIT travels with it: a local step's
transaction is 5 statements in 2 round trips instead of 10 in 4 (sequential client CPU
-25% side by side); participants read inbox and idempotency records in one round
trip and write their record without waiting for an answer; the relay with NATS locks
its batch in the transaction that marks it (one commit per batch); steps are stored as
compact rows; tracing costs nothing without a provider; saga counts come from
per-state counters.

1. **Engine CPU: {m("engine/postgres/ok/cpu_per_saga")} ms per saga on PostgreSQL**
   (target 0.5; {m("engine/sqlite/ok/cpu_per_saga")} ms on SQLite). The profile spreads
   it thin: JSON {_area_share(profiles, "postgres", "json")}, the state machine
   {_area_share(profiles, "postgres", "sagakit state machine")}, instances (copy,
   decode) {_area_share(profiles, "postgres", "sagakit instance")}, psycopg
   {_area_share(profiles, "postgres", "psycopg (driver")}, and
   {_area_share(profiles, "postgres", "idle")} of the wall time the process waits for
   the server. The server is the other half: PostgreSQL's own CPU is not measured by
   this suite, but read by hand from its processes (2026-11-28) it was about as much per
   saga as the client's, so on 2 cores the two together cap throughput well below the
   target whatever the client saves. **Next steps:** re-encode a saga's `data` only when
   a transition changed it (most do not); server work per transition (a state change
   updates an indexed column, so no HOT update; the per-state counter row; the timer
   upsert each step). Throughput also scales with worker processes against one
   database; on this 2-core machine they compete with PostgreSQL.
2. **Sequential latency: {m("engine/postgres/ok/seq_p50")} ms p50 on PostgreSQL,
   {m("engine/sqlite/ok/seq_p50")} ms on SQLite** (target 2.5). Commits alone set a
   floor of {m("compare/limit/postgres_seq_commit_floor_ms")} ms on PostgreSQL and
   {m("compare/limit/sqlite_seq_commit_floor_ms")} ms on SQLite at this machine's raw
   commit rates ({m("engine/sqlite/ok/commits_per_saga_seq")} commits per saga: one per
   step, each step's result durable before the next step runs); the rest is client CPU
   ({m("engine/postgres/ok/seq_cpu_per_saga")} ms per saga: psycopg and asyncio per
   statement and per wait, 5 statements and 2 round trips per transaction) and the
   server's work (the write statement, the commit's flush to disk). Running several
   local steps in one transaction would break that durability promise and is not
   proposed. Tried and dropped (side by side, 2026-11-28): ignoring the notifications
   the process itself sent (no change). **Next step:** the server's share, which is now
   half: a transition rewrites the saga row and, when its state changes, every index on
   it (no HOT update), and upserts the step's timer; fewer indexes and timers written
   per step.
3. **SQLite: {m("engine/sqlite/ok/throughput")} sagas/s** (target 5,000), one core busy
   and SQLite's own statement work about a third of it. Batches now load their sagas and
   record their inbox ids with one statement each. **Next steps:** a write-behind buffer
   like PostgreSQL's (one executemany per table per transaction instead of statements per
   transition); an instance cache (a saga this process wrote last is not read and decoded
   again; the version check still guards against another writer). **A cost paid on
   purpose** (side by side, 2026-12-05): local steps now run side by side, blocking ones
   in the engine's thread pool, so that a slow step never delays other sagas (a 3 s step
   beside 100 fast sagas: their p99 went from seconds to under 0.1 s). That costs SQLite
   4-5% of its throughput and ~0.9 ms of sequential latency per 4-step saga (a thread
   hop and a task per step; PostgreSQL within noise). Long-lived threads that hand their
   results back in batches cut an initial 20% loss to this; pool designs, thread counts
   and the switch interval changed it by at most 1%. An opt-in for steps known to be
   fast (run on the loop) would win it back.
4. **Distributed checkout: {m("checkout/seq_p50")} ms for one order**, 14 messages
   one after the other: each waits {m("checkout/hop_outbox")} ms in the outbox (the rest
   of the writer's transaction and its commit, the NOTIFY, the relay's wake-up, lock and
   publish) and travels {m("checkout/hop_delivery")} ms from the broker's
   acknowledgement to its consumer. Under load, {m("checkout/throughput")} checkouts/s
   with <= {sizes.checkout_window} in flight and {m("checkout/burst_throughput")}/s for
   a burst; CPU is {m("checkout/cpu")} ms per checkout over the six processes, so two
   cores, even without PostgreSQL and NATS on them, cap it near {cap} checkouts/s.
   Tried and dropped (side by side, 2026-11-28): the worker and the services publishing
   their own outbox rows (the relay role in each) left the outbox wait unchanged and
   tripled the commits per checkout, so the hop is not the NOTIFY but the work around
   it: the rest of the writer's transaction and its flush to disk, the relay's lock and
   the broker's acknowledgement, on two cores shared by seven processes. **Next step:**
   a per-process profile of one hop, to see which of these to cut.
5. **Scale and recovery** (see the targets table): waiting sagas cost little in the
   worker (RSS {m("timers/sqlite/worker_rss_idle")} MB on SQLite and
   {m("timers/postgres/worker_rss_idle")} MB on PostgreSQL with every saga waiting; they
   live in the database); counting is {m("listing/sqlite/count_p99")} /
   {m("listing/postgres/count_p99")} ms p99 and every list query within
   {m("listing/sqlite/worst_list_p99")} / {m("listing/postgres/worst_list_p99")} ms;
   recovery after `kill -9` takes {m("recovery/sqlite/recovery_s")} s with
   {m("recovery/sqlite/participant_duplicates")} duplicate participant effects (local
   steps re-ran {m("recovery/sqlite/local_reruns")} times: the batch whose callables had
   run when the process died; at least once, with the same idempotency key, as
   documented).
"""
