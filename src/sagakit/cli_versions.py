"""``sagakit versions``: which saga definition versions are in flight, and whether the app
still has them.

A saga runs the definition version it started with until it ends, so a release that
drops a version strands that version's sagas (their inputs are set aside until some
process has it again). Run this in the deploy pipeline with the *new* release's app::

    sagakit versions --app travel.app:app --store postgresql://db/travel

It reads the orchestrator store: sagas per definition version and state, and inputs set
aside per version. Exit status 1 when a version with sagas still in flight (running or
compensating) or waiting in the manual queue (a person's decision needs the definition
too) is missing from the app; 0 otherwise; 2 on usage errors and when the store cannot
be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagakit.cli_app import add_app_argument, add_app_options, loaded, options_of
from sagakit.core.instance import MANUAL_STATES, SagaState
from sagakit.errors import ConfigurationError, SagakitError

if TYPE_CHECKING:
    from sagakit.app import App

COMMAND = "versions"


def register(sub: Any, apps: Callable[[str], App | None] | None = None) -> None:
    """Add ``sagakit versions`` to the ``sagakit`` parser's subcommands.

    ``apps(command)`` is the app whose options become flags (see
    :func:`sagakit.cli_app.prescan`); by default the app named by ``SAGAKIT_APP``.
    """
    from sagakit.cli_app import default_app
    from sagakit.cli_processes import store_option

    apps = apps or default_app
    versions = sub.add_parser(
        COMMAND,
        help="list the saga definition versions in flight; fail if the app lacks one",
        description="Count the sagas in the app's orchestrator store per definition "
        "version and state, and the inputs set aside for each version; mark the versions "
        "the app has. Exit status 1 when the app lacks a version that still has sagas "
        "running, compensating or in the manual queue (a deploy would strand them), "
        "0 otherwise, 2 on usage errors or when the store cannot be read.",
    )
    add_app_argument(versions, COMMAND)
    store_option(versions)
    versions.add_argument("--json", action="store_true", help="print one JSON object")
    add_app_options(versions, COMMAND, apps(COMMAND))
    versions.set_defaults(func=_run)


@dataclass
class VersionRow:
    """One definition version: its sagas per state, inputs set aside, and the app's view."""

    definition: str
    version: int
    in_app: bool
    states: dict[SagaState, int] = field(default_factory=dict)
    set_aside: int = 0

    @property
    def key(self) -> str:
        """``name@version``."""
        return f"{self.definition}@{self.version}"

    @property
    def in_flight(self) -> int:
        """Sagas that may still move (running or compensating)."""
        return sum(n for s, n in self.states.items() if not s.terminal)

    @property
    def manual(self) -> int:
        """Sagas waiting for a person (whose decision needs the definition)."""
        return sum(n for s, n in self.states.items() if s in MANUAL_STATES)

    @property
    def finished(self) -> int:
        """Sagas that ended for good."""
        return sum(self.states.values()) - self.in_flight - self.manual

    @property
    def stranded(self) -> bool:
        """The app lacks this version while sagas still need it."""
        return not self.in_app and (self.in_flight + self.manual + self.set_aside) > 0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "definition": self.definition,
            "version": self.version,
            "key": self.key,
            "in_app": self.in_app,
            "states": {s.value: n for s, n in sorted(self.states.items())},
            "in_flight": self.in_flight,
            "manual": self.manual,
            "finished": self.finished,
            "set_aside": self.set_aside,
            "stranded": self.stranded,
        }


def version_rows(
    app_versions: set[tuple[str, int]],
    counts: Mapping[tuple[str, int, SagaState], int],
    set_aside: Mapping[tuple[str, int], int],
) -> list[VersionRow]:
    """Every version the store or the app knows, by definition then version."""
    keys = app_versions | {(d, v) for d, v, _ in counts} | set(set_aside)
    rows = {k: VersionRow(k[0], k[1], k in app_versions) for k in keys}
    for (d, v, state), n in counts.items():
        rows[(d, v)].states[state] = n
    for k, n in set_aside.items():
        rows[k].set_aside = n
    return [rows[k] for k in sorted(rows)]


async def read_versions(app: App, store_url: str, options: Mapping[str, Any]) -> list[VersionRow]:
    """The version rows of ``app``'s orchestrator store at ``store_url``."""
    from sagakit.deployment import Deployment

    dep = Deployment(app, store_url, options=options)
    have = {(d.name, d.version) for d in dep.definitions}
    store = dep.store("orchestrator")
    await store.open()
    try:
        counts = await store.count_sagas_by_version()
        aside = await store.set_aside_counts()
    finally:
        await store.close()
    return version_rows(have, counts, aside)


def _run(args: argparse.Namespace) -> int:
    try:
        app = loaded(args, COMMAND)
        if not args.store:
            raise ConfigurationError(
                "--store is required: the app's store URL (postgresql://... or "
                "sqlite:///DIR), or set SAGAKIT_STORE_URL"
            )
        rows = asyncio.run(read_versions(app, args.store, options_of(args, COMMAND, app)))
    except ConfigurationError as exc:
        print(f"sagakit {COMMAND}: {exc}", file=sys.stderr)
        return 2
    except SagakitError as exc:
        print(f"sagakit {COMMAND}: cannot read the store: {exc}", file=sys.stderr)
        return 2
    stranded = [r for r in rows if r.stranded]
    if args.json:
        print(
            json.dumps(
                {
                    "app": app.name,
                    "ok": not stranded,
                    "missing": [r.key for r in stranded],
                    "versions": [r.to_json() for r in rows],
                }
            )
        )
    else:
        print(render(app.name, rows))
    return 1 if stranded else 0


def render(app_name: str, rows: list[VersionRow]) -> str:
    """The text report: one line per version, then the verdict."""
    header = ("VERSION", "APP", "IN FLIGHT", "MANUAL", "FINISHED", "SET ASIDE", "STATES")
    table = [header] + [
        (
            r.key,
            "yes" if r.in_app else "MISSING",
            str(r.in_flight),
            str(r.manual),
            str(r.finished),
            str(r.set_aside),
            " ".join(f"{s.value}={n}" for s, n in sorted(r.states.items())) or "-",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(line, widths, strict=False)), line[-1]])
        for line in table
    ]
    stranded = [r for r in rows if r.stranded]
    if not rows:
        lines = [f"app {app_name!r}: no saga definitions and no sagas in the store"]
    if stranded:
        for r in stranded:
            lines.append(
                f"refused: app {app_name!r} lacks {r.key}, which {r.in_flight} saga(s) in "
                f"flight, {r.manual} in the manual queue and {r.set_aside} input(s) set aside "
                f"still need; keep {r.key} in the app until they finish"
            )
    else:
        lines.append(f"ok: app {app_name!r} has every definition version its sagas still need")
    return "\n".join(lines)
