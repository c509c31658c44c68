"""The ``sagakit`` command line.

Environment variables (prefix ``SAGAKIT_``) are read here, at the edge, and nowhere in
the library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sagakit.errors import ConfigurationError, SagakitError
from sagakit.redaction import RedactPersonalData
from sagakit.runtime.lockfile import private_dir

if TYPE_CHECKING:
    from sagakit.app import App
    from sagakit.testing.checker import Bounds, Checker
    from sagakit.testing.races import Race, RaceResult


def _configure_logging(data_dir: Path | None, level: str) -> None:
    # The library installs no handlers; the CLI decides where logs go. Without this,
    # Python's last-resort handler would print injected-fault warnings over the demo.
    root = logging.getLogger("sagakit")
    root.setLevel(level)
    if data_dir is not None:
        private_dir(data_dir)  # 0700: the log and the databases are the owner's
        log_file = data_dir / "sagakit.log"
        # Created readable by its owner only (0600), like the databases next to it.
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
        handler: logging.Handler = logging.FileHandler(log_file)
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RedactPersonalData())  # e-mails and card numbers never reach a log
    root.addHandler(handler)
    root.propagate = False


def _demo(args: argparse.Namespace) -> int:
    from sagakit.app_demo import DemoRequest, run_app_demo
    from sagakit.cli_app import loaded, options_of

    data_dir = Path(args.data_dir) if args.data_dir else None
    _configure_logging(data_dir, args.log_level)
    try:
        app = loaded(args, "demo")
        request = DemoRequest(
            orders=args.orders,
            faults=args.faults,
            seed=args.seed,
            data_dir=data_dir,
            synchronous=args.synchronous,
            timeout=args.timeout,
            store_url=args.store,
            broker_url=args.broker,
            options=options_of(args, "demo", app),
            progress=_progress(),
        )
        result = asyncio.run(run_app_demo(app, request))
    except (ValueError, RuntimeError, SagakitError) as exc:
        print(f"sagakit demo: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), sort_keys=False))
    else:
        print(result.render())
    return 0 if result.ok else 1


def _progress() -> TextIO | None:
    """Progress on stderr, when it is a terminal."""
    return sys.stderr if sys.stderr.isatty() else None


def _simulate(args: argparse.Namespace) -> int:
    from sagakit.testing.sim.runner import render, render_replay, replay_seed, run_seeds

    _configure_logging(None, args.log_level)
    app: str | None = args.app
    if app is not None and args.mode is not None:
        print("sagakit simulate: --mode is for the checkout; drop it with --app", file=sys.stderr)
        return 2
    mode = args.mode or "orchestration"
    least = 1 if app is not None else 2
    if args.seeds < 1 or args.orders < least or args.faults < 0:
        print(
            f"sagakit simulate: --seeds must be >= 1, --orders >= {least} and --faults >= 0",
            file=sys.stderr,
        )
        return 2
    if app is not None:
        from sagakit.app import load_app

        try:
            loaded = load_app(app)
        except SagakitError as exc:
            print(f"sagakit simulate: {exc}", file=sys.stderr)
            return 2
        if loaded.load is None:
            print(
                f"sagakit simulate: app {loaded.name!r} ships no load driver: give it "
                "App(load=...) so that the simulator knows which sagas to start",
                file=sys.stderr,
            )
            return 2
    if args.replay is not None:
        summary, result = replay_seed(
            args.replay, orders=args.orders, faults=args.faults, mode=mode, app=app
        )
        if args.json:
            out = summary.to_json()
            out["replay"] = {
                "seed": result.seed,
                "ok": result.ok,
                "violations": result.verdict.violations,
                "outcomes": result.verdict.outcomes,
                "fingerprint": result.fingerprint,
                "schedule": [a.to_json() for a in result.schedule],
            }
            print(json.dumps(out))
        else:
            print(render_replay(summary, result))
        return 0 if summary.ok else 1
    jobs = args.jobs
    if jobs <= 0:
        env = os.environ.get("SAGAKIT_JOBS", "")
        jobs = int(env) if env.isdigit() and int(env) > 0 else min(os.cpu_count() or 1, 8)
    summary = run_seeds(
        range(args.start, args.start + args.seeds),
        orders=args.orders,
        faults=args.faults,
        jobs=jobs,
        mode=mode,
        app=app,
    )
    if args.json:
        print(json.dumps(summary.to_json()))
    else:
        print(render(summary))
    return 0 if summary.ok else 1


def _check(args: argparse.Namespace) -> int:
    import importlib

    from sagakit.core.definition import SagaDefinition
    from sagakit.testing.checker import Bounds, Checker, checkout_checker

    bounds = Bounds(
        sagas=args.sagas,
        stock=args.stock,
        faults=args.faults,
        failures=args.failures,
        cancels=args.cancels,
        max_states=args.max_states,
        attempts=args.attempts,
        silences=args.silences,
        manual=args.manual,
    )
    races_at = args.races
    targets: list[tuple[str, Callable[[Bounds], Checker]]] = []
    if args.app is not None:
        if args.definition is not None:
            print("sagakit check: give a definition or --app, not both", file=sys.stderr)
            return 2
        try:
            targets = _app_checkers(args.app, args.sagas)
        except SagakitError as exc:
            print(f"sagakit check: {exc}", file=sys.stderr)
            return 2
    elif args.definition is None:
        print("sagakit check: give a definition (or 'checkout') or --app", file=sys.stderr)
        return 2
    elif args.definition == "checkout":
        targets = [("checkout", checkout_checker)]
        races_at = races_at or "sagakit_checkout.races:checkout_races"
    else:
        module, _, attr = args.definition.partition(":")
        try:
            target = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            print(f"sagakit check: cannot load {args.definition!r}: {exc}", file=sys.stderr)
            return 2
        definition = target() if callable(target) else target
        if not isinstance(definition, SagaDefinition):
            print(f"sagakit check: {args.definition!r} is not a SagaDefinition", file=sys.stderr)
            return 2
        targets = [(args.definition, partial(Checker, definition))]
    races: list[Race] = []
    if races_at is not None and not args.no_races:
        try:
            races = _load_races(races_at)
        except (ImportError, AttributeError, ValueError, TypeError) as exc:
            print(f"sagakit check: cannot load the races {races_at!r}: {exc}", file=sys.stderr)
            return 2
    codes: list[int] = []
    for i, (label, make) in enumerate(targets):
        args.definition = label
        # The races are the app's, not a definition's: explored once, before the first.
        codes.append(_check_one(args, bounds, make, races if i == 0 else []))
        if codes[-1] == 1:
            break
    # A violation first, then a failed exploration (2), then one cut short (3).
    return next((c for c in (1, 2, 3) if c in codes), 0)


def _app_checkers(spec: str, sagas: int) -> list[tuple[str, Callable[[Bounds], Checker]]]:
    """A checker per saga definition of the app ``spec`` (the latest version of each
    name), each saga's data taken from the app's load driver (seed 0) when it has one."""
    from sagakit.app import load_app
    from sagakit.core.definition import SagaDefinition
    from sagakit.testing.checker import Checker

    app = load_app(spec)
    latest: dict[str, SagaDefinition] = {}
    for d in app.definitions():
        if d.name not in latest or d.version > latest[d.name].version:
            latest[d.name] = d
    if not latest:
        raise ConfigurationError(f"app {app.name!r} has no saga definition to check")
    requests = list(app.load(max(sagas, 1) * 4, 0)) if app.load is not None else []
    out: list[tuple[str, Callable[[Bounds], Checker]]] = []
    for name, d in latest.items():
        samples = [dict(data) for defn, _, data in requests if defn == name]
        data = None if not samples else partial(_nth, samples)
        out.append((f"{spec} [{d.key}]", partial(Checker, d, data=data)))
    return out


def _nth(samples: Sequence[dict[str, Any]], i: int) -> dict[str, Any]:
    """The ``i``-th saga's data: the load driver's samples, round and round."""
    return dict(samples[i % len(samples)])


def _check_one(
    args: argparse.Namespace,
    bounds: Bounds,
    make: Callable[[Bounds], Checker],
    races: Sequence[Race],
) -> int:
    """Explore one definition (after ``races``); print its report; its exit status."""
    import time

    from sagakit.testing.coverage import render_exercised
    from sagakit.testing.races import explore_all

    if args.suite:
        return _check_suite(args, make, races)
    results = asyncio.run(explore_all(races)) if races else []
    if any(r.violations for r in results):
        _print_races(args, results)
        return 1
    started = time.monotonic()
    try:
        report = make(bounds).run()
    except Exception as exc:  # e.g. a payload builder that needs data the checker lacks
        return _explore_failed(args, exc)
    elapsed = time.monotonic() - started
    if args.json:
        print(
            json.dumps(
                {
                    **report.to_json(),
                    "elapsed_s": round(elapsed, 2),
                    "races": {r.name: r.to_json() for r in results},
                }
            )
        )
    else:
        _print_races(args, results)
        print(f"sagakit check {args.definition}: {bounds}")
        print(
            f"  states visited: {report.states}, transitions: {report.transitions}, "
            f"final states: {report.final_states}, {elapsed:.1f}s, "
            f"{'complete' if report.complete else 'CUT SHORT by --max-states'}"
        )
        for outcome, count in report.outcomes.items():
            print(f"  final {outcome}: {count}")
        print("  exercised (kinds of transition explored):")
        print("\n".join(render_exercised(report.exercised, indent="    ")))
        if report.violations:
            print(f"  VIOLATION: {report.violations[0]}")
            for i, step in enumerate(report.trace, 1):
                print(f"    {i:3}. {step}")
        else:
            print("  no invariant broken")
    if report.violations:
        return 1
    return 0 if report.complete else 3


def _explore_failed(args: argparse.Namespace, exc: Exception) -> int:
    """Exit status 2, with what failed: the definition's own code raised while the
    checker ran it (it starts saga *i* with the data ``{"n": i}``)."""
    print(
        f"sagakit check: exploring {args.definition} failed: {type(exc).__name__}: {exc}. "
        'The checker starts saga i with the data {"n": i}; a step whose payload needs '
        "other fields cannot be explored this way yet",
        file=sys.stderr,
    )
    return 2


def _load_races(where: str) -> list[Race]:
    """The races at ``module:attr``: a list of Race, or a function returning one."""
    import importlib

    from sagakit.testing.races import Race

    module, _, attr = where.partition(":")
    if not attr:
        raise ValueError("expected module:attribute")
    target = getattr(importlib.import_module(module), attr)
    races = target() if callable(target) else target
    if not isinstance(races, list | tuple) or not all(isinstance(r, Race) for r in races):
        raise TypeError(f"{where} is not a list of sagakit.testing.races.Race")
    return list(races)


def _print_races(args: argparse.Namespace, results: Sequence[RaceResult]) -> None:
    """Print the races' results (with ``--json``, only a line for a violation: the
    line of a run that stops there)."""
    if args.json:
        if any(r.violations for r in results):
            found = [f"handlers/{r.name}: {v}" for r in results for v in r.violations]
            print(
                json.dumps({"violations": found, "races": {r.name: r.to_json() for r in results}})
            )
        return
    for r in results:
        state = "complete" if r.complete else "CUT SHORT"
        print(
            f"sagakit check {args.definition} [handlers/{r.name}]: "
            f"{r.schedules} interleavings, {state}"
        )
        if r.violations:
            print(f"  VIOLATION: {r.violations[0]}")
            for i, step in enumerate(r.trace, 1):
                print(f"    {i:3}. {step}")


def _check_suite(
    args: argparse.Namespace, make: Callable[[Bounds], Checker], races: Sequence[Race]
) -> int:
    from sagakit.testing.check_suite import run_suite
    from sagakit.testing.coverage import render_exercised

    try:
        suite = run_suite(make, races=races)
    except Exception as exc:
        return _explore_failed(args, exc)
    if args.json:
        print(json.dumps(suite.to_json()))
    else:
        _print_races(args, suite.races)
        for name, report in suite.reports.items():
            print(f"sagakit check {args.definition} [{name}]: {suite.bounds[name]}")
            print(
                f"  states visited: {report.states}, transitions: {report.transitions}, "
                f"final states: {report.final_states}, {suite.elapsed[name]:.1f}s, "
                f"{'complete' if report.complete else 'CUT SHORT by max_states'}"
            )
            if report.violations:
                print(f"  VIOLATION: {report.violations[0]}")
                for i, step in enumerate(report.trace, 1):
                    print(f"    {i:3}. {step}")
        print("exercised, summed over the configurations (kinds of transition explored):")
        print("\n".join(render_exercised(suite.exercised)))
        if not suite.violations:
            print("no invariant broken")
    if suite.violations:
        return 1
    return 0 if suite.complete else 3


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs).

    The app a command runs is loaded first (``--app`` in ``argv``, else ``SAGAKIT_APP``,
    else the command's default), so that its options are flags of the command.
    """
    from sagakit.cli_app import add_app_argument, add_app_options, default_app, prescan

    scan = prescan(list(argv)) if argv is not None else None

    def apps(command: str) -> App | None:
        if scan is not None and scan.command == command:
            return scan.app
        return default_app(command)

    parser = argparse.ArgumentParser(prog="sagakit", description="Durable sagas for Python.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="run an app's demo and check its invariants (default: the checkout)",
        description="Run an app under faults and check its invariants. The default app, "
        "the reference checkout, places orders through four services (each with its own "
        "SQLite database) and checks the invariants from the services' own ledgers; "
        "another app (--app) starts the sagas of its load driver and checks its own "
        "invariants. Exit status 1 if any invariant fails.",
    )
    add_app_argument(demo, "demo")
    demo.add_argument("--orders", type=int, default=200, help="how many sagas (default 200)")
    demo.add_argument("--faults", choices=["none", "default", "chaos"], default="default")
    demo.add_argument("--seed", type=int, default=int(os.environ.get("SAGAKIT_SEED", "0")))
    demo.add_argument(
        "--data-dir",
        default=os.environ.get("SAGAKIT_DATA_DIR"),
        help="keep the databases here; rerun after a crash to resume (default: a temp dir)",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.add_argument(
        "--synchronous",
        choices=["FULL", "NORMAL"],
        default="FULL",
        help="SQLite durability: FULL survives power loss, NORMAL survives kill -9",
    )
    demo.add_argument(
        "--timeout", type=float, default=600.0, help="give up waiting after this many seconds"
    )
    demo.add_argument("--log-level", default=os.environ.get("SAGAKIT_LOG_LEVEL", "INFO"))
    demo.add_argument(
        "--store",
        help="run on this database instead of SQLite files: postgresql://user@host/db "
        "(a schema per store); needs --broker",
    )
    demo.add_argument("--broker", help="nats://host:4222 or amqp://user:pass@host:5672/")
    add_app_options(demo, "demo", apps("demo"))
    demo.set_defaults(func=_demo)

    check = sub.add_parser(
        "check",
        help="explore every interleaving of a few sagas within fault bounds",
        description="First explore the app's races (--races; the checkout's by default): "
        "its real handlers' transactions side by side in every interleaving of their "
        "statements on SQLite, as PostgreSQL's READ COMMITTED runs them. "
        "Then run the real state machine against model participants and explore "
        "every order of deliveries and timer firings, with up to --faults lost, duplicated "
        "or late messages and timers a second worker fires again late, --failures business "
        "failures (definite or retryable, of actions and compensation rungs), --silences "
        "endpoints that stop answering, --cancels cancel requests and --manual decisions "
        "of a person on sagas in the manual queue. --suite runs a fixed list of targeted "
        "configurations instead. Prints the number of states and how often each kind of "
        "transition was exercised; a broken invariant comes with the trace that breaks "
        "it. Exit status 1 on a violation, 3 if --max-states cut the search short.",
    )
    check.add_argument(
        "definition",
        nargs="?",
        help="'checkout' (the reference checkout) or module:attribute of a SagaDefinition "
        "(or --app)",
    )
    check.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="check every saga definition of this app (the latest version of each), each "
        "saga started with data from the app's load driver; one report (one JSON object "
        "with --json) per definition",
    )
    check.add_argument("--sagas", type=int, default=2)
    check.add_argument("--stock", type=int, default=1, help="units of the contested item")
    check.add_argument("--faults", type=int, default=1)
    check.add_argument("--failures", type=int, default=1)
    check.add_argument("--cancels", type=int, default=0)
    check.add_argument("--silences", type=int, default=0, help="endpoints that may go silent")
    check.add_argument("--manual", type=int, default=0, help="decisions a person may take")
    check.add_argument(
        "--attempts", type=int, default=None, help="cap every retry policy's max_attempts"
    )
    check.add_argument("--max-states", type=int, default=2_000_000)
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument(
        "--races",
        metavar="MODULE:ATTR",
        default=None,
        help="the app's races of concurrent handler transactions (a list of "
        "sagakit.testing.races.Race, or a function returning one), explored in every "
        "interleaving on SQLite before the sagas; the checkout's are its default",
    )
    check.add_argument("--no-races", action="store_true", help="skip the races")
    check.add_argument(
        "--suite",
        action="store_true",
        help="run the fixed, named list of bound configurations (CHECK_SUITE) one after "
        "the other instead of one configuration (the bound options are ignored); stop at "
        "the first violation",
    )
    check.set_defaults(func=_check)

    from sagakit.api.cli import register as register_api
    from sagakit.api.cli_tokens import register as register_tokens
    from sagakit.cli_flows import register as register_flows
    from sagakit.cli_processes import register as register_processes
    from sagakit.cli_schemas import register as register_schemas
    from sagakit.cli_versions import register as register_versions
    from sagakit.graph import register_graph_command

    register_processes(sub, apps)
    register_graph_command(sub)
    register_api(sub, apps)
    register_tokens(sub)
    register_schemas(sub)
    register_flows(sub)
    register_versions(sub, apps)

    sim = sub.add_parser(
        "simulate",
        help="run the checkout, or any app (--app), under the deterministic simulator",
        description="Run the reference checkout (real state machine or real event "
        "handlers and tracker, real participant runtime), or any app (--app: its real "
        "definitions and handlers), under a seeded scheduler with a "
        "virtual clock that loses, duplicates, delays and reorders messages (each copy of "
        "an event on its own), crashes consumers before and after commit, loses relay "
        "acknowledgements and fires timeouts (or the tracker's SLA check) while messages "
        "are on their way, fires timers again or late; orchestrated, two workers share "
        "the saga store and a simulated operator decides on the manual queue. Check the "
        "design's invariants (docs/design.md) after every seed, and report how often each "
        "kind of transition was exercised. A failing seed is printed and shrunk to a "
        "minimal schedule. Exit status 1 if any seed fails.",
    )
    sim.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        default=None,
        help="simulate this app instead of the checkout (a sagakit.App, or a function "
        "returning one): its real definitions and services on SQLite files, the sagas of "
        "its load driver (--orders per seed), its setup, its watch after every step and "
        "its invariants at the end, beside the generic ones",
    )
    sim.add_argument(
        "--mode",
        choices=("orchestration", "choreography", "hybrid"),
        default=None,
        help="how the checkout runs (not with --app): orchestrated (default), "
        "choreographed (the services "
        "react to each other's facts; the tracker keeps the saga views) or hybrid "
        "(orchestrated, with a choreography inside shipping)",
    )
    sim.add_argument("--seeds", type=int, default=100, help="how many seeds (default 100)")
    sim.add_argument("--start", type=int, default=0, help="the first seed (default 0)")
    sim.add_argument(
        "--orders",
        type=int,
        default=3,
        help="orders per seed, two of them racing (default 3); with --app, the count "
        "given to its load driver",
    )
    sim.add_argument("--faults", type=int, default=8, help="fault budget per seed (default 8)")
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    sim.add_argument(
        "--replay",
        type=int,
        metavar="SEED",
        help="run only SEED and print its schedule and verdict (shrunk if it fails)",
    )
    sim.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="worker processes (default: $SAGAKIT_JOBS, else one per CPU); a seed's run "
        "does not depend on it",
    )
    sim.add_argument("--log-level", default=os.environ.get("SAGAKIT_LOG_LEVEL", "WARNING"))
    sim.set_defaults(func=_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sagakit`` command."""
    from sagakit.cli_app import prescan

    argv = list(sys.argv[1:] if argv is None else argv)
    scan = prescan(argv)
    if scan.error is not None and not {"-h", "--help"} & set(argv):
        # Before parsing: the app's own flags would otherwise be "unrecognized".
        print(f"sagakit {scan.command}: {scan.error}", file=sys.stderr)
        return 2
    args = build_parser(argv).parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
