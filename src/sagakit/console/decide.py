"""The console's decision page: the confirmation an irreversible decision asks for, and
the page a refused decision comes back to.

Both show the saga as it is now (state, step, version, reason), what the decision does
to the saga and to its participants, and which holds are still open; the reason the
person typed is kept in the form. A confirmation posts the same decision again with
``confirm=yes`` and the version it showed; a refusal (the saga moved since the form was
loaded, the decision does not apply, holds are open) offers the decisions that apply
now, on the saga's current version.
"""

from __future__ import annotations

from collections.abc import Sequence

from sagakit.console import choreo
from sagakit.console import html as h
from sagakit.console.html import e
from sagakit.core.definition import SagaDefinition
from sagakit.core.instance import SagaInstance
from sagakit.core.machine_manual import DESCRIPTIONS, ManualAction, open_holds
from sagakit.runtime.tracker import TrackedFlow
from sagakit.runtime.tracker_manual import VIEW_DESCRIPTIONS, view_holds


def holds_of(
    definition: SagaDefinition | None, flow: TrackedFlow | None, inst: SagaInstance
) -> list[tuple[str, str]]:
    """The holds an ``accept_partial`` would leave open (the engine's own rule)."""
    if definition is not None:
        return open_holds(definition, inst)
    return view_holds(flow, inst) if flow is not None else []


def description(definition: SagaDefinition | None, flow: TrackedFlow | None, action: str) -> str:
    """What ``action`` does to this saga (a view's records differ from a driven saga's)."""
    if definition is None and flow is not None and action in VIEW_DESCRIPTIONS:
        return VIEW_DESCRIPTIONS[action]
    return DESCRIPTIONS.get(action, "")


def _summary(
    base: str, definition: SagaDefinition | None, flow: TrackedFlow | None, inst: SagaInstance
) -> str:
    step = h.current_step(definition, inst)
    if definition is None and flow is not None:
        step = choreo.view_step(flow, inst)[0]
    rows = [
        ("saga", h.saga_link(base, inst)),
        ("state", f"{h.state_badge(inst.state)} {e(inst.status)}"),
        ("stopped at", f"<b>{e(step)}</b>"),
        ("version", f'<span class="version">{inst.version}</span>'),
    ]
    if inst.reason:
        rows.append(("reason", f'<span class="error-text">{e(inst.reason)}</span>'))
    return '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _holds(holds: Sequence[tuple[str, str]]) -> str:
    if not holds:
        return '<p class="holds">Open holds: none.</p>'
    items = "".join(f"<li><b>{e(name)}</b> {e(what)}</li>" for name, what in holds)
    head = "<p>Open holds (left as they are by this decision):</p>"
    return f'<div class="holds">{head}<ul>{items}</ul></div>'


def decide_page(
    base: str,
    *,
    inst: SagaInstance,
    definition: SagaDefinition | None,
    flow: TrackedFlow | None,
    action: str,
    reason: str,
    rung: int | None,
    csrf: str,
    next_url: str,
    title: str,
    message: str = "",
    confirm: bool = False,
    force_offered: bool = False,
    refused: bool = False,
) -> str:
    """The decision page of ``action`` on ``inst`` (as it is now).

    ``confirm``: ask to confirm ``action`` (one button, the reason kept, a *force*
    box when ``force_offered``; ``refused``: this confirmation comes back after a
    refusal); otherwise the decision was refused with ``message`` and the page offers
    the decisions that apply now, the reason kept.
    """
    holds = holds_of(definition, flow, inst)
    what = description(definition, flow, action)
    parts = [f"<h1>{e(title)}</h1>"]
    if message:
        # A refusal is announced at once; a confirmation's note is not an error.
        role = "status" if confirm and not refused else "alert"
        parts.append(f'<p class="problem" role="{role}">{e(message)}</p>')
    parts.append(_summary(base, definition, flow, inst))
    parts.append(
        f'<section class="what-it-does"><h2>What {e(action)} does</h2><p>{e(what)}</p>'
        f"{_holds(holds) if action == ManualAction.ACCEPT_PARTIAL.value else ''}</section>"
    )
    if confirm:
        extra = ""
        if force_offered:
            extra = (
                '<label class="force"><input type="checkbox" name="force" value="yes" '
                "required> Accept although these holds stay open for good (say why in the "
                "reason)</label>"
            )
        hidden = {"confirm": "yes"}
        if rung is not None:
            hidden["rung"] = str(rung)
        button = (
            f'<button type="submit" name="action" value="{e(action)}" class="act danger" '
            f'data-confirm="{e(action)}">Confirm {e(action)} on version {inst.version}</button>'
            f' <a class="back" href="{e(next_url)}">Back, decide nothing</a>'
        )
        form = h.decision_form(
            base,
            inst,
            [button],
            csrf=csrf,
            next_url=next_url,
            reason=reason,
            hidden=hidden,
            extra=extra,
        )
        parts.append(f'<section class="decide-box"><h2>Confirm</h2>{form}</section>')
    else:
        if definition is not None:
            form = h.action_form(
                base, definition, inst, csrf=csrf, next_url=next_url, reason=reason
            )
        elif flow is not None:
            form = choreo.view_form(base, flow, inst, csrf=csrf, next_url=next_url, reason=reason)
        else:
            form = ""
        if form:
            parts.append(
                f'<section class="decide-box"><h2>Decide again, on version {inst.version}</h2>'
                f"{form}</section>"
            )
        else:
            parts.append(
                f'<p class="note">No decision applies to the saga as it is now. '
                f'<a href="{e(next_url)}">Back</a></p>'
            )
    return h.layout(title, "".join(parts), base=base, nav="manual")


DISCARD = (
    "Settle the dead letter without sending anything: its message is never handled (no "
    "saga or service hears of it again), and the letter stays, discarded, with who, when "
    "and why. Cannot be taken back; replay instead if the message should still be handled."
)
"""What discarding a dead letter does, shown before it is confirmed."""


def discard_page(
    base: str, *, store: str, letter_id: int, reason: str, csrf: str, next_url: str
) -> str:
    """The confirmation a dead letter's discard asks for: what it does, the reason kept,
    one button that discards and a link back."""
    action = f"{base}/dead-letters/{h.seg(store)}/{letter_id}/settle"
    rid = f"reason-{e(store)}-{letter_id}"
    form = (
        f'<form class="decide" method="post" action="{e(action)}">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        f'<input type="hidden" name="next" value="{e(next_url)}">'
        '<input type="hidden" name="confirm" value="yes">'
        f'<label for="{rid}">Reason (kept with the dead letter)</label>'
        f'<textarea id="{rid}" name="reason" rows="2" required maxlength="1000">'
        f"{e(reason)}</textarea>"
        '<div class="buttons"><button type="submit" name="settlement" value="discard" '
        f'class="act danger" data-confirm="discard">Confirm discard of {e(store)} #{letter_id}'
        f'</button> <a class="back" href="{e(next_url)}">Back, decide nothing</a></div></form>'
    )
    body = (
        f"<h1>Confirm discard</h1>"
        f'<section class="what-it-does"><h2>What discard does</h2><p>{e(DISCARD)}</p></section>'
        f'<section class="decide-box"><h2>Confirm</h2>{form}</section>'
    )
    return h.layout("Confirm discard", body, base=base, nav="dead-letters")
