"""sagakit.graph: Mermaid, DOT and SVG of definitions; timeline and flow of instances.

Structure is compared, not pixels: SVGs are parsed as XML and read through their
``class`` / ``data-*`` attributes.
"""

from __future__ import annotations

import argparse
import json
import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from sagakit import (
    DefinitionError,
    HistoryEntry,
    SagaDefinition,
    SagaInstance,
    SagaState,
    Step,
    StepKind,
    StepState,
    StepStatus,
    command,
    local,
)
from sagakit.graph import (
    flow_svg,
    load_definition,
    register_graph_command,
    timeline_svg,
    to_dot,
    to_mermaid,
    to_svg,
)

SVG = "{http://www.w3.org/2000/svg}"
ODD = "<script>alert('x')</script> & \"quoted\" | pipe # hash"


def noop(_: Any) -> None:
    return None


def definition() -> SagaDefinition:
    """Four steps: compensatable with a ladder, a local one with an odd name, the pivot,
    a retriable one; odd status labels everywhere."""
    return SagaDefinition(
        "trip",
        started_status=ODD,
        completed_status='DONE "ok"',
        steps=[
            Step(
                "hotel",
                command("hotels", "Book"),
                [command("hotels", "Cancel"), command("hotels", "Refund")],
                status="BOOKING <hotel>",
                status_query=command("hotels", "Status"),
            ),
            Step("risk", local(noop, name=ODD), local(noop, name="undo risk")),
            Step("charge", command('pay"s', "Charge|Now"), kind=StepKind.PIVOT, status="PAYING"),
            Step("mail", command("mailer", "Send"), kind=StepKind.RETRIABLE),
        ],
    )


def instance(
    d: SagaDefinition, statuses: list[StepStatus], state: SagaState, cursor: int
) -> SagaInstance:
    return SagaInstance(
        saga_id="saga-1",
        definition=d.name,
        definition_version=d.version,
        business_key=ODD,
        correlation_id="saga-1",
        state=state,
        status="X",
        data={},
        steps=[StepState(status=s, attempt=1) for s in statuses],
        created_at=100.0,
        updated_at=101.0,
        cursor=cursor,
    )


def svg(text: str) -> ET.Element:
    root = ET.fromstring(text)  # raises on anything that is not well-formed XML
    assert root.tag == f"{SVG}svg"
    return root


def by_class(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [el for el in root.iter(f"{SVG}{tag}") if cls in (el.get("class") or "").split()]


# -- definition pictures ---------------------------------------------------------------


def test_mermaid_lists_steps_in_order_with_kinds_and_dashed_ladders() -> None:
    text = to_mermaid(definition())
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    nodes = [ln.strip() for ln in lines if re.match(r"\s+s\d[\[{(]", ln)]
    assert [n[:2] for n in nodes] == ["s0", "s1", "s2", "s3"]
    assert nodes[2].startswith('s2{{"charge') and "(pivot)" in nodes[2]
    assert nodes[3].startswith('s3(["mail') and "(retriable)" in nodes[3]
    assert "  start --> s0" in lines and "  s3 --> done" in lines
    back = [ln for ln in lines if "-.->" in ln]
    assert len(back) == 2
    assert back[0].endswith("| cancelled") and "1. hotels.Cancel / 2. hotels.Refund" in back[0]
    assert back[1].endswith("| s0")
    assert "[BOOKING #60;hotel#62;]" in text


def test_mermaid_escapes_odd_names() -> None:
    text = to_mermaid(definition())
    assert "<script>" not in text and "alert('x')" in text
    for line in text.splitlines():
        if line.strip().startswith(("s", "start", "done")) and '"' in line:
            # Only the label delimiters are raw quotes.
            assert line.count('"') == 2 or "-.->" in line
    assert "#34;quoted#34;" in text and "#124; pipe #35; hash" in text


def test_mermaid_highlight_colours_steps_and_marks_the_position() -> None:
    d = definition()
    statuses = [StepStatus.SUCCEEDED, StepStatus.SUCCEEDED, StepStatus.UNKNOWN, StepStatus.PENDING]
    text = to_mermaid(d, instance(d, statuses, SagaState.FAILED_NEEDS_MANUAL, 2))
    assert "  class s0 st_SUCCEEDED" in text and "  class s2 st_UNKNOWN" in text
    assert "classDef st_UNKNOWN fill:" in text
    assert "  style s2 stroke-width:4px,stroke:#1e3a8a" in text
    assert "  s2 -.-> manual" in text
    assert text == to_mermaid(d, instance(d, statuses, SagaState.FAILED_NEEDS_MANUAL, 2))


def test_dot_is_a_digraph_with_escaped_labels() -> None:
    d = definition()
    text = to_dot(d)
    assert text.startswith('digraph "trip@1" {') and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    assert "shape=hexagon" in text and 'style="rounded,filled,bold"' in text
    assert text.count("style=dashed") == 2
    assert 'pay\\"s.Charge|Now' in text  # quotes escaped, nothing else needed in DOT
    assert "completed_status" not in text and 'label="DONE \\"ok\\""' in text
    for line in text.splitlines():
        # Every quote is either escaped or a delimiter: the unescaped ones pair up.
        assert len(re.findall(r'(?<!\\)"', line)) % 2 == 0, line


def test_dot_highlight() -> None:
    d = definition()
    statuses = [StepStatus.SUCCEEDED, StepStatus.RUNNING, StepStatus.PENDING, StepStatus.PENDING]
    text = to_dot(d, instance(d, statuses, SagaState.RUNNING, 1))
    s1 = next(ln for ln in text.splitlines() if ln.strip().startswith("s1 ["))
    assert "penwidth=4" in s1 and 'fillcolor="#dbeafe"' in s1 and "RUNNING" in s1


def test_svg_definition_structure() -> None:
    root = svg(to_svg(definition()))
    assert root.get("data-definition") == "trip@1"
    steps = by_class(root, "g", "step")
    assert [g.get("data-step") for g in steps] == ["hotel", "risk", "charge", "mail"]
    assert [g.get("data-step") for g in by_class(root, "g", "pivot")] == ["charge"]
    assert [g.get("data-step") for g in by_class(root, "g", "retriable")] == ["mail"]
    edges = by_class(root, "path", "comp-edge")
    assert [(p.get("data-from"), p.get("data-to")) for p in edges] == [
        ("hotel", ""),
        ("risk", "hotel"),
    ]
    assert all(g.get("data-status") is None for g in steps)
    assert ODD in "".join(root.itertext())  # escaped in the file, intact when parsed


def test_svg_highlight_marks_status_and_current_step() -> None:
    d = definition()
    statuses = [
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATION_FAILED,
        StepStatus.FAILED,
        StepStatus.PENDING,
    ]
    root = svg(to_svg(d, instance(d, statuses, SagaState.FAILED_NEEDS_MANUAL, 1)))
    steps = by_class(root, "g", "step")
    assert [g.get("data-status") for g in steps] == [s.value for s in statuses]
    assert [g.get("data-step") for g in by_class(root, "g", "current")] == ["risk"]
    assert len(by_class(root, "g", "manual")) == 1
    done = instance(d, [StepStatus.SUCCEEDED] * 4, SagaState.SUCCEEDED, 3)
    assert by_class(svg(to_svg(d, done)), "g", "current") == []


# -- instance pictures -----------------------------------------------------------------


Row = tuple[float, str, str | None, dict[str, Any]]


def history(d: SagaDefinition, rows: list[Row]) -> list[HistoryEntry]:
    """History rows; rows at the same instant belong to one transition (one version)."""
    versions = {at: v for v, at in enumerate(sorted({r[0] for r in rows}), 1)}
    return [
        HistoryEntry("saga-1", versions[at], at, event, SagaState.RUNNING, "X", step, detail)
        for at, event, step, detail in rows
    ]


ROWS: list[Row] = [
    (100.0, "saga.started", None, {}),
    (100.0, "step.started", "hotel", {"attempt": 1, "action": "hotels.Book"}),
    (100.5, "step.timed_out", "hotel", {"attempt": 1}),
    (100.5, "step.started", "hotel", {"attempt": 2}),
    (101.0, "retry.scheduled", "hotel", {"phase": "action", "attempt": 2, "delay": 0.5}),
    (101.5, "step.started", "hotel", {"attempt": 3}),
    (102.0, "step.timed_out", "hotel", {"attempt": 3}),
    (102.0, "outcome.unknown", "hotel", {"reason": "?"}),
    (102.0, "status.queried", "hotel", {"query": 1}),
    (102.2, "status.answered", "hotel", {"state": "done", "query": 1}),
    (102.2, "step.succeeded", "hotel", {"attempt": 3}),
    (102.2, "step.started", "risk", {"attempt": 1}),
    (102.4, "step.failed", "risk", {"reason": ODD, "attempt": 1}),
    (102.4, "compensation.started", None, {"reason": "risk failed"}),
    (102.4, "compensation.sent", "hotel", {"rung": 0, "attempt": 1}),
    (102.6, "compensation.failed", "hotel", {"rung": 0, "reason": "no"}),
    (102.6, "compensation.sent", "hotel", {"rung": 1, "attempt": 1}),
    (102.7, "reply.stale", "hotel", {"why": "old", "attempt": 1}),
    (102.8, "timer.stale", None, {"timer": "step", "fence": "timeout:1:action:0:1"}),
    (103.0, "compensation.failed", "hotel", {"rung": 1, "reason": "no"}),
    (103.0, "manual.escalated", "hotel", {"reason": "every rung failed"}),
    (103.0, "saga.finished", None, {"outcome": "FAILED_NEEDS_MANUAL"}),
    (110.0, "manual.resolved", "hotel", {"action": "mark_compensated", "actor": ODD}),
    (110.0, "saga.finished", None, {"outcome": "COMPENSATED"}),
]


def test_timeline_has_a_lane_per_step_and_bars_per_attempt() -> None:
    d = definition()
    inst = instance(
        d, [StepStatus.COMPENSATED] * 2 + [StepStatus.PENDING] * 2, SagaState.COMPENSATED, 0
    )
    root = svg(timeline_svg(d, inst, history(d, ROWS)))
    assert [g.get("data-lane") for g in by_class(root, "g", "lane")] == [
        "saga",
        "hotel",
        "risk",
        "charge",
        "mail",
    ]
    hotel = [r.get("class") for r in by_class(root, "rect", "bar") if r.get("data-lane") == "hotel"]
    assert hotel == [
        "bar timeout",
        "bar failed",
        "bar wait",
        "bar timeout",
        "bar query",
        "bar comp-failed",
        "bar comp-failed",
    ]
    risk = [r.get("class") for r in by_class(root, "rect", "bar") if r.get("data-lane") == "risk"]
    assert risk == ["bar failed"]
    stale = by_class(root, "path", "stale")
    assert sorted(p.get("data-lane") or "" for p in stale) == ["hotel", "risk"]  # fence -> lane
    manual = by_class(root, "g", "manual")
    assert len(manual) == 1 and f"{ODD}: mark_compensated" in "".join(manual[0].itertext())
    finished = ["".join(g.itertext()) for g in by_class(root, "g", "finished")]
    assert finished[0].startswith("FAILED_NEEDS_MANUAL") and finished[1].startswith("COMPENSATED")
    # Scaled to the saga's duration: the last event sits at the right end of the plot.
    bars = by_class(root, "rect", "bar")
    xs = [float(r.get("x") or 0) + float(r.get("width") or 0) for r in bars]
    assert max(xs) <= 930.01
    assert all(r.find(f"{SVG}title") is not None for r in by_class(root, "rect", "bar"))


def test_timeline_of_a_running_saga_keeps_open_bars() -> None:
    d = definition()
    inst = instance(d, [StepStatus.RUNNING] + [StepStatus.PENDING] * 3, SagaState.RUNNING, 0)
    rows = [*ROWS[:2], (100.3, "reply.stale", "hotel", {"why": "x"})]
    root = svg(timeline_svg(d, inst, history(d, rows)))
    assert [r.get("class") for r in by_class(root, "rect", "bar")] == ["bar open"]
    assert "RUNNING" in "".join(by_class(root, "text", "state")[0].itertext())
    assert timeline_svg(d, inst, history(d, rows)) == timeline_svg(d, inst, history(d, rows))


def test_timeline_with_no_history_is_still_a_picture() -> None:
    d = definition()
    inst = instance(d, [StepStatus.PENDING] * 4, SagaState.RUNNING, 0)
    root = svg(timeline_svg(d, inst, []))
    assert len(by_class(root, "g", "lane")) == 5 and not by_class(root, "rect", "bar")


def test_flow_has_a_column_per_endpoint_and_an_arrow_per_message() -> None:
    d = definition()
    inst = instance(d, [StepStatus.COMPENSATED] * 4, SagaState.COMPENSATED, 0)
    root = svg(flow_svg(d, inst, history(d, ROWS)))
    cols = [g.get("data-column") for g in by_class(root, "g", "column")]
    assert cols == ["orchestrator", "hotels", "local", 'pay"s', "mailer"]
    arrows = [(g.get("class"), g.get("data-endpoint")) for g in by_class(root, "g", "arrow")]
    assert arrows.count(("arrow command", "hotels")) == 3
    assert ("arrow query", "hotels") in arrows and ("arrow reply", "hotels") in arrows
    # The status answer settles the step: no second reply arrow for its step.succeeded.
    assert arrows.count(("arrow reply", "hotels")) == 1
    assert arrows.count(("arrow comp", "hotels")) == 2
    assert ("arrow reply-failed", "local") in arrows and ("arrow stale", "hotels") in arrows
    notes = ["".join(g.itertext()) for g in by_class(root, "g", "note")]
    assert any("timeout: hotel" in n for n in notes) and any("mark_compensated" in n for n in notes)


# -- command line ----------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sagakit")
    register_graph_command(p.add_subparsers(dest="command", required=True))
    return p


@pytest.mark.parametrize("fmt", ["mermaid", "dot", "svg"])
def test_graph_command_prints_the_checkout(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = parser().parse_args(["graph", "checkout", "--format", fmt, "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["definition"] == "checkout@1" and out["format"] == fmt
    assert "capture_payment" in out["output"]
    if fmt == "svg":
        svg(out["output"])


def test_graph_command_plain_and_module_attribute(capsys: pytest.CaptureFixture[str]) -> None:
    args = parser().parse_args(["graph", "sagakit_checkout.sagas:checkout_definition"])
    assert args.format == "mermaid" and args.func(args) == 0
    assert capsys.readouterr().out.startswith("flowchart LR\n")
    bad = parser().parse_args(["graph", "sagakit:no_such_thing"])
    assert bad.func(bad) == 2
    assert "no attribute" in capsys.readouterr().err


def test_load_definition_refuses_what_is_not_a_definition() -> None:
    assert load_definition("checkout").key == "checkout@1"
    for spec in ("no-colon", "no_such_module_x:attr", "sagakit_checkout.sagas:CHECKOUT"):
        with pytest.raises(DefinitionError):
            load_definition(spec)
