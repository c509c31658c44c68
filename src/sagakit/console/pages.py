"""The console's pages, rendered from data the routes loaded (no I/O here).

Each function returns a whole HTML page; :mod:`sagakit.console.routes` fetches the
instances, history and counts, checks permissions and passes them in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sagakit.console import choreo
from sagakit.console import html as h
from sagakit.console.html import e, seg, url
from sagakit.console.svg import flow_svg, fmt_duration, timeline_svg
from sagakit.core.definition import SagaDefinition
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState
from sagakit.graph import to_svg
from sagakit.runtime.tracker import TrackedFlow

DefinitionOf = Callable[[SagaInstance], "SagaDefinition | None"]
FlowOf = Callable[[SagaInstance], "TrackedFlow | None"]


@dataclass(frozen=True, slots=True)
class ListQuery:
    """The saga list's filters, as read from the query string."""

    state: SagaState | None = None
    definition: str | None = None
    search: str = ""
    offset: int = 0
    limit: int = 50

    def params(self, **override: str | int | None) -> dict[str, str | int | None]:
        """The query-string parameters of this view, with some replaced."""
        out: dict[str, str | int | None] = {
            "state": self.state.value if self.state else None,
            "definition": self.definition,
            "q": self.search,
            "offset": self.offset or None,
        }
        out.update(override)
        return out


def _step(definition: SagaDefinition | None, flow: TrackedFlow | None, inst: SagaInstance) -> str:
    """The saga's current step: at its cursor, or for a view the last fact's step."""
    if definition is None and flow is not None:
        return choreo.view_step(flow, inst)[0]
    return h.current_step(definition, inst)


def _cut(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def list_page(
    base: str,
    *,
    query: ListQuery,
    sagas: Sequence[SagaInstance],
    counts: dict[SagaState, int],
    definitions: Sequence[str],
    definition_of: DefinitionOf,
    tag: str,
    more: bool,
    flow_of: FlowOf = lambda inst: None,
) -> str:
    """The saga list: counts per state, filters, one row per saga, paging."""
    total = sum(counts.values())
    chips = [
        f'<a class="count{" current" if query.state is None else ""}" data-state="all" '
        f'href="{e(url(base, "/", query.params(state=None, offset=None)))}">all '
        f"<b>{total}</b></a>"
    ]
    for state in SagaState:
        current = " current" if query.state is state else ""
        chips.append(
            f'<a class="count{current}" data-state="{e(state.value)}" '
            f'href="{e(url(base, "/", query.params(state=state.value, offset=None)))}">'
            f"{h.state_badge(state)} <b>{counts.get(state, 0)}</b></a>"
        )
    states = "".join(
        f'<option value="{e(s.value)}"{" selected" if s is query.state else ""}>'
        f"{e(s.value)}</option>"
        for s in SagaState
    )
    defs = "".join(
        f'<option value="{e(d)}"{" selected" if d == query.definition else ""}>{e(d)}</option>'
        for d in definitions
    )
    form = (
        f'<form class="filters" method="get" action="{e(base)}/">'
        f'<label>state <select name="state"><option value="">any</option>{states}</select>'
        f'</label><label>definition <select name="definition"><option value="">any</option>'
        f"{defs}</select></label>"
        f'<label>business key <input type="search" name="q" value="{e(query.search)}" '
        'placeholder="order-42 or a saga id"></label><button type="submit">Filter</button>'
        f'<a href="{e(base)}/">clear</a></form>'
    )
    rows = [
        [
            h.saga_link(base, s),
            f"<code>{e(s.saga_id[:12])}</code>",
            e(f"{s.definition}@{s.definition_version}"),
            h.state_badge(s.state),
            e(s.status),
            e(_step(definition_of(s), flow_of(s), s)),
            e(h.fmt_time(s.updated_at)),
            f'<span class="reason" title="{e(s.reason or "")}">{e(_cut(s.reason or ""))}</span>',
        ]
        for s in sagas
    ]
    headers = ["business key", "saga", "definition", "state", "status", "step", "updated"]
    listing = (
        h.table([*headers, "reason"], rows, "sagas")
        if rows
        else '<p class="empty">No saga matches these filters.</p>'
    )
    pager = []
    if query.offset:
        prev = max(query.offset - query.limit, 0)
        pager.append(f'<a href="{e(url(base, "/", query.params(offset=prev or None)))}">newer</a>')
    if more:
        nxt = query.offset + query.limit
        pager.append(f'<a href="{e(url(base, "/", query.params(offset=nxt)))}">older</a>')
    dot = " \u00b7 "
    body = (
        f'<h1>Sagas</h1><div class="counts">{"".join(chips)}</div>{form}{listing}'
        f'<p class="pager">{dot.join(pager)}</p>'
    )
    live = url(base, "/events", query.params(q=None, offset=None))
    return h.layout("Sagas", body, base=base, nav="sagas", live=live, tag=tag)


def _steps_table(d: SagaDefinition, inst: SagaInstance, now: float) -> str:
    rows = []
    at = inst.cursor if not inst.terminal or inst.state is SagaState.FAILED_NEEDS_MANUAL else -1
    for i, (step, st) in enumerate(zip(d.steps, inst.steps, strict=False)):
        here = ' <span class="here">\u25c0 here</span>' if i == at else ""
        rung = ""
        if step.ladder and st.status.value.startswith("COMPENSAT"):
            rung = f"{st.rung}: {step.ladder[st.rung].label} (try {st.rung_attempt})"
        retry = ""
        if st.next_retry_at is not None:
            retry = f"{h.fmt_time(st.next_retry_at)} ({h.relative(st.next_retry_at - now)})"
        took = ""
        if st.started_at is not None and st.finished_at is not None:
            took = fmt_duration(st.finished_at - st.started_at)
        rows.append(
            [
                f"<b>{e(step.name)}</b>{h.kind_tag(d, i)}{here}",
                f"<code>{e(step.action.label)}</code>",
                h.step_badge(st.status),
                f"{st.attempt} / {step.retry.max_attempts}"
                + (f" ({st.queries} queries)" if st.queries else ""),
                e(rung),
                f'<span class="error-text">{e(st.error or "")}</span>',
                e(retry),
                e(took),
            ]
        )
    headers = ["step", "action", "status", "attempts", "compensation", "last error"]
    return h.table([*headers, "next retry", "took"], rows, "steps")


def _history_table(history: Sequence[HistoryEntry]) -> str:
    t0 = history[0].at if history else 0.0
    rows = [
        [
            str(x.version),
            f'<span title="{e(h.fmt_time(x.at))}">+{e(fmt_duration(x.at - t0))}</span>',
            f'<span class="event ev-{e(x.event.split(".")[0])}">{e(x.event)}</span>',
            e(x.step or ""),
            e(x.state.value),
            e(x.status),
            f'<code class="detail">{h.compact_json(x.detail)}</code>',
        ]
        for x in history
    ]
    headers = ["v", "at", "event", "step", "state", "status", "detail"]
    return h.table(headers, rows, "history")


def detail_page(
    base: str,
    *,
    inst: SagaInstance,
    definition: SagaDefinition | None,
    history: Sequence[HistoryEntry],
    csrf: str,
    can_act: bool,
    now: float,
    flash: str = "",
    flow: TrackedFlow | None = None,
    waiting_for: str | None = None,
) -> str:
    """One saga: summary, decisions, timeline, diagram, message flow, steps, history.

    A choreography's view (``flow``, no definition) shows its steps and the records a
    person may make instead (:mod:`sagakit.console.choreo`). ``waiting_for``: the
    ``name@N`` its inputs are set aside for (see :mod:`sagakit.runtime.set_aside`).
    """
    facts = [
        ("state", h.state_badge(inst.state)),
        ("status", e(inst.status)),
        ("definition", e(f"{inst.definition}@{inst.definition_version}")),
        ("saga id", f"<code>{e(inst.saga_id)}</code>"),
        ("correlation", f"<code>{e(inst.correlation_id)}</code>"),
        ("version", str(inst.version)),
        ("started", e(h.fmt_time(inst.created_at))),
        ("updated", e(h.fmt_time(inst.updated_at))),
        ("deadline", e(h.fmt_time(inst.deadline_at))),
    ]
    if inst.reason:
        facts.append(("reason", f'<span class="error-text">{e(inst.reason)}</span>'))
    if waiting_for:
        facts.append(("waiting for", f'<span class="error-text">{e(waiting_for)}</span>'))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    parts = [f"<h1>{e(inst.business_key)}</h1><dl class=facts>{dl}</dl>"]
    if waiting_for:
        parts.append(
            f'<p class="error-text waiting-for">Waiting for {e(waiting_for)}: no process that '
            "received this saga's replies or timers has this definition version, so they are "
            f"set aside. Run a worker that has {e(waiting_for)}; it applies them at once.</p>"
        )
    if definition is None and flow is not None:
        parts += choreo.view_sections(base, flow, inst, csrf=csrf, can_act=can_act)
    elif definition is None:
        parts.append(
            f'<p class="error-text">This console does not know the definition '
            f"{e(inst.definition)}@{inst.definition_version}; pictures are not available.</p>"
        )
    else:
        here = f"{base}/sagas/{seg(inst.saga_id)}"
        form = h.action_form(base, definition, inst, csrf=csrf, next_url=here)
        if form and can_act:
            parts.append(f'<section class="decide-box"><h2>Decide</h2>{form}</section>')
        elif form:
            parts.append('<p class="note">You may look but not act on this saga.</p>')
        pics = e(f"{base}/sagas/{seg(inst.saga_id)}/pictures")
        downloads = " \u00b7 ".join(
            f'<a href="{pics}/{n}">{n}</a>'
            for n in ("timeline.svg", "diagram.svg", "flow.svg", "diagram.mmd", "diagram.dot")
        )
        parts += [
            f'<section><h2>Timeline</h2><div class="figure">'
            f"{timeline_svg(definition, inst, history)}</div></section>",
            f'<section><h2>Definition</h2><div class="figure">{to_svg(definition, inst)}'
            "</div></section>",
            f'<section><h2>Message flow</h2><div class="figure">'
            f"{flow_svg(definition, inst, history)}</div></section>",
            f"<section><h2>Steps</h2>{_steps_table(definition, inst, now)}</section>",
            f'<p class="downloads">download: {downloads}</p>',
        ]
    parts += [
        f"<section><h2>History ({len(history)})</h2>{_history_table(history)}</section>",
        f"<section><h2>Data</h2>{h.json_block(inst.data)}</section>",
    ]
    live = f"{base}/sagas/{seg(inst.saga_id)}/events"
    return h.layout(
        inst.business_key, "".join(parts), base=base, live=live, tag=str(inst.version), flash=flash
    )


def manual_page(
    base: str,
    *,
    cases: Sequence[SagaInstance],
    definition_of: DefinitionOf,
    csrf: str,
    can_act: bool,
    tag: str,
    flash: str = "",
    flow_of: FlowOf = lambda inst: None,
) -> str:
    """The manual queue: each case with its reason and, for those a person can decide,
    the decision form (a choreography's view: the records of what a person did)."""
    cards = []
    for inst in cases:
        d, flow = definition_of(inst), flow_of(inst)
        form = ""
        if d is not None and can_act:
            form = h.action_form(base, d, inst, csrf=csrf, next_url=f"{base}/manual")
        step = h.current_step(d, inst)
        status = inst.steps[inst.cursor].status if 0 <= inst.cursor < len(inst.steps) else None
        if d is None and flow is not None:
            step, status = choreo.view_step(flow, inst)
            if can_act:
                form = choreo.view_form(base, flow, inst, csrf=csrf, next_url=f"{base}/manual")
        cards.append(
            f'<article class="case" data-saga="{e(inst.saga_id)}" '
            f'data-key="{e(inst.business_key)}"><header>'
            f"{h.saga_link(base, inst)} {h.state_badge(inst.state)} "
            f"<span>{e(inst.definition)}@{inst.definition_version}</span> "
            f'<span class="muted">since {e(h.fmt_time(inst.updated_at))}</span></header>'
            f"<p>stuck at <b>{e(step)}</b> {h.step_badge(status) if status else ''}</p>"
            f'<p class="error-text">{e(inst.reason or "")}</p>'
            + (form or '<p class="muted">No decision to take here.</p>')
            + "</article>"
        )
    body = "<h1>Manual queue</h1>" + (
        "".join(cards) if cards else '<p class="empty">Nobody needs to decide anything.</p>'
    )
    if not can_act and cases:
        body += '<p class="note">You may look but not act on these sagas.</p>'
    return h.layout(
        "Manual queue",
        body,
        base=base,
        nav="manual",
        live=f"{base}/events?manual=1",
        tag=tag,
        flash=flash,
    )
