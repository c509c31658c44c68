"""The benchmark suite's quick mode runs end to end and reports well-formed results.

It asserts nothing about speed (CI machines are shared and noisy): only that the one
command works, every result line is JSON with the expected keys, and the report is
written. Benchmarks whose server or peer is missing report ``skipped`` with a reason.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"bench", "name", "metric", "unit", "median", "min", "max", "runs", "values", "status"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_benchmarks_emit_json_results(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    run_py = str(ROOT / "benchmarks" / "run.py")
    proc = subprocess.run(
        [sys.executable, run_py, "--quick", "--runs", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=840,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, "no result lines"
    results: dict[str, dict[str, object]] = {}
    for line in lines:
        result = json.loads(line)
        assert result.keys() >= KEYS, (KEYS - result.keys(), line)
        assert result["status"] in ("ok", "skipped", "failed"), line
        assert isinstance(result["values"], list), line
        if result["status"] == "ok":
            assert result["min"] <= result["median"] <= result["max"], line
        results[result["name"]] = result
    # A missing server or peer is "skipped"; "failed" is the suite's own code broken (the
    # distributed checkout failed unnoticed once: its processes lacked --app).
    failed = {n: r.get("note") for n, r in results.items() if r["status"] == "failed"}
    assert not failed, failed
    # The engine on SQLite needs nothing but the standard library: it always runs.
    for name in (
        "raw/sqlite_wal_full",
        "engine/sqlite/ok/throughput",
        "engine/sqlite/ok/seq_p50",
        "engine/sqlite/fail/throughput",
        "timers/sqlite/worker_rss_idle",
        "listing/sqlite/list_manual_p99",
        "recovery/sqlite/participant_duplicates",
    ):
        assert results[name]["status"] == "ok", results.get(name)
    # Not a speed claim but the proof the recovery benchmark exists for.
    assert results["recovery/sqlite/participant_duplicates"]["median"] == 0
    report = out.read_text(encoding="utf-8")
    assert "## Targets" in report and "## Machine, versions, settings" in report


@pytest.mark.timeout(180)
def test_api_load_benchmark_prints_healthz_percentiles_per_load() -> None:
    # benchmarks/bench_api_load.py at tiny sizes: every load runs and reports /healthz.
    bench = str(ROOT / "benchmarks" / "bench_api_load.py")
    sizes = [
        "--orders=20", "--half-open=20", "--hold=0.5", "--lists=5", "--concurrency=5",
        "--streams=10", "--disconnects=2", "--settle=2", "--pause=0.2",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, bench, *sizes], capture_output=True, text=True, timeout=170, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {row["load"]: row for row in map(json.loads, proc.stdout.splitlines())}
    assert set(rows) == {"idle", "half_open", "list", "batch_cancel", "streams", "disconnect"}
    for row in rows.values():
        assert row["probes"] > 0 and row["healthz_p99_ms"] >= row["healthz_p50_ms"], row
    # Not speed: a client hanging up mid-body is one INFO line, never a traceback.
    assert rows["disconnect"]["tracebacks"] == 0, rows["disconnect"]
    assert rows["disconnect"]["disconnect_lines"] == {"INFO": 2}, rows["disconnect"]


def test_checkout_profile_reads_py_spy_collapsed_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    # What bench_checkout.py makes of py-spy's output: idle waits apart, one entry per
    # function (lines merged), the bench's own counting thread left out, junk skipped.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_checkout

    loop = "<module> (_counted_process.py:40);BaseEventLoop._run_once (asyncio/base_events.py:1884)"
    handle = "<module> (_counted_process.py:40);Handle._run (asyncio/events.py:80)"
    collapsed = "\n".join(
        [
            f"{loop};EpollSelector.select (selectors.py:468) 60",
            f"{handle};Envelope.from_dict (sagakit/core/envelope.py:120) 25",
            f"{handle};Envelope.from_dict (sagakit/core/envelope.py:131) 5",
            "_bootstrap (threading.py:995);_dump (_counted_process.py:26) 100",
            "not a stack",
            "_bootstrap (threading.py:995);_worker (concurrent/futures/thread.py:81) 10",
        ]
    )
    got = bench_checkout._top_functions(collapsed)
    assert got["samples"] == 100
    assert got["idle_share"] == pytest.approx(0.7)
    assert got["top"] == [["Envelope.from_dict (sagakit/core/envelope.py)", pytest.approx(0.3)]]


def _target_rows(lines: list[str]) -> dict[str, list[str]]:
    """The Targets table's rows by label: [goal, measured, met, ratio]."""
    rows: dict[str, list[str]] = {}
    for line in lines[4:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


def test_issue_17_targets_are_ratios_taken_run_by_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two hand-made runs whose medians of ratios differ from the ratios of medians: the
    # report must divide run 1 by run 1 and run 2 by run 2, then take the median.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    # By path and under a name of its own: "run" may already be another module (the
    # mutation suite's tests/mutation/run.py) when the whole suite runs.
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_run", run)  # its dataclasses look it up
    spec.loader.exec_module(run)
    from report import derive
    from report_targets import TARGETS, targets_section

    def runs(*values: dict[str, float]) -> list[Any]:
        return [run.Outcome(dict(v)) for v in values]

    by_key = {
        "raw": runs(
            {"pg_8_commits_per_s": 10_000, "pg_1_commits_per_s": 4_000,
             "sqlite_full_commits_per_s": 2_000},
            {"pg_8_commits_per_s": 8_000, "pg_1_commits_per_s": 2_000,
             "sqlite_full_commits_per_s": 1_000},
        ),
        "engine/postgres/ok": runs(
            {"conc_sagas_per_s": 5_000, "seq_p50_ms": 5.0, "conc_cpu_ms_per_saga": 0.2,
             "seq_cpu_ms_per_saga": 2.0},
            {"conc_sagas_per_s": 2_400, "seq_p50_ms": 20.0, "conc_cpu_ms_per_saga": 0.4,
             "seq_cpu_ms_per_saga": 4.0},
        ),
        "engine/sqlite/ok": runs({"conc_sagas_per_s": 3_000}, {"conc_sagas_per_s": 700}),
        "checkout/postgres+nats": runs(
            {"win_per_s": 600, "hop_outbox_ms": 1.0, "hop_delivery_ms": 0.2,
             "win_cpu_ms_per_checkout": 2.0},
            {"win_per_s": 400, "hop_outbox_ms": 3.0, "hop_delivery_ms": 0.4,
             "win_cpu_ms_per_checkout": 3.0},
        ),
    }  # fmt: skip
    results = derive(by_key, 2, {}, run.FULL, quick=False)
    by_name = {r.name: r for r in results}

    def values(name: str) -> list[float | None]:
        return by_name[name].values

    assert values("compare/limit/postgres_sagas_vs_raw_8") == pytest.approx([0.5, 0.3])
    # p50 / (1000 / pg_1_commits_per_s): 5 ms / 0.25 ms, 20 ms / 0.5 ms
    assert values("compare/limit/postgres_seq_p50_in_commits") == pytest.approx([20, 40])
    assert values("compare/limit/sqlite_sagas_vs_raw") == pytest.approx([1.5, 0.7])
    assert values("checkout/hop") == pytest.approx([1.2, 3.4])
    assert by_name["compare/limit/postgres_seq_p50_in_commits"].target == "<= 10 commit times"
    assert by_name["compare/limit/postgres_seq_p50_in_commits"].better == "lower"

    rows = _target_rows(targets_section(by_name, run.FULL.__dict__))
    assert list(rows) == [t.label for t in TARGETS]

    def row(result: str) -> list[str]:
        return rows[next(t.label for t in TARGETS if t.result == result)]

    # Met: the median of 0.5 and 0.3 (0.4), not the ratio of the medians (3,700 / 9,000).
    assert row("compare/limit/postgres_sagas_vs_raw_8") == [
        ">= 0.3 x raw commits/s", "0.400 x raw commits/s", "yes", "1.33x of target"
    ]  # fmt: skip
    assert row("compare/limit/sqlite_sagas_vs_raw")[2:] == ["yes", "1.10x of target"]
    assert row("checkout/cpu")[2:] == ["yes", "0.83x of the limit"]
    # Missed: the median of 20 and 40, not 12.5 ms x 3,000/s.
    assert row("compare/limit/postgres_seq_p50_in_commits") == [
        "<= 10 commit times", "30 commit times", "**no**", "missed: 3.0x over the limit"
    ]  # fmt: skip
    assert row("checkout/hop")[1:] == ["2.30 ms", "**no**", "missed: 1.5x over the limit"]
    assert row("engine/postgres/ok/seq_cpu_per_saga")[2:] == [
        "**no**", "missed: 3.0x over the limit"
    ]  # fmt: skip
    assert row("checkout/throughput")[2:] == ["yes", "1.00x of target"]
    # Not in these runs: DBOS, recovery, the checkout's steady-load latency.
    for result in (
        "compare/throughput/sagakit_pg_vs_dbos_pg",
        "recovery/sqlite/recovery_s",
        "checkout/steady_p50",
    ):
        assert row(result)[2:] == ["—", "not measured"], result
