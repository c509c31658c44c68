"""sagakit's benchmark suite: one command, JSON lines on stdout, ``RESULTS.md``.

    python benchmarks/run.py               # the full run (3 runs of everything)
    python benchmarks/run.py --quick       # small sizes, 1 run: what CI runs (< 3 min)
    python benchmarks/run.py --runs 5 --only engine,dbos,raw

Every measurement runs in a fresh child process (CPU time, commit counts and memory
then belong to it alone), and every comparison is measured side by side: within each
run the variants are measured one after the other, and ratios are taken run by run
(sagakit's run *i* against the peer's or the limit's run *i*). Nothing here asserts
anything about speed; targets are reported as met or missed, with the ratio.

Needs PostgreSQL on 127.0.0.1:5432 (trust, user postgres, database test) and, for the
distributed checkout, nats-server with JetStream on 127.0.0.1:4222; what cannot run is
reported as skipped with the reason. The peer needs ``pip install 'sagakit[bench]'``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402  (the benchmarks directory is not a package)
    NATS_URL,
    emit,
    environment,
    log,
    pg_available,
    pg_drop_schema,
    scratch_name,
)

BENCHES = ("raw", "engine", "dbos", "timers", "listing", "recovery", "checkout", "profile")


@dataclass(frozen=True)
class Sizes:
    engine_seq: int
    engine_conc: int
    dbos_seq: int
    dbos_conc: int
    raw_seconds: float
    timers_n: int
    list_rows: int
    list_samples: int
    recovery_n: int
    checkout_orders: int
    checkout_window: int
    checkout_burst: int
    checkout_seq: int
    timeout: float


QUICK = Sizes(
    engine_seq=30,
    engine_conc=300,
    dbos_seq=15,
    dbos_conc=40,
    raw_seconds=1.0,
    timers_n=2_000,
    list_rows=20_000,
    list_samples=30,
    recovery_n=500,
    checkout_orders=40,
    checkout_window=20,
    checkout_burst=0,
    checkout_seq=5,
    timeout=150.0,
)
FULL = Sizes(
    engine_seq=200,
    engine_conc=3_000,
    dbos_seq=100,
    dbos_conc=500,
    raw_seconds=3.0,
    timers_n=100_000,
    list_rows=1_000_000,
    list_samples=200,
    recovery_n=500,
    checkout_orders=400,
    checkout_window=20,
    checkout_burst=1_000,
    checkout_seq=100,
    timeout=1800.0,
)


# -- child processes ----------------------------------------------------------------------


def child_main(module: str, params_json: str) -> int:
    """Run one measurement; print ``{"result": ...}`` as the last stdout line."""
    params = json.loads(params_json)
    mod = importlib.import_module(module)
    try:
        result = mod.main(params)
    except BaseException:
        traceback.print_exc()
        return 1
    print(json.dumps({"result": result}), flush=True)
    return 0


def child_cmd(module: str) -> list[str]:
    return [sys.executable, str(HERE / "run.py"), "--child", module]


@dataclass
class Outcome:
    value: dict[str, Any] | None
    error: str | None = None


def spawn(module: str, params: dict[str, Any], timeout: float) -> Outcome:
    """Run ``module.main(params)`` in a fresh interpreter."""
    cmd = [*child_cmd(module), json.dumps(params)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(None, f"timed out after {timeout:.0f} s")
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith('{"result"')]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return Outcome(None, f"exit {proc.returncode}: " + " | ".join(tail))
    return Outcome(json.loads(lines[-1])["result"])


def in_process(fn: Callable[[], dict[str, Any]]) -> Outcome:
    try:
        return Outcome(fn())
    except Exception as exc:
        return Outcome(None, f"{type(exc).__name__}: {exc}")


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


# -- the plan -----------------------------------------------------------------------------


@dataclass
class Case:
    """One measurement, repeated once per run."""

    key: str
    bench: str
    run: Callable[[int], Outcome]
    outcomes: list[Outcome] = field(default_factory=list)


def nats_available() -> str | None:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(NATS_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), 2):
            return None
    except OSError as exc:
        return f"NATS at {NATS_URL} is not reachable: {exc}"


def dbos_available() -> str | None:
    try:
        importlib.import_module("dbos")
    except ImportError:
        return "DBOS Transact is not installed (pip install 'sagakit[bench]')"
    return None


def job(module: str, params: dict[str, Any], timeout: float) -> Callable[[int], Outcome]:
    """A case that runs ``module`` in a child process with ``params``."""
    return lambda _run: spawn(module, params, timeout)


def later(fn: Callable[[], Outcome]) -> Callable[[int], Outcome]:
    """A case that calls ``fn`` (which spawns what it needs)."""
    return lambda _run: fn()


def build_cases(sizes: Sizes, only: set[str], skipped: dict[str, str]) -> list[Case]:
    t = sizes.timeout
    pg_missing = pg_available()
    cases: list[Case] = []

    def add(key: str, bench: str, fn: Callable[[int], Outcome]) -> None:
        if bench in only:
            cases.append(Case(key, bench, fn))

    def skip(key: str, why: str) -> None:
        skipped[key] = why

    add(
        "raw",
        "raw",
        lambda r: spawn(
            "bench_raw", {"seconds": sizes.raw_seconds, "postgres": pg_missing is None}, t
        ),
    )
    backends = ["sqlite"] + (["postgres"] if pg_missing is None else [])
    if pg_missing is not None:
        skip("postgres", pg_missing)
    dbos_missing = dbos_available()
    if dbos_missing is not None:
        skip("dbos", dbos_missing)
    engine_params = {"seq_n": sizes.engine_seq, "conc_n": sizes.engine_conc}
    dbos_params = {"seq_n": sizes.dbos_seq, "conc_n": sizes.dbos_conc}
    dbos_backends = (["postgres"] if pg_missing is None else []) + ["sqlite", "sqlite-wal"]
    for variant in ("ok", "fail"):
        for b in backends:
            add(
                f"engine/{b}/{variant}",
                "engine",
                job("bench_engine", {**engine_params, "backend": b, "variant": variant}, t),
            )
        if dbos_missing is None:
            for b in dbos_backends:
                if variant == "fail" and b == "sqlite":
                    continue  # the failing variant on DBOS: PostgreSQL and SQLite WAL
                add(
                    f"dbos/{b}/{variant}",
                    "dbos",
                    job("bench_dbos", {**dbos_params, "backend": b, "variant": variant}, t),
                )
    for b in backends:
        add(f"timers/{b}", "timers", later(functools.partial(run_timers, b, sizes)))
    for b in backends:
        add(
            f"listing/{b}",
            "listing",
            later(functools.partial(run_listing, b, sizes)),
        )
    add("recovery/sqlite", "recovery", lambda r: run_recovery(sizes))
    why = pg_missing or nats_available()
    if why is None:
        add(
            "checkout/postgres+nats",
            "checkout",
            lambda r: spawn(
                "bench_checkout",
                {
                    "orders": sizes.checkout_orders,
                    "window": sizes.checkout_window,
                    "burst": sizes.checkout_burst,
                    "seq_n": sizes.checkout_seq,
                    "timeout": t,
                },
                t + 60,
            ),
        )
    elif "checkout" in only:
        skip("checkout", why)
    return cases


def _scratch(backend: str) -> dict[str, Any]:
    if backend == "sqlite":
        return {"backend": backend, "dir": tempfile.mkdtemp(prefix="sagakit-bench-")}
    return {"backend": backend, "schema": scratch_name("bench_scale")}


def _cleanup(scratch: dict[str, Any]) -> None:
    if "dir" in scratch:
        shutil.rmtree(scratch["dir"], ignore_errors=True)
    if "schema" in scratch:
        pg_drop_schema(scratch["schema"])


def run_timers(backend: str, sizes: Sizes) -> Outcome:
    scratch = _scratch(backend)
    try:
        params = {**scratch, "n": sizes.timers_n}
        created = spawn("bench_scale", {**params, "what": "timers_create"}, sizes.timeout)
        if created.value is None:
            return created
        fired = spawn("bench_scale", {**params, "what": "timers_fire"}, sizes.timeout)
        if fired.value is None:
            return fired
        return Outcome({**created.value, **fired.value})
    finally:
        _cleanup(scratch)


def run_listing(backend: str, sizes: Sizes) -> Outcome:
    scratch = _scratch(backend)
    try:
        params = {
            **scratch,
            "what": "listing",
            "rows": sizes.list_rows,
            "samples": sizes.list_samples,
        }
        return spawn("bench_scale", params, sizes.timeout)
    finally:
        _cleanup(scratch)


def run_recovery(sizes: Sizes) -> Outcome:
    import bench_recovery

    d = tempfile.mkdtemp(prefix="sagakit-recovery-")
    try:
        return in_process(
            lambda: bench_recovery.orchestrate(
                {"dir": d, "n": sizes.recovery_n}, child_cmd("bench_recovery")
            )
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 run (CI)")
    ap.add_argument("--runs", type=int, default=None, help="runs of each measurement")
    ap.add_argument(
        "--out",
        default=str(HERE / "RESULTS.md"),
        help="where to write the report (a file, or a directory for RESULTS.md)",
    )
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile runs")
    ap.add_argument(
        "--from-raw",
        metavar="JSON",
        help="rewrite the report from a saved results.json instead of measuring",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("params", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child, args.params or "{}")
    out = Path(args.out)
    if out.is_dir():
        out = out / "RESULTS.md"
    if args.from_raw:
        return rewrite(Path(args.from_raw), out)
    sizes = QUICK if args.quick else FULL
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if runs < 1:
        ap.error("--runs must be >= 1")
    only = set(filter(None, args.only.split(","))) or set(BENCHES)
    unknown = only - set(BENCHES)
    if unknown:
        ap.error(f"unknown benches {sorted(unknown)}; choose from {BENCHES}")
    if args.no_profile or args.quick:
        only.discard("profile")
    started = time.time()
    env = environment()
    env["load_before"] = loadavg()
    skipped: dict[str, str] = {}
    cases = build_cases(sizes, only, skipped)
    for key, why in skipped.items():
        log(f"skipping {key}: {why}")
    for r in range(runs):
        for case in cases:
            log(f"run {r + 1}/{runs}: {case.key}")
            t0 = time.perf_counter()
            outcome = case.run(r)
            case.outcomes.append(outcome)
            if outcome.error:
                log(f"  failed: {outcome.error}")
            else:
                log(f"  done in {time.perf_counter() - t0:.1f} s")
    profiles: list[dict[str, Any]] = []
    if "profile" in only:
        for b in ["sqlite"] + (["postgres"] if "postgres" not in skipped else []):
            log(f"profile: engine on {b}")
            p = spawn(
                "bench_profile",
                {"backend": b, "variant": "ok", "seq_n": 5, "conc_n": sizes.engine_conc},
                sizes.timeout,
            )
            if p.value is not None:
                profiles.append(p.value)
            else:
                log(f"  profile failed: {p.error}")
    env["load_after"] = loadavg()
    env["elapsed_s"] = round(time.time() - started, 1)

    saved = {
        "env": env,
        "runs": runs,
        "quick": args.quick,
        "sizes": asdict(sizes),
        "skipped": skipped,
        "profiles": profiles,
        "outcomes": {c.key: [asdict(o) for o in c.outcomes] for c in cases},
    }
    raw_path = out.with_name("results.json")
    raw_path.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
    report(saved, out, emit_lines=True)
    log(f"wrote {out} and {raw_path.name} in {env['elapsed_s']} s")
    return 0


def report(saved: dict[str, Any], out: Path, *, emit_lines: bool) -> None:
    """Derive the result lines from saved measurements; print them; write the report."""
    from report import derive, write_report

    sizes = Sizes(**saved["sizes"])
    by_key = {k: [Outcome(**o) for o in v] for k, v in saved["outcomes"].items()}
    results = derive(by_key, saved["runs"], saved["skipped"], sizes, quick=saved["quick"])
    if emit_lines:
        for res in results:
            emit(res.line())
    write_report(
        out,
        results=results,
        env=saved["env"],
        runs=saved["runs"],
        quick=saved["quick"],
        sizes=sizes,
        raw=by_key,
        profiles=saved["profiles"],
        skipped=saved["skipped"],
    )


def rewrite(raw_path: Path, out: Path) -> int:
    report(json.loads(raw_path.read_text(encoding="utf-8")), out, emit_lines=True)
    log(f"rewrote {out} from {raw_path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
