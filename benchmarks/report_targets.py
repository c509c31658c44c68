"""The goals from the benchmarks issue, and how the report checks the results against them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from _common import Result
from report_format import fmt, median, table


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

    @property
    def goal(self) -> str:
        """The goal as the report and the result line state it, e.g. ``>= 3000 sagas/s``."""
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
