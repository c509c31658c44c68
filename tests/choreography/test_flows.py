"""The flow linter: the checkout's graph is clean; strays, gaps and cycles are flagged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from sagakit_checkout.choreography import FLOW, checkout_flow
from sagakit_checkout.hybrid import shipping_flow

from sagakit import Participant
from sagakit.flows import START, FlowSpec, Publishes, derive, lint, mermaid, read_baseline
from sagakit.stores.memory import MemoryStore

ROOT = Path(__file__).parents[2]
BASELINE = ROOT / "examples" / "checkout" / "flows.baseline.json"


def subscriber(name: str, *events: str) -> Participant:
    p = Participant(name, MemoryStore(name))
    for e in events:
        p.on_event(e)(lambda tx, ev: None)
    return p


def test_the_checkout_and_the_shipping_domain_are_clean_against_their_baselines() -> None:
    for factory in (checkout_flow, shipping_flow):
        spec, participants = factory()
        graph = derive(spec, participants)
        assert lint(graph, read_baseline(BASELINE, spec.name)) == [], spec.name


def test_a_stray_subscriber_is_flagged() -> None:
    spec, participants = checkout_flow()
    stray = subscriber("marketing", "PaymentAuthorized")
    graph = derive(spec, [*participants, stray])
    found = {(f.kind, f.subject) for f in lint(graph, read_baseline(BASELINE, spec.name))}
    assert found == {
        ("new-subscriber", "marketing:PaymentAuthorized"),
        ("undeclared", "marketing:PaymentAuthorized"),
    }
    # Declared and accepted into the baseline, it is just another subscriber.
    declared = FlowSpec(
        spec.name,
        (*spec.declarations, Publishes("marketing", "PaymentAuthorized")),
        spec.terminal,
        spec.escalated,
        spec.observers,
    )
    base = json.loads(BASELINE.read_text())["flows"][spec.name]
    base["subscriptions"]["PaymentAuthorized"].append("marketing")
    assert lint(derive(declared, [*participants, stray]), base) == []


def test_gaps_cycles_and_names_are_reported() -> None:
    spec = FlowSpec(
        "toy",
        (
            Publishes("a", START, ("ThingStarted",)),
            Publishes("b", "ThingStarted", ("ThingChecked", "CheckFailed")),
            Publishes("c", "ThingChecked", ("ThingStarted", "NoteWritten")),
            Publishes("d", "ThingMissing"),
            Publishes("e", "ThingRemember"),
        ),
    )
    graph = derive(
        spec,
        [
            subscriber("b", "ThingStarted"),
            subscriber("c", "ThingChecked"),
            subscriber("d", "ThingMissing"),
            subscriber("e", "ThingRemember"),
            subscriber("f", "ThingStarted"),
        ],
    )
    found = {(f.kind, f.subject) for f in lint(graph)}
    assert found == {
        ("undeclared", "f:ThingStarted"),
        ("unhandled-failure", "CheckFailed"),
        ("unconsumed", "NoteWritten"),
        ("unpublished", "ThingMissing"),
        ("naming", "ThingMissing"),
        ("unpublished", "ThingRemember"),
        ("naming", "ThingRemember"),
        ("cycle", "ThingChecked -> ThingStarted -> ThingChecked"),
    }


def test_the_mermaid_in_the_docs_is_the_current_graph() -> None:
    spec, participants = checkout_flow()
    text = mermaid(derive(spec, participants))
    assert text == mermaid(derive(*checkout_flow())), "deterministic"
    assert text.startswith("flowchart LR") and "OrderCompleted" in text
    docs = (ROOT / "docs" / "flows.md").read_text()
    assert text in docs, "docs/flows.md is stale: paste `sagakit flows --format mermaid`"
    spec2, parts2 = shipping_flow()
    assert mermaid(derive(spec2, parts2)) in docs
    assert FLOW.observers == {"tracker"}


def flows_cli(*args: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    code = (
        "import argparse, sys\n"
        "from sagakit.cli_flows import register\n"
        "p = argparse.ArgumentParser(prog='sagakit'); sub = p.add_subparsers(required=True)\n"
        "register(sub); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    env: dict[str, Any] = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = f"{path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return subprocess.run(
        [sys.executable, "-c", code, "flows", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_the_cli_passes_the_checkout_and_fails_a_stray_subscriber(tmp_path: Path) -> None:
    ok = flows_cli()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 finding(s)" in ok.stdout and "flowchart LR" in ok.stdout
    (tmp_path / "stray_flow.py").write_text(
        textwrap.dedent(
            """
            from sagakit import Participant
            from sagakit.stores.memory import MemoryStore
            from sagakit_checkout.choreography import checkout_flow

            def flow():
                spec, parts = checkout_flow()
                stray = Participant("marketing", MemoryStore("marketing"))
                stray.on_event("OrderCompleted")(lambda tx, ev: None)
                return spec, [*parts, stray]
            """
        )
    )
    bad = flows_cli(
        "--flow", "stray_flow:flow", "--baseline", str(BASELINE), "--format", "json", path=tmp_path
    )
    assert bad.returncode == 1, bad.stderr
    kinds = {(f["kind"], f["subject"]) for f in json.loads(bad.stdout)["findings"]}
    assert ("new-subscriber", "marketing:OrderCompleted") in kinds
