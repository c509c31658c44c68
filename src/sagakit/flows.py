"""The event graph of a choreography, drawn and linted.

In a choreography the flow exists nowhere in code: it is the sum of who subscribes to
what and who publishes what. Subscriptions are real (each participant's
``subscriptions``); what a handler publishes cannot be read from a function, so a flow
keeps a *declaration table* next to its handlers (:class:`Publishes` rows), and its
tests check the table against what the handlers actually emitted
(:func:`check_emissions`). From both, :func:`derive` builds the graph, :func:`mermaid`
draws it and :func:`lint` reports what usually goes wrong as a choreography grows:

* a failure fact (``...Failed``) that no service handles and no person is given;
* a fact nobody consumes (neither a final fact of the flow nor handed to a person);
* a subscription to a fact nobody publishes, or a handler missing from the table;
* a cycle (a fact that, hop by hop, causes itself again);
* a subscriber that is new since the committed baseline (someone started listening:
  review it, then ``sagakit flows --write-baseline``);
* an event name that does not read as a fact in the past tense.

Observers (a saga tracker subscribed to everything) are shown apart and never count
as handlers: a fact only a tracker hears is still a fact nobody acts on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sagakit.core.envelope import Envelope, MessageKind

__all__ = [
    "START",
    "Finding",
    "FlowGraph",
    "FlowSpec",
    "Publishes",
    "baseline",
    "check_emissions",
    "derive",
    "lint",
    "mermaid",
    "read_baseline",
    "write_baseline",
]

START = "(start)"
"""The ``on`` of a declaration for a flow's entry point (no event causes it)."""


class Subscriber(Protocol):
    """What the graph needs of a participant."""

    name: str
    subscriptions: set[str]


@dataclass(frozen=True, slots=True)
class Publishes:
    """One handler's declaration: ``service``, on ``on``, may publish ``emits``."""

    service: str
    on: str
    emits: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """A choreography's declarations."""

    name: str
    declarations: tuple[Publishes, ...]
    terminal: frozenset[str] = frozenset()
    """Facts that end the flow (their consumers are outside it)."""
    escalated: frozenset[str] = frozenset()
    """Failure facts whose handling is a person (the tracker's manual queue)."""
    observers: frozenset[str] = frozenset()
    """Passive subscribers (saga trackers)."""


@dataclass(slots=True)
class FlowGraph:
    """Facts, who publishes them and who handles them."""

    spec: FlowSpec
    subscribers: dict[str, set[str]] = field(default_factory=dict)
    observers: dict[str, set[str]] = field(default_factory=dict)
    publishers: dict[str, set[str]] = field(default_factory=dict)

    @property
    def events(self) -> list[str]:
        """Every fact in the flow, sorted."""
        return sorted(set(self.subscribers) | set(self.publishers) | set(self.observers))


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the linter reports."""

    kind: str
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def derive(spec: FlowSpec, participants: Iterable[Subscriber]) -> FlowGraph:
    """The graph from the participants' real subscriptions and the declarations."""
    graph = FlowGraph(spec)
    for p in participants:
        target = graph.observers if p.name in spec.observers else graph.subscribers
        for event in p.subscriptions:
            target.setdefault(event, set()).add(p.name)
    for d in spec.declarations:
        for event in d.emits:
            graph.publishers.setdefault(event, set()).add(d.service)
    return graph


def failure(event: str) -> bool:
    """True for failure facts (``PaymentFailed``, ``PaymentCaptureFailed``)."""
    return event.endswith("Failed")


# Irregular past participles that end neither in -ed nor in -en.
# fmt: off
_IRREGULAR = frozenset({
    "Sent", "Paid", "Lost", "Built", "Sold", "Held", "Made", "Kept", "Left", "Bought",
    "Found", "Done", "Spent", "Put", "Set", "Cut", "Shut", "Read", "Won", "Met", "Told",
    "Brought", "Caught", "Taught", "Thought", "Begun", "Run", "Hit", "Split", "Quit",
})
# fmt: on


def past_tense(event: str) -> bool:
    """True when an event name's last word reads as a past participle (a fact)."""
    words = re.findall(r"[A-Z][a-z]*", event)
    last = words[-1] if words else event
    return last.endswith(("ed", "en")) or last in _IRREGULAR


def lint(graph: FlowGraph, base: Mapping[str, Any] | None = None) -> list[Finding]:
    """Everything worth a look, in a stable order (see the module doc)."""
    spec, out = graph.spec, []
    declared = {(d.service, d.on) for d in spec.declarations}
    for event, services in sorted(graph.subscribers.items()):
        for s in sorted(services):
            if (s, event) not in declared:
                out.append(
                    Finding(
                        "undeclared",
                        f"{s}:{event}",
                        f"{s} handles {event} but the table does not say what it "
                        "publishes (declare it, even as publishing nothing)",
                    )
                )
    for s, event in sorted(declared):
        if event != START and s not in graph.subscribers.get(event, set()):
            out.append(
                Finding(
                    "missing-handler",
                    f"{s}:{event}",
                    f"the table says {s} handles {event}, but {s} does not subscribe",
                )
            )
    for event in graph.events:
        handled = bool(graph.subscribers.get(event))
        if event in graph.publishers and not handled:
            if failure(event) and event not in spec.escalated:
                out.append(
                    Finding(
                        "unhandled-failure",
                        event,
                        f"failure {event} is handled by no service and given to no "
                        "person: whatever happened before it is never undone",
                    )
                )
            elif event not in spec.terminal and event not in spec.escalated:
                out.append(
                    Finding(
                        "unconsumed",
                        event,
                        f"{event} is published by {_names(graph.publishers[event])} "
                        "but nobody consumes it",
                    )
                )
        if handled and event not in graph.publishers:
            out.append(
                Finding(
                    "unpublished",
                    event,
                    f"{_names(graph.subscribers[event])} subscribe to {event}, "
                    "which nobody publishes",
                )
            )
        if not past_tense(event):
            out.append(
                Finding("naming", event, f"{event} does not read as a fact (events are past tense)")
            )
    for cycle in _cycles(graph):
        out.append(Finding("cycle", " -> ".join(cycle), "cycle: " + " -> ".join(cycle)))
    if base is not None:
        known = {(e, s) for e, subs in base.get("subscriptions", {}).items() for s in subs}
        for event, services in sorted(graph.subscribers.items()):
            for s in sorted(services):
                if (event, s) not in known:
                    out.append(
                        Finding(
                            "new-subscriber",
                            f"{s}:{event}",
                            f"{s} subscribes to {event} since the baseline: review "
                            "it, then write the baseline again",
                        )
                    )
    return out


def _names(services: Iterable[str]) -> str:
    return ", ".join(sorted(services))


def _cycles(graph: FlowGraph) -> list[list[str]]:
    """Elementary cycles of the fact graph (fact -> facts its handlers publish), each once."""
    nxt: dict[str, set[str]] = {}
    for d in graph.spec.declarations:
        if d.service in graph.subscribers.get(d.on, set()):
            nxt.setdefault(d.on, set()).update(d.emits)
    found: set[tuple[str, ...]] = set()

    def walk(path: list[str]) -> None:
        for n in sorted(nxt.get(path[-1], ())):
            if n == path[0]:
                found.add(tuple(path))
            elif n not in path and n > path[0]:  # report each cycle from its smallest fact
                walk([*path, n])

    for start in sorted(nxt):
        walk([start])
    return [[*c, c[0]] for c in sorted(found)]


def mermaid(graph: FlowGraph) -> str:
    """A Mermaid flowchart: facts as rounded nodes, handlers as boxes between them."""
    spec = graph.spec
    lines = ["flowchart LR"]
    ids: dict[str, str] = {}

    def node(event: str) -> str:
        if event not in ids:
            ids[event] = f"e{len(ids)}"
            shape = f'(["{event}"])' if event != START else '(("start"))'
            lines.append(f"  {ids[event]}{shape}")
        return ids[event]

    for i, d in enumerate(spec.declarations):
        handler = f"h{i}"
        lines.append(f'  {handler}["{d.service}"]')
        lines.append(f"  {node(d.on)} --> {handler}")
        for event in d.emits:
            lines.append(f"  {handler} --> {node(event)}")
    for event in sorted(spec.escalated):
        lines.append(f"  {node(event)} -.-> person{{{{manual queue}}}}")
    watchers = sorted({s for subs in graph.observers.values() for s in subs})
    if watchers:
        lines.append(f"  %% observers (subscribed to every fact): {', '.join(watchers)}")
    lines.append("  classDef failure fill:#fde2e1,stroke:#b42318")
    lines.append("  classDef final fill:#dcfae6,stroke:#067647")
    for event, ident in ids.items():
        if failure(event) or event in spec.escalated:
            lines.append(f"  class {ident} failure")
        elif event in spec.terminal:
            lines.append(f"  class {ident} final")
    return "\n".join(lines)


def baseline(graph: FlowGraph) -> dict[str, Any]:
    """What ``sagakit flows --write-baseline`` commits: every (fact, subscriber) pair."""
    return {
        "subscriptions": {e: sorted(s) for e, s in sorted(graph.subscribers.items())},
        "observers": sorted({s for subs in graph.observers.values() for s in subs}),
    }


def read_baseline(path: str | Path, flow: str) -> dict[str, Any] | None:
    """The baseline of ``flow`` in the file at ``path`` (one file holds several flows)."""
    p = Path(path)
    if not p.exists():
        return None
    entry: dict[str, Any] | None = json.loads(p.read_text()).get("flows", {}).get(flow)
    return entry


def write_baseline(graph: FlowGraph, path: str | Path) -> None:
    """Write this flow's :func:`baseline` into the file (other flows in it are kept)."""
    p = Path(path)
    doc: dict[str, Any] = json.loads(p.read_text()) if p.exists() else {}
    doc.setdefault("flows", {})[graph.spec.name] = baseline(graph)
    p.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def check_emissions(spec: FlowSpec, events: Sequence[Envelope]) -> list[Finding]:
    """Emissions the table does not declare, from events actually written.

    ``events`` are outbox envelopes of every service of a run; an event's cause is
    found by its ``causation_id``. An event with no cause, or caused by a command
    (a choreography inside a service, started by an orchestrator), is a start.
    """
    by_id = {e.message_id: e for e in events}
    declared = {(d.service, d.on, x) for d in spec.declarations for x in d.emits}
    out: list[Finding] = []
    seen: set[tuple[str, str, str]] = set()
    for e in events:
        if e.kind is not MessageKind.EVENT:
            continue
        source = by_id.get(e.causation_id or "")
        if e.causation_id is None or (source is not None and source.kind is not MessageKind.EVENT):
            cause = START
        else:
            cause = "?" if source is None else source.type
        edge = (e.source, cause, e.type)
        if edge not in declared and edge not in seen:
            seen.add(edge)
            out.append(
                Finding(
                    "undeclared-emission",
                    f"{e.source}:{cause}:{e.type}",
                    f"{e.source} published {e.type} on {cause}, which the table does not declare",
                )
            )
    return out
