"""The console's pages, rendered from data the routes loaded (no I/O here).

Each function returns a whole HTML page; :mod:`sagakit.console.routes` fetches the
instances, history and counts, checks permissions and passes them in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sagakit.console import choreo
from sagakit.console import html as h
from sagakit.console.filters import LIST_SORTS, ListQuery, human_duration
from sagakit.console.html import e, seg, url
from sagakit.console.svg import flow_svg, fmt_duration, timeline_details, timeline_svg
from sagakit.core.definition import SagaDefinition
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState
from sagakit.graph import to_svg
from sagakit.runtime.tracker import TrackedFlow

__all__ = ["ListQuery", "detail_page", "list_page"]

DefinitionOf = Callable[[SagaInstance], "SagaDefinition | None"]
FlowOf = Callable[[SagaInstance], "TrackedFlow | None"]


def _step(definition: SagaDefinition | None, flow: TrackedFlow | None, inst: SagaInstance) -> str:
    """The saga's current step: at its cursor, or for a view the last fact's step."""
    if definition is None and flow is not None:
        return choreo.view_step(flow, inst)[0]
    return h.current_step(definition, inst)


def _cut(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _options(values: Sequence[str], current: str | None) -> str:
    """``<option>`` s of ``values``, ``current`` selected (kept even when not among them)."""
    extra = [current] if current and current not in values else []
    return "".join(
        f'<option value="{e(v)}"{" selected" if v == current else ""}>{e(v)}</option>'
        for v in [*values, *extra]
    )


def _list_form(
    base: str, query: ListQuery, definitions: Sequence[str], steps: Sequence[str]
) -> str:
    states = "".join(
        f'<option value="{e(s.value)}"{" selected" if s is query.state else ""}>'
        f"{e(s.value)}</option>"
        for s in SagaState
    )
    sorts = "".join(
        f'<option value="{e(k)}"{" selected" if k == query.sort else ""}>{e(label)}</option>'
        for k, (_, label) in LIST_SORTS.items()
    )
    return (
        f'<form class="filters" method="get" action="{e(base)}/">'
        f'<label>state <select name="state"><option value="">any</option>{states}</select>'
        f'</label><label>definition <select name="definition"><option value="">any</option>'
        f"{_options(definitions, query.definition)}</select></label>"
        f'<label>step <select name="step"><option value="">any</option>'
        f"{_options(steps, query.step)}</select></label>"
        f'<label>age at least <input type="text" name="min_age" size="8" '
        f'value="{e(query.min_age)}" placeholder="30 min"></label>'
        f'<label>age at most <input type="text" name="max_age" size="8" '
        f'value="{e(query.max_age)}" placeholder="2 d"></label>'
        f'<label>order <select name="sort">{sorts}</select></label>'
        f'<label>business key <input type="search" name="q" value="{e(query.search)}" '
        'placeholder="order-42 or a saga id"></label><button type="submit">Filter</button>'
        f'<a href="{e(base)}/">clear</a></form>'
    )


IN_STATE = (
    "Since the saga last changed: for a finished saga or a case in the manual queue, how "
    "long it has been in its state; for a running one, since its last step moved."
)
"""What the list's "in state" column measures."""


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
    steps: Sequence[str] = (),
    total: int | None = None,
    now: float = 0.0,
) -> str:
    """The saga list: counts per state, filters and order, one row per saga (with its
    age and time in state, measured at ``now``), paging.

    ``total``: how many sagas the filters select (None when not counted: a search).
    A query with problems shows them, not sagas.
    """
    all_sagas = sum(counts.values())
    chips = [
        f'<a class="count{" current" if query.state is None else ""}" data-state="all" '
        f'href="{e(url(base, "/", query.params(state=None, offset=None)))}">all '
        f"<b>{all_sagas}</b></a>"
    ]
    for state in SagaState:
        current = " current" if query.state is state else ""
        chips.append(
            f'<a class="count{current}" data-state="{e(state.value)}" '
            f'href="{e(url(base, "/", query.params(state=state.value, offset=None)))}">'
            f"{h.state_badge(state)} <b>{counts.get(state, 0)}</b></a>"
        )
    form = _list_form(base, query, definitions, steps)
    if query.problems:
        items = "".join(f"<li>{e(p)}</li>" for p in query.problems)
        body = (
            f'<h1>Sagas</h1><div class="counts">{"".join(chips)}</div>{form}'
            f'<div class="problems" role="alert"><p>These filters cannot be used:</p>'
            f"<ul>{items}</ul></div>"
        )
        return h.layout("Sagas", body, base=base, nav="sagas")
    rows = [
        [
            h.saga_link(base, s),
            f"<code>{e(s.saga_id[:12])}</code>",
            e(f"{s.definition}@{s.definition_version}"),
            h.state_badge(s.state),
            e(s.status),
            e(_step(definition_of(s), flow_of(s), s)),
            f'<span class="age" title="started {e(h.fmt_time(s.created_at))}">'
            f"{e(human_duration(now - s.created_at))}</span>",
            f'<span class="in-state" title="last change {e(h.fmt_time(s.updated_at))}">'
            f"{e(human_duration(now - s.updated_at))}</span>",
            f'<span class="reason" title="{e(s.reason or "")}">{e(_cut(s.reason or ""))}</span>',
        ]
        for s in sagas
    ]
    headers = ["business key", "saga", "definition", "state", "status", "step", "age"]
    listing = (
        h.table([*headers, "in state", "reason"], rows, "sagas").replace(
            "<th>in state</th>", f'<th title="{e(IN_STATE)}">in state</th>', 1
        )
        if rows
        else '<p class="empty">No saga matches these filters.</p>'
    )
    pager = []
    if query.offset:
        prev = max(query.offset - query.limit, 0)
        href = url(base, "/", query.params(offset=prev or None))
        pager.append(f'<a rel="prev" href="{e(href)}">\u2039 previous</a>')
    if more:
        nxt = query.offset + query.limit
        pager.append(
            f'<a rel="next" href="{e(url(base, "/", query.params(offset=nxt)))}">next \u203a</a>'
        )
    dot = " \u00b7 "
    where = ""
    if rows:
        first, last = query.offset + 1, query.offset + len(rows)
        of = f" of {total}" if total is not None else ""
        where = f"sagas {first}\u2013{last}{of}, {e(LIST_SORTS[query.sort][1])}"
    body = (
        f'<h1>Sagas</h1><div class="counts">{"".join(chips)}</div>{form}{listing}'
        f'<p class="pager">{dot.join([where, *pager] if where else pager)}</p>'
    )
    live = url(base, "/events", query.params(q=None))
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

        # A figure wider than the screen scrolls in its own box; tabindex lets a
        # keyboard scroll it too (the pictures themselves have nothing to focus).
        def figure(name: str) -> str:
            return f'<div class="figure" tabindex="0" role="group" aria-label="{name}">'

        parts += [
            f"<section><h2>Timeline</h2>{figure('timeline')}"
            f"{timeline_svg(definition, inst, history)}</div>"
            f"{timeline_details(definition, inst, history)}</section>",
            f"<section><h2>Definition</h2>{figure('definition diagram')}"
            f"{to_svg(definition, inst)}</div></section>",
            f"<section><h2>Message flow</h2>{figure('message flow')}"
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
