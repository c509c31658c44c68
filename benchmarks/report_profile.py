"""The profile section: where the engine's time goes under cProfile, by area and function."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from report_format import fmt, table


def _functions(functions: Sequence[dict[str, Any]], first_column: str) -> list[str]:
    """The 15 first functions of a profile's list, with calls, own and cumulative seconds."""
    return table(
        [
            (f"`{f['function']}`", str(f["calls"]), fmt(f["own_s"]), fmt(f["cum_s"]))
            for f in functions[:15]
        ],
        (first_column, "calls", "own s", "cum s"),
    )


def profile_section(profiles: list[dict[str, Any]], sizes_d: dict[str, Any]) -> list[str]:
    """The "Where the time goes" section: one block per profiled backend; none if none."""
    if not profiles:
        return []
    L = [
        "## Where the time goes (cProfile of the concurrent phase)",
        "",
        "The engine's concurrent phase (`start_many` of "
        f"{sizes_d['engine_conc']:,} sagas, 4 local steps) under cProfile. Own time "
        "grouped by area, then the top functions by own time and sagakit's by "
        "cumulative time. The profiler measures wall-clock time and slows everything "
        "down, so the shares are the point; for a coroutine, each resumption after an "
        "`await` counts as a call.",
        "",
    ]
    for p in profiles:
        m = p.get("measured", {})
        L.append(
            f"### {p['backend']} — {fmt(m.get('conc_sagas_per_s'))} sagas/s and "
            f"{fmt(m.get('conc_cpu_ms_per_saga'))} ms CPU/saga under the profiler; "
            f"{fmt(p['total_s'])} s profiled"
        )
        L.append("")
        L += table(
            [(a["area"], fmt(a["own_s"]), f"{a['share'] * 100:.1f}%") for a in p["areas"][:14]],
            ("area", "own s", "share"),
        )
        L.append("")
        L += _functions(p["top_own"], "top by own time")
        L.append("")
        L += _functions(p["top_cum"], "sagakit by cumulative time")
        L.append("")
    return L


def area_share(profiles: list[dict[str, Any]], backend: str, needle: str) -> str:
    """The share of own time in the areas whose name holds ``needle``, on ``backend``."""
    for p in profiles:
        if p["backend"] == backend:
            share = sum(a["share"] for a in p["areas"] if needle in a["area"])
            return f"{share * 100:.0f}%"
    return "—"
