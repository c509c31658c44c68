"""Mutation testing of the proofs: plant each catalogued bug, run the proofs, report.

    python tests/mutation/run.py [--first-kill] [--json] [--jobs N] [--only A,B]
                                 [--proofs simulate,check[,race]] [--demo] [--list]

For every mutant of ``catalogue.py`` the runner makes a scratch copy of the engine
(``<tmp>/sagakit``) and of the reference checkout (``<tmp>/sagakit_checkout``), plants
the bug in the copy (never in the working tree) and runs the proofs in subprocesses
with ``PYTHONPATH=<tmp>``, which takes precedence over the editable install; every
subprocess first checks that both packages really come from the copy. The code is
copied once, at the start (a snapshot): the baseline and every mutant see the same
code even when the working tree changes during the run. The proofs, in this order
(cheapest first, which is where ``--first-kill`` stops), with budgets that keep one
mutant to seconds:

* ``simulate:<mode>``: ``sagakit simulate`` on :data:`SIM_SEEDS` seeds in each mode;
* ``check``: ``sagakit check checkout --suite`` (the exhaustive checker; :data:`CHECK_ARGS`);
* ``race`` (only with ``--proofs ...,race``; it does not count as a kill): the
  PostgreSQL last-item race test (``tests/integration``), the real database beside the
  checker's races of the handlers on SQLite;
* ``demo:<seed>`` (only with ``--demo``; it does not count as a kill): the chaos demo.

A mutant whose ``covers`` (or file) lies where one proof leads (:func:`plan_for`) runs
that proof first, then the others in the order above. The order only saves time: a
mutant no proof kills runs every proof whatever the order, so what is killed and what
survives does not depend on it. Mutants marked ``known_hole`` (they run every proof)
start first, so that the longest mutant does not start last.

A proof kills a mutant when it reports a broken invariant (exit 1 with its report) or,
for the race test, a failed assertion. Anything else that is not a pass (a crash, a
search cut short, a timeout, a skipped test) is an error: reported, never a kill.
Before the mutants every proof runs on the unplanted copy; a failure there aborts the
run, so a flaky or broken proof can never count as a kill.

Exit status: 0 when every mutant is killed except those marked ``known_hole`` (which
must survive); 1 when a mutant survives unmarked or a marked one is killed (the mark is
stale: remove it); 2 on a bad catalogue entry or a failing baseline.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from catalogue import MUTANTS, ROOT, Mutant, problems

CHECK_ARGS: tuple[str, ...] = ("check", "checkout", "--suite", "--json")
"""The checker's command line (after ``sagakit``)."""

SIM_MODES: tuple[str, ...] = ("orchestration", "choreography", "hybrid")
SIM_SEEDS = 60
"""Seeds per mode and mutant: a few seconds each on one core."""

RACE_TEST = "tests/integration/test_last_item_race_pg.py"
DEMO_SEEDS: tuple[int, ...] = (1, 2)
DEMO_ORDERS = 300

TIMEOUTS: dict[str, float] = {"check": 900, "simulate": 300, "race": 300, "demo": 900}
"""Seconds a proof may take before it is stopped (an error, never a kill)."""

COUNTED = ("check", "simulate")
"""The proof families whose kill counts: the simulator and the checker must catch every
planted bug. The race test's and the demo's kills are reported only."""

FAMILIES = ("check", "simulate", "race")
"""What ``--proofs`` takes (the demo has its own flag)."""

SCRATCH_MISMATCH = 97  # exit status of a subprocess that imported the wrong sagakit

# Runs in every proof subprocess: refuse to go on unless both packages come from the
# scratch copy (an editable install, a stray sys.path entry or a cwd could shadow it),
# then run the sagakit CLI or pytest in this very process.
BOOT = """
import os, sys
root = os.path.realpath(sys.argv[1])
import sagakit, sagakit_checkout
for module in (sagakit, sagakit_checkout):
    where = os.path.realpath(module.__file__ or "?")
    if not where.startswith(root + os.sep):
        print(f"{module.__name__} was imported from {where}, not from the scratch copy "
              f"{root}", file=sys.stderr)
        sys.exit(EXIT_MISMATCH)
tool, args = sys.argv[2], sys.argv[3:]
sys.argv = [tool, *args]
if tool == "pytest":
    import pytest
    sys.exit(pytest.main(args))
from sagakit.cli import main
sys.exit(main(args))
""".replace("EXIT_MISMATCH", str(SCRATCH_MISMATCH))


class Fatal(Exception):
    """Stops the run: the runner itself cannot work (exit status 2)."""


@dataclass(frozen=True)
class Proof:
    """One proof run: a name, its family, and how to run and judge it in a scratch dir."""

    name: str
    family: str  # check | simulate | race | demo
    args: Callable[[Path], list[str]]  # the BOOT arguments after the scratch root
    judge: Callable[[int, str, str], Verdict]  # (exit status, stdout, stderr)


@dataclass(frozen=True)
class Verdict:
    """What one proof said: ``killed``, ``passed`` or ``error``, and why."""

    result: str
    detail: str = ""
    seconds: float = 0.0


@dataclass
class MutantResult:
    """Every proof's verdict on one mutant."""

    mutant: Mutant
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def killers(self) -> list[str]:
        """The proofs that killed the mutant (the demo included)."""
        return [n for n, v in self.verdicts.items() if v.result == "killed"]

    @property
    def counted_killers(self) -> list[str]:
        """The killers whose kill counts (not the demo)."""
        return [n for n in self.killers if _family(n) in COUNTED]

    @property
    def killed(self) -> bool:
        """True when a counted proof killed the mutant."""
        return bool(self.counted_killers)

    @property
    def errors(self) -> dict[str, str]:
        """The proofs that could not decide, with why."""
        return {n: v.detail for n, v in self.verdicts.items() if v.result == "error"}


def _family(proof: str) -> str:
    return proof.split(":", 1)[0]


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    return None


def _tail(text: str, n: int = 400) -> str:
    text = " ".join(text.strip().split())
    return text if len(text) <= n else "..." + text[-n:]


def judge_check(code: int, out: str, err: str) -> Verdict:
    """``sagakit check``: exit 1 with violations in its report kills; 3 (cut short) or a
    crash is an error."""
    report = _last_json(out)
    if code == 0 and report is not None:
        return Verdict("passed")
    if code == 1 and report is not None and report.get("violations"):
        return Verdict("killed", str(report["violations"][0])[:300])
    if code == 3:
        return Verdict("error", "the search was cut short (--max-states)")
    return Verdict("error", f"exit {code}: {_tail(err or out)}")


def judge_simulate(code: int, out: str, err: str) -> Verdict:
    """``sagakit simulate``: exit 1 with failing seeds in its report kills; a crash (exit
    1 without a report included) is an error."""
    summary = _last_json(out)
    if code == 0 and summary is not None:
        return Verdict("passed")
    if (
        code == 1
        and summary is not None
        and (summary.get("violations") or summary.get("failing_seeds"))
    ):
        seeds = summary.get("failing_seeds") or []
        shrunk = summary.get("shrunk") or {}
        why = shrunk.get("violations") or shrunk.get("invariants") or ""
        detail = f"{len(seeds)} failing seeds {seeds[:5]}: {_tail(json.dumps(why), 240)}"
        return Verdict("killed", detail)
    return Verdict("error", f"exit {code}: {_tail(err or out)}")


def judge_race(code: int, out: str, err: str) -> Verdict:
    """pytest of the race test: a failed test kills; a skip (no PostgreSQL), a collection
    or fixture error is an error."""
    lines = out.strip().splitlines()
    summary = lines[-1] if lines else ""
    if code == 0 and re.search(r"\b\d+ passed", summary) and "skipped" not in summary:
        return Verdict("passed")
    if code == 0 and "skipped" in summary:
        reasons = [line for line in lines if line.startswith("SKIPPED")]
        return Verdict("error", f"skipped: {_tail(' '.join(reasons) or summary)}")
    if code == 1 and re.search(r"\b\d+ failed", summary) and " error" not in summary:
        failure = next((line for line in lines if line.startswith("E ")), summary)
        return Verdict("killed", _tail(failure, 300))
    return Verdict("error", f"exit {code}: {_tail(summary or err)}")


def judge_demo(code: int, out: str, err: str) -> Verdict:
    """``sagakit demo``: exit 1 with its report kills (reported only, never counted)."""
    report = _last_json(out)
    if code == 0 and report is not None:
        return Verdict("passed")
    if code == 1 and report is not None:
        why = report.get("violations") or [f"not ok: {report.get('outcomes')}"]
        return Verdict("killed", str(why[0])[:300])
    return Verdict("error", f"exit {code}: {_tail(err or out)}")


CHECK_LEADS: tuple[str, ...] = ("on_timer", "query", "status", "outcome", "fence")
"""Words of a mutant's ``covers`` that put it where the exhaustive checker leads: timers
that fire late or twice, answers to status queries, outcomes in doubt, fences. A seeded
simulation reaches those interleavings only by luck; the checker visits every one."""

HANDLER_LEADS: tuple[str, ...] = ("examples/checkout/inventory.py",)
"""Files of handlers whose transactions race (the stock concurrent orders contend for):
their mutants run the checker (which explores the handlers' races before the sagas,
in about a second) before the simulations, and the race test (when asked for) next."""


def lead_families(mutant: Mutant) -> tuple[str, ...]:
    """The proof families likely to kill ``mutant`` first, most likely first (see
    :data:`CHECK_LEADS`, :data:`HANDLER_LEADS`); empty for the default order."""
    if mutant.path in HANDLER_LEADS:
        return ("check", "race")
    if any(word in mutant.covers for word in CHECK_LEADS):
        return ("check",)
    return ()


def plan_for(mutant: Mutant, plan: Sequence[Proof]) -> list[Proof]:
    """``plan`` with the proofs of ``mutant``'s lead families first: the same proofs and
    verdicts, but with ``--first-kill`` the likely killer runs before the others."""
    leads = lead_families(mutant)
    return sorted(plan, key=lambda p: leads.index(p.family) if p.family in leads else len(leads))


def _fixed(args: list[str]) -> Callable[[Path], list[str]]:
    """Arguments that do not depend on the scratch dir."""
    return lambda _scratch: list(args)


def proofs(families: Sequence[str], demo: bool) -> list[Proof]:
    """The proofs to run, in the order they run (and the order ``--first-kill`` stops)."""
    out: list[Proof] = []
    # Cheapest first: with --first-kill most mutants then stop after a few seconds of
    # simulation instead of a full exhaustive search.
    if "simulate" in families:
        for mode in SIM_MODES:
            args = ["cli", "simulate", "--mode", mode, "--seeds", str(SIM_SEEDS)]
            args += ["--jobs", "1", "--json"]
            out.append(Proof(f"simulate:{mode}", "simulate", _fixed(args), judge_simulate))
    if "check" in families:
        out.append(Proof("check", "check", _fixed(["cli", *CHECK_ARGS]), judge_check))
    if "race" in families:

        def race(scratch: Path) -> list[str]:
            return [
                "pytest",
                str(ROOT / RACE_TEST),
                "-p",
                "no:cacheprovider",
                "-q",
                "-x",
                "-rs",
                f"--basetemp={scratch / 'pytest'}",
            ]

        out.append(Proof("race", "race", race, judge_race))
    if demo:
        for seed in DEMO_SEEDS:

            def run_demo(scratch: Path, seed: int = seed) -> list[str]:
                args = ["cli", "demo", "--orders", str(DEMO_ORDERS), "--faults", "chaos"]
                args += ["--seed", str(seed), "--json"]
                return [*args, "--data-dir", str(scratch / f"demo-{seed}")]

            out.append(Proof(f"demo:{seed}", "demo", run_demo, judge_demo))
    return out


# -- scratch copies --------------------------------------------------------------------

_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def snapshot() -> Path:
    """A copy of the code under test, laid out as in the repository (``src/sagakit``,
    ``examples/checkout``), taken once: the baseline and every mutant run on the same
    code even if the working tree changes during the run."""
    tmp = Path(tempfile.mkdtemp(prefix="sagakit-snapshot-"))
    shutil.copytree(ROOT / "src" / "sagakit", tmp / "src" / "sagakit", ignore=_IGNORE)
    shutil.copytree(ROOT / "examples" / "checkout", tmp / "examples" / "checkout", ignore=_IGNORE)
    return tmp


def scratch_copy(source: Path, mutant: Mutant | None) -> Path:
    """A temp dir with ``sagakit`` and ``sagakit_checkout`` copied from the snapshot
    ``source``, ``mutant`` planted."""
    tmp = Path(tempfile.mkdtemp(prefix="sagakit-mutant-"))
    shutil.copytree(source / "src" / "sagakit", tmp / "sagakit")
    shutil.copytree(source / "examples" / "checkout", tmp / "sagakit_checkout")
    if mutant is not None:
        if mutant.path.startswith("src/sagakit/"):
            path = tmp / "sagakit" / mutant.path.removeprefix("src/sagakit/")
        else:
            path = tmp / "sagakit_checkout" / mutant.path.removeprefix("examples/checkout/")
        text = path.read_text()
        if text.count(mutant.old) != 1:
            shutil.rmtree(tmp, ignore_errors=True)
            raise Fatal(f"{mutant.name}: its snippet no longer occurs once in {mutant.path}")
        path.write_text(text.replace(mutant.old, mutant.new))
    return tmp


_children: set[int] = set()
_children_lock = threading.Lock()


def run_proof(proof: Proof, scratch: Path) -> Verdict:
    """Run ``proof`` against ``scratch`` in its own process group, within its budget."""
    env = {k: v for k, v in os.environ.items() if k not in ("SAGAKIT_APP", "SAGAKIT_SEED")}
    env.update(PYTHONPATH=str(scratch), SAGAKIT_JOBS="1", PYTHONDONTWRITEBYTECODE="1")
    argv = [sys.executable, "-c", BOOT, str(scratch), *proof.args(scratch)]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group: a timeout stops its children too
    )
    with _children_lock:
        _children.add(proc.pid)
    try:
        out, err = proc.communicate(timeout=TIMEOUTS[proof.family])
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.communicate()
        budget = TIMEOUTS[proof.family]
        return Verdict("error", f"timed out after {budget:.0f}s", time.monotonic() - started)
    finally:
        with _children_lock:
            _children.discard(proc.pid)
    seconds = time.monotonic() - started
    if proc.returncode == SCRATCH_MISMATCH:
        raise Fatal(f"{proof.name}: {err.strip()}")
    verdict = proof.judge(proc.returncode, out, err)
    return Verdict(verdict.result, verdict.detail, seconds)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def run_mutant(
    source: Path, mutant: Mutant, plan: Sequence[Proof], first_kill: bool
) -> MutantResult:
    """Plant ``mutant`` in a scratch copy of ``source`` and run ``plan`` (its lead first,
    see :func:`plan_for`) against it."""
    result = MutantResult(mutant)
    started = time.monotonic()
    scratch = scratch_copy(source, mutant)
    try:
        for proof in plan_for(mutant, plan):
            verdict = run_proof(proof, scratch)
            result.verdicts[proof.name] = verdict
            if first_kill and verdict.result == "killed" and proof.family in COUNTED:
                break
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.seconds = time.monotonic() - started
    return result


def run_baseline(source: Path, plan: Sequence[Proof], jobs: int) -> dict[str, Verdict]:
    """Every proof on an unplanted copy of ``source``, in parallel."""
    scratch = scratch_copy(source, None)
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
            futures = {p.name: pool.submit(run_proof, p, scratch) for p in plan}
            return {name: f.result() for name, f in futures.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- report ----------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time the proofs' processes used so far (what a run costs on idle cores)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_MARK = {"killed": "KILL", "passed": ".", "error": "ERR"}


def outcome(r: MutantResult) -> str:
    """``killed``, ``survived``, ``known hole``, ``stale mark`` or ``error``."""
    if r.mutant.known_hole is not None:
        return "stale mark" if r.killed else "known hole"
    if r.killed:
        return "killed"
    return "error" if r.errors else "survived"


def render(results: Sequence[MutantResult], plan: Sequence[Proof], elapsed: float) -> str:
    """The table for a terminal: one row per mutant, one column per proof."""
    names = [p.name for p in plan]
    short = [n.replace("simulate:", "sim:").replace("orchestration", "orch") for n in names]
    short = [s.replace("choreography", "choreo") for s in short]
    width = max(len(r.mutant.name) for r in results) if results else 10
    head = f"{'mutant':<{width}}  {'result':<10}  " + "  ".join(f"{s:<10}" for s in short)
    lines = [head + "  time", "-" * (len(head) + 8)]
    for r in results:
        cells = [_MARK[r.verdicts[n].result] if n in r.verdicts else "-" for n in names]
        row = f"{r.mutant.name:<{width}}  {outcome(r):<10}  " + "  ".join(f"{c:<10}" for c in cells)
        lines.append(f"{row}  {r.seconds:5.1f}s")
    lines.append("")
    killed = sum(1 for r in results if r.killed)
    lines.append(
        f"{killed} of {len(results)} mutants killed in {elapsed:.0f}s "
        f"({cpu_seconds():.0f} CPU seconds in the proofs)"
    )
    for r in results:
        o = outcome(r)
        if o == "known hole":
            lines.append(f"  known hole {r.mutant.name}: {r.mutant.known_hole}")
        elif o == "stale mark":
            lines.append(
                f"  STALE MARK {r.mutant.name}: killed by {', '.join(r.counted_killers)}; "
                "remove its known_hole mark in tests/mutation/catalogue.py"
            )
        elif o in ("survived", "error"):
            lines.append(f"  SURVIVOR {r.mutant.name}: {r.mutant.bug}")
        else:
            first = r.killers[0]
            lines.append(f"  {r.mutant.name}: {first}: {r.verdicts[first].detail[:200]}")
        for proof, detail in r.errors.items():
            lines.append(f"    error in {proof}: {detail}")
    return "\n".join(lines)


def to_json(results: Sequence[MutantResult], elapsed: float, first_kill: bool) -> dict[str, Any]:
    """The ``--json`` line. ``killed_by`` counts, per family, the mutants it killed (with
    ``--first-kill`` only the first killer of each ran)."""
    killed_by = {"simulate": 0, "check": 0, "demo": 0, "race": 0}
    for r in results:
        for family in dict.fromkeys(_family(n) for n in r.killers):
            killed_by[family] += 1
    return {
        "mutants": len(results),
        "killed": sum(1 for r in results if r.killed),
        "survivors": [r.mutant.name for r in results if not r.killed],
        "killed_by": killed_by,
        "known_holes": {
            r.mutant.name: r.mutant.known_hole
            for r in results
            if r.mutant.known_hole is not None and not r.killed
        },
        "unexpected_survivors": [
            r.mutant.name for r in results if outcome(r) in ("survived", "error")
        ],
        "stale_known_holes": [r.mutant.name for r in results if outcome(r) == "stale mark"],
        "errors": {r.mutant.name: r.errors for r in results if r.errors},
        "proofs": {r.mutant.name: {n: v.result for n, v in r.verdicts.items()} for r in results},
        "details": {
            r.mutant.name: {n: v.detail for n, v in r.verdicts.items() if v.detail} for r in results
        },
        "seconds": {r.mutant.name: round(r.seconds, 1) for r in results},
        "first_kill": first_kill,
        "elapsed_s": round(elapsed, 1),
        "cpu_s": round(cpu_seconds(), 1),
    }


# -- main ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python tests/mutation/run.py",
        description="Plant each catalogued bug in a scratch copy and run the proofs.",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants at once")
    parser.add_argument(
        "--first-kill", action="store_true", help="stop a mutant's proofs at the first kill"
    )
    parser.add_argument("--only", help="run only these mutants (comma-separated names)")
    parser.add_argument(
        "--proofs",
        default=",".join(COUNTED),
        help="proof families to run: some of check,simulate,race (default check,simulate; "
        "the race test's kills are reported, not counted)",
    )
    parser.add_argument("--demo", action="store_true", help="also run the chaos demo (2 seeds)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--list", action="store_true", help="list the catalogue and exit")
    return parser.parse_args(argv)


def select(args: argparse.Namespace) -> tuple[list[Mutant], list[Proof]] | str:
    """The mutants and proofs the arguments ask for, or why they are wrong."""
    mutants = list(MUTANTS)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {m.name for m in MUTANTS})
        if unknown:
            return f"unknown mutants: {', '.join(unknown)}"
        mutants = [m for m in MUTANTS if m.name in wanted]
    families = [f.strip() for f in args.proofs.split(",") if f.strip()]
    if not families or set(families) - set(FAMILIES):
        return f"--proofs takes some of {', '.join(FAMILIES)}"
    return mutants, proofs(families, args.demo)


def main(argv: Sequence[str]) -> int:
    """Run the suite; the exit status is the module docstring's."""
    args = parse_args(argv)
    started = time.monotonic()
    if args.list:
        for m in MUTANTS:
            hole = f"  [known hole: {m.known_hole}]" if m.known_hole else ""
            print(f"{m.name:<40} {m.path:<36} {m.covers}{hole}\n    {m.bug}")
        return 0
    chosen = select(args)
    if isinstance(chosen, str):
        print(chosen, file=sys.stderr)
        return 2
    mutants, plan = chosen
    log = sys.stderr if args.json else sys.stdout
    source = snapshot()
    try:
        bad = problems(source)
        if bad:
            print("bad catalogue entries:\n  " + "\n  ".join(bad), file=sys.stderr)
            return 2
        results = run_all(source, mutants, plan, args, log)
    except Fatal as exc:
        print(f"mutation runner: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        with _children_lock:
            for pid in list(_children):
                _kill_group(pid)
        raise
    finally:
        shutil.rmtree(source, ignore_errors=True)
    elapsed = time.monotonic() - started
    if args.json:
        print(json.dumps(to_json(results, elapsed, args.first_kill)))
    else:
        print(render(results, plan, elapsed))
    for r in results:
        if outcome(r) == "stale mark":
            print(
                f"{r.mutant.name} is marked known_hole but {', '.join(r.counted_killers)} "
                "killed it: remove the mark in tests/mutation/catalogue.py",
                file=sys.stderr,
            )
    return 1 if any(outcome(r) in ("survived", "error", "stale mark") for r in results) else 0


def run_all(
    source: Path,
    mutants: Sequence[Mutant],
    plan: Sequence[Proof],
    args: argparse.Namespace,
    log: TextIO,
) -> list[MutantResult]:
    """The baseline, then every mutant (``args.jobs`` at once); Fatal if the baseline fails."""
    print(f"baseline: {len(plan)} proofs on the unplanted code", file=log, flush=True)
    baseline = run_baseline(source, plan, args.jobs)
    failed = {n: v for n, v in baseline.items() if v.result != "passed"}
    if failed:
        raise Fatal(
            "; ".join(
                f"baseline: {name} does not pass on the unplanted code ({v.result}: {v.detail})"
                for name, v in failed.items()
            )
            + ". Fix the proof (or the code) before planting bugs."
        )
    times = ", ".join(f"{n} {v.seconds:.1f}s" for n, v in baseline.items())
    print(f"baseline: every proof passes ({times})", file=log, flush=True)
    results: list[MutantResult] = []
    # Known holes run every proof: start them first, not last (a stable sort).
    queue = sorted(mutants, key=lambda m: m.known_hole is None)
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(run_mutant, source, m, plan, args.first_kill) for m in queue]
        for future in concurrent.futures.as_completed(futures):
            try:
                r = future.result()
            except Fatal:
                for f in futures:
                    f.cancel()
                raise
            results.append(r)
            print(
                f"  {r.mutant.name}: {outcome(r)}"
                + (f" by {', '.join(r.killers)}" if r.killers else "")
                + f" ({r.seconds:.1f}s)",
                file=log,
                flush=True,
            )
    order = {m.name: i for i, m in enumerate(MUTANTS)}
    return sorted(results, key=lambda r: order[r.mutant.name])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
