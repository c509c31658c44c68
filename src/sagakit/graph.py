"""Pictures of sagas: a definition as Mermaid, Graphviz DOT or SVG, and a running
instance's timeline and message flow as SVG.

Every function is pure and deterministic (same input, same text), needs no external
tool, and escapes every name, label and reason it draws. ``highlight`` colours each
step by its :class:`~sagakit.core.instance.StepStatus` and marks where the instance is.
The SVGs carry ``class`` and ``data-*`` attributes (``g.step[data-step]``,
``g.lane[data-lane]``, ``path.comp-edge``) so that tests and scripts can read them.

The instance pictures (:func:`timeline_svg`, :func:`flow_svg`) are implemented in
:mod:`sagakit.console.svg`, which imports no web framework, and re-exported here.
``sagakit graph checkout --format mermaid`` prints a definition from the command line
(:func:`register_graph_command` adds the subcommand to a CLI).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
from collections.abc import Callable
from typing import Any

from sagakit.console.svg import esc, flow_svg, status_colour, timeline_svg
from sagakit.core.definition import SagaDefinition, Step, StepKind
from sagakit.core.instance import SagaInstance, SagaState
from sagakit.errors import DefinitionError

__all__ = [
    "flow_svg",
    "load_definition",
    "register_graph_command",
    "timeline_svg",
    "to_dot",
    "to_mermaid",
    "to_svg",
]

_TERMINAL_NODE = {
    SagaState.SUCCEEDED: "done",
    SagaState.PARTIAL_ACCEPTED: "done",
    SagaState.COMPENSATED: "cancelled",
    SagaState.TIMED_OUT: "cancelled",
    SagaState.FAILED_NEEDS_MANUAL: "manual",
}


def _tag(step: Step) -> str:
    if step.kind is StepKind.PIVOT:
        return "pivot"
    if step.kind is StepKind.RETRIABLE:
        return "retriable"
    return "optional" if step.optional else ""


def _lines(d: SagaDefinition, i: int, hl: SagaInstance | None) -> list[str]:
    """The text of step ``i``'s node: name, action, kind, status label, live status."""
    s = d.steps[i]
    out = [s.name, s.action.label]
    if _tag(s):
        out.append(f"({_tag(s)})")
    if s.status:
        out.append(f"[{s.status}]")
    if hl is not None and i < len(hl.steps):
        st = hl.steps[i]
        out.append(st.status.value + (f" x{st.attempt}" if st.attempt > 1 else ""))
    return out


def _ladder_text(step: Step) -> str:
    return " / ".join(f"{n}. {r.label}" for n, r in enumerate(step.ladder, 1))


def _back_edges(d: SagaDefinition) -> list[tuple[int, int | None]]:
    """(from, to) for compensation edges: each compensatable step back to the previous
    one (``None``: to the cancelled end)."""
    comp = [i for i, s in enumerate(d.steps) if s.ladder]
    return [(i, comp[n - 1] if n else None) for n, i in enumerate(comp)]


def _current(hl: SagaInstance | None) -> int | None:
    """The step the instance is at: while it runs, or where it waits for a person."""
    if hl is None or (hl.terminal and hl.state is not SagaState.FAILED_NEEDS_MANUAL):
        return None
    return hl.cursor


# -- Mermaid ------------------------------------------------------------------------
def _mm(text: str) -> str:
    """Escape text for a quoted Mermaid label (entity codes, one line)."""
    out = []
    for ch in text:
        if ch in '#"<>&|`':
            out.append(f"#{ord(ch)};")
        elif ch in "\r\n\t":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def to_mermaid(d: SagaDefinition, highlight: SagaInstance | None = None) -> str:
    """The definition as a Mermaid flowchart, optionally coloured by an instance."""
    shapes = {"pivot": ('{{"', '"}}'), "retriable": ('(["', '"])')}
    out = ["flowchart LR", f"  %% saga {_mm(d.key)}"]
    out.append(f'  start(["{_mm(d.started_status)}"])')
    for i, s in enumerate(d.steps):
        a, b = shapes.get(_tag(s), ('["', '"]'))
        out.append(f"  s{i}{a}{'<br/>'.join(_mm(x) for x in _lines(d, i, highlight))}{b}")
    out.append(f'  done((("{_mm(d.completed_status)}")))')
    out.append(f'  cancelled(["{_mm(d.cancelled_status)}"])')
    chain = ["start", *(f"s{i}" for i in range(len(d.steps))), "done"]
    out += [f"  {a} --> {b}" for a, b in itertools.pairwise(chain)]
    for i, j in _back_edges(d):
        target = "cancelled" if j is None else f"s{j}"
        out.append(f'  s{i} -.->|"undo: {_mm(_ladder_text(d.steps[i]))}"| {target}')
    out.append("  classDef pivot stroke-width:3px")
    out += [f"  class s{i} pivot" for i, s in enumerate(d.steps) if s.kind is StepKind.PIVOT]
    if highlight is not None:
        out.append(f'  manual[/"{_mm(d.attention_status)}"/]')
        for status in sorted({st.status for st in highlight.steps}):
            fill, stroke = status_colour(status)
            out.append(f"  classDef st_{status.value} fill:{fill},stroke:{stroke}")
        out += [f"  class s{i} st_{st.status.value}" for i, st in enumerate(highlight.steps)]
        cur = _current(highlight)
        if cur is not None:
            out.append(f"  style s{cur} stroke-width:4px,stroke:#1e3a8a")
        node = _TERMINAL_NODE.get(highlight.state)
        if node == "manual":
            out.append(f"  s{highlight.cursor} -.-> manual")
        if node is not None:
            out.append(f"  style {node} stroke-width:4px,stroke:#1e3a8a")
    return "\n".join(out) + "\n"


# -- Graphviz DOT -------------------------------------------------------------------
def _dq(text: str) -> str:
    """A DOT double-quoted string."""
    body = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + body.replace("\r", " ").replace("\n", " ") + '"'


def to_dot(d: SagaDefinition, highlight: SagaInstance | None = None) -> str:
    """The definition as a Graphviz ``digraph`` (``dot -Tsvg`` renders it)."""
    out = [f"digraph {_dq(d.key)} {{", "  rankdir=LR;"]
    out.append('  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontsize=11];')
    out.append(f"  start [shape=oval, label={_dq(d.started_status)}];")
    cur = _current(highlight)
    for i, s in enumerate(d.steps):
        label = "\\n".join(_dq(x)[1:-1] for x in _lines(d, i, highlight))
        attrs = [f'label="{label}"']
        if s.kind is StepKind.PIVOT:
            attrs.append("shape=hexagon, peripheries=2")
        elif s.kind is StepKind.RETRIABLE:
            attrs.append('style="rounded,filled,bold"')
        if highlight is not None and i < len(highlight.steps):
            fill, stroke = status_colour(highlight.steps[i].status)
            attrs.append(f'fillcolor="{fill}", color="{stroke}"')
        if cur == i:
            attrs.append("penwidth=4")
        out.append(f"  s{i} [{', '.join(attrs)}];")
    out.append(f"  done [shape=oval, peripheries=2, label={_dq(d.completed_status)}];")
    out.append(f"  cancelled [shape=box, label={_dq(d.cancelled_status)}];")
    chain = ["start", *(f"s{i}" for i in range(len(d.steps))), "done"]
    out += [f"  {a} -> {b};" for a, b in itertools.pairwise(chain)]
    for i, j in _back_edges(d):
        target = "cancelled" if j is None else f"s{j}"
        rungs = [f"{n}. {r.label}" for n, r in enumerate(d.steps[i].ladder, 1)]
        label = '"undo:\\n' + "\\n".join(_dq(r)[1:-1] for r in rungs) + '"'
        out.append(
            f'  s{i} -> {target} [style=dashed, color="#c2410c", constraint=false, label={label}];'
        )
    if highlight is not None:
        node = _TERMINAL_NODE.get(highlight.state)
        if node == "manual":
            out.append(f"  manual [shape=parallelogram, label={_dq(d.attention_status)}];")
            out.append(f"  s{highlight.cursor} -> manual [style=dotted];")
        if node is not None:
            out.append(f"  {node} [penwidth=4];")
    out.append("}")
    return "\n".join(out) + "\n"


# -- SVG of a definition ------------------------------------------------------------
_W, _H, _GAP, _X0, _Y0 = 150, 74, 34, 84, 46


def _clip(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def to_svg(d: SagaDefinition, highlight: SagaInstance | None = None) -> str:
    """The definition drawn as a self-contained SVG (own layout: one row of steps,
    compensation ladders as dashed arcs back underneath)."""
    n = len(d.steps)
    width = _X0 + n * (_W + _GAP) + 80
    back = _back_edges(d)
    height = _Y0 + _H + 44 + 26 * max(len(back), 1)
    cur = _current(highlight)
    p = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="saga-diagram" data-definition="'
        f'{esc(d.key)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f"<title>saga {esc(d.key)}</title>",
        '<defs><marker id="dg-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#475569"/></marker>'
        "</defs>",
    ]
    cy = _Y0 + _H // 2
    p.append(
        f'<g class="terminal start"><circle cx="36" cy="{cy}" r="22" fill="#f1f5f9" '
        f'stroke="#475569"/><text x="36" y="{cy + 4}" text-anchor="middle" font-size="9">'
        f"start</text><title>{esc(d.started_status)}</title></g>"
    )
    for i, s in enumerate(d.steps):
        x = _X0 + i * (_W + _GAP)
        st = highlight.steps[i] if highlight is not None and i < len(highlight.steps) else None
        fill, stroke = status_colour(st.status) if st is not None else ("#ffffff", "#475569")
        classes = " ".join(c for c in ("step", _tag(s), "current" if cur == i else "") if c)
        status_attr = f' data-status="{st.status.value}"' if st is not None else ""
        p.append(f'<g class="{classes}" data-step="{esc(s.name)}"{status_attr}>')
        p.append(f"<title>{esc(' | '.join(_lines(d, i, highlight)))}</title>")
        sw = 4 if cur == i else (3 if s.kind is StepKind.PIVOT else 1.5)
        p.append(
            f'<rect x="{x}" y="{_Y0}" width="{_W}" height="{_H}" rx="8" fill="{fill}" '
            f'stroke="{stroke if cur != i else "#1e3a8a"}" stroke-width="{sw}"/>'
        )
        if s.kind is StepKind.PIVOT:
            p.append(
                f'<rect x="{x + 4}" y="{_Y0 + 4}" width="{_W - 8}" height="{_H - 8}" rx="6" '
                f'fill="none" stroke="{stroke}"/>'
            )
        if _tag(s):
            p.append(
                f'<text x="{x + _W - 6}" y="{_Y0 - 6}" text-anchor="end" font-size="10" '
                f'class="kind" fill="#7c2d12">{_tag(s).upper()}</text>'
            )
        if cur == i:
            p.append(
                f'<text x="{x + 6}" y="{_Y0 - 6}" font-size="10" fill="#1e3a8a">\u25bc now</text>'
            )
        rows = [(s.name, "bold"), (s.action.label, "normal")]
        if s.status:
            rows.append((f"[{s.status}]", "normal"))
        if st is not None:
            rows.append((st.status.value + (f" x{st.attempt}" if st.attempt > 1 else ""), "bold"))
        for k, (text, weight) in enumerate(rows):
            p.append(
                f'<text x="{x + 10}" y="{_Y0 + 17 + 16 * k}" font-weight="{weight}">'
                f"{esc(_clip(text))}</text>"
            )
        p.append("</g>")
        prev_x = 58 if i == 0 else x - _GAP
        p.append(
            f'<line x1="{prev_x}" y1="{cy}" x2="{x - 2}" y2="{cy}" stroke="#475569" '
            'marker-end="url(#dg-arrow)"/>'
        )
    ex = _X0 + n * (_W + _GAP) + 24
    p.append(
        f'<line x1="{ex - 58}" y1="{cy}" x2="{ex - 24}" y2="{cy}" stroke="#475569" '
        'marker-end="url(#dg-arrow)"/>'
    )
    node = _TERMINAL_NODE.get(highlight.state) if highlight is not None else None
    done_w = 4 if node == "done" else 1.5
    p.append(
        f'<g class="terminal done"><circle cx="{ex}" cy="{cy}" r="22" fill="#dcfce7" '
        f'stroke="#166534" stroke-width="{done_w}"/><text x="{ex}" y="{cy + 4}" '
        f'text-anchor="middle" font-size="9">done</text><title>{esc(d.completed_status)}'
        "</title></g>"
    )
    # Compensation arcs run under the row, right to left, each on its own level: the
    # rightmost is the shallowest, so no label crosses an arc further right.
    base, levels = _Y0 + _H, len(back)
    bottom = base + 24 + 26 * (levels - 1) if levels else base + 24
    cancel_w = 4 if node == "cancelled" else 1.5
    p.append(
        f'<g class="terminal cancelled"><rect x="6" y="{bottom - 12}" width="60" height="24" '
        f'rx="12" fill="#e2e8f0" stroke="#475569" stroke-width="{cancel_w}"/><text x="36" '
        f'y="{bottom + 4}" text-anchor="middle" font-size="9">undone</text>'
        f"<title>{esc(d.cancelled_status)}</title></g>"
    )
    for k, (i, j) in enumerate(back):
        x1 = _X0 + i * (_W + _GAP) + _W * 35 // 100
        depth = base + 24 + 26 * (levels - 1 - k)
        if j is None:
            x2, end = 68, f"H{68}"
        else:
            x2 = _X0 + j * (_W + _GAP) + _W * 65 // 100
            end = f"H{x2} V{base + 2}"
        full = "undo: " + _ladder_text(d.steps[i])
        short = "undo: " + " \u2192 ".join(r.label.rsplit(".", 1)[-1] for r in d.steps[i].ladder)
        p.append(
            f'<path class="comp-edge" data-from="{esc(d.steps[i].name)}" data-to="'
            f'{esc("" if j is None else d.steps[j].name)}" d="M{x1},{base} V{depth} {end}" '
            'fill="none" stroke="#c2410c" stroke-dasharray="5 4" '
            f'marker-end="url(#dg-arrow)"><title>{esc(full)}</title></path>'
        )
        p.append(
            f'<text x="{x2 + 6}" y="{depth + 12}" font-size="10" fill="#9a3412">'
            f"{esc(_clip(short, 70))}<title>{esc(full)}</title></text>"
        )
    if node == "manual" and highlight is not None:
        x = _X0 + highlight.cursor * (_W + _GAP)
        p.append(
            f'<g class="terminal manual"><text x="{x + _W // 2}" y="{_Y0 - 20}" '
            f'text-anchor="middle" font-weight="bold" fill="#b91c1c">\u26a0 '
            f"{esc(d.attention_status)}</text><title>{esc(highlight.reason or '')}</title></g>"
        )
    p.append("</svg>")
    return "\n".join(p) + "\n"


# -- command line -------------------------------------------------------------------
def load_definition(spec: str) -> SagaDefinition:
    """``checkout`` (the reference checkout) or ``module:attribute``; an attribute that
    is a callable (a factory) is called without arguments."""
    if spec == "checkout":
        spec = "sagakit_checkout.sagas:checkout_definition"
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise DefinitionError(f"{spec!r}: expected 'checkout' or 'module:attribute'")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise DefinitionError(f"cannot import {module!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DefinitionError(f"{module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, SagaDefinition) and callable(obj):
        obj = obj()
    if not isinstance(obj, SagaDefinition):
        raise DefinitionError(f"{spec!r} is {type(obj).__name__}, not a SagaDefinition")
    return obj


_RENDER: dict[str, Callable[[SagaDefinition], str]] = {
    "mermaid": to_mermaid,
    "dot": to_dot,
    "svg": to_svg,
}


def _graph(args: argparse.Namespace) -> int:
    try:
        d = load_definition(args.definition)
    except DefinitionError as exc:
        print(f"sagakit graph: {exc}", file=sys.stderr)
        return 2
    text = _RENDER[args.format](d)
    if args.json:
        print(json.dumps({"definition": d.key, "format": args.format, "output": text}))
    else:
        sys.stdout.write(text)
    return 0


def register_graph_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``graph DEFINITION --format mermaid|dot|svg [--json]`` to a CLI's subparsers
    (the object ``add_subparsers()`` returned); sets ``func`` to the handler."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "graph",
        help="draw a saga definition as Mermaid, Graphviz DOT or SVG",
        description="Print a saga definition's diagram: steps in order, the pivot and "
        "retriable steps marked, compensation ladders as dashed edges back.",
    )
    parser.add_argument(
        "definition", help="'checkout' (the reference checkout) or 'module:attribute'"
    )
    parser.add_argument("--format", choices=sorted(_RENDER), default="mermaid")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_graph)
    return parser
