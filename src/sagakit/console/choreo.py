"""The console's parts for a choreography's saga view, which nobody drives.

A :class:`~sagakit.runtime.tracker.Tracker` view has no definition to draw (no
commands, no pivot, no ladder): the page shows its steps as the facts left them, says
that there is no retry, compensation or cancel to ask for, and offers the records of
what a person did by hand (:mod:`sagakit.runtime.tracker_manual`).
"""

from __future__ import annotations

from sagakit.console import html as h
from sagakit.console.html import e
from sagakit.core.instance import SagaInstance, StepStatus
from sagakit.runtime.tracker import TrackedFlow
from sagakit.runtime.tracker_manual import VIEW_DESCRIPTIONS, available

LABELS = {
    "mark_done": "Mark done (finished by hand)",
    "mark_compensated": "Mark compensated (undone by hand)",
    "accept_partial": "Accept partial",
}


def view_form(
    base: str,
    flow: TrackedFlow,
    inst: SagaInstance,
    *,
    csrf: str,
    next_url: str,
    reason: str = "",
) -> str:
    """The decision form of a view waiting for a person ("" when none applies), with
    ``reason`` typed already (kept when a decision comes back refused)."""
    acts = available(flow, inst)
    if not acts:
        return ""
    buttons = [h.action_button(a.value, LABELS[a.value]) for a in acts]
    return h.decision_form(
        base,
        inst,
        buttons,
        csrf=csrf,
        next_url=next_url,
        reason=reason,
        described={a.value: VIEW_DESCRIPTIONS[a] for a in acts},
    )


def view_step(flow: TrackedFlow, inst: SagaInstance) -> tuple[str, StepStatus | None]:
    """The step of the last fact heard, and its status (``("-", None)`` before any)."""
    last = inst.data.get("last")
    fact = flow.facts.get(last) if isinstance(last, str) else None
    if fact is None:
        return "-", None
    return fact.step, inst.steps[flow.steps.index(fact.step)].status


def note(flow: TrackedFlow) -> str:
    """Why this page offers no retry, compensation or cancel."""
    return (
        f'<p class="note">A view of the choreography <b>{e(flow.definition)}</b>: the '
        "services react to each other's facts and no process drives them, so nothing here "
        "can send, repeat or undo a step. If it is stuck, fix it in the services, then "
        "record what you did.</p>"
    )


def view_sections(
    base: str, flow: TrackedFlow, inst: SagaInstance, *, csrf: str, can_act: bool
) -> list[str]:
    """The decision box (if any) and the steps table of a view's detail page."""
    parts = [note(flow)]
    here = f"{base}/sagas/{h.seg(inst.saga_id)}"
    form = view_form(base, flow, inst, csrf=csrf, next_url=here)
    if form and can_act:
        parts.append(f'<section class="decide-box"><h2>Decide</h2>{form}</section>')
    elif form:
        parts.append('<p class="note">You may look but not act on this saga.</p>')
    rows = [
        [
            f"<b>{e(name)}</b>",
            h.step_badge(st.status),
            e(h.fmt_time(st.finished_at)),
            f'<span class="error-text">{e(st.error or "")}</span>',
            e(str((st.result or {}).get("resolved_by", ""))),
        ]
        for name, st in zip(flow.steps, inst.steps, strict=False)
    ]
    table = h.table(["step", "status", "heard at", "last error", "by hand"], rows, "steps")
    parts.append(f"<section><h2>Steps</h2>{table}</section>")
    return parts
