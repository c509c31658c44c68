"""``sagakit check --suite``: a fixed set of small bound configurations, run in order.

One exhaustive run with every fault kind at once would not finish; a few small runs,
each aimed at one family of bugs, cover them all within about half a minute of CPU (see
:data:`CHECK_SUITE`). The mutation suite (``tests/mutation``) runs this one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagakit.testing.checker import Bounds, Checker, CheckReport
from sagakit.testing.races import Race, RaceResult, explore_all

CHECK_SUITE: dict[str, Bounds] = {
    # Cheap configurations first: a planted bug is usually caught in the first seconds.
    # Two sagas race for the last item, with a business failure, then with a cancel.
    "race-failure": Bounds(sagas=2, faults=0, failures=1, attempts=2),
    "race-cancel": Bounds(sagas=2, faults=0, failures=0, cancels=1, attempts=2),
    # One saga: a person decides, twice, while late replies and timers still arrive (two
    # retries in flight at once: an older retry must not run the handler again).
    "manual": Bounds(sagas=1, faults=1, failures=1, manual=2, attempts=2),
    # One saga: a second worker holds a timer while a person decides (the decision
    # starts new tries and a new deadline: the held timer must move nothing).
    "decision-ghosts": Bounds(sagas=1, faults=1, failures=2, manual=1, attempts=2),
    # One saga: the ladder (definite and retryable rung failures, an endpoint that goes
    # silent) and a person's decision.
    "ladder": Bounds(sagas=1, faults=0, failures=2, silences=1, manual=1, attempts=2),
    # One saga: an endpoint goes silent (every try and status query times out) and a
    # second worker fires a timer late.
    "silent": Bounds(sagas=1, faults=1, failures=0, silences=1, attempts=2),
    # One saga: a fault and two failures, before or after the pivot (a failure starts the
    # compensation, the other hits a rung while a late try is still on its way).
    "fault-failures": Bounds(sagas=1, faults=1, failures=2, attempts=2),
    # Two sagas race for the last item with a lost, duplicated or late message or timer.
    "race-fault": Bounds(sagas=2, faults=1, failures=0, attempts=2),
}
"""The named bound configurations ``sagakit check --suite`` runs, one after the other.

Each is small and aimed at one family of bugs, so the suite stays within about half a
minute on one core; budgets are maxima, so a configuration covers every smaller one. A
deeper run is one command away, e.g. ``sagakit check checkout --sagas 1 --faults 2
--failures 1 --attempts 2``."""


@dataclass
class SuiteReport:
    """The reports of a suite's configurations, in the order they ran."""

    reports: dict[str, CheckReport] = field(default_factory=dict)
    bounds: dict[str, Bounds] = field(default_factory=dict)
    elapsed: dict[str, float] = field(default_factory=dict)
    races: list[RaceResult] = field(default_factory=list)
    """The app's races of concurrent handler transactions (:mod:`sagakit.testing.races`),
    run before the configurations."""

    @property
    def violations(self) -> list[str]:
        """Every violation found (the suite stops at the first race or configuration
        with one)."""
        return [f"handlers/{r.name}: {v}" for r in self.races for v in r.violations] + [
            f"{name}: {v}" for name, r in self.reports.items() for v in r.violations
        ]

    @property
    def complete(self) -> bool:
        """True if no configuration was cut short by its ``max_states`` (nor a race by
        its schedule budget)."""
        return all(r.complete for r in self.reports.values()) and all(
            r.complete for r in self.races
        )

    @property
    def exercised(self) -> Counter[str]:
        """The configurations' :attr:`CheckReport.exercised`, summed."""
        total: Counter[str] = Counter()
        for r in self.reports.values():
            total.update(r.exercised)
        return total

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form: totals, then each configuration's report."""
        return {
            "complete": self.complete,
            "violations": self.violations,
            "states": sum(r.states for r in self.reports.values()),
            "exercised": dict(sorted(self.exercised.items())),
            "races": {r.name: r.to_json() for r in self.races},
            "configurations": {
                name: {
                    "bounds": dataclasses.asdict(self.bounds[name]),
                    "elapsed_s": round(self.elapsed[name], 2),
                    **r.to_json(),
                }
                for name, r in self.reports.items()
            },
        }


def run_suite(
    make: Callable[[Bounds], Checker],
    suite: Mapping[str, Bounds] | None = None,
    *,
    races: Sequence[Race] = (),
) -> SuiteReport:
    """Explore ``races`` (every interleaving of the app's concurrent handler
    transactions, on SQLite; they take about a second), then run ``make(bounds).run()``
    for each configuration of ``suite`` (default :data:`CHECK_SUITE`) in order; stop
    after the first race or configuration that finds a violation."""
    out = SuiteReport()
    if races:
        out.races = asyncio.run(explore_all(races))
        if any(r.violations for r in out.races):
            return out
    for name, bounds in (CHECK_SUITE if suite is None else suite).items():
        started = time.monotonic()
        report = make(bounds).run()
        out.reports[name] = report
        out.bounds[name] = bounds
        out.elapsed[name] = time.monotonic() - started
        if report.violations:
            break
    return out
