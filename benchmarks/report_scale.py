"""The scale sections: sagas waiting on durable timers, and listing and counting sagas."""

from __future__ import annotations

from typing import Any

from report_lines import ResultLines, Row

_LIST_QUERIES = (
    ("list_all", "list_sagas(limit=50)"),
    ("list_running", "list_sagas(states=[RUNNING], limit=50) (2% of rows)"),
    ("list_manual", "list_sagas(states=[FAILED_NEEDS_MANUAL, TIMED_OUT]) (1%)"),
    ("list_succeeded_offset_5000", "list_sagas(states=[SUCCEEDED], offset=5000)"),
    ("count", "count_sagas()"),
)
"""The queries the listing benchmark times: the field prefix of each, and what it runs."""


def timer_results(res: ResultLines, sizes: Any) -> None:
    """Memory and firing rate with ``sizes.timers_n`` sagas waiting, on each backend."""
    n = sizes.timers_n
    rows = (
        Row(
            "worker_rss_idle",
            f"worker RSS with {n:,} sagas waiting",
            "MB",
            "worker_rss_idle_mb",
            "lower",
            "a fresh worker process opened on the store, idle, every saga waiting on "
            "its durable timer",
        ),
        Row(
            "worker_peak_rss",
            "worker peak RSS while firing them all",
            "MB",
            "worker_peak_rss_mb",
            "lower",
        ),
        Row(
            "creator_rss",
            f"RSS of the process that started {n:,}",
            "MB",
            "creator_rss_after_mb",
            "lower",
        ),
        Row(
            "fire_s",
            f"time to fire {n:,} due timers (all terminal)",
            "s",
            "fire_s",
            "lower",
            "the worker's clock jumps past the 1 h step timeout: all due at once",
        ),
        Row("fire_rate", "timers fired", "timers/s", "fire_per_s"),
        Row(
            "create_rate",
            "waiting sagas started (batches of 1,000)",
            "sagas/s",
            "create_per_s",
        ),
    )
    for backend in ("sqlite", "postgres"):
        res.rows("timers", f"timers/{backend}", rows)


def listing_results(res: ResultLines, sizes: Any) -> None:
    """List and count latencies at ``sizes.list_rows`` rows, on each backend."""
    rows = sizes.list_rows
    queries = [
        Row(f"{q}_{p}", f"{label} {p} at {rows:,} rows", "ms", f"{q}_{p}_ms", "lower")
        for q, label in _LIST_QUERIES
        for p in ("p50", "p99")
    ]
    fill = (Row("fill_s", f"bulk insert of {rows:,} rows (setup)", "s", "fill_s", "lower"),)
    for backend in ("sqlite", "postgres"):
        key = f"listing/{backend}"
        res.rows("listing", key, queries)
        worst: list[float | None] = []
        for o in res.by_key.get(key, []):
            if o.value is None:
                worst.append(None)
                continue
            worst.append(
                max(
                    v for k, v in o.value.items() if k.startswith("list_") and k.endswith("_p99_ms")
                )
            )
        res.add(
            "listing",
            f"{key}/worst_list_p99",
            f"worst list query p99 at {rows:,} rows",
            "ms",
            worst,
            key=key,
            better="lower",
        )
        res.rows("listing", key, fill)
