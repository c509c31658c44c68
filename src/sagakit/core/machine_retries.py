"""How the state machine tries again: status queries, retries, the next rung.

:class:`RetryRules` is the part of :class:`~sagakit.core.machine.Machine` that asks a
step's status again (or gives the question to a person when the queries run out),
schedules the retry of an action or a compensation rung, and moves a compensation to
the next rung of its ladder after a definite failure (a person decides when none is
left). Each method works on the transition in progress (``t``) and records what it
decided there; what the answers mean is judged in :mod:`sagakit.core.machine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagakit.core.definition import SagaDefinition
from sagakit.core.instance import StepStatus

if TYPE_CHECKING:
    from sagakit.core.machine import _Transition


class RetryRules:
    """Trying again; a base of :class:`~sagakit.core.machine.Machine`."""

    definition: SagaDefinition

    def _query_again(self, t: _Transition, index: int, why: str) -> None:
        step, st = self.definition.steps[index], t.inst.steps[index]
        if st.next_retry_at is not None:
            # The retry wait is over: ask again.
            t.dispatch_query(index)
            return
        if st.queries >= step.retry.max_attempts:
            t.needs_manual(
                f"outcome of step {step.name!r} still unknown after {st.queries} status "
                f"queries: {why}",
                step.name,
            )
            return
        st.next_retry_at = t.now + step.retry.backoff(st.queries, f"{t.inst.saga_id}:{step.name}:q")
        t.set_step_timer("retry", index, "query", st.queries, st.next_retry_at)
        t.log("retry.scheduled", step.name, phase="query", attempt=st.queries, reason=why)

    def _schedule_retry(
        self, t: _Transition, index: int, phase: str, delay: float, reason: str
    ) -> None:
        st = t.inst.steps[index]
        st.status = (
            StepStatus.WAITING_RETRY if phase == "action" else StepStatus.COMPENSATION_WAITING
        )
        st.next_retry_at = t.now + delay
        attempt = st.attempt if phase == "action" else st.rung_attempt
        t.set_step_timer("retry", index, phase, attempt, st.next_retry_at)
        t.log(
            "retry.scheduled",
            self.definition.steps[index].name,
            phase=phase,
            attempt=attempt,
            delay=round(delay, 4),
            reason=reason,
        )

    def _next_rung(self, t: _Transition, index: int, reason: str) -> None:
        step, st = self.definition.steps[index], t.inst.steps[index]
        if st.rung + 1 < len(step.ladder):
            st.rung += 1
            st.rung_attempt = 0
            t.log(
                "compensation.escalated", step.name, rung=st.rung, action=step.ladder[st.rung].label
            )
            t.dispatch_compensation(index)
            return
        st.status = StepStatus.COMPENSATION_FAILED
        t.needs_manual(
            f"compensation of step {step.name!r} failed on every rung: {reason}", step.name
        )
