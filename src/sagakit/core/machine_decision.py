"""What one transition of the state machine decides, and the record it is built in.

:class:`Decision` is what a :class:`~sagakit.core.machine.Machine` method returns: the
new instance, history rows, outgoing messages, timers to set or cancel. The runtime
writes it in one local transaction. :class:`TransitionBase` accumulates those effects
on a private copy of the instance while the transition runs, and does the mechanical
moves: send a try of a step's action, status query or compensation rung (with the
timer that concludes it), finish the saga or hand it to a person. Where the saga goes
next is decided in :mod:`sagakit.core.machine` (``_Transition`` builds on this class).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagakit.core.definition import CommandAction, LocalAction, RetryPolicy, SagaView, Step
from sagakit.core.envelope import MANUAL_RETRY, Envelope, MessageKind, traceparent_for
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState, StepStatus, Timer
from sagakit.core.machine_keys import (
    DEADLINE_TIMER,
    STEP_TIMER,
    action_key,
    compensation_key,
    query_key,
)

if TYPE_CHECKING:
    from sagakit.core.machine import Machine

LOCAL_COMMAND = "sagakit.local"


@dataclass(slots=True)
class Decision:
    """What a transition decided. ``changed`` is False for stale or refused inputs."""

    instance: SagaInstance
    outgoing: list[Envelope] = field(default_factory=list)
    set_timers: list[Timer] = field(default_factory=list)
    cancel_timers: list[str] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)
    changed: bool = True


class TransitionBase:
    """Accumulates one transition's effects on a private copy of the instance."""

    def __init__(self, machine: Machine, inst: SagaInstance, now: float, cause: str | None):
        self.m = machine
        self.d = machine.definition
        self.original = inst
        self.inst = inst.copy()
        self.now = now
        self.cause = cause
        self.new_version = inst.version + 1
        self.out: list[Envelope] = []
        self.timers: list[Timer] = []
        self.cancel: list[str] = []
        self.history: list[HistoryEntry] = []

    # -- bookkeeping ------------------------------------------------------------------
    def log(self, event: str, step: str | None = None, **detail: Any) -> None:
        self.history.append(
            HistoryEntry(
                saga_id=self.inst.saga_id,
                version=self.new_version,
                at=self.now,
                event=event,
                state=self.inst.state,
                status=self.inst.status,
                step=step,
                detail=detail,
                message_id=self.cause,
            )
        )

    def unchanged(self, event: str, step: str | None, **detail: Any) -> Decision:
        """Record an input that moves nothing (stale, refused) and keep the instance."""
        self.new_version = self.original.version
        self.inst = self.original
        self.log(event, step, **detail)
        return Decision(self.original, [], [], [], self.history, False)

    def decision(self) -> Decision:
        self.inst.version = self.new_version
        self.inst.updated_at = self.now
        # A transition that cancels a timer and sets it again means "replace": keep only
        # the set, so the order a runtime applies them in cannot lose the new timer.
        setting = {t.name for t in self.timers}
        cancel = [n for n in dict.fromkeys(self.cancel) if n not in setting]
        return Decision(self.inst, self.out, self.timers, cancel, self.history, True)

    def view(self) -> SagaView:
        names = [s.name for s in self.d.steps]
        return SagaView(
            self.inst.saga_id, self.inst.business_key, self.inst.data, self.inst.results(names)
        )

    def _send(
        self,
        step: Step,
        action: CommandAction | LocalAction,
        *,
        key: str,
        attempt: int,
        compensates: str | None,
        phase: str,
    ) -> None:
        inst = self.inst
        message_id = f"{inst.saga_id}:{self.new_version}:{len(self.out)}"
        kind = MessageKind.QUERY if phase == "query" else MessageKind.COMMAND
        if isinstance(action, CommandAction):
            mtype, destination, version = action.type, action.endpoint, action.version
            payload = action.build(self.view())
            if phase == "query":
                # Tell the participant which action the question is about.
                payload["action_key"] = action_key(inst.saga_id, step.name)
        else:
            view = self.view()
            mtype, destination, version = LOCAL_COMMAND, self.m.local_endpoint, 1
            payload = {
                "definition": self.d.name,
                "definition_version": self.d.version,
                "phase": phase,
                "data": dict(view.data),
                "results": {k: dict(v) for k, v in view.results.items()},
            }
        self.out.append(
            Envelope(
                message_id=message_id,
                type=mtype,
                version=version,
                kind=kind,
                source=self.m.endpoint,
                destination=destination,
                correlation_id=inst.correlation_id,
                causation_id=self.cause,
                saga_id=inst.saga_id,
                business_key=inst.business_key,
                step=step.name,
                attempt=attempt,
                fence=self.new_version,
                idempotency_key=key,
                compensates=compensates,
                reply_to=self.m.endpoint,
                occurred_at=self.now,
                payload=payload,
                traceparent=traceparent_for(inst.correlation_id, message_id),
                headers=self._headers(step),
            )
        )

    def _headers(self, step: Step) -> dict[str, str]:
        retries = self.inst.steps[self.d.step_index(step.name)].manual_retries
        return {MANUAL_RETRY: str(retries)} if retries else {}

    def set_step_timer(self, kind: str, index: int, phase: str, attempt: int, due: float) -> None:
        st = self.inst.steps[index]
        # The step's fence floor last: a person's decision raises it, so a timer set
        # before the decision (a second worker may still fire it) never matches a try the
        # decision started, even where the decision counts tries from 1 again.
        fence = f"{kind}:{index}:{phase}:{st.rung}:{attempt}:{st.fence_floor}"
        self.timers.append(Timer(self.inst.saga_id, STEP_TIMER, due, fence))

    # -- sending tries, ending --------------------------------------------------------
    def send_try(
        self,
        index: int,
        phase: str,
        action: CommandAction | LocalAction,
        attempt: int,
        policy: RetryPolicy,
        timeout: float,
        *,
        key: str,
        compensates: str | None = None,
    ) -> None:
        """Send try ``attempt`` of step ``index``'s action, status query or compensation
        rung (``phase``), and set the timer that concludes it if no answer comes."""
        step = self.d.steps[index]
        self._send(step, action, key=key, attempt=attempt, compensates=compensates, phase=phase)
        due = self.now + policy.timeout(timeout, attempt)
        self.set_step_timer("timeout", index, phase, attempt, due)

    def dispatch_action(self, index: int) -> None:
        step, st = self.d.steps[index], self.inst.steps[index]
        st.attempt += 1
        st.status = StepStatus.RUNNING
        st.next_retry_at = None
        if st.started_at is None:
            st.started_at = self.now
        self.inst.cursor = index
        # The label in force: the step's own, else the last one before it. (After a
        # person resumed a saga its status must leave NEEDS_ATTENTION.)
        label = next(
            (s.status for s in reversed(self.d.steps[: index + 1]) if s.status is not None),
            self.d.started_status,
        )
        self.inst.status = label
        key = action_key(self.inst.saga_id, step.name)
        self.send_try(index, "action", step.action, st.attempt, step.retry, step.timeout, key=key)
        self.log("step.started", step.name, attempt=st.attempt, action=step.action.label)

    def dispatch_query(self, index: int) -> None:
        """Ask the participant what became of the step's action (its outcome is unknown)."""
        step, st = self.d.steps[index], self.inst.steps[index]
        assert step.status_query is not None
        st.queries += 1
        st.status = StepStatus.QUERYING
        st.next_retry_at = None
        key = query_key(self.inst.saga_id, step.name)
        query = step.status_query
        self.send_try(index, "query", query, st.queries, step.retry, step.timeout, key=key)
        self.log("status.queried", step.name, query=st.queries, action=step.status_query.label)

    def dispatch_compensation(self, index: int) -> None:
        step, st = self.d.steps[index], self.inst.steps[index]
        rung = step.ladder[st.rung]
        st.rung_attempt += 1
        st.status = StepStatus.COMPENSATING
        st.next_retry_at = None
        self.inst.cursor = index
        self.send_try(
            index,
            "comp",
            rung.action,
            st.rung_attempt,
            rung.retry,
            rung.timeout,
            key=compensation_key(self.inst.saga_id, step.name, st.rung),
            compensates=action_key(self.inst.saga_id, step.name),
        )
        self.log(
            "compensation.sent", step.name, rung=st.rung, attempt=st.rung_attempt, action=rung.label
        )

    def pivot_passed(self) -> bool:
        p = self.d.pivot_index
        return p is not None and self.inst.steps[p].status is StepStatus.SUCCEEDED

    def finish(self, state: SagaState, status: str, reason: str | None) -> None:
        self.inst.state = state
        self.inst.status = status
        if reason is not None:
            self.inst.reason = reason
        self.cancel.extend([STEP_TIMER, DEADLINE_TIMER])
        self.log("saga.finished", None, outcome=state.value, reason=reason)

    def needs_manual(self, reason: str, step: str | None) -> None:
        self.log("manual.escalated", step, reason=reason)
        self.finish(SagaState.FAILED_NEEDS_MANUAL, self.d.attention_status, reason)
