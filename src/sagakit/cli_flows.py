"""``sagakit flows``: draw a choreography's event graph and lint it against its baseline.

``--flow module:attribute`` names a callable returning ``(FlowSpec, participants)``
(the checkout's choreography by default); the baseline is ``flows.baseline.json``
next to that module unless ``--baseline`` says otherwise. Exit status 1 when the
linter finds something, 0 when the flow is clean.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_FLOW = "sagakit_checkout.choreography:checkout_flow"
BASELINE_NAME = "flows.baseline.json"


def register(sub: Any) -> None:
    """Add ``sagakit flows`` to the ``sagakit`` parser's subcommands."""
    flows = sub.add_parser(
        "flows",
        help="draw a choreography's event graph (Mermaid) and lint it",
        description="Derive the event graph from the participants' subscriptions and the "
        "flow's declaration table (who publishes what); print it as Mermaid and report "
        "failure events nobody handles, events nobody consumes, cycles, and subscribers "
        "that are new since the committed baseline. Exit status 1 on any finding.",
    )
    flows.add_argument(
        "--flow",
        default=DEFAULT_FLOW,
        help=f"module:attribute of a callable returning (FlowSpec, participants) "
        f"(default {DEFAULT_FLOW})",
    )
    flows.add_argument("--baseline", help=f"default: {BASELINE_NAME} next to the flow's module")
    flows.add_argument(
        "--format",
        choices=["text", "mermaid", "json"],
        default="text",
        help="text: findings then Mermaid; mermaid: the diagram only; json: one object",
    )
    flows.add_argument(
        "--write-baseline",
        action="store_true",
        help="accept the current subscribers: write them as the new baseline",
    )
    flows.set_defaults(func=_run)


def load_flow(spec: str) -> tuple[Any, Path]:
    """The graph of ``module:attribute`` and its module's default baseline path."""
    from sagakit.flows import derive

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"cannot load {spec!r}: {exc}") from exc
    flow_spec, participants = factory()
    return derive(flow_spec, participants), Path(module.__file__ or ".").parent / BASELINE_NAME


def _run(args: argparse.Namespace) -> int:
    from sagakit.flows import baseline, lint, mermaid, read_baseline, write_baseline

    try:
        graph, default_path = load_flow(args.flow)
    except ValueError as exc:
        print(f"sagakit flows: {exc}", file=sys.stderr)
        return 2
    path = Path(args.baseline) if args.baseline else default_path
    if args.write_baseline:
        write_baseline(graph, path)
        print(f"wrote {path}", file=sys.stderr)
    base = read_baseline(path, graph.spec.name)
    findings = lint(graph, base)
    if base is None:
        print(
            f"sagakit flows: no baseline of {graph.spec.name} in {path}; new subscribers "
            "are not checked (write one with --write-baseline)",
            file=sys.stderr,
        )
    if args.format == "json":
        print(
            json.dumps(
                {
                    "flow": graph.spec.name,
                    "baseline": str(path),
                    "findings": [
                        {"kind": f.kind, "subject": f.subject, "message": f.message}
                        for f in findings
                    ],
                    "graph": baseline(graph),
                    "mermaid": mermaid(graph),
                }
            )
        )
    elif args.format == "mermaid":
        print(mermaid(graph))
    else:
        print(
            f"sagakit flows {graph.spec.name}: {len(graph.events)} facts, "
            f"{len(graph.spec.declarations)} handlers, {len(findings)} finding(s)"
        )
        for f in findings:
            print(f"  {f}")
        print()
        print(mermaid(graph))
    return 1 if findings else 0
