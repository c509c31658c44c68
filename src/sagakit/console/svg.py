"""SVG pictures of one saga instance: its timeline and its message flow.

Both are derived from the instance's history alone, drawn with a layout of their own
(no external tool), deterministic (same history, same text) and escaped throughout.
This module imports no web framework, so :mod:`sagakit.graph` re-exports it for the
command line and for scripts.
"""

from __future__ import annotations

import html
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass

from sagakit.core.definition import LocalAction, SagaDefinition
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState, StepStatus

_COLOURS: dict[StepStatus, tuple[str, str]] = {
    StepStatus.PENDING: ("#f8fafc", "#94a3b8"),
    StepStatus.RUNNING: ("#dbeafe", "#1d4ed8"),
    StepStatus.WAITING_RETRY: ("#fef3c7", "#b45309"),
    StepStatus.SUCCEEDED: ("#dcfce7", "#15803d"),
    StepStatus.FAILED: ("#fee2e2", "#b91c1c"),
    StepStatus.SKIPPED: ("#e5e7eb", "#4b5563"),
    StepStatus.UNKNOWN: ("#fae8ff", "#a21caf"),
    StepStatus.QUERYING: ("#ede9fe", "#6d28d9"),
    StepStatus.COMPENSATING: ("#ffedd5", "#c2410c"),
    StepStatus.COMPENSATION_WAITING: ("#ffedd5", "#c2410c"),
    StepStatus.COMPENSATED: ("#e0e7ff", "#4338ca"),
    StepStatus.COMPENSATION_FAILED: ("#fecaca", "#991b1b"),
}
# Bar kinds of the timeline -> fill colour (compensations have their own orange).
BAR_COLOURS = {
    "ok": "#16a34a",
    "failed": "#dc2626",
    "timeout": "#d97706",
    "open": "#2563eb",
    "wait": "#cbd5e1",
    "query": "#7c3aed",
    "comp": "#ea580c",
    "comp-failed": "#9a3412",
}
# State colours double as text colours on the timeline: each is >= 4.5:1 on white
# and on the lanes' #f8fafc (WCAG 2.1 AA), like the console's badges.
STATE_COLOURS = {
    SagaState.RUNNING: "#2563eb",
    SagaState.COMPENSATING: "#c2410c",
    SagaState.SUCCEEDED: "#15803d",
    SagaState.COMPENSATED: "#4338ca",
    SagaState.FAILED_NEEDS_MANUAL: "#dc2626",
    SagaState.TIMED_OUT: "#92400e",
    SagaState.PARTIAL_ACCEPTED: "#0f766e",
}


def esc(text: object) -> str:
    """Escape any value for SVG/HTML text and attribute values."""
    return html.escape(str(text), quote=True)


def status_colour(status: StepStatus) -> tuple[str, str]:
    """(fill, stroke) used for a step in this status."""
    return _COLOURS[status]


def fmt_duration(seconds: float) -> str:
    """A short human duration: ``0``, ``850 ms``, ``2.4 s``, ``3.0 min``."""
    if seconds <= 0:
        return "0"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _detail(h: HistoryEntry) -> str:
    return json.dumps(h.detail, sort_keys=True, default=str)[:300]


@dataclass(slots=True)
class _Bar:
    lane: int
    kind: str
    t0: float
    t1: float
    tip: str


@dataclass(slots=True)
class _Mark:
    lane: int
    kind: str
    t: float
    tip: str
    text: str = ""


def _lanes(d: SagaDefinition, history: Sequence[HistoryEntry]) -> tuple[list[_Bar], list[_Mark]]:
    """Turn history into bars and markers; lane 0 is the saga, lane i+1 is step i."""
    bars: list[_Bar] = []
    marks: list[_Mark] = []
    open_: dict[tuple[int, str], tuple[float, str]] = {}
    names = {s.name: i + 1 for i, s in enumerate(d.steps)}
    t0 = history[0].at if history else 0.0

    def close(lane: int, slot: str, at: float, kind: str, tip: str) -> bool:
        start = open_.pop((lane, slot), None)
        if start is None:
            return False
        bars.append(_Bar(lane, kind, start[0], at, f"{start[1]} -> {tip}"))
        return True

    for h in history:
        lane = names.get(h.step or "", 0)
        if h.event == "timer.stale" and lane == 0:
            parts = str(h.detail.get("fence", "")).split(":")
            if len(parts) == 5 and parts[1].isdigit() and int(parts[1]) < len(d.steps):
                lane = int(parts[1]) + 1
        tip = f"{h.event} at +{fmt_duration(h.at - t0)} (v{h.version}) {_detail(h)}"
        ev = h.event
        if ev in ("step.started", "status.queried", "compensation.sent"):
            close(lane, "wait", h.at, "wait", "retry")
            slot = {"step.started": "try", "status.queried": "query"}.get(ev, "comp")
            open_[(lane, slot)] = (h.at, tip)
        elif ev in ("step.succeeded", "step.failed", "step.timed_out"):
            kind = {"step.succeeded": "ok", "step.failed": "failed"}.get(ev, "timeout")
            if not close(lane, "try", h.at, kind, tip):
                marks.append(_Mark(lane, "event", h.at, tip))
        elif ev in ("status.answered", "status.timed_out"):
            close(lane, "query", h.at, "query", tip)
        elif ev in ("compensation.succeeded", "compensation.failed", "compensation.timed_out"):
            kind = "comp" if ev == "compensation.succeeded" else "comp-failed"
            close(lane, "comp", h.at, kind, tip)
        elif ev == "retry.scheduled":
            phase = h.detail.get("phase")
            slot, kind = {"comp": ("comp", "comp-failed"), "query": ("query", "query")}.get(
                str(phase), ("try", "failed")
            )
            close(lane, slot, h.at, kind, tip)
            open_[(lane, "wait")] = (h.at, tip)
        elif ev in ("reply.stale", "timer.stale"):
            marks.append(_Mark(lane, "stale", h.at, tip))
        elif ev == "manual.resolved":
            text = f"{h.detail.get('actor', '?')}: {h.detail.get('action', '?')}"
            marks.append(_Mark(lane, "manual", h.at, tip, text))
        elif ev == "manual.escalated":
            marks.append(_Mark(lane, "escalated", h.at, tip, "manual"))
        elif ev == "saga.finished":
            marks.append(_Mark(0, "finished", h.at, tip, str(h.detail.get("outcome", ""))))
        else:
            marks.append(_Mark(lane, "event", h.at, tip))
    end = max((h.at for h in history), default=t0)
    for (lane, slot), (start, tip) in sorted(open_.items()):
        kind = {"try": "open", "query": "query", "comp": "comp", "wait": "wait"}[slot]
        bars.append(_Bar(lane, kind, start, end, f"{tip} -> (still open)"))
    return bars, marks


_LEGEND = [
    ("ok", "attempt ok"),
    ("failed", "failed"),
    ("timeout", "timed out"),
    ("open", "in flight"),
    ("wait", "retry wait"),
    ("query", "status query"),
    ("comp", "compensation"),
    ("comp-failed", "compensation failed"),
]


# A quiet stretch (no event at all) longer than this share of the saga's duration and
# than MIN_BREAK_S is drawn as a break of BREAK_PX pixels, so that a long retry wait or
# a person's late decision does not squash everything else into a sliver (shorter
# stretches stay to scale: a break there would distort more than it saves); at most
# MAX_BREAKS of them.
BREAK_SHARE = 0.15
MIN_BREAK_S = 1.0
BREAK_PX = 44.0
MAX_BREAKS = 6
# Widths of an 11 px sans-serif character, generously (to keep labels apart).
CHAR_PX = 6.6
BOLD_CHAR_PX = 8.0


@dataclass(frozen=True, slots=True)
class _Scale:
    """Time -> x of the timeline: linear pieces, with the quiet stretches in ``breaks``
    ((start, end) times) each drawn :data:`BREAK_PX` wide."""

    t0: float
    left: float
    per_second: float
    breaks: tuple[tuple[float, float], ...]

    def x(self, t: float) -> float:
        """The x of time ``t``."""
        pos, last = self.left, self.t0
        for a, b in self.breaks:
            if t <= a:
                break
            pos += (a - last) * self.per_second
            if t < b:
                return round(pos + (t - a) / (b - a) * BREAK_PX, 2)
            pos, last = pos + BREAK_PX, b
        return round(pos + (t - last) * self.per_second, 2)


def _scale(times: Sequence[float], t0: float, span: float, left: float, plot: float) -> _Scale:
    """A linear scale over ``span``, or one with breaks over the long quiet stretches
    between ``times`` (sorted) when there are any and some busy time remains (the busy
    time then gets all the plot but the breaks)."""
    gaps = sorted(
        (
            (b - a, a, b)
            for a, b in itertools.pairwise(times)
            if b - a > max(span * BREAK_SHARE, MIN_BREAK_S)
        ),
        reverse=True,
    )[:MAX_BREAKS]
    busy = span - sum(g for g, _, _ in gaps)
    if not gaps or busy <= 1e-6:  # nothing but quiet: to scale is as good
        return _Scale(t0, left, plot / span, ())
    breaks = tuple(sorted((a, b) for _, a, b in gaps))
    return _Scale(t0, left, (plot - BREAK_PX * len(breaks)) / busy, breaks)


def _place(labels: Sequence[tuple[float, float, int, float | None]]) -> dict[int, int]:
    """Rows for text labels so that none overlaps another, nor another's diamond
    marker, on its lane: ``labels`` are (x, width, lane, centre x of its diamond or
    None); diamonds sit in row 0. Returns the row (0 or 1) of each label, by index; a
    label is left out when its lane has no free row at its x (its marker's title still
    tells)."""
    taken: dict[tuple[int, int], list[tuple[float, float, int]]] = {}
    for i, (_, _, lane, cx) in enumerate(labels):
        if cx is not None:
            taken.setdefault((lane, 0), []).append((cx - 8, cx + 8, i))
    rows: dict[int, int] = {}
    for i, (x0, w, lane, _) in sorted(enumerate(labels), key=lambda item: item[1][0]):
        for row in (0, 1):
            spans = taken.setdefault((lane, row), [])
            if all(j == i or b + 3 <= x0 or x0 + w + 3 <= a for a, b, j in spans):
                spans.append((x0, x0 + w, i))
                rows[i] = row
                break
    return rows


def timeline_svg(
    definition: SagaDefinition, instance: SagaInstance, history: Sequence[HistoryEntry]
) -> str:
    """The instance's timeline: a lane per step (plus one for the saga), a bar per
    attempt, retry wait, status query and compensation, markers for stale inputs and
    manual decisions, the terminal state at the end; scaled to the saga's duration,
    with long quiet stretches drawn as marked breaks of the axis (:func:`_scale`).
    Labels never overlap: marker texts move to a free row of their lane (or stay in
    their title), axis labels too close to another are left out."""
    left, plot, lane_h, top = 170, 760, 30, 34
    t0 = history[0].at if history else instance.created_at
    end = max([h.at for h in history] + [t0])
    span = max(end - t0, 1e-3)
    names = ["saga", *(s.name for s in definition.steps)]
    lanes_end = top + lane_h * len(names)
    width, height = left + plot + 190, lanes_end + 34
    scale = _scale(sorted({h.at for h in history}), t0, span, left, plot)
    x = scale.x

    bars, marks = _lanes(definition, history)
    p = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="saga-timeline" data-saga="'
        f'{esc(instance.saga_id)}" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" font-family="sans-serif" font-size="11">',
        f"<title>timeline of saga {esc(instance.saga_id)} ({esc(instance.state.value)}, "
        f"{fmt_duration(span)})</title>",
    ]
    # Axis labels: each break's length on a row of its own above the ticks, which sit
    # at the ends of the busy pieces (evenly spaced when there is no break); a label
    # too close to another on its row is left out rather than drawn over it.
    taken: dict[float, list[tuple[float, float]]] = {}

    def free(cx: float, row: float, text: str) -> bool:
        half = len(text) * CHAR_PX / 2 + 3
        spans = taken.setdefault(row, [])
        if any(a < cx + half and cx - half < b for a, b in spans):
            return False
        spans.append((cx - half, cx + half))
        return True

    broken: list[str] = []  # drawn over the lanes, under the bars
    for start, stop in scale.breaks:
        xa, xb = x(start), x(stop)
        cx = round((xa + xb) / 2, 2)
        quiet = fmt_duration(stop - start)
        gap = f"\u2026{quiet}"
        label = (
            f'<text x="{cx}" y="{top - 23}" text-anchor="middle" fill="#475569">{gap}</text>'
            if free(cx, top - 23, gap)
            else ""
        )
        broken.append(
            f'<g class="break" data-seconds="{round(stop - start, 3)}"><rect x="{xa + 4}" '
            f'y="{top}" width="{round(xb - xa - 8, 2)}" height="{lanes_end - top}" '
            f'fill="#e2e8f0" fill-opacity="0.7"/><path d="M{xa + 6},{top - 4} l-6,8 '
            f"M{xb},{top - 4} l-6,8 M{xa + 6},{lanes_end - 4} l-6,8 M{xb},{lanes_end - 4} "
            f'l-6,8" stroke="#475569" stroke-width="1.5"/>{label}<title>axis broken: '
            f"{quiet} with no event, drawn {BREAK_PX:.0f} px wide</title></g>"
        )
    edges = [t0, *(t for pair in scale.breaks for t in pair), end] if scale.breaks else []
    ticks = edges or [t0 + span * k / 4 for k in range(5)]
    for t in ticks:
        tx, text = x(t), f"+{fmt_duration(t - t0)}"
        label = (
            f'<text x="{tx}" y="{top - 8}" text-anchor="middle" fill="#475569">{text}</text>'
            if free(tx, top - 8, text)
            else ""
        )
        p.append(
            f'<g class="tick"><line x1="{tx}" y1="{top - 6}" x2="{tx}" y2="{lanes_end}" '
            f'stroke="#e2e8f0"/>{label}</g>'
        )
    for i, name in enumerate(names):
        y = top + i * lane_h
        kind = "" if i == 0 else definition.steps[i - 1].kind.value
        p.append(
            f'<g class="lane" data-lane="{esc(name)}"><rect x="0" y="{y}" width="{width}" '
            f'height="{lane_h}" fill="{"#f8fafc" if i % 2 else "#ffffff"}"/><text x="8" '
            f'y="{y + 19}" font-weight="{"bold" if i == 0 else "normal"}">{esc(name)}'
            f"</text><title>{esc(name)} {esc(kind)}</title></g>"
        )
    p += broken
    for b in bars:
        y = top + b.lane * lane_h + (9 if b.kind == "wait" else 6)
        h = 12 if b.kind == "wait" else 18
        w = max(x(b.t1) - x(b.t0), 2.0)
        p.append(
            f'<rect class="bar {b.kind}" data-lane="{esc(names[b.lane])}" x="{x(b.t0)}" '
            f'y="{y}" width="{round(w, 2)}" height="{h}" rx="3" fill="{BAR_COLOURS[b.kind]}" '
            f'fill-opacity="{0.55 if b.kind == "wait" else 0.9}"><title>{esc(b.tip)}</title>'
            "</rect>"
        )
    labelled = [m for m in marks if m.kind in ("manual", "escalated", "finished")]
    # The text starts right of its marker: 6 px after a line, 9 px after a diamond.
    rows = _place(
        [
            (x(m.t) + 6, len(m.text) * BOLD_CHAR_PX, m.lane, None)
            if m.kind == "finished"
            else (x(m.t) + 9, len(m.text) * BOLD_CHAR_PX, m.lane, x(m.t))
            for m in labelled
        ]
    )
    # Row 0 is the lane's middle, row 1 just above it (in the lower half of the lane
    # above, which holds no text of its own there: 13 px text boxes, 30 px lanes).
    row_of = {id(m): rows.get(i) for i, m in enumerate(labelled)}
    dy = {0: 4.0, 1: -9.5}
    for m in marks:
        cx, cy = x(m.t), top + m.lane * lane_h + lane_h / 2
        lane = esc(names[m.lane])
        tip = f"<title>{esc(m.tip)}</title>"
        row = row_of.get(id(m))
        ty = cy + dy[row] if row is not None else cy
        if m.kind == "stale":
            p.append(
                f'<path class="mark stale" data-lane="{lane}" d="M{cx},{cy - 11} l4,7 h-8 z" '
                f'fill="#64748b">{tip}</path>'
            )
        elif m.kind in ("manual", "escalated"):
            colour = "#0f766e" if m.kind == "manual" else "#dc2626"
            p.append(
                f'<g class="mark {m.kind}" data-lane="{lane}"><path d="M{cx},{cy - 7} l7,7 '
                f'l-7,7 l-7,-7 z" fill="{colour}"/>{_label(cx + 9, ty, colour, m.text, row)}'
                f"{tip}</g>"
            )
        elif m.kind == "finished":
            outcome = SagaState.__members__.get(m.text)
            colour = STATE_COLOURS[outcome] if outcome is not None else "#334155"
            p.append(
                f'<g class="mark finished" data-lane="{lane}"><line x1="{cx}" y1="{top}" '
                f'x2="{cx}" y2="{lanes_end}" stroke="{colour}" stroke-dasharray="3 3"/>'
                f"{_label(cx + 6, ty, colour, m.text, row)}{tip}</g>"
            )
        else:
            p.append(
                f'<circle class="mark event" data-lane="{lane}" cx="{cx}" cy="{cy}" r="3" '
                f'fill="#334155">{tip}</circle>'
            )
    lx = 8
    for kind, label in _LEGEND:
        p.append(
            f'<g class="legend"><rect x="{lx}" y="{lanes_end + 12}" width="14" height="10" '
            f'rx="2" fill="{BAR_COLOURS[kind]}"/><text x="{lx + 18}" y="{lanes_end + 21}" '
            f'fill="#475569">{label}</text></g>'
        )
        lx += 30 + 6 * len(label)
    if not instance.terminal:
        p.append(
            f'<text class="state" x="{left + plot + 8}" y="{top + 19}" fill="'
            f'{STATE_COLOURS[instance.state]}" font-weight="bold">'
            f"{esc(instance.state.value)}\u2026</text>"
        )
    p.append("</svg>")
    return "\n".join(p) + "\n"


def _label(x: float, y: float, colour: str, text: str, row: int | None) -> str:
    """A marker's bold text, or nothing when :func:`_place` found no free row for it."""
    if row is None:
        return ""
    return f'<text x="{x}" y="{y}" fill="{colour}" font-weight="bold">{esc(text)}</text>'


def timeline_details(
    definition: SagaDefinition, instance: SagaInstance, history: Sequence[HistoryEntry]
) -> str:
    """What the timeline's tooltips say, as HTML a keyboard and a screen reader reach: a
    folded ``<details>`` listing every bar and marker of :func:`timeline_svg` in time
    order, each with its lane and what happened."""
    bars, marks = _lanes(definition, history)
    names = ["saga", *(s.name for s in definition.steps)]
    labels = dict(_LEGEND)
    rows = sorted(
        [(b.t0, names[b.lane], labels[b.kind], b.tip) for b in bars]
        + [(m.t, names[m.lane], m.text or m.kind, m.tip) for m in marks]
    )
    items = "".join(
        f"<li><b>{esc(lane)}</b> \u00b7 {esc(kind)}: {esc(tip)}</li>" for _, lane, kind, tip in rows
    )
    return (
        f'<details class="timeline-text" data-saga="{esc(instance.saga_id)}">'
        f"<summary>Timeline as text ({len(rows)} entries)</summary><ol>{items}</ol></details>"
    )


def _columns(d: SagaDefinition) -> list[str]:
    cols = ["orchestrator"]
    for s in d.steps:
        for a in (s.action, s.status_query, *(r.action for r in s.ladder)):
            if a is None:
                continue
            col = "local" if isinstance(a, LocalAction) else a.endpoint
            if col not in cols:
                cols.append(col)
    return cols


def _arrows(d: SagaDefinition, history: Sequence[HistoryEntry]) -> list[tuple[str, str, str, str]]:
    """(kind, endpoint, label, tooltip) per message derived from history, in order."""
    out: list[tuple[str, str, str, str]] = []
    index = {s.name: s for s in d.steps}
    answered: set[int] = set()
    for h in history:
        s = index.get(h.step or "")
        if s is None:
            if h.event == "manual.resolved":
                out.append(("note", "orchestrator", f"{h.detail.get('actor')}", _detail(h)))
            continue
        rung = h.detail.get("rung")
        ladder = s.ladder[rung] if isinstance(rung, int) and 0 <= rung < len(s.ladder) else None
        action = ladder.action if ladder is not None and h.event.startswith("comp") else s.action
        if h.event == "status.queried" and s.status_query is not None:
            action = s.status_query
        col = "local" if isinstance(action, LocalAction) else action.endpoint
        name = action.label.split(".")[-1] if not isinstance(action, LocalAction) else action.label
        tip = f"{h.event} {s.name} v{h.version} {_detail(h)}"
        ev = h.event
        if ev == "step.started":
            out.append(("command", col, f"{name} #{h.detail.get('attempt', 1)}", tip))
        elif ev == "status.queried":
            out.append(("query", col, f"{name}?", tip))
        elif ev == "status.answered":
            answered.add(h.version)
            out.append(("reply", col, f"status: {h.detail.get('state')}", tip))
        elif ev in ("step.succeeded", "step.failed") and h.version not in answered:
            ok = ev == "step.succeeded"
            label = "ok" if ok else f"failed: {h.detail.get('reason', '')}"
            out.append(("reply" if ok else "reply-failed", col, label, tip))
        elif ev == "compensation.sent":
            out.append(("comp", col, f"{name} #{h.detail.get('attempt', 1)}", tip))
        elif ev in ("compensation.succeeded", "compensation.failed"):
            ok = ev == "compensation.succeeded"
            label = "undone" if ok else f"failed: {h.detail.get('reason', '')}"
            out.append(("comp-reply" if ok else "reply-failed", col, label, tip))
        elif ev == "reply.stale":
            out.append(("stale", col, f"stale ({h.detail.get('why', '')})", tip))
        elif ev in ("step.timed_out", "compensation.timed_out", "status.timed_out"):
            out.append(("note", "orchestrator", f"timeout: {s.name}", tip))
        elif ev == "manual.resolved":
            label = f"{h.detail.get('actor')}: {h.detail.get('action')}"
            out.append(("note", "orchestrator", label, tip))
    return out


# Arrow colours are also their labels' text colours: each is >= 4.5:1 on white.
_ARROW_STYLE = {
    "command": ("#1d4ed8", ""),
    "query": ("#6d28d9", "2 3"),
    "reply": ("#15803d", "6 3"),
    "reply-failed": ("#b91c1c", "6 3"),
    "comp": ("#c2410c", ""),
    "comp-reply": ("#9a3412", "6 3"),
    "stale": ("#64748b", "2 2"),
}


def flow_svg(
    definition: SagaDefinition, instance: SagaInstance, history: Sequence[HistoryEntry]
) -> str:
    """The message flow: the orchestrator and each endpoint as columns, an arrow per
    command, status query, reply and compensation (derived from history)."""
    cols = _columns(definition)
    arrows = _arrows(definition, history)
    col_w, row_h, top = 170, 24, 44
    width = col_w * len(cols)
    height = top + row_h * len(arrows) + 20
    cx = {c: col_w * i + col_w // 2 for i, c in enumerate(cols)}
    p = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="saga-flow" data-saga="'
        f'{esc(instance.saga_id)}" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" font-family="sans-serif" font-size="11">',
        f"<title>message flow of saga {esc(instance.saga_id)}</title><defs>",
    ]
    for kind, (colour, _) in sorted(_ARROW_STYLE.items()):
        p.append(
            f'<marker id="flow-{kind}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
            f'fill="{colour}"/></marker>'
        )
    p.append("</defs>")
    for c in cols:
        p.append(
            f'<g class="column" data-column="{esc(c)}"><rect x="{cx[c] - 70}" y="6" width="140" '
            f'height="24" rx="5" fill="#f1f5f9" stroke="#475569"/><text x="{cx[c]}" y="22" '
            f'text-anchor="middle" font-weight="bold">{esc(c)}</text><line x1="{cx[c]}" '
            f'y1="30" x2="{cx[c]}" y2="{height - 6}" stroke="#94a3b8" stroke-dasharray="4 4"/>'
            "</g>"
        )
    for n, (kind, col, label, tip) in enumerate(arrows):
        y = top + n * row_h + 10
        if kind == "note":
            p.append(
                f'<g class="note"><rect x="{cx[col] + 6}" y="{y - 11}" width="150" height="16" '
                f'rx="3" fill="#fef9c3" stroke="#ca8a04"/><text x="{cx[col] + 10}" y="{y + 1}">'
                f"{esc(label[:26])}</text><title>{esc(tip)}</title></g>"
            )
            continue
        colour, dash = _ARROW_STYLE[kind]
        outward = kind in ("command", "query", "comp")
        x1, x2 = (cx["orchestrator"], cx[col]) if outward else (cx[col], cx["orchestrator"])
        x2 += -4 if x2 > x1 else 4
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        p.append(
            f'<g class="arrow {kind}" data-endpoint="{esc(col)}"><line x1="{x1}" y1="{y}" '
            f'x2="{x2}" y2="{y}" stroke="{colour}" stroke-width="1.6"{dash_attr} '
            f'marker-end="url(#flow-{kind})"/><text x="{(x1 + x2) / 2}" y="{y - 3}" '
            f'text-anchor="middle" fill="{colour}">{esc(label[:40])}</text>'
            f"<title>{esc(tip)}</title></g>"
        )
    p.append("</svg>")
    return "\n".join(p) + "\n"
