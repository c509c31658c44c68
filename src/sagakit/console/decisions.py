"""The console's decision handlers: apply a decision form, or answer with the page that
confirms or refuses it (:mod:`sagakit.console.decide` renders those pages).

A form carries the saga version it was rendered at. A saga that moved since gets the
refusal page (409), with the typed reason kept and the decisions that apply now; an
irreversible decision (:data:`~sagakit.core.machine_manual.IRREVERSIBLE`) and a
dead letter's discard get a confirmation page first; a decision the engine refuses
(another state, open holds, no driver) comes back to its form with the reason kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from sagakit.console import html as h
from sagakit.console.decide import decide_page, discard_page
from sagakit.core.instance import SagaInstance
from sagakit.core.machine import ManualAction
from sagakit.core.machine_manual import irreversible
from sagakit.errors import (
    ManualActionRefused,
    OpenHolds,
    SagaMoved,
    SagaNotFound,
    VersionMissing,
)

if TYPE_CHECKING:
    from sagakit.console.routes import _Console

ACTIONS = frozenset({*(a.value for a in ManualAction), "cancel"})
"""What a decision form may ask: the engine's manual actions, and cancel."""


@dataclass(frozen=True, slots=True)
class _Decision:
    """What a decision form asked for: the action, the typed reason, the rung, force."""

    action: str
    reason: str
    rung: int | None
    force: bool


def moved(expected: int, inst: SagaInstance | None) -> str:
    """Why a form decided on version ``expected`` is refused now."""
    if inst is None:
        return f"The saga is gone since this form was loaded at version {expected}."
    return (
        f"The saga changed since this form was loaded: you decided on version {expected}, "
        f"it is at version {inst.version} now ({inst.state.value}). Nothing was applied. "
        "Look at it as it is now; your reason is kept below."
    )


async def act(c: _Console, request: Request) -> Response:
    """Apply a decision form's decision, or answer with the page that confirms or refuses it.

    The form must carry the saga version it was rendered at: a saga at another one
    gets the refusal page (409) with the reason kept; an irreversible action without
    ``confirm=yes`` gets its confirmation page; the engine re-checks the version in
    the transaction that applies the decision.
    """
    checked = await c.decision_form(request, "sagas")
    if isinstance(checked, Response):
        return checked
    who, form = checked
    action, reason = form.get("action", ""), form.get("reason", "").strip()
    if action not in ACTIONS:
        return await c.error(request, 400, "Unknown action", f"Choose one of {sorted(ACTIONS)}.")
    if not reason:
        why = "Every decision needs a reason; it is recorded in the saga's history."
        return await c.error(request, 400, "Reason missing", why)
    if (refused := await c.personal_data(request, reason)) is not None:
        return refused
    saga_id = request.path_params["saga_id"]
    raw_version = form.get("version", "")
    if not (raw_version.isascii() and raw_version.isdigit()) or len(raw_version) > 18:
        why = (
            "This form does not say which version of the saga it was decided on (it "
            "was loaded from an older console). Reload the page and decide again."
        )
        return await c.error(request, 400, "Saga version missing", why)
    expected = int(raw_version)
    raw_rung = form.get("rung", "")
    rung = int(raw_rung) if action == "use_rung" and raw_rung.isdigit() else None
    force = form.get("force") == "yes"
    inst = await c.engine.store.get_saga(saga_id)
    if inst is None:
        return await c.error(request, 404, "No such saga", "There is no saga with this id.")
    decision = _Decision(action, reason, rung, force)
    if inst.version != expected:
        return await refuse(c, request, form, inst, decision, moved(expected, inst))
    if irreversible(action) and form.get("confirm") != "yes":
        # Say what it does first; the person confirms on the page that follows.
        return await confirm(c, request, form, inst, decision)
    try:
        if action == "cancel":
            # The engine's cancel takes no actor: the reason carries it into history.
            after = await c.engine.cancel(
                saga_id, f"{reason} (by {who})", expected_version=expected
            )
            if after.version == inst.version:
                why = (
                    f"The saga is {after.state.value}: a cancel is refused once the saga "
                    "passed its point of no return, is already cancelling, or finished."
                )
                return await refuse(c, request, form, after, decision, why)
        else:
            await c.engine.resolve(
                saga_id,
                action,
                reason=reason,
                actor=who,
                rung=rung,
                expected_version=expected,
                force=force,
            )
    except SagaNotFound:
        return await c.error(request, 404, "No such saga", "There is no saga with this id.")
    except SagaMoved:
        now = await c.engine.store.get_saga(saga_id)
        return await refuse(c, request, form, now or inst, decision, moved(expected, now))
    except OpenHolds as exc:
        return await confirm(c, request, form, inst, decision, str(exc), status=409)
    except ManualActionRefused as exc:
        return await refuse(c, request, form, inst, decision, str(exc))
    except VersionMissing as exc:
        return await c.error(request, 409, f"This console lacks {exc.waiting_for}", str(exc))
    return c.back(request, form, f"/sagas/{h.seg(saga_id)}", action)


def next_of(c: _Console, request: Request, form: dict[str, str], inst: SagaInstance) -> str:
    """Where a decision page's form goes back to: the form's own ``next`` when it
    stays inside the console, else the saga's page."""
    return _inside(c.base(request), form, f"/sagas/{h.seg(inst.saga_id)}")


def _inside(base: str, form: dict[str, str], otherwise: str) -> str:
    """The form's ``next`` when it stays inside the console, else ``base + otherwise``."""
    target = form.get("next", "")[:4000]
    path = target.partition("?")[0]
    if path.startswith(base + "/") and "//" not in path and "\\" not in path:
        return target
    return base + otherwise


async def _decision_page(
    c: _Console,
    request: Request,
    form: dict[str, str],
    inst: SagaInstance,
    decision: _Decision,
    status: int,
    **page: Any,
) -> Response:
    """The decision page of ``inst`` (refused or to confirm), the typed reason kept."""
    token, nonce = c.csrf.issue(request, c.who(request))
    body = decide_page(
        c.base(request),
        inst=inst,
        definition=c.definition_of(inst),
        flow=c.flow_of(inst),
        action=decision.action,
        reason=decision.reason,
        rung=decision.rung,
        csrf=token,
        next_url=next_of(c, request, form, inst),
        **page,
    )
    return await c.page(request, body, status, nonce=nonce)


async def refuse(
    c: _Console,
    request: Request,
    form: dict[str, str],
    inst: SagaInstance,
    decision: _Decision,
    message: str,
    status: int = 409,
) -> Response:
    """A refused decision's page (409): why, the saga as it is now and the
    decisions that apply, with the reason the person typed kept."""
    return await _decision_page(
        c, request, form, inst, decision, status, title="Decision refused", message=message
    )


async def confirm(
    c: _Console,
    request: Request,
    form: dict[str, str],
    inst: SagaInstance,
    decision: _Decision,
    message: str = "",
    status: int = 200,
) -> Response:
    """The confirmation of an irreversible decision: what it does, the saga's
    version it applies to and its open holds (a *force* box when they would refuse
    it); a decision that would be refused anyway gets its refusal page at once."""
    try:
        c.engine.preview(
            inst,
            decision.action,
            actor=c.who(request),
            reason=decision.reason,
            rung=decision.rung,
            force=decision.force,
        )
        holds = False
    except OpenHolds as exc:
        holds, message = True, message or str(exc)
    except (ManualActionRefused, VersionMissing) as exc:
        return await refuse(c, request, form, inst, decision, str(exc))
    return await _decision_page(
        c,
        request,
        form,
        inst,
        decision,
        status,
        title=f"Confirm {decision.action}",
        message=message,
        confirm=True,
        force_offered=holds,
        refused=status >= 400,
    )


async def confirm_discard(
    c: _Console, request: Request, form: dict[str, str], store: str, letter_id: int
) -> Response:
    """The confirmation page of a dead letter's discard, the typed reason kept."""
    token, nonce = c.csrf.issue(request, c.who(request))
    base = c.base(request)
    target = _inside(base, form, "/dead-letters")
    body = discard_page(
        base,
        store=store,
        letter_id=letter_id,
        reason=form.get("reason", "").strip(),
        csrf=token,
        next_url=target,
    )
    return await c.page(request, body, nonce=nonce)
