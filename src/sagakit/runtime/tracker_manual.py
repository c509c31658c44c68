"""A person's decision on a choreography's saga view (what the manual queue can do).

A :class:`~sagakit.runtime.tracker.Tracker` view is not driven by anyone: the services
react to each other's facts and the tracker only writes down what it heard. So the
actions of an orchestrated saga that *make something happen* (retry a step, start the
compensation, use a rung of a ladder, cancel) have nothing to act through here, and
are refused with :class:`~sagakit.errors.NoDriver`, which says so. What remains is
recording what a person did by hand in the services, so that the view tells the truth
and leaves the queue:

* ``mark_done``: the flow was finished by hand; the view ends SUCCEEDED (not allowed
  when the flow was undoing itself: a half-undone order is not completed);
* ``mark_compensated``: whatever had happened was undone by hand; it ends COMPENSATED;
* ``accept_partial``: the order stays as it is; it ends PARTIAL_ACCEPTED. Refused
  while the flow was undoing itself and an effect is still in place
  (:func:`view_holds`), unless the person forces it.

Each needs a reason and an actor, written with the previous reason in a
``manual.resolved`` history row, in the same transaction as the new state, and may
carry the view's version the person decided on: a view that moved since (a fact
heard meanwhile) is refused with :class:`~sagakit.errors.SagaMoved`.
:data:`VIEW_DESCRIPTIONS` says what each does, for a person to read before confirming.
"""

from __future__ import annotations

from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState, StepStatus
from sagakit.core.machine import ManualAction, check_manual, manual_action
from sagakit.core.machine_manual import holds_refusal
from sagakit.errors import ManualActionRefused, NoDriver, SagaNotFound
from sagakit.metrics import record_history
from sagakit.runtime.tracker import TrackedFlow, Tracker

VIEW_ACTIONS = (ManualAction.MARK_DONE, ManualAction.MARK_COMPENSATED, ManualAction.ACCEPT_PARTIAL)
"""The manual actions a choreography's view takes: records of what a person did."""

_HAPPENED = (StepStatus.SUCCEEDED, StepStatus.COMPENSATION_FAILED)
"""Step statuses whose effect is still in place (undone by a ``mark_compensated``)."""


VIEW_DESCRIPTIONS: dict[str, str] = {
    ManualAction.MARK_DONE: "Record that the flow was finished by hand: every step not "
    "done is marked done by you; no message is sent to any service; the view ends "
    "SUCCEEDED. Cannot be taken back.",
    ManualAction.MARK_COMPENSATED: "Record that every done step was undone by hand: no "
    "compensation is sent (nothing drives this flow); the view ends COMPENSATED. Cannot "
    "be taken back.",
    ManualAction.ACCEPT_PARTIAL: "End the view as it stands: nothing is sent and nothing "
    "is undone; the view ends PARTIAL_ACCEPTED. Refused while an undo is unfinished, "
    "unless forced. Cannot be taken back.",
}
"""What each view action does (a record of what a person did; nothing is sent)."""

_UNDOING = (StepStatus.COMPENSATING, StepStatus.COMPENSATION_WAITING)
"""Step statuses of an undo in flight."""


def view_holds(flow: TrackedFlow, inst: SagaInstance) -> list[tuple[str, str]]:
    """``(step, what)`` that an ``accept_partial`` would leave open for good: an undo in
    flight or failed, and, once the flow began undoing itself, each step whose effect is
    still in place. (A flow stopped on its way forward holds what a person accepts.)"""
    back = undoing(flow, inst)
    out: list[tuple[str, str]] = []
    for name, st in zip(flow.steps, inst.steps, strict=False):
        if st.status in _UNDOING:
            out.append((name, "being undone"))
        elif st.status is StepStatus.COMPENSATION_FAILED:
            out.append((name, "undo failed"))
        elif back and st.status is StepStatus.SUCCEEDED:
            out.append((name, "open"))
    return out


def no_driver(flow: TrackedFlow, saga_id: str, what: str) -> NoDriver:
    """The refusal of an action that needs someone to drive the saga."""
    allowed = ", ".join(a.value for a in VIEW_ACTIONS)
    return NoDriver(
        f"{what} does not apply to saga {saga_id}: it is a view of the choreography "
        f"{flow.definition}, which no process drives (the services react to each other's "
        f"facts; the tracker only records them), so nothing here can send, repeat or undo "
        f"a step. Fix it in the services, then record what was done: {allowed}"
    )


def undoing(flow: TrackedFlow, inst: SagaInstance) -> bool:
    """True when the flow had begun undoing itself (a failure or an undo was heard).

    Mirrors the tracker: a failure that is not a "person must decide" fact starts the
    compensation, and any undo fact belongs to one.
    """
    for event_type in inst.data.get("facts", {}):
        fact = flow.facts.get(event_type)
        if fact is None:
            continue
        if fact.outcome in (StepStatus.COMPENSATED, StepStatus.COMPENSATION_FAILED):
            return True
        if fact.outcome is StepStatus.FAILED and not fact.manual:
            return True
    return False


def available(flow: TrackedFlow, inst: SagaInstance) -> list[ManualAction]:
    """The view actions that apply to ``inst`` now (none unless it waits for a person)."""
    if inst.state is not SagaState.FAILED_NEEDS_MANUAL:
        return []
    if undoing(flow, inst):
        return [ManualAction.MARK_COMPENSATED, ManualAction.ACCEPT_PARTIAL]
    return list(VIEW_ACTIONS)


def resolve_view(
    flow: TrackedFlow,
    inst: SagaInstance,
    action: ManualAction | str,
    *,
    reason: str,
    actor: str,
    now: float,
    expected_version: int | None = None,
    force: bool = False,
) -> tuple[SagaInstance, list[HistoryEntry]]:
    """Apply a person's record to a view: a pure function (the new view, its history rows).

    Raises :class:`~sagakit.errors.NoDriver` for the actions that need a driver,
    :class:`~sagakit.errors.SagaMoved` when ``expected_version`` is not the view's,
    :class:`~sagakit.errors.OpenHolds` for an ``accept_partial`` that would leave
    :func:`view_holds` open (unless ``force``) and
    :class:`~sagakit.errors.ManualActionRefused` when the action does not fit the view.
    """
    action = manual_action(action)
    if action not in VIEW_ACTIONS:
        raise no_driver(flow, inst.saga_id, action.value)
    check_manual(inst, reason=reason, actor=actor, expected_version=expected_version)
    holds = view_holds(flow, inst) if action is ManualAction.ACCEPT_PARTIAL else []
    if holds and not force:
        raise holds_refusal(inst.saga_id, holds)
    new = inst.copy()
    new.version, new.updated_at = inst.version + 1, now
    new.data = {**inst.data, "finished_at": now}
    by_hand = {"resolved_by": actor, "reason": reason}
    if action is ManualAction.MARK_DONE:
        if undoing(flow, inst):
            raise ManualActionRefused(
                f"mark_done does not apply to saga {inst.saga_id}: the flow was undoing "
                "itself when it stopped; use mark_compensated (undone by hand) or "
                "accept_partial"
            )
        for st in new.steps:
            if st.status is not StepStatus.SUCCEEDED:
                st.status, st.result, st.finished_at = StepStatus.SUCCEEDED, by_hand, now
        state, status, new.reason = SagaState.SUCCEEDED, flow.completed_status, None
    elif action is ManualAction.MARK_COMPENSATED:
        for st in new.steps:
            if st.status in _HAPPENED:
                st.status, st.result, st.finished_at = StepStatus.COMPENSATED, by_hand, now
        state, status, new.reason = SagaState.COMPENSATED, flow.cancelled_status, None
    else:
        state, status = SagaState.PARTIAL_ACCEPTED, flow.partial_status
        new.reason = f"accepted by {actor}: {reason}"
    new.state, new.status = state, status
    detail: dict[str, object] = {
        "action": action.value,
        "actor": actor,
        "reason": reason,
        "by_hand": True,
    }
    if holds:
        detail.update(forced=True, holds_left_open=[f"{n} {w}" for n, w in holds])
    rows = [
        HistoryEntry(
            new.saga_id,
            new.version,
            now,
            "manual.resolved",
            state,
            status,
            None,
            {**detail, "previous_reason": inst.reason},
        ),
        HistoryEntry(
            new.saga_id,
            new.version,
            now,
            "saga.finished",
            state,
            status,
            None,
            {"outcome": state.value, "reason": new.reason},
        ),
    ]
    return new, rows


async def resolve_tracked(
    tracker: Tracker,
    saga_id: str,
    action: ManualAction | str,
    *,
    reason: str,
    actor: str,
    expected_version: int | None = None,
    force: bool = False,
) -> SagaInstance:
    """Load the view from the tracker's store, apply :func:`resolve_view`, write it.

    One transaction, version-checked: a fact the tracker applied meanwhile makes it
    fail with :class:`~sagakit.errors.ConcurrencyError` rather than hide that fact,
    and a view at another version than ``expected_version`` (the one the person
    decided on) with :class:`~sagakit.errors.SagaMoved`.
    """
    now = tracker.clock()
    async with tracker.transaction() as tx:
        inst = await tx.saga_get(saga_id)
        if inst is None:
            raise SagaNotFound(f"no saga {saga_id!r}")
        new, rows = resolve_view(
            tracker.flow,
            inst,
            action,
            reason=reason,
            actor=actor,
            now=now,
            expected_version=expected_version,
            force=force,
        )
        await tx.saga_update(new, inst.version)
        await tx.history_add(rows)
        record_history(new, tracker.flow.steps, rows)
    # Wake whoever follows the saga in this process (console pages, event streams).
    tracker.wakeups.notify(f"sagas:{tracker.store.name}")
    return new
