"""HTML building blocks of the console: the page layout, badges, tables and forms.

Plain string templates. Every value that comes from a saga, a definition, a request
or a person goes through :func:`e` (HTML-escaped, quotes included); URLs are built
raw with :func:`url` and :func:`seg` (percent-encoded path segments), then escaped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from urllib.parse import quote, urlencode

from sagakit.console.svg import esc, fmt_duration
from sagakit.core.definition import SagaDefinition, StepKind
from sagakit.core.instance import SagaInstance, SagaState, StepStatus
from sagakit.core.machine_manual import DESCRIPTIONS, irreversible

e = esc


def seg(segment: str) -> str:
    """A URL path segment, percent-encoded (escape the whole URL with :func:`e`)."""
    return quote(segment, safe="")


def url(base: str, path: str, params: Mapping[str, str | int | None] | None = None) -> str:
    """``base + path`` with a query string of the non-empty ``params`` (not escaped)."""
    items = {k: str(v) for k, v in (params or {}).items() if v not in (None, "")}
    return base + path + ("?" + urlencode(items) if items else "")


def compact_json(value: object) -> str:
    """One-line JSON of a value, escaped."""
    return e(json.dumps(value, sort_keys=True, default=str))


def fmt_time(ts: float | None) -> str:
    """UTC wall-clock time with milliseconds, or an empty string."""
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def state_badge(state: SagaState) -> str:
    """A coloured badge for a saga state (the colour also has a CSS class)."""
    return f'<span class="badge state-{e(state.value)}">{e(state.value)}</span>'


def step_badge(status: StepStatus) -> str:
    """A badge for a step status."""
    return f'<span class="badge step-{e(status.value)}">{e(status.value)}</span>'


def layout(
    title: str,
    body: str,
    *,
    base: str,
    nav: str = "",
    live: str | None = None,
    tag: str = "",
    flash: str = "",
) -> str:
    """A whole page. ``live`` is the URL of its event stream (the script refreshes the
    ``#content`` element when the stream reports a ``tag`` other than the page's, and
    says so briefly in the ``#live-status`` region for screen readers)."""
    live_attr = f' data-live="{e(live)}" data-tag="{e(tag)}"' if live else ""
    links = [
        ("sagas", f"{base}/", "Sagas"),
        ("manual", f"{base}/manual", "Manual queue"),
        ("dead-letters", f"{base}/dead-letters", "Dead letters"),
    ]
    menu = "".join(
        f'<a href="{e(href)}"{" class=current" if key == nav else ""}>{label}</a>'
        for key, href, label in links
    )
    note = f'<p class="flash" role="status">{e(flash)}</p>' if flash else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} \u00b7 sagakit console</title>"
        f'<link rel="stylesheet" href="{e(base)}/static/console.css">'
        f'<script src="{e(base)}/static/console.js" defer></script></head>'
        # The skip link comes first so a keyboard user reaches the content in one tab;
        # the polite live region stays outside #content, which the live script replaces.
        f'<body><a class="skip" href="#content">Skip to content</a>'
        f'<header><a class="brand" href="{e(base)}/">sagakit console</a>'
        f'<nav aria-label="Console">{menu}</nav>'
        '<span id="live-indicator" class="live" hidden>live</span></header>'
        '<p id="live-status" class="sr-only" role="status" aria-live="polite"></p>'
        f'<main id="content" tabindex="-1"{live_attr}>{note}{body}</main></body></html>\n'
    )


MANUAL_LINK = ">Manual queue</a>"
"""The end of the manual queue's link in the layout's nav (:func:`with_open_cases`)."""


def with_open_cases(page: str, count: int) -> str:
    """``page`` (built by :func:`layout`) with how many manual cases are open on its nav
    link to the manual queue."""
    noun = "open case" if count == 1 else "open cases"
    badge = (
        f'>Manual queue <span class="nav-count{" none" if not count else ""}" '
        f'title="{count} {noun}" aria-label="{count} {noun}">{count}</span></a>'
    )
    # The nav is the page's first part: the first link is the layout's own.
    return page.replace(MANUAL_LINK, badge, 1)


def with_sign_out(page: str, action: str, who: str) -> str:
    """``page`` (built by :func:`layout`) with a *Sign out* button for ``who`` at the end
    of its header; the button posts to ``action``."""
    name = f'<span class="who">{e(who)}</span>' if who else ""
    form = (
        f'<form class="account" method="post" action="{e(action)}">{name}'
        '<button type="submit">Sign out</button></form>'
    )
    # The layout's header is the page's first one (cards have their own, later).
    return page.replace("</header>", form + "</header>", 1)


def error_page(base: str, status: int, title: str, message: str) -> str:
    """A page that explains why a request was refused and what to do."""
    body = (
        f'<section class="error"><h1>{status} \u00b7 {e(title)}</h1><p>{e(message)}</p>'
        f'<p><a href="{e(base)}/">Back to the sagas</a></p></section>'
    )
    return layout(title, body, base=base)


def table(headers: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    """A table; cells are HTML already (escape values before passing them)."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def saga_link(base: str, inst: SagaInstance, text: str | None = None) -> str:
    """A link to a saga's detail page."""
    href = e(f"{base}/sagas/{seg(inst.saga_id)}")
    return f'<a href="{href}">{e(text or inst.business_key)}</a>'


def current_step(definition: SagaDefinition | None, inst: SagaInstance) -> str:
    """The name of the step the saga is at (its cursor)."""
    if definition is None or not 0 <= inst.cursor < len(definition.steps):
        return str(inst.cursor)
    return definition.steps[inst.cursor].name


def json_block(value: object) -> str:
    """Pretty JSON in a ``<pre>``, escaped."""
    return f"<pre>{e(json.dumps(value, indent=2, sort_keys=True, default=str))}</pre>"


def relative(seconds: float) -> str:
    """``in 1.2 s`` / ``3.4 s ago``."""
    return f"in {fmt_duration(seconds)}" if seconds >= 0 else f"{fmt_duration(-seconds)} ago"


def _undoing(inst: SagaInstance) -> bool:
    st = inst.steps[inst.cursor]
    return st.status in (
        StepStatus.COMPENSATION_FAILED,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATION_WAITING,
    )


def available_actions(definition: SagaDefinition, inst: SagaInstance) -> list[tuple[str, str]]:
    """(action, button label) that fit the saga as it stands (the engine re-checks)."""
    if inst.state is SagaState.FAILED_NEEDS_MANUAL and 0 <= inst.cursor < len(inst.steps):
        if _undoing(inst):
            acts = [("retry", "Retry compensation"), ("mark_compensated", "Mark compensated")]
        else:
            acts = [("retry", "Retry step"), ("mark_done", "Mark done")]
            p = definition.pivot_index
            if p is None or inst.cursor <= p:
                acts.append(("compensate", "Compensate"))
        return [*acts, ("accept_partial", "Accept partial")]
    if inst.terminal or inst.cancel_requested or inst.state is SagaState.COMPENSATING:
        return []
    p = definition.pivot_index
    if p is not None and inst.steps[p].status is StepStatus.SUCCEEDED:
        return []  # past the point of no return: a cancel would be refused
    return [("cancel", "Cancel saga")]


def action_form(
    base: str,
    definition: SagaDefinition,
    inst: SagaInstance,
    *,
    csrf: str,
    next_url: str,
    reason: str = "",
) -> str:
    """The decision form of one saga: a required reason (``reason`` typed already, kept
    when a decision comes back refused), one button per action, and what each does."""
    acts = available_actions(definition, inst)
    if not acts:
        return ""
    buttons = [action_button(action, label) for action, label in acts]
    if inst.state is SagaState.FAILED_NEEDS_MANUAL and _undoing(inst):
        ladder = definition.steps[inst.cursor].ladder
        options = "".join(
            f'<option value="{n}"{" selected" if n == inst.steps[inst.cursor].rung else ""}>'
            f"{n}: {e(r.label)}</option>"
            for n, r in enumerate(ladder)
        )
        buttons.append(
            f'<span class="rung"><label>rung <select name="rung">{options}</select></label>'
            '<button type="submit" name="action" value="use_rung" class="act" '
            'data-action="use_rung">Use rung</button></span>'
        )
    described = [a for a, _ in acts] + (["use_rung"] if len(buttons) > len(acts) else [])
    return decision_form(
        base,
        inst,
        buttons,
        csrf=csrf,
        next_url=next_url,
        reason=reason,
        described={a: DESCRIPTIONS[a] for a in described},
    )


def action_button(action: str, label: str) -> str:
    """One decision button (cancel and accept_partial look dangerous). An irreversible
    action's button says that it asks for a confirmation first."""
    danger = " danger" if action in ("cancel", "accept_partial") else ""
    more = "…" if irreversible(action) else ""
    flag = " data-irreversible" if more else ""
    return (
        f'<button type="submit" name="action" value="{e(action)}" '
        f'class="act{danger}" data-action="{e(action)}"{flag}>{e(label)}{more}</button>'
    )


def what_it_does(described: Mapping[str, str]) -> str:
    """What each action of a form does (to the saga and its participants), folded."""
    if not described:
        return ""
    items = "".join(
        f"<dt>{e(a)}{' (asks to confirm: cannot be taken back)' if irreversible(a) else ''}"
        f"</dt><dd>{e(text)}</dd>"
        for a, text in described.items()
    )
    summary = "<summary>What each decision does</summary>"
    return f'<details class="what">{summary}<dl>{items}</dl></details>'


def decision_form(
    base: str,
    inst: SagaInstance,
    buttons: Iterable[str],
    *,
    csrf: str,
    next_url: str,
    reason: str = "",
    described: Mapping[str, str] | None = None,
    hidden: Mapping[str, str] | None = None,
    extra: str = "",
) -> str:
    """The form posting a decision on ``inst``: a required reason (prefilled with
    ``reason``), ``buttons``, ``extra`` controls and what each action does.

    It carries the saga version it was rendered at: the console refuses it (409) when
    the saga moved since, rather than apply a decision made on a state gone by.
    ``hidden``: more hidden fields (the confirmation step's action and ``confirm``).
    """
    rid = f"reason-{e(inst.saga_id)}"
    fields = {"csrf": csrf, "next": next_url, "version": str(inst.version), **(hidden or {})}
    inputs = "".join(
        f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in fields.items()
    )
    return (
        f'<form class="decide" method="post" action="{e(f"{base}/sagas/{seg(inst.saga_id)}/act")}">'
        f"{inputs}"
        f'<label for="{rid}">Reason (recorded in the saga history)</label>'
        f'<textarea id="{rid}" name="reason" rows="2" required maxlength="2000" '
        f'placeholder="why this decision">{e(reason)}</textarea>{extra}'
        f'<div class="buttons">{"".join(buttons)}</div>'
        f"{what_it_does(described or {})}</form>"
    )


def kind_tag(definition: SagaDefinition, index: int) -> str:
    """``pivot`` / ``retriable`` / ``optional`` / empty, as a small tag."""
    s = definition.steps[index]
    if s.kind is StepKind.COMPENSATABLE and not s.optional:
        return ""
    text = "optional" if s.kind is StepKind.COMPENSATABLE else s.kind.value
    return f' <span class="tag">{e(text)}</span>'
