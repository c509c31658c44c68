"""The manual queue page: the cases a person must decide, oldest first, a page at a time.

Each case card says how long the case has waited, where it stopped and why, the
business facts that matter for the decision (from the saga's data, never a field the
definition declares personal) and which holds are still open (steps done that have a
compensation and are not undone: the engine's own rule,
:func:`~sagakit.core.machine_manual.open_holds`, which also refuses an unforced
``accept_partial`` while any is open), then the decision form.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

from sagakit.console import bulk, choreo
from sagakit.console import html as h
from sagakit.console.filters import MANUAL_SORTS, ManualQuery, human_duration
from sagakit.console.html import e, url
from sagakit.core.definition import SagaDefinition
from sagakit.core.instance import SagaInstance
from sagakit.core.machine_manual import HOLDS, open_holds
from sagakit.core.personal import Handling
from sagakit.redaction import personal_data_in
from sagakit.runtime.tracker import TrackedFlow

__all__ = ["HOLDS", "data_facts", "manual_page", "open_holds"]

DefinitionOf = Callable[[SagaInstance], "SagaDefinition | None"]
FlowOf = Callable[[SagaInstance], "TrackedFlow | None"]

MAX_FACTS = 8
"""Facts a card shows when the console was not told which ones (the first fields)."""

MAX_FACT_TEXT = 120
"""Characters of one fact's value on a card (longer ones are cut)."""


def _personal(definition: SagaDefinition, path: tuple[str, ...]) -> bool:
    """Whether ``path`` is, is inside or holds a field declared personal."""
    for declared, spec in definition.personal.fields.items():
        if spec.handling is Handling.PUBLIC:
            continue
        n = min(len(declared), len(path))
        if declared[:n] == path[:n]:
            return True
    return False


def _value(data: Mapping[str, object], path: tuple[str, ...]) -> object:
    value: object = data
    for part in path:
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _shown(value: object) -> str | None:
    """A value as a card shows it, or None when it is not one to show (a mapping, or
    text that looks like personal data although no rule declares it)."""
    if isinstance(value, Mapping) or value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if personal_data_in(text) is not None:
        return None
    return text if len(text) <= MAX_FACT_TEXT else text[: MAX_FACT_TEXT - 1] + "\u2026"


def data_facts(
    definition: SagaDefinition, data: Mapping[str, object], chosen: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """``(field, value)`` of the saga's data that a card shows.

    ``chosen``: the dotted field paths to show, in order (the console's ``facts`` for
    this definition); without it, the first :data:`MAX_FACTS` top-level fields that
    hold a value or a list. Never a field the definition declares personal
    (``refuse`` or ``tokenise``: its tokens say nothing to a person deciding, and its
    nested fields may be personal), nor text that looks like personal data.
    """
    paths = (
        [tuple(p.split(".")) for p in chosen]
        if chosen is not None
        else [(str(k),) for k in data][: MAX_FACTS * 4]
    )
    out: list[tuple[str, str]] = []
    for path in paths:
        if _personal(definition, path):
            continue
        text = _shown(_value(data, path))
        if text is not None:
            out.append((".".join(path), text))
        if chosen is None and len(out) == MAX_FACTS:
            break
    return out


def _card(
    base: str,
    inst: SagaInstance,
    *,
    definition: SagaDefinition | None,
    flow: TrackedFlow | None,
    csrf: str,
    can_act: bool,
    here: str,
    now: float,
    facts: Sequence[str] | None,
) -> str:
    form = ""
    if definition is not None and can_act:
        form = h.action_form(base, definition, inst, csrf=csrf, next_url=here)
    step = h.current_step(definition, inst)
    status = inst.steps[inst.cursor].status if 0 <= inst.cursor < len(inst.steps) else None
    if definition is None and flow is not None:
        step, status = choreo.view_step(flow, inst)
        if can_act:
            form = choreo.view_form(base, flow, inst, csrf=csrf, next_url=here)
    waited = human_duration(now - inst.updated_at)
    rows: list[tuple[str, str]] = []
    if definition is not None:
        rows += [(e(k), e(v)) for k, v in data_facts(definition, inst.data, facts)]
        holds = open_holds(definition, inst)
        rows.append(
            (
                "open holds",
                ", ".join(f"<b>{e(name)}</b> {e(what)}" for name, what in holds) or "none",
            )
        )
    facts_html = (
        '<dl class="case-facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"
        if rows
        else ""
    )
    return (
        f'<article class="case" data-saga="{e(inst.saga_id)}" '
        f'data-key="{e(inst.business_key)}" data-waiting="{int(max(now - inst.updated_at, 0))}">'
        f"<header>{bulk.case_checkbox(inst) if can_act else ''}"
        f"{h.saga_link(base, inst)} {h.state_badge(inst.state)} "
        f"<span>{e(inst.definition)}@{inst.definition_version}</span> "
        f'<span class="waiting" title="in the queue since {e(h.fmt_time(inst.updated_at))}">'
        f"waiting {e(waited)}</span></header>"
        f"<p>stuck at <b>{e(step)}</b> {h.step_badge(status) if status else ''}</p>"
        f'<p class="error-text">{e(inst.reason or "")}</p>'
        + facts_html
        + (form or '<p class="muted">No decision to take here.</p>')
        + "</article>"
    )


def _form(base: str, query: ManualQuery, definitions: Sequence[str], steps: Sequence[str]) -> str:
    def options(values: Sequence[str], current: str | None) -> str:
        extra = [current] if current and current not in values else []
        return "".join(
            f'<option value="{e(v)}"{" selected" if v == current else ""}>{e(v)}</option>'
            for v in [*values, *extra]
        )

    sorts = "".join(
        f'<option value="{e(k)}"{" selected" if k == query.sort else ""}>{e(label)}</option>'
        for k, (_, label) in MANUAL_SORTS.items()
    )
    return (
        f'<form class="filters" method="get" action="{e(base)}/manual">'
        f'<label>definition <select name="definition"><option value="">any</option>'
        f"{options(definitions, query.definition)}</select></label>"
        f'<label>step <select name="step"><option value="">any</option>'
        f"{options(steps, query.step)}</select></label>"
        f'<label>reason contains <input type="search" name="reason" maxlength="200" '
        f'value="{e(query.reason)}" placeholder="refused"></label>'
        f'<label>waiting at least <input type="text" name="min_wait" size="10" '
        f'value="{e(query.min_wait)}" placeholder="30 min, 2 h, 1 d"></label>'
        f'<label>order <select name="sort">{sorts}</select></label>'
        '<button type="submit">Filter</button>'
        f'<a href="{e(base)}/manual">clear</a></form>'
    )


def _pager(base: str, query: ManualQuery, shown: int, matched: int) -> str:
    if not matched:
        return ""
    first, last = query.offset + 1, query.offset + shown
    links = []
    if query.offset:
        prev = max(query.offset - query.limit, 0)
        href = url(base, "/manual", query.params(offset=prev or None))
        links.append(f'<a rel="prev" href="{e(href)}">\u2039 previous</a>')
    if last < matched:
        href = url(base, "/manual", query.params(offset=query.offset + query.limit))
        links.append(f'<a rel="next" href="{e(href)}">next \u203a</a>')
    where = f"cases {first}\u2013{last} of {matched}" if shown else f"no case past {matched}"
    order = MANUAL_SORTS[query.sort][1]
    dot = " \u00b7 "
    return f'<p class="pager">{where}, {e(order)}{dot if links else ""}{dot.join(links)}</p>'


def manual_page(
    base: str,
    *,
    query: ManualQuery,
    cases: Sequence[SagaInstance],
    matched: int,
    open_cases: int,
    definitions: Sequence[str],
    steps: Sequence[str],
    definition_of: DefinitionOf,
    csrf: str,
    can_act: bool,
    tag: str,
    now: float,
    flash: str = "",
    flow_of: FlowOf = lambda inst: None,
    facts: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The manual queue: how many cases are open, the filters, one page of cases (each
    with its wait, reason, facts, open holds and, for those a person can decide, the
    decision form), and the pager.

    ``matched``: how many cases the filters select (all pages); ``open_cases``: how
    many the queue holds in all. ``facts``: definition name -> the data fields its
    cards show (see :func:`data_facts`). A query with problems shows them, not cases.
    """
    noun = "open case" if open_cases == 1 else "open cases"
    parts = [
        f'<h1>Manual queue: <span class="open-count">{open_cases} {noun}</span></h1>',
        _form(base, query, definitions, steps),
    ]
    if query.problems:
        items = "".join(f"<li>{e(p)}</li>" for p in query.problems)
        parts.append(
            f'<div class="problems" role="alert"><p>These filters cannot be used:</p>'
            f"<ul>{items}</ul></div>"
        )
    else:
        if query.filtered:
            parts.append(f'<p class="matched">{matched} of {open_cases} match these filters.</p>')
        # A decision comes back to this very view: same filters, order and page.
        here = url(base, "/manual", query.params())
        cards = [
            _card(
                base,
                inst,
                definition=definition_of(inst),
                flow=flow_of(inst),
                csrf=csrf,
                can_act=can_act,
                here=here,
                now=now,
                facts=None if facts is None else facts.get(inst.definition),
            )
            for inst in cases
        ]
        if cards:
            if can_act:  # the bulk form, which the cards' boxes belong to
                parts.append(
                    bulk.selection_form(base, query=query, matched=matched, cases=cases, csrf=csrf)
                )
            parts += cards
        elif query.filtered:
            parts.append('<p class="empty">No case matches these filters.</p>')
        else:
            parts.append('<p class="empty">Nobody needs to decide anything.</p>')
        parts.append(_pager(base, query, len(cases), matched))
        if not can_act and cases:
            parts.append('<p class="note">You may look but not act on these sagas.</p>')
    live = None if query.problems else url(base, "/events", {"manual": 1, **query.params()})
    return h.layout(
        "Manual queue", "".join(parts), base=base, nav="manual", live=live, tag=tag, flash=flash
    )
