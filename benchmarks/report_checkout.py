"""The distributed checkout section: PostgreSQL + NATS JetStream, one process per role."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from report_format import per_run
from report_lines import ResultLines, Row


def checkout_results(res: ResultLines, sizes: Any) -> None:
    """Throughput and latency of the checkout: steady load, one at a time, and a burst."""
    key = "checkout/postgres+nats"
    w, nb = sizes.checkout_window, sizes.checkout_burst
    rows = [
        Row(
            "throughput",
            f"checkouts/s, steady load ({sizes.checkout_orders:,} orders, <= {w} in flight)",
            "checkouts/s",
            "win_per_s",
        ),
        Row(
            "seq_p50",
            "end-to-end p50, one order at a time",
            "ms",
            "seq_p50_ms",
            "lower",
            "placed -> COMPLETED on the client's clock, idle system",
        ),
        Row("seq_p99", "end-to-end p99, one order at a time", "ms", "seq_p99_ms", "lower"),
        Row(
            "hop_outbox",
            "a message in the outbox, one order at a time (p50)",
            "ms",
            "hop_outbox_ms",
            "lower",
            "writer's transaction start -> publish acknowledged (commit, wake-up, relay)",
        ),
        Row(
            "hop_delivery",
            "a message from broker to consumer, one order at a time (p50)",
            "ms",
            "hop_delivery_ms",
            "lower",
            "publish acknowledged -> the consumer's transaction starts",
        ),
        Row(
            "steady_p50",
            f"end-to-end p50 under steady load (<= {w} in flight)",
            "ms",
            "win_e2e_p50_ms",
            "lower",
            "saga updated_at - created_at",
        ),
        Row("steady_completed", "steady-load orders COMPLETED", "orders", "win_completed"),
        Row(
            "messages",
            "messages per checkout (outbox rows)",
            "messages",
            "win_messages_per_checkout",
            "lower",
        ),
        Row(
            "commits",
            "write commits per checkout (5 stores, the 6 processes + the driver)",
            "commits",
            "win_commits_per_checkout",
            "lower",
        ),
        Row(
            "cpu",
            "CPU per checkout (user + system of the 6 processes)",
            "ms",
            "win_cpu_ms_per_checkout",
            "lower",
        ),
    ]
    if nb:
        rows += [
            Row(
                "burst_throughput",
                f"checkouts/s, {nb:,} placed at once",
                "checkouts/s",
                "burst_per_s",
            ),
            Row(
                "burst_completed",
                f"burst orders COMPLETED (of {nb:,})",
                "orders",
                "burst_completed",
            ),
            Row("burst_p50", "end-to-end p50 of the burst", "ms", "burst_e2e_p50_ms", "lower"),
        ]
    # A line per process that reported its share, in the order bench_checkout.py runs them.
    per_process = "win_cpu_ms_per_checkout_"
    roles = dict.fromkeys(
        field[len(per_process) :]
        for o in res.by_key.get(key, [])
        if o.value is not None
        for field in o.value
        if field.startswith(per_process)
    )
    rows += [
        Row(
            f"cpu_{role}",
            f"CPU per checkout in the {role} process",
            "ms",
            f"{per_process}{role}",
            "lower",
            "steady load",
        )
        for role in roles
    ]
    # The summed hop goes right after its two parts.
    split = 1 + next(i for i, r in enumerate(rows) if r.suffix == "hop_delivery")
    res.rows("checkout", key, rows[:split], prefix="checkout")
    # The hop of issue 17's target, run by run: the two medians bench_checkout.py takes
    # from the stores' stamps, added. They start at the writer's transaction start, not
    # its commit (no stamp marks the commit), so this is an upper bound on commit ->
    # consumer's transaction start, by the rest of the writer's transaction.
    hop = [
        a + b if a is not None and b is not None else None
        for a, b in zip(
            res.vals(key, "hop_outbox_ms"), res.vals(key, "hop_delivery_ms"), strict=True
        )
    ]
    res.add(
        "checkout",
        "checkout/hop",
        "a message from its writer to its consumer, one order at a time (p50 + p50)",
        "ms",
        hop,
        key=key,
        better="lower",
        note="hop_outbox + hop_delivery: writer's transaction start (its commit included) "
        "-> the consumer's transaction starts",
    )
    res.rows("checkout", key, rows[split:], prefix="checkout")


def _profile_lines(i: int, v: dict[str, Any]) -> list[str]:
    """Run ``i``'s py-spy sample of each process under steady load, or why there is none."""
    if v.get("profile_skipped"):
        return [f"- run {i}, per-process profile: not taken ({v['profile_skipped']})"]
    out: list[str] = []
    for role, p in (v.get("profile") or {}).items():
        if "error" in p:
            out.append(f"- run {i}, {role}: py-spy failed: {p['error'][:200]}")
            continue
        idle = p.get("idle_share")
        top = ", ".join(f"`{fn}` {share * 100:.1f}%" for fn, share in p.get("top", [])[:5])
        out.append(
            f"- run {i}, {role}: {p.get('samples', 0):,} samples, "
            f"{'—' if idle is None else f'{idle * 100:.0f}%'} idle; busiest: {top or '—'}"
        )
    return out


def _run_phases(i: int, v: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for phase in ("win", "burst"):
        if f"{phase}_orders" not in v:
            continue
        name = "steady" if phase == "win" else "burst"
        bits = [f"{v[f'{phase}_completed']} of {v[f'{phase}_orders']} COMPLETED"]
        bits.append(f"states {v.get(f'{phase}_states')}")
        if v.get(f"{phase}_failure_reasons"):
            bits.append(f"reasons {v[f'{phase}_failure_reasons']}")
        out.append(f"- run {i}, {name}: " + "; ".join(bits))
    if v.get("seq_error"):
        out.append(f"- run {i}, sequential: {v['seq_error'][:300]}")
    return out


def checkout_notes(outcomes: Sequence[Any], skipped: dict[str, str]) -> list[str]:
    """Under the checkout table: why it was not measured, or each run's orders and states."""
    if "checkout" in skipped:
        return [f"Not measured: {skipped['checkout']}.", ""]
    lines = [*per_run(outcomes, _run_phases), ""]
    profile = [
        line
        for i, o in enumerate(outcomes, 1)
        if o.value is not None
        for line in _profile_lines(i, o.value)
    ]
    if profile:
        lines += [
            "Where each process spends its time under steady load (py-spy, sampled from "
            "outside at 200/s; idle: waiting in the event loop's selector or on a pool's "
            "queue; a function's share: the samples in which it was the innermost Python "
            "frame, C calls included, out of all samples):",
            "",
            *profile,
            "",
        ]
    return lines
