"""The fault catalogue's pytest plugin and the renderer of docs/reliability.md.

Plugin (registered by tests/conftest.py): a test that injects a fault scenario carries
``@pytest.mark.fault("F-...", ...)`` with ids of tests/faults.toml; an id that is not in
the catalogue fails collection. The marker takes ``backends=("simulator",)`` where the
backends cannot be read from the test's markers and parameters. With the environment
variable ``SAGAKIT_FAULT_REPORT=<path>`` set, every test carrying ``fault`` ids is
recorded (its ids, backends, whether it is ``slow``, its outcome; tests deselected by
``-m``/``-k`` as ``deselected``) and the JSON is written at the end of the session
(the variable is removed from the session's environment, so that a pytest run by a
test does not write over it).
The ids travel in each report's ``user_properties``, so a pytest-xdist controller
would see them too (the suite does not use xdist; under it, deselected tests are not
recorded).

Renderer: ``python tests/fault_report.py render REPORT.json --out docs/reliability.md``
(what ``python3 dev.py reliability`` runs) turns the catalogue and a report into the
page: one row per scenario with its backends, how many of its tests ran, and the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
CATALOGUE = HERE / "faults.toml"
ENV = "SAGAKIT_FAULT_REPORT"
FORMAT = 1

BACKENDS = ("sqlite", "memory", "postgres", "nats", "rabbitmq", "simulator")
"""Backend names a report uses, in the order the page lists them."""

_ALIASES = {"embedded": "sqlite", **{b: b for b in BACKENDS}}
"""Words of a test's parameter id that name a backend (the embedded transport runs on
SQLite files)."""

RAN = ("passed", "failed", "error", "xfailed", "xpassed")
"""Outcomes of a test that ran (skipped and deselected ones did not)."""

PROPERTY = "sagakit_fault"
"""The ``user_properties`` key a test's ids, backends and slowness travel under."""


@dataclass(frozen=True)
class Scenario:
    """One entry of the catalogue."""

    id: str
    scenario: str
    holds: str


def load_catalogue(path: Path = CATALOGUE) -> dict[str, Scenario]:
    """The catalogue's scenarios by id, in the file's order; a malformed entry is an error."""
    with path.open("rb") as f:
        raw = tomllib.load(f)
    out: dict[str, Scenario] = {}
    for sid, entry in raw.items():
        if not sid.startswith("F-") or sid != sid.upper():
            raise ValueError(f"{path}: fault id {sid!r} must look like F-UPPER-CASE")
        if not isinstance(entry, dict) or set(entry) != {"scenario", "holds"}:
            raise ValueError(f"{path}: [{sid}] needs exactly the keys scenario and holds")
        if not all(isinstance(v, str) and v.strip() for v in entry.values()):
            raise ValueError(f"{path}: [{sid}] scenario and holds must be non-empty text")
        out[sid] = Scenario(sid, entry["scenario"].strip(), entry["holds"].strip())
    return out


# -- the plugin ---------------------------------------------------------------------------


def _fault_of(item: Any, catalogue: Mapping[str, Scenario]) -> dict[str, Any] | None:
    """The item's fault ids, backends and slowness, or None without a ``fault`` marker.

    Raises ValueError naming the test when a marker is malformed or names an id the
    catalogue does not have.
    """
    markers = list(item.iter_markers("fault"))
    if not markers:
        return None
    ids: list[str] = []
    given: list[str] = []
    for m in markers:
        unknown_kw = set(m.kwargs) - {"backends"}
        if unknown_kw or not m.args:
            raise ValueError(
                f"{item.nodeid}: use @pytest.mark.fault('F-...', ..., backends=(...)), "
                f"got args {m.args!r} kwargs {m.kwargs!r}"
            )
        for sid in m.args:
            if sid not in catalogue:
                raise ValueError(f"{item.nodeid}: fault id {sid!r} is not in tests/faults.toml")
            if sid not in ids:
                ids.append(sid)
        for b in m.kwargs.get("backends", ()):
            if b not in BACKENDS:
                raise ValueError(f"{item.nodeid}: unknown backend {b!r}; choose from {BACKENDS}")
            given.append(b)
    return {
        "faults": ids,
        "backends": sorted(set(given) or backends_of(item), key=BACKENDS.index),
        "slow": item.get_closest_marker("slow") is not None,
    }


def backends_of(item: Any) -> set[str]:
    """What a test runs on: its server markers and the backend words of its parameter
    id (``sqlite``, ``postgres``, ``embedded`` ...); SQLite when neither names one."""
    found = {m.name for m in item.iter_markers() if m.name in ("postgres", "nats", "rabbitmq")}
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        for word in callspec.id.replace("_", "-").split("-"):
            if word in _ALIASES:
                found.add(_ALIASES[word])
    return found or {"sqlite"}


class FaultPlugin:
    """Checks every ``fault`` marker; with ``SAGAKIT_FAULT_REPORT`` set, records outcomes."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.catalogue = load_catalogue()
        # Taken out of the environment: a pytest that a test runs in a subprocess
        # must not write its report over this session's.
        path = os.environ.pop(ENV, "").strip()
        self.path = Path(path) if path else None
        self.tests: dict[str, dict[str, Any]] = {}

    @pytest.hookimpl(tryfirst=True)  # before -m and -k deselect: every marker is checked
    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        for item in items:
            try:
                fault = _fault_of(item, self.catalogue)
            except ValueError as e:
                raise pytest.UsageError(str(e)) from None
            if fault is not None:
                item.user_properties.append((PROPERTY, fault))
                if self.path is not None:
                    self.tests[item.nodeid] = {"nodeid": item.nodeid, **fault, "outcome": None}

    def pytest_deselected(self, items: Sequence[Any]) -> None:
        for item in items:
            if item.nodeid in self.tests:
                self.tests[item.nodeid]["outcome"] = "deselected"

    def pytest_runtest_logreport(self, report: Any) -> None:
        if self.path is None:
            return
        fault = dict(report.user_properties).get(PROPERTY)
        if fault is None:
            return
        entry = self.tests.setdefault(
            report.nodeid, {"nodeid": report.nodeid, **fault, "outcome": None}
        )
        xfail = hasattr(report, "wasxfail")
        if report.failed:
            if entry["outcome"] not in ("failed", "error"):
                entry["outcome"] = "failed" if report.when == "call" else "error"
        elif report.skipped:
            entry["outcome"] = "xfailed" if xfail else "skipped"
            if not xfail and isinstance(report.longrepr, tuple):
                entry["reason"] = str(report.longrepr[2]).removeprefix("Skipped: ")
        elif report.when == "call":
            entry["outcome"] = "xpassed" if xfail else "passed"
        if report.when == "call":
            entry["duration"] = round(report.duration, 2)

    def pytest_sessionfinish(self) -> None:
        if self.path is None or hasattr(self.config, "workerinput"):
            return  # an xdist worker: its reports reach the controller, which writes
        args = " ".join(_quote(a) for a in self.config.invocation_params.args)
        report = {
            "format": FORMAT,
            "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": f"python -m pytest {args}".strip(),
            "tests": sorted(
                ({**t, "outcome": t["outcome"] or "not run"} for t in self.tests.values()),
                key=lambda t: t["nodeid"],
            ),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(report, indent=1) + "\n")


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_./=:[]," for c in arg) else repr(arg)


def pytest_configure(config: Any) -> None:
    """Register the plugin object (this module is loaded through ``pytest_plugins``)."""
    config.pluginmanager.register(FaultPlugin(config), "sagakit-fault-catalogue")


# -- the page -----------------------------------------------------------------------------

HEADER = """\
# Reliability

<!-- Generated by `python3 dev.py reliability` from tests/faults.toml and a test run;
do not edit by hand. -->

Every fault scenario the test suite injects has an id in the fault catalogue
(`tests/faults.toml`), and every test that injects one carries the id
(`@pytest.mark.fault("F-...")`). This page is generated from a run of those tests:
for each scenario, the backends its tests run on, how many of its tests ran, and the
result. What each scenario must keep true is listed below the table.
"""


def _result(tests: Sequence[Mapping[str, Any]]) -> str:
    """The result cell of one scenario: passed, failed, skipped, on demand, or not run."""
    ran = [t for t in tests if t["outcome"] in RAN]
    bad = [t for t in ran if t["outcome"] in ("failed", "error")]
    slow_left = [t for t in tests if t["outcome"] not in RAN and t["slow"]]
    if bad:
        return f"**failed** ({len(bad)} of {len(ran)})"
    if ran:
        notes = []
        if xfailed := sum(t["outcome"] == "xfailed" for t in ran):
            notes.append(f"{xfailed} known failure (xfail)")
        if slow_left:
            notes.append(f"{len(slow_left)} slow on demand")
        return "passed" + (f" ({'; '.join(notes)})" if notes else "")
    if tests and len(slow_left) == len(tests):
        return "runs on demand / in CI"
    if any(t["outcome"] == "skipped" for t in tests):
        return "skipped"
    return "not run"


def _files(tests: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted({t["nodeid"].split("::")[0] for t in tests})


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(catalogue: Mapping[str, Scenario], report: Mapping[str, Any], command: str) -> str:
    """The page for ``catalogue`` and one run's ``report`` (the plugin's JSON)."""
    if report.get("format") != FORMAT:
        raise ValueError(f"not a fault report of format {FORMAT}: {report.get('format')!r}")
    by_id: dict[str, list[Mapping[str, Any]]] = {sid: [] for sid in catalogue}
    for t in report["tests"]:
        for sid in t["faults"]:
            if sid not in by_id:
                raise ValueError(f"{t['nodeid']}: fault id {sid!r} is not in the catalogue")
            by_id[sid].append(t)
    lines = [
        HEADER,
        f"Generated on {report['created']} by `{command}`, from the run `{report['command']}`.",
        "",
        "| Id | Scenario | Backends | Runs | Result |",
        "|----|----------|----------|------|--------|",
    ]
    on_demand: dict[str, list[str]] = {}
    for sid, s in catalogue.items():
        tests = by_id[sid]
        backends = sorted({b for t in tests for b in t["backends"]}, key=BACKENDS.index)
        ran = sum(t["outcome"] in RAN for t in tests)
        result = _result(tests)
        slow = [t for t in tests if t["slow"] and t["outcome"] not in RAN]
        if slow:
            on_demand[sid] = _files(slow)
        runs = f"{ran} of {len(tests)}" if tests else "0"
        lines.append(
            f"| {sid} | {_cell(s.scenario)} | {', '.join(backends) or '-'} | {runs} | {result} |"
        )
    lines += ["", "Runs: tests of the scenario that ran, of the tests that inject it."]
    if on_demand:
        files = sorted({f for fs in on_demand.values() for f in fs})
        lines += [
            "Scenarios with slow tests (servers of their own, kill -9, minutes of chaos)",
            "run those on demand and in CI, with "
            f'`.venv/bin/python -m pytest -m "fault and slow" {" ".join(files)}`.',
        ]
    lines += ["", "## What must hold", ""]
    for sid, s in catalogue.items():
        tests = by_id[sid]
        lines.append(f"**{sid}**: {s.scenario} *Must hold:* {s.holds}")
        if tests:
            lines.append(f"Tests: {', '.join(f'`{f}`' for f in _files(tests))}.")
        if bad := [t["nodeid"] for t in tests if t["outcome"] in ("failed", "error")]:
            lines.append(f"Failed in this run: {', '.join(f'`{b}`' for b in bad)}.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str]) -> int:
    """``render REPORT.json [--out PATH] [--command TEXT]``: write the page."""
    parser = argparse.ArgumentParser(prog="fault_report.py")
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("render", help="render docs/reliability.md from a fault report")
    r.add_argument("report", type=Path, help="the JSON a run with SAGAKIT_FAULT_REPORT wrote")
    r.add_argument("--out", type=Path, default=HERE.parent / "docs" / "reliability.md")
    r.add_argument("--command", default="python3 dev.py reliability")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
        page = render(load_catalogue(), report, args.command)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"fault_report.py: cannot render {args.report}: {e}", file=sys.stderr)
        return 2
    args.out.write_text(page)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
