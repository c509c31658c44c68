"""The fault catalogue (tests/faults.toml), its marker and docs/reliability.md keep in step.

Every id of the catalogue is injected by at least one collected test, every ``fault``
marker names ids of the catalogue (collection fails otherwise), the page lists every
scenario of the catalogue in its order, and the report and the renderer
(tests/fault_report.py, ``python3 dev.py reliability``) say what the run did.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from fault_report import CATALOGUE, ENV, FORMAT, Scenario, load_catalogue, render

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "reliability.md"
TESTS = ROOT / "tests"


def run_pytest(args: list[str], report: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """pytest in a subprocess with the fault report written to ``report``."""
    env = {**os.environ, ENV: str(report)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def isolated_pytest(
    where: Path, args: list[str], report: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """pytest on ``where``'s test files with only the fault plugin (no conftest, no
    ini file; unknown markers only warn)."""
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    env.pop(ENV, None)
    if report is not None:
        env[ENV] = str(report)
    plugins = ["-p", "no:cacheprovider", "-p", "fault_report"]
    isolated = ["-c", os.devnull, "--rootdir", str(where), "-q"]
    quiet = ["-W", "ignore::pytest.PytestUnknownMarkWarning"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *plugins, *isolated, *quiet, *args],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The report of collecting every test that carries a ``fault`` marker."""
    report = tmp_path_factory.mktemp("faults") / "collected.json"
    # A module that fails to import fails the suite anyway; the others still count here.
    done = run_pytest(
        ["--collect-only", "-q", "-m", "fault", "--continue-on-collection-errors"], report
    )
    ok = (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
    assert done.returncode in ok, done.stdout[-3000:] + done.stderr[-3000:]
    return dict(json.loads(report.read_text()))


def test_the_catalogue_is_well_formed() -> None:
    catalogue = load_catalogue()
    assert len(catalogue) >= 20
    for sid, s in catalogue.items():
        assert s.id == sid and sid.startswith("F-")
        assert s.scenario.endswith(".") and s.holds.endswith("."), sid


def test_a_malformed_catalogue_entry_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "faults.toml"
    bad.write_text('[F-X]\nscenario = "s."\n')
    with pytest.raises(ValueError, match=r"\[F-X\] needs exactly the keys scenario and holds"):
        load_catalogue(bad)
    bad.write_text('[crash]\nscenario = "s."\nholds = "h."\n')
    with pytest.raises(ValueError, match="must look like F-UPPER-CASE"):
        load_catalogue(bad)


def test_every_catalogue_id_is_injected_by_a_collected_test(collected: dict[str, Any]) -> None:
    used = {sid for t in collected["tests"] for sid in t["faults"]}
    catalogue = set(load_catalogue())
    assert sorted(catalogue - used) == [], "ids no test injects: mark a test or delete the id"
    assert sorted(used - catalogue) == []
    assert all(t["outcome"] == "not run" for t in collected["tests"])


def test_backends_come_from_markers_parameters_or_the_marker(collected: dict[str, Any]) -> None:
    by_id = {t["nodeid"]: t for t in collected["tests"]}
    transport = "tests/contract/test_transport_contract.py::test_unacked_messages_survive_a_"
    assert by_id[transport + "consumer_restart[embedded]"]["backends"] == ["sqlite"]
    assert by_id[transport + "consumer_restart[rabbitmq]"]["backends"] == ["rabbitmq"]
    chaos = by_id["tests/e2e/test_chaos.py::test_chaos_postgres_nats"]
    assert chaos["backends"] == ["postgres", "nats"] and chaos["slow"]
    sim = "tests/integration/test_simulator.py::test_two_workers_share_the_orchestrators_work"
    assert by_id[sim]["backends"] == ["simulator"]


def test_a_fault_id_not_in_the_catalogue_fails_collection(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n@pytest.mark.fault('F-NO-SUCH-THING')\ndef test_x():\n    pass\n"
    )
    done = isolated_pytest(tmp_path, ["test_x.py"])
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "fault id 'F-NO-SUCH-THING' is not in tests/faults.toml" in done.stderr


def test_the_report_records_each_outcome_and_the_slow_tests_left_out(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.fault("F-DUPLICATE")
            def test_ok():
                pass

            @pytest.mark.fault("F-DUPLICATE", "F-REORDER")
            @pytest.mark.parametrize(
                "db", ["sqlite", pytest.param("pg", marks=pytest.mark.postgres)]
            )
            def test_bad(db):
                assert db == "sqlite"

            @pytest.mark.fault("F-REORDER")
            def test_skipped():
                pytest.skip("no server")

            @pytest.mark.fault("F-PARTITION", backends=("simulator",))
            def test_known_bug():
                pytest.xfail("known")

            @pytest.mark.slow
            @pytest.mark.fault("F-KILL9")
            def test_slow():
                pass

            def test_unmarked():
                pass
            """
        )
    )
    report = tmp_path / "out" / "faults.json"
    done = isolated_pytest(tmp_path, ["-m", "fault and not slow", "test_x.py"], report)
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    got = json.loads(report.read_text())
    assert got["format"] == FORMAT and "-m 'fault and not slow'" in got["command"]
    outcomes = {
        t["nodeid"]: (t["faults"], t["backends"], t["slow"], t["outcome"]) for t in got["tests"]
    }
    assert outcomes == {
        "test_x.py::test_ok": (["F-DUPLICATE"], ["sqlite"], False, "passed"),
        "test_x.py::test_bad[sqlite]": (["F-DUPLICATE", "F-REORDER"], ["sqlite"], False, "passed"),
        "test_x.py::test_bad[pg]": (["F-DUPLICATE", "F-REORDER"], ["postgres"], False, "failed"),
        "test_x.py::test_skipped": (["F-REORDER"], ["sqlite"], False, "skipped"),
        "test_x.py::test_known_bug": (["F-PARTITION"], ["simulator"], False, "xfailed"),
        "test_x.py::test_slow": (["F-KILL9"], ["sqlite"], True, "deselected"),
    }
    skipped = next(t for t in got["tests"] if t["outcome"] == "skipped")
    assert skipped["reason"] == "no server"


SMALL = {
    "F-A": Scenario("F-A", "Lost | found.", "One effect."),
    "F-B": Scenario("F-B", "Twice.", "Once."),
    "F-C": Scenario("F-C", "Killed.", "Resumes."),
    "F-D": Scenario("F-D", "Nobody.", "Nothing."),
    "F-E": Scenario("F-E", "Skipped.", "Later."),
}


def _test(
    nodeid: str, faults: list[str], backends: list[str], outcome: str, slow: bool = False
) -> dict[str, Any]:
    """One test's entry of a report."""
    return {
        "nodeid": nodeid,
        "faults": faults,
        "backends": backends,
        "slow": slow,
        "outcome": outcome,
    }


def test_the_page_renders_a_known_report() -> None:
    report = {
        "format": FORMAT,
        "created": "2026-01-02 03:04 UTC",
        "command": "python -m pytest -m 'fault and not slow'",
        "tests": [
            _test("tests/a.py::test_one[sqlite]", ["F-A", "F-B"], ["sqlite"], "passed"),
            _test("tests/a.py::test_one[postgres]", ["F-A", "F-B"], ["postgres"], "passed"),
            _test("tests/b.py::test_two", ["F-B"], ["nats"], "failed"),
            _test("tests/c.py::test_chaos", ["F-C"], ["postgres", "nats"], "deselected", True),
            _test("tests/c.py::test_slow_too", ["F-A"], ["sqlite"], "deselected", True),
            _test("tests/e.py::test_e", ["F-E"], ["rabbitmq"], "skipped"),
        ],
    }
    page = render(SMALL, report, "python3 dev.py reliability")
    table = [line for line in page.splitlines() if line.startswith("|")]
    assert table == [
        "| Id | Scenario | Backends | Runs | Result |",
        "|----|----------|----------|------|--------|",
        "| F-A | Lost \\| found. | sqlite, postgres | 2 of 3 | passed (1 slow on demand) |",
        "| F-B | Twice. | sqlite, postgres, nats | 3 of 3 | **failed** (1 of 3) |",
        "| F-C | Killed. | postgres, nats | 0 of 1 | runs on demand / in CI |",
        "| F-D | Nobody. | - | 0 | not run |",
        "| F-E | Skipped. | rabbitmq | 0 of 1 | skipped |",
    ]
    assert (
        "Generated on 2026-01-02 03:04 UTC by `python3 dev.py reliability`, from the run "
        "`python -m pytest -m 'fault and not slow'`." in page
    )
    assert '`.venv/bin/python -m pytest -m "fault and slow" tests/c.py`' in page
    assert "**F-C**: Killed. *Must hold:* Resumes.\nTests: `tests/c.py`.\n\n" in page
    assert "Tests: `tests/a.py`, `tests/b.py`.\nFailed in this run: `tests/b.py::test_two`." in page


def test_a_report_with_an_unknown_id_or_format_is_refused() -> None:
    report = {"format": FORMAT, "created": "x", "command": "y", "tests": []}
    report["tests"] = [_test("t.py::t", ["F-Z"], ["sqlite"], "passed")]
    with pytest.raises(ValueError, match="'F-Z' is not in the catalogue"):
        render(SMALL, report, "c")
    with pytest.raises(ValueError, match="not a fault report of format"):
        render(SMALL, {**report, "format": 99}, "c")


def test_the_renderer_script_writes_the_page(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    report.write_text(
        json.dumps({"format": FORMAT, "created": "today", "command": "pytest", "tests": []})
    )
    out = tmp_path / "page.md"
    script = [sys.executable, str(TESTS / "fault_report.py"), "render", str(report)]
    done = subprocess.run([*script, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all(f"| {sid} |" in out.read_text() for sid in load_catalogue())
    report.write_text("{")
    done = subprocess.run([*script, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 2 and "cannot render" in done.stderr


def test_dev_py_reliability_runs_the_marked_tests_then_renders(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = importlib.util.spec_from_file_location("_dev_reliability", ROOT / "dev.py")
    assert spec is not None and spec.loader is not None
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    ran: list[list[str]] = []
    reports: list[str] = []

    def fake_run(cmd: list[str], env: dict[str, str] | None = None) -> int:
        ran.append(cmd)
        if "pytest" in cmd:
            assert env is not None
            reports.append(env[ENV])
            Path(env[ENV]).write_text("{}")
        return 0

    monkeypatch.setattr(dev, "run", fake_run)
    assert dev.reliability(["--out", str(tmp_path / "p.md"), "-k", "dup"]) == 0
    tests, page = ran
    assert tests[-5:] == ["-m", "fault and not slow", "-q", "-k", "dup"]
    assert page[-4:] == ["render", reports[0], "--out", str(tmp_path / "p.md")]
    assert ENV not in os.environ or os.environ[ENV] != reports[0]
    ran.clear()
    assert dev.reliability(["--from", "r.json"]) == 0
    [page] = ran
    assert page[-4:] == ["render", "r.json", "--out", str(ROOT / "docs" / "reliability.md")]


def test_the_page_lists_every_scenario_of_the_catalogue_in_order() -> None:
    rows = [
        line.split("|")[1].strip()
        for line in PAGE.read_text().splitlines()
        if line.startswith("| F-")
    ]
    assert rows == list(load_catalogue()), (
        f"{PAGE.name} is behind {CATALOGUE.name}: run `python3 dev.py reliability`"
    )
