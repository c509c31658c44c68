"""The mutation suite: every planted bug of the catalogue is caught by a proof.

The fast tests check the catalogue against the code (each snippet occurs exactly once,
each table row of planted bugs has its mutants); the slow one runs the whole suite as
CI does (``run.py --first-kill --json``) and holds it to its rules: every entry ran, no
survivor that is not marked as a known hole, no known-hole mark on a killed mutant.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import run as runner
from catalogue import MIN_PER_ROW, MUTANTS, ROOT, TABLE_ROWS, Mutant, entry_problems, problems

RUN_PY = Path(__file__).resolve().parent / "run.py"


def test_every_catalogue_entry_plants_into_the_code_exactly_once() -> None:
    assert problems(ROOT) == []
    for m in MUTANTS:
        text = (ROOT / m.path).read_text()
        assert text.count(m.old) == 1, m.name
        assert text.replace(m.old, m.new) != text, m.name


def test_every_table_row_is_covered() -> None:
    covered = {row: [m.name for m in MUTANTS if m.covers == row] for row in TABLE_ROWS}
    for row, names in covered.items():
        assert len(names) >= MIN_PER_ROW.get(row, 1), (row, names)
    # Both paths by which a rung whose outcome stays unknown could move down the ladder.
    assert len(covered["table:unknown-rung"]) >= 2
    assert all(m.covers in TABLE_ROWS or m.covers.startswith("guard:") for m in MUTANTS)


def test_a_snippet_that_does_not_occur_exactly_once_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "src" / "sagakit" / "core" / "machine.py"
    target.parent.mkdir(parents=True)
    entry = Mutant("m", "src/sagakit/core/machine.py", "x = 1\n", "x = 2\n", "bug", "guard:x")
    target.write_text("y = 0\n")
    assert "occurs 0 times" in " ".join(entry_problems(tmp_path, entry))
    target.write_text("x = 1\nx = 1\n")
    assert "occurs 2 times" in " ".join(entry_problems(tmp_path, entry))
    target.write_text("x = 1\n")
    assert entry_problems(tmp_path, entry) == []
    broken = dataclasses.replace(entry, new="x = (\n")
    assert "does not compile" in " ".join(entry_problems(tmp_path, broken))
    outside = dataclasses.replace(entry, path="tests/conftest.py")
    assert "outside" in " ".join(entry_problems(tmp_path, outside))


def test_a_mutant_s_lead_only_reorders_the_proofs() -> None:
    # What is killed must not depend on the order: every mutant gets every proof.
    plan = runner.proofs(runner.FAMILIES, demo=False)
    names = sorted(p.name for p in plan)
    for m in MUTANTS:
        ordered = runner.plan_for(m, plan)
        assert sorted(p.name for p in ordered) == names, m.name
        leads = runner.lead_families(m)  # one proof each (check, race): they come first
        assert [p.family for p in ordered[: len(leads)]] == list(leads), m.name


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_proofs_kill_every_mutant_of_the_catalogue() -> None:
    # About two minutes on two idle cores; the ceiling only guards against a hang.
    proc = subprocess.run(
        [sys.executable, str(RUN_PY), "--first-kill", "--json"],
        capture_output=True,
        text=True,
        timeout=1140,
        cwd=ROOT,
    )
    assert proc.returncode in (0, 1), proc.stderr[-4000:]  # 2: bad catalogue or baseline
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout[-4000:]
    report = json.loads(lines[0])
    names = [m.name for m in MUTANTS]
    assert report["mutants"] == len(MUTANTS)
    assert sorted(report["proofs"]) == sorted(names), "every catalogue entry ran"
    assert all(report["proofs"][n] for n in names), "every entry ran at least one proof"
    holes = {m.name for m in MUTANTS if m.known_hole is not None}
    assert report["unexpected_survivors"] == [], (report["unexpected_survivors"], report["errors"])
    assert report["stale_known_holes"] == [], (
        "killed mutants still marked known_hole: remove the marks",
        report["stale_known_holes"],
    )
    assert set(report["survivors"]) <= holes
    assert report["killed"] + len(report["survivors"]) == len(MUTANTS)
    assert report["killed"] == sum(1 for n in names if n not in report["survivors"])
    assert proc.returncode == 0, proc.stderr[-4000:]
