"""A person's decisions on a saga in the manual queue (FAILED_NEEDS_MANUAL).

:class:`ManualAction` lists what a person can decide and :func:`describe` says what
each does to the saga and to its participants (shown before a person confirms it);
:data:`IRREVERSIBLE` names the ones that only record what was done by hand and cannot
be taken back, which the API, the CLI and the console confirm explicitly.
:func:`check_manual` refuses a decision without a reason or an actor, one made on
another version of the saga (:class:`~sagakit.errors.SagaMoved`), or on a saga not
waiting for a person; :func:`resolve_manual` applies an accepted decision to the
transition in progress (:meth:`Machine.on_manual <sagakit.core.machine.Machine.on_manual>`
starts it). ``accept_partial`` is refused while :func:`open_holds` finds a
compensation or a hold still open, unless the person forces it
(:class:`~sagakit.errors.OpenHolds`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from sagakit.core.instance import SagaInstance, SagaState, StepStatus
from sagakit.core.machine_decision import Decision
from sagakit.core.machine_keys import deadline_timer
from sagakit.errors import ManualActionRefused, OpenHolds, SagaMoved

if TYPE_CHECKING:
    from sagakit.core.definition import SagaDefinition
    from sagakit.core.machine import _Transition


class ManualAction(StrEnum):
    """What a person can decide for a saga in FAILED_NEEDS_MANUAL."""

    RETRY = "retry"
    """Try the stuck step (or its compensation rung) again, with a fresh retry budget."""
    MARK_DONE = "mark_done"
    """The stuck forward step was done by hand: record it and continue forward."""
    COMPENSATE = "compensate"
    """The stuck step (at or before the pivot) is to be undone with the steps before it."""
    MARK_COMPENSATED = "mark_compensated"
    """The stuck compensation was done by hand: record it and go on undoing."""
    USE_RUNG = "use_rung"
    """Run a given rung of the stuck step's ladder (e.g. the credit note)."""
    ACCEPT_PARTIAL = "accept_partial"
    """Accept the saga as it stands: it ends PARTIAL_ACCEPTED."""


IRREVERSIBLE = frozenset(
    {ManualAction.MARK_DONE, ManualAction.MARK_COMPENSATED, ManualAction.ACCEPT_PARTIAL}
)
"""Decisions that record what a person did (or accepted) instead of making something
happen: nothing checks them and nothing can take them back, so every front end asks
for an explicit confirmation (the API's ``confirm``, the CLI's ``--yes``, the
console's confirmation step)."""

CANCEL = "cancel"
"""The one decision on a saga that is not a manual action: ask a running saga to stop."""

DESCRIPTIONS: dict[str, str] = {
    ManualAction.RETRY: "Send the stuck step again (or, while undoing, its compensation) "
    "with a fresh retry budget: its participant gets the same command, with the same "
    "idempotency key; the saga goes back to RUNNING (or COMPENSATING).",
    ManualAction.MARK_DONE: "Record that the stuck step was done by hand: nothing is sent "
    "for it and nothing checks it; the saga goes on with the next step (whose commands "
    "are sent). Cannot be taken back.",
    ManualAction.COMPENSATE: "Undo the stuck step and every done step before it: their "
    "compensations are sent to their participants, newest first; the saga ends "
    "COMPENSATED (or comes back here if an undo fails).",
    ManualAction.MARK_COMPENSATED: "Record that the stuck compensation was done by hand: "
    "nothing is sent for it and nothing checks it; the saga goes on undoing the steps "
    "before it (their compensations are sent) and ends COMPENSATED. Cannot be taken back.",
    ManualAction.USE_RUNG: "Run the chosen rung of the stuck step's compensation ladder "
    "(a refund, a credit note): its command is sent to the participant; the saga goes "
    "back to COMPENSATING.",
    ManualAction.ACCEPT_PARTIAL: "End the saga as it stands: nothing is sent and nothing "
    "is undone, so every effect still in place stays for good; the saga ends "
    "PARTIAL_ACCEPTED. Refused while a compensation or a hold is open, unless forced. "
    "Cannot be taken back.",
    CANCEL: "Ask the running saga to stop: before its point of no return the done steps "
    "are compensated (their compensations are sent) and it ends COMPENSATED; after it "
    "the cancel is refused.",
}
"""What each decision does to the saga and to its participants, keyed by the action's
name (the manual actions and ``cancel``)."""


def describe(action: ManualAction | str) -> str:
    """What ``action`` does to the saga and to its participants (for a person to read
    before confirming); :class:`ManualActionRefused` for an unknown action."""
    key = action.value if isinstance(action, ManualAction) else action
    if key not in DESCRIPTIONS:
        raise ManualActionRefused(f"unknown action {action!r}; choose from {sorted(DESCRIPTIONS)}")
    return DESCRIPTIONS[key]


def irreversible(action: ManualAction | str) -> bool:
    """Whether ``action`` needs an explicit confirmation (see :data:`IRREVERSIBLE`)."""
    return action in {a.value for a in IRREVERSIBLE}


HOLDS: dict[StepStatus, str] = {
    StepStatus.SUCCEEDED: "open",
    StepStatus.COMPENSATING: "being undone",
    StepStatus.COMPENSATION_WAITING: "undo waiting to retry",
    StepStatus.COMPENSATION_FAILED: "undo failed",
    StepStatus.UNKNOWN: "may be open (outcome unknown)",
    StepStatus.QUERYING: "may be open (asking its status)",
    StepStatus.RUNNING: "may be open (no answer yet)",
    StepStatus.WAITING_RETRY: "may be open (to be retried)",
}
"""The statuses of a step with a compensation whose effect may still be in place, and
what each says about the hold (the ones compensated, failed, skipped or never run hold
nothing)."""


def open_holds(definition: SagaDefinition, inst: SagaInstance) -> list[tuple[str, str]]:
    """``(step, what)`` of the steps with a compensation whose effect may still be in
    place and that are not undone: an authorisation not voided, stock still reserved,
    an undo in flight or failed.

    Once the pivot succeeded, the steps before it that succeeded are not holds: the saga
    is past its point of no return and keeps them (nothing will compensate them).
    """
    p = definition.pivot_index
    committed = (
        p is not None and p < len(inst.steps) and inst.steps[p].status is StepStatus.SUCCEEDED
    )
    out: list[tuple[str, str]] = []
    for index, (step, st) in enumerate(zip(definition.steps, inst.steps, strict=False)):
        if not step.ladder or st.status not in HOLDS:
            continue
        if committed and p is not None and index < p and st.status is StepStatus.SUCCEEDED:
            continue
        out.append((step.name, HOLDS[st.status]))
    return out


def holds_refusal(saga_id: str, holds: list[tuple[str, str]]) -> OpenHolds:
    """The refusal of an ``accept_partial`` that would leave ``holds`` open for good."""
    listed = ", ".join(f"{name} {what}" for name, what in holds)
    return OpenHolds(
        f"accept_partial refused on saga {saga_id}: a compensation or a hold is still open "
        f"({listed}); accepting the saga as it stands would leave it so for good. Undo it "
        "first (retry, use_rung, compensate, or mark_compensated once done by hand), or "
        "force the decision with a reason that says why it must stay",
        holds=holds,
    )


def manual_action(action: ManualAction | str) -> ManualAction:
    """``action`` as a :class:`ManualAction`; :class:`ManualActionRefused` if unknown."""
    try:
        return ManualAction(action)
    except ValueError:
        raise ManualActionRefused(
            f"unknown manual action {action!r}; choose from {[a.value for a in ManualAction]}"
        ) from None


def check_version(inst: SagaInstance, expected_version: int | None) -> None:
    """:class:`~sagakit.errors.SagaMoved` when a decision made on ``expected_version``
    meets the saga at another version (None: the caller decided on no version)."""
    if expected_version is not None and expected_version != inst.version:
        raise SagaMoved(
            f"saga {inst.saga_id} moved since this decision was made on its version "
            f"{expected_version}: it is at version {inst.version} now "
            f"({inst.state.value}, {inst.status}); look at it again, then decide",
            expected=expected_version,
            current=inst.version,
        )


def check_manual(
    inst: SagaInstance, *, reason: str, actor: str, expected_version: int | None = None
) -> None:
    """Refuse a manual action without a reason or an actor, made on another version of
    the saga than ``expected_version`` (when given), or on a saga not waiting for a
    person (FAILED_NEEDS_MANUAL)."""
    if not reason or not reason.strip():
        raise ManualActionRefused("a manual action needs a reason (it is audited)")
    if not actor or not actor.strip():
        raise ManualActionRefused("a manual action needs the actor who decided it")
    # Before the state check: a saga another person just resolved is best explained
    # as "it moved", not as "it is not in the manual queue".
    check_version(inst, expected_version)
    if inst.state is not SagaState.FAILED_NEEDS_MANUAL:
        raise ManualActionRefused(
            f"saga {inst.saga_id} is {inst.state.value}; only FAILED_NEEDS_MANUAL sagas "
            "take manual actions"
        )


def resolve_manual(
    t: _Transition,
    action: ManualAction,
    *,
    reason: str,
    actor: str,
    rung: int | None,
    force: bool = False,
) -> Decision:
    """Apply a person's decision (already checked by :func:`check_manual`) to the
    transition ``t``; audited in history.

    Raises :class:`~sagakit.errors.ManualActionRefused` when the action does not fit
    the saga's state (the message says why and what would), and its subclass
    :class:`~sagakit.errors.OpenHolds` for an ``accept_partial`` while
    :func:`open_holds` finds any, unless ``force``.
    """
    inst, d, now = t.original, t.d, t.now
    holds = open_holds(d, inst) if action is ManualAction.ACCEPT_PARTIAL else []
    if holds and not force:
        raise holds_refusal(inst.saga_id, holds)
    index = inst.cursor
    step = d.steps[index]
    undoing = inst.steps[index].status in (
        StepStatus.COMPENSATION_FAILED,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATION_WAITING,
    )
    st = t.inst.steps[index]
    st.fence_floor = t.new_version
    t.log(
        "manual.resolved",
        step.name,
        action=action.value,
        actor=actor,
        reason=reason,
        rung=rung,
        previous_reason=inst.reason,
        **({"forced": True, "holds_left_open": [f"{n} {w}" for n, w in holds]} if holds else {}),
    )

    def refuse(why: str) -> ManualActionRefused:
        return ManualActionRefused(f"{action.value} does not apply to saga {inst.saga_id}: {why}")

    if action is ManualAction.ACCEPT_PARTIAL:
        t.finish(SagaState.PARTIAL_ACCEPTED, d.partial_status, f"accepted by {actor}: {reason}")
    elif action is ManualAction.RETRY:
        t.inst.reason = None
        st.manual_retries += 1
        if undoing:
            t.inst.state = SagaState.COMPENSATING
            t.inst.status = d.cancelling_status
            st.rung_attempt = 0
            t.dispatch_compensation(index)
        else:
            t.inst.state = SagaState.RUNNING
            st.retry_base = st.attempt
            st.queries = 0
            t.dispatch_action(index)
    elif action is ManualAction.MARK_DONE:
        if undoing:
            raise refuse(f"step {step.name!r} is being compensated; use mark_compensated")
        st.status = StepStatus.SUCCEEDED
        st.result = {"resolved_by": actor, "reason": reason}
        st.finished_at = now
        t.inst.state = SagaState.RUNNING
        t.inst.reason = None
        t.advance(index)
    elif action is ManualAction.COMPENSATE:
        if undoing:
            raise refuse(f"step {step.name!r} is already being compensated")
        if d.pivot_index is not None and index > d.pivot_index:
            raise refuse(f"step {step.name!r} is past the pivot; nothing after it is undone")
        if st.status is not StepStatus.SUCCEEDED:
            st.status = StepStatus.UNKNOWN if step.ladder else StepStatus.FAILED
        t.begin_compensation(index, f"compensation decided by {actor}: {reason}")
    elif action is ManualAction.MARK_COMPENSATED:
        if not undoing:
            raise refuse(f"step {step.name!r} is not being compensated")
        st.status = StepStatus.COMPENSATED
        st.finished_at = now
        t.inst.state = SagaState.COMPENSATING
        t.inst.status = d.cancelling_status
        t.inst.reason = f"compensated by hand ({actor}): {reason}"
        t.next_compensation(index - 1)
    else:  # USE_RUNG
        if not undoing:
            raise refuse(f"step {step.name!r} is not being compensated")
        if rung is None or not 0 <= rung < len(step.ladder):
            rungs = [f"{i}: {r.label}" for i, r in enumerate(step.ladder)]
            raise refuse(f"rung must be one of {rungs}, got {rung!r}")
        st.rung = rung
        st.rung_attempt = 0
        st.manual_retries += 1
        t.inst.state = SagaState.COMPENSATING
        t.inst.status = d.cancelling_status
        t.dispatch_compensation(index)
    if t.inst.state is SagaState.COMPENSATING and t.inst.deadline_at is not None:
        # A compensation runs past any deadline, so none is in force any more; a
        # deadline timer read before the decision then finds it gone and is stale.
        t.inst.deadline_at = None
    if t.inst.state is SagaState.RUNNING and d.deadline is not None:
        # Going to the manual queue cancelled the deadline. A saga a person sends
        # forward again gets its SLA back, counted from the decision: otherwise it
        # could wait on a slow participant with nobody told. (A compensation keeps
        # running past any deadline, so a saga sent back to compensating gets none.)
        t.inst.timed_out = False
        t.inst.deadline_at = now + d.deadline
        t.timers.append(deadline_timer(inst.saga_id, t.inst.deadline_at))
        t.log("deadline.set", None, deadline_at=t.inst.deadline_at)
    return t.decision()
