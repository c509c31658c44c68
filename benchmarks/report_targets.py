"""The goals from the benchmarks issues, and how the report checks the results against them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from _common import Result
from report_format import fmt, median, table


@dataclass(frozen=True)
class Target:
    """A goal from a benchmarks issue, checked against one result."""

    label: str
    result: str  # Result.name
    op: str  # ">=" or "<="
    value: float
    unit: str
    next_step: str
    scale_note: str = ""

    @property
    def goal(self) -> str:
        """The goal as the report and the result line state it, e.g. ``>= 500 checkouts/s``."""
        return f"{self.op} {self.value:g} {self.unit}"


def _on_both_backends(
    label: str, result: str, value: float, unit: str, next_step: str, scale_note: str
) -> tuple[Target, Target]:
    """An upper limit on SQLite and on PostgreSQL: ``{db}`` and ``{backend}`` filled in."""

    def on(backend: str, db: str) -> Target:
        return Target(
            label.format(db=db),
            result.format(backend=backend),
            "<=",
            value,
            unit,
            next_step,
            scale_note=scale_note,
        )

    return on("sqlite", "SQLite"), on("postgres", "PostgreSQL")


TARGETS: tuple[Target, ...] = (
    # Issue 17's targets (ratios taken run by run against the limit of the same run),
    # then the earlier ones it left as they were.
    Target(
        "distributed checkout >= 500 checkouts/s (steady load)",
        "checkout/throughput",
        ">=",
        500.0,
        "checkouts/s",
        "see 'Next steps' 4.",
    ),
    Target(
        "distributed checkout p50 <= 25 ms (one order at a time, idle system)",
        "checkout/seq_p50",
        "<=",
        25.0,
        "ms",
        "see 'Next steps' 4: 14 messages one after the other, each a hop.",
    ),
    Target(
        "distributed checkout p50 <= 50 ms (under the steady load above)",
        "checkout/steady_p50",
        "<=",
        50.0,
        "ms",
        "see 'Next steps' 4.",
    ),
    Target(
        "distributed checkout CPU <= 3 ms per checkout (its 6 processes summed, not the "
        "driver placing the orders)",
        "checkout/cpu",
        "<=",
        3.0,
        "ms",
        "see 'Next steps' 4 and the per-process profile under the checkout's table (when taken).",
    ),
    Target(
        "distributed checkout <= 1.5 ms per hop (outbox p50 + delivery p50: writer's "
        "transaction start, its commit included, -> consumer's transaction start)",
        "checkout/hop",
        "<=",
        1.5,
        "ms",
        "see 'Next steps' 4: the outbox wait and the delivery, each in its own row.",
    ),
    Target(
        "engine on PostgreSQL >= 0.3 of the raw 8-client commit rate (concurrent sagas/s "
        "/ raw commits/s)",
        "compare/limit/postgres_sagas_vs_raw_8",
        ">=",
        0.3,
        "x raw commits/s",
        "see 'Next steps' 1: client CPU and the server's own work per transition, not the "
        "commit rate, are the limit.",
    ),
    Target(
        "client CPU <= 0.25 ms per saga (PostgreSQL, concurrent)",
        "engine/postgres/ok/cpu_per_saga",
        "<=",
        0.25,
        "ms",
        "see 'Next steps' 1 (the profile shows where the CPU goes).",
    ),
    Target(
        "sequential p50 <= 10 single-commit times (PostgreSQL; one commit: 1000 / raw "
        "1-client commits/s)",
        "compare/limit/postgres_seq_p50_in_commits",
        "<=",
        10.0,
        "commit times",
        "see 'Next steps' 2: one commit per step, each durable before the next runs.",
    ),
    Target(
        "client CPU <= 1 ms per saga (PostgreSQL, sequential)",
        "engine/postgres/ok/seq_cpu_per_saga",
        "<=",
        1.0,
        "ms",
        "see 'Next steps' 2: psycopg and asyncio per statement and per wait.",
    ),
    Target(
        "engine on SQLite WAL+FULL >= the raw commit rate (concurrent sagas/s / raw commits/s)",
        "compare/limit/sqlite_sagas_vs_raw",
        ">=",
        1.0,
        "x raw commits/s",
        "see 'Next steps' 3: a write-behind buffer, an instance cache.",
    ),
    Target(
        "engine on PostgreSQL >= 30x DBOS throughput",
        "compare/throughput/sagakit_pg_vs_dbos_pg",
        ">=",
        30.0,
        "x",
        "see 'Next steps' 1-3: client CPU per transition, the server's own work, "
        "round trips per transaction.",
    ),
    *_on_both_backends(
        "100,000 waiting sagas in <= 300 MB (worker RSS, {db})",
        "timers/{backend}/worker_rss_idle",
        300.0,
        "MB",
        "",
        "timers_n",
    ),
    *_on_both_backends(
        "list queries <= 50 ms p99 at 1,000,000 rows ({db}, worst list query)",
        "listing/{backend}/worst_list_p99",
        50.0,
        "ms",
        "",
        "list_rows",
    ),
    *_on_both_backends(
        "count_sagas() <= 50 ms p99 at 1,000,000 rows ({db})",
        "listing/{backend}/count_p99",
        50.0,
        "ms",
        "see 'Next steps' 5.",
        "list_rows",
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


def apply_targets(results: list[Result]) -> None:
    """Mark each result a target names with the goal and the direction that is better."""
    by_name = {r.name: r for r in results}
    for t in TARGETS:
        r = by_name.get(t.result)
        if r is None:
            continue
        r.target = t.goal
        r.better = "higher" if t.op == ">=" else "lower"


def _met(t: Target, med: float | None) -> tuple[str, str]:
    """The "met" and "ratio" cells for target ``t`` and the median measured."""
    if med is None:
        return "—", "not measured"
    if t.op == ">=":
        ok = med >= t.value
        ratio = med / t.value if t.value else float("inf")
        if ok:
            how = f"{ratio:.2f}x of target"
        elif med:
            how = f"missed: {ratio:.2f}x of target ({t.value / med:.1f}x short)"
        else:
            how = "missed"
    else:
        ok = med <= t.value
        if t.value == 0:
            how = "met" if ok else f"missed by {med:g}"
        else:
            ratio = med / t.value
            how = f"{ratio:.2f}x of the limit" if ok else f"missed: {ratio:.1f}x over the limit"
    return ("yes" if ok else "**no**"), how


def targets_section(by_name: Mapping[str, Result], sizes_d: dict[str, Any]) -> list[str]:
    """The report's "Targets" section: each goal, the median measured, met or not."""
    L = ["## Targets", ""]
    rows = []
    for t in TARGETS:
        r = by_name.get(t.result)
        med = median(by_name, t.result)
        met, how = _met(t, med)
        scale = ""
        if t.scale_note:
            n = sizes_d[t.scale_note]
            stated = 100_000 if t.scale_note == "timers_n" else 1_000_000
            if n != stated:
                scale = f" (measured at {n:,}, not {stated:,})"
        status = "" if r is None or r.status == "ok" else f" ({r.status}: {r.note[:200]})"
        rows.append((t.label + scale, t.goal, f"{fmt(med)} {t.unit}" + status, met, how))
    L += table(rows, ("target", "goal", "measured (median)", "met", "ratio"))
    L.append("")
    return L
