"""A person's decisions on a saga in the manual queue (FAILED_NEEDS_MANUAL).

:class:`ManualAction` lists what a person can decide; :func:`check_manual` refuses a
decision without a reason or an actor, or on a saga not waiting for a person; and
:func:`resolve_manual` applies an accepted decision to the transition in progress
(:meth:`Machine.on_manual <sagakit.core.machine.Machine.on_manual>` starts it).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from sagakit.core.instance import SagaInstance, SagaState, StepStatus
from sagakit.core.machine_decision import Decision
from sagakit.core.machine_keys import deadline_timer
from sagakit.errors import ManualActionRefused

if TYPE_CHECKING:
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


def manual_action(action: ManualAction | str) -> ManualAction:
    """``action`` as a :class:`ManualAction`; :class:`ManualActionRefused` if unknown."""
    try:
        return ManualAction(action)
    except ValueError:
        raise ManualActionRefused(
            f"unknown manual action {action!r}; choose from {[a.value for a in ManualAction]}"
        ) from None


def check_manual(inst: SagaInstance, *, reason: str, actor: str) -> None:
    """Refuse a manual action without a reason or an actor, or on a saga not waiting
    for a person (FAILED_NEEDS_MANUAL)."""
    if not reason or not reason.strip():
        raise ManualActionRefused("a manual action needs a reason (it is audited)")
    if not actor or not actor.strip():
        raise ManualActionRefused("a manual action needs the actor who decided it")
    if inst.state is not SagaState.FAILED_NEEDS_MANUAL:
        raise ManualActionRefused(
            f"saga {inst.saga_id} is {inst.state.value}; only FAILED_NEEDS_MANUAL sagas "
            "take manual actions"
        )


def resolve_manual(
    t: _Transition, action: ManualAction, *, reason: str, actor: str, rung: int | None
) -> Decision:
    """Apply a person's decision (already checked by :func:`check_manual`) to the
    transition ``t``; audited in history.

    Raises :class:`~sagakit.errors.ManualActionRefused` when the action does not fit
    the saga's state (the message says why and what would).
    """
    inst, d, now = t.original, t.d, t.now
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
