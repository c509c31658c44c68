"""The engine sections: the raw commit-rate limit, sagakit and DBOS side by side, ratios."""

from __future__ import annotations

from bench_dbos import DRIVERS
from report_lines import ResultLines, Row


def limit_results(res: ResultLines) -> None:
    """The limit: raw durable commits/s of each database, measured in the same run."""
    pg = "PostgreSQL, synchronous_commit=on, psycopg async"
    res.rows(
        "raw",
        "raw",
        (
            Row(
                "sqlite_wal_full",
                "commits",
                "commits/s",
                "sqlite_full_commits_per_s",
                note="SQLite WAL, synchronous=FULL, one connection, single-row INSERTs",
            ),
            Row(
                "pg_1_client",
                "commits",
                "commits/s",
                "pg_1_commits_per_s",
                note=f"{pg}, 1 connection",
            ),
            Row(
                "pg_8_clients",
                "commits",
                "commits/s",
                "pg_8_commits_per_s",
                note=f"{pg}, 8 connections",
            ),
        ),
    )


def _engine_rows(res: ResultLines, prefix: str, system: str, backend: str, variant: str) -> None:
    """The lines of one engine (sagakit or DBOS) on one backend, succeeding or failing."""
    key = f"{prefix}/{backend}/{variant}"
    label = f"{system} on {backend}" + (", failing at step 3" if variant == "fail" else "")
    what = (
        "write transactions committed (sagakit stores, counted in-process)"
        if prefix == "engine"
        else "SQLAlchemy commits (DBOS system database; read transactions included)"
    )
    fastest = ", ".join(_fastest_drivers(res, key))
    throughput_note = (
        f"{label}; the fastest way of driving it (rows below), per run: {fastest}"
        if prefix == "dbos" and fastest
        else label
    )
    res.rows(
        prefix,
        key,
        (
            Row("seq_p50", "sequential latency p50", "ms", "seq_p50_ms", "lower", label),
            Row("seq_p99", "sequential latency p99", "ms", "seq_p99_ms", "lower", label),
            Row(
                "throughput",
                "concurrent throughput",
                "sagas/s",
                "conc_sagas_per_s",
                note=throughput_note,
            ),
            Row(
                "cpu_per_saga",
                "client CPU per saga (concurrent)",
                "ms",
                "conc_cpu_ms_per_saga",
                "lower",
                label,
            ),
            Row(
                "seq_cpu_per_saga",
                "client CPU per saga (sequential)",
                "ms",
                "seq_cpu_ms_per_saga",
                "lower",
                label,
            ),
            Row(
                "runqueue_wait",
                "time waiting for a CPU (concurrent phase)",
                "share of wall",
                "conc_runqueue_wait_share",
                "lower",
                label + "; summed over the process's threads / wall time: the machine's other load",
            ),
            Row(
                "commits_per_saga_conc",
                "commits per saga (concurrent)",
                "commits",
                "conc_commits_per_saga",
                "lower",
                f"{label}; {what}",
            ),
            Row(
                "commits_per_saga_seq",
                "commits per saga (sequential)",
                "commits",
                "seq_commits_per_saga",
                "lower",
                f"{label}; {what}",
            ),
        ),
    )


def _fastest_drivers(res: ResultLines, key: str) -> list[str]:
    """The fastest way of driving DBOS in each run of ``key`` (none in results written
    before bench_dbos.py measured several)."""
    return [
        str(o.value["conc_driver"])
        for o in res.by_key.get(key, [])
        if o.value is not None and "conc_driver" in o.value
    ]


def _dbos_driver_rows(res: ResultLines, backend: str, variant: str) -> None:
    """DBOS's throughput with each way of driving it, beside the best."""
    key = f"dbos/{backend}/{variant}"
    if key in res.by_key and not _fastest_drivers(res, key):
        return  # results from before the drivers were measured: nothing to show
    res.rows(
        "dbos",
        key,
        tuple(
            Row(
                f"throughput_{driver}",
                "concurrent throughput",
                "sagas/s",
                f"conc_{driver}_sagas_per_s",
                note=f"DBOS 3.4 on {backend}: {what}",
            )
            for driver, what in DRIVERS.items()
        ),
    )


def engine_results(res: ResultLines) -> None:
    """sagakit and DBOS 3.4 on each backend, the workflow succeeding and failing."""
    for variant in ("ok", "fail"):
        for backend in ("sqlite", "postgres"):
            _engine_rows(res, "engine", "sagakit", backend, variant)
        for backend in ("postgres", "sqlite", "sqlite-wal"):
            if variant == "fail" and backend == "sqlite":
                continue
            _engine_rows(res, "dbos", "DBOS 3.4", backend, variant)
            _dbos_driver_rows(res, backend, variant)


def compare_results(res: ResultLines) -> None:
    """Comparisons, run by run: sagakit against DBOS, and against the raw commit rate."""

    def tp(key: str) -> list[float | None]:
        return res.vals(key, "conc_sagas_per_s")

    for variant in ("ok", "fail"):
        sfx = "" if variant == "ok" else "_fail"
        res.ratio(
            f"compare/throughput/sagakit_pg_vs_dbos_pg{sfx}",
            tp(f"engine/postgres/{variant}"),
            tp(f"dbos/postgres/{variant}"),
            f"concurrent sagas/s, sagakit / DBOS, both on PostgreSQL ({variant})",
        )
        res.ratio(
            f"compare/throughput/sagakit_sqlite_vs_dbos_sqlite_wal{sfx}",
            tp(f"engine/sqlite/{variant}"),
            tp(f"dbos/sqlite-wal/{variant}"),
            f"concurrent sagas/s, sagakit (WAL, FULL) / DBOS (WAL, FULL) ({variant})",
        )
        res.ratio(
            f"compare/cpu/dbos_pg_vs_sagakit_pg{sfx}",
            res.vals(f"dbos/postgres/{variant}", "conc_cpu_ms_per_saga"),
            res.vals(f"engine/postgres/{variant}", "conc_cpu_ms_per_saga"),
            f"client CPU per saga, DBOS / sagakit (how many times less CPU sagakit "
            f"uses), PostgreSQL ({variant})",
        )
        res.ratio(
            f"compare/seq_p50/dbos_pg_vs_sagakit_pg{sfx}",
            res.vals(f"dbos/postgres/{variant}", "seq_p50_ms"),
            res.vals(f"engine/postgres/{variant}", "seq_p50_ms"),
            f"sequential p50, DBOS / sagakit (> 1: sagakit is faster), PostgreSQL ({variant})",
        )
    res.ratio(
        "compare/throughput/sagakit_sqlite_vs_dbos_sqlite_default",
        tp("engine/sqlite/ok"),
        tp("dbos/sqlite/ok"),
        "concurrent sagas/s, sagakit (WAL, FULL) / DBOS on SQLite in its default "
        "journal mode (DELETE, FULL)",
    )
    res.ratio(
        "compare/seq_p50/dbos_sqlite_wal_vs_sagakit_sqlite",
        res.vals("dbos/sqlite-wal/ok", "seq_p50_ms"),
        res.vals("engine/sqlite/ok", "seq_p50_ms"),
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
        thr, cps = tp(key), res.vals(key, "conc_commits_per_saga")
        used = [
            a * b if a is not None and b is not None else None
            for a, b in zip(thr, cps, strict=False)
        ]
        res.ratio(
            f"compare/limit/{backend}_commit_rate_used",
            used,
            res.vals("raw", raw_field),
            f"sagakit's durable commits/s while running concurrently / raw commits/s "
            f"({label}); far below 1: the database is not the bottleneck",
            metric="share of the raw commit rate",
        )
        seq_cps = res.vals(key, "seq_commits_per_saga")
        ceiling = [
            r / c if r is not None and c else None
            for r, c in zip(res.vals("raw", seq_field), seq_cps, strict=False)
        ]
        res.add(
            "compare",
            f"compare/limit/{backend}_seq_ceiling",
            "sequential sagas/s if only commits cost time (raw commits/s / commits per saga)",
            "sagas/s",
            ceiling,
            note=f"{seq_label}: the ceiling for one saga at a time with today's commit count",
        )
        res.add(
            "compare",
            f"compare/limit/{backend}_seq_commit_floor_ms",
            "sequential latency floor from commits alone (commits per saga / raw commits/s)",
            "ms",
            [1000 / c if c else None for c in ceiling],
            better="lower",
            note=f"{seq_label}; compare with engine/{backend}/ok/seq_p50",
        )

    # Issue 17's targets, against the limit measured in the same run.
    res.ratio(
        "compare/limit/postgres_sagas_vs_raw_8",
        tp("engine/postgres/ok"),
        res.vals("raw", "pg_8_commits_per_s"),
        "sagakit's concurrent sagas/s on PostgreSQL / raw commits/s with 8 clients",
        metric="sagas/s per raw commit/s",
    )
    res.ratio(
        "compare/limit/postgres_seq_p50_in_commits",
        res.vals("engine/postgres/ok", "seq_p50_ms"),
        [1000 / c if c else None for c in res.vals("raw", "pg_1_commits_per_s")],
        "sagakit's sequential p50 on PostgreSQL / the time of one raw commit with 1 client "
        "(1000 / its commits/s)",
        metric="sequential p50 in single-commit times",
    )
    res.ratio(
        "compare/limit/sqlite_sagas_vs_raw",
        tp("engine/sqlite/ok"),
        res.vals("raw", "sqlite_full_commits_per_s"),
        "sagakit's concurrent sagas/s on SQLite WAL+FULL / raw commits/s (1 connection)",
        metric="sagas/s per raw commit/s",
    )
