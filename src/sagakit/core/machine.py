"""The saga state machine: a pure function from (instance, input) to a decision.

No I/O happens here. The runtime loads the instance, calls one of :class:`Machine`'s
methods with the current time, and writes the returned :class:`Decision` (new
instance, history rows, outgoing messages, timers to set or cancel) in one local
transaction. Message ids are derived from the saga id and the new version, so a
transition recomputed after a crash emits the very same messages.

Rules worth knowing (they are the safety of the whole engine):

* A reply for a step the saga is no longer waiting on is *stale*: it is recorded in
  history and moves nothing. A late success of a step that is being compensated needs
  no special case, because the step's compensation is sent whenever its action *may*
  have happened, and the participant serialises action and compensation on the same
  idempotency key (a compensation that arrives first leaves a tombstone).
* A timed-out action is retried with the same idempotency key; when attempts run out
  its outcome is UNKNOWN: before the pivot it is compensated with the others, at or
  after the pivot a person decides.
* Only a definite failure moves a compensation to the next rung of its ladder. A rung
  whose outcome stays unknown goes to a person: refunding money whose void may have
  succeeded would pay the customer twice.

The machine's parts live beside it: the idempotency keys and timer names in
:mod:`~sagakit.core.machine_keys`; :class:`Decision` and the mechanics of one
transition (recording history, sending a try with its timeout timer, ending the saga)
in :mod:`~sagakit.core.machine_decision`; asking again, retrying and the next rung of
a ladder in :mod:`~sagakit.core.machine_retries`; a person's decisions in
:mod:`~sagakit.core.machine_manual`. This module keeps the machine's inputs and the
rules above: which answers and timers count, what an outcome means, where the saga
goes next. Every name of those modules that callers use is importable from here too.
"""

from __future__ import annotations

from typing import Any

from sagakit.core.definition import SagaDefinition
from sagakit.core.envelope import Envelope, Outcome
from sagakit.core.instance import (
    MAY_HAVE_EFFECT,
    SagaInstance,
    SagaState,
    StepState,
    StepStatus,
    Timer,
)
from sagakit.core.machine_decision import LOCAL_COMMAND, Decision, TransitionBase
from sagakit.core.machine_keys import (
    DEADLINE_TIMER,
    STEP_TIMER,
    KeyParts,
    _deadline_of,
    action_key,
    compensation_key,
    deadline_timer,
    parse_key,
    query_key,
)
from sagakit.core.machine_manual import (
    IRREVERSIBLE,
    ManualAction,
    check_manual,
    check_version,
    describe,
    manual_action,
    open_holds,
    resolve_manual,
)
from sagakit.core.machine_retries import RetryRules
from sagakit.errors import DefinitionError, MessageError

__all__ = [
    "DEADLINE_TIMER",
    "IRREVERSIBLE",
    "LOCAL_COMMAND",
    "STEP_TIMER",
    "Decision",
    "KeyParts",
    "Machine",
    "ManualAction",
    "action_key",
    "check_manual",
    "check_version",
    "compensation_key",
    "deadline_timer",
    "describe",
    "manual_action",
    "open_holds",
    "parse_key",
    "query_key",
]


class _Transition(TransitionBase):
    """Accumulates one transition's effects on a private copy of the instance, and
    decides where the saga goes next: on to the next step or back through the
    compensations, and what to do when a step's outcome is in doubt."""

    # -- forward ----------------------------------------------------------------------
    def advance(self, index: int) -> None:
        """Step ``index`` is settled (succeeded or skipped): move to the next one."""
        inst = self.inst
        nxt = index + 1
        if inst.cancel_requested and not self.pivot_passed():
            self.begin_compensation(index, inst.reason or "cancelled")
            return
        if nxt == len(self.d.steps):
            if any(s.status is StepStatus.SKIPPED for s in inst.steps):
                self.finish(SagaState.PARTIAL_ACCEPTED, self.d.partial_status, None)
            else:
                self.finish(SagaState.SUCCEEDED, self.d.completed_status, None)
            return
        self.dispatch_action(nxt)

    def outcome_unknown(self, index: int, reason: str) -> None:
        """The action may or may not have happened: ask, or make it safe, or ask a person.

        With a status query the participant is asked. Without one, a step before the
        pivot is compensated with the others (its compensation undoes the effect or
        tombstones the key); at or after the pivot, guessing could lose money, so a
        person decides.
        """
        step, st = self.d.steps[index], self.inst.steps[index]
        st.status = StepStatus.UNKNOWN
        st.error = reason
        self.log("outcome.unknown", step.name, reason=reason)
        if step.status_query is not None:
            st.queries = 0
            self.dispatch_query(index)
        elif self.d.pivot_index is not None and index >= self.d.pivot_index:
            self.needs_manual(reason, step.name)
        else:
            self.begin_compensation(index, reason)

    # -- backward ---------------------------------------------------------------------
    def begin_compensation(self, from_index: int, reason: str) -> None:
        inst = self.inst
        inst.state = SagaState.COMPENSATING
        inst.reason = reason
        inst.status = self.d.cancelling_status
        self.cancel.append(STEP_TIMER)
        first = self.d.steps[from_index].name if from_index >= 0 else None
        self.log("compensation.started", None, reason=reason, from_step=first)
        self.next_compensation(from_index)

    def next_compensation(self, start: int) -> None:
        for k in range(start, -1, -1):
            st = self.inst.steps[k]
            if st.status in (StepStatus.RUNNING, StepStatus.WAITING_RETRY):
                # Cancelled or failed around a step in flight: its effect is unknown.
                st.status = StepStatus.UNKNOWN
            if st.status in MAY_HAVE_EFFECT and self.d.steps[k].ladder:
                st.rung = 0
                st.rung_attempt = 0
                self.dispatch_compensation(k)
                return
        state = SagaState.TIMED_OUT if self.inst.timed_out else SagaState.COMPENSATED
        self.finish(state, self.d.cancelled_status, None)


class Machine(RetryRules):
    """The transition function of one saga definition.

    ``endpoint`` is where replies come back to; local steps are sent to
    ``endpoint + ".local"``.
    """

    def __init__(self, definition: SagaDefinition, endpoint: str = "orchestrator") -> None:
        self.definition = definition
        self.endpoint = endpoint
        self.local_endpoint = f"{endpoint}.local"
        self.step_names = [step.name for step in definition.steps]

    # -- inputs -----------------------------------------------------------------------
    def start(
        self,
        saga_id: str,
        business_key: str,
        data: dict[str, Any],
        now: float,
        *,
        correlation_id: str | None = None,
    ) -> Decision:
        """Create the instance and send the first step."""
        d = self.definition
        inst = SagaInstance(
            saga_id=saga_id,
            definition=d.name,
            definition_version=d.version,
            business_key=business_key,
            correlation_id=correlation_id or saga_id,
            state=SagaState.RUNNING,
            status=d.started_status,
            data=data,
            steps=[StepState() for _ in d.steps],
            created_at=now,
            updated_at=now,
            version=0,
            deadline_at=None if d.deadline is None else now + d.deadline,
        )
        t = _Transition(self, inst, now, None)
        t.log("saga.started", None, definition=d.key, business_key=business_key)
        if t.inst.deadline_at is not None:
            t.timers.append(deadline_timer(saga_id, t.inst.deadline_at))
        t.dispatch_action(0)
        return t.decision()

    def on_reply(self, inst: SagaInstance, reply: Envelope, now: float) -> Decision:
        """Apply a participant's reply (or a local step's result)."""
        if reply.idempotency_key is None:
            raise MessageError(f"reply {reply.message_id} has no idempotency_key")
        key = parse_key(reply.idempotency_key)
        if key.saga_id != inst.saga_id:
            raise MessageError(
                f"reply {reply.message_id} is for saga {key.saga_id}, not {inst.saga_id}"
            )
        outcome = Outcome.from_payload(reply.payload)
        d = self.definition
        try:
            index = d.step_index(key.step)
        except DefinitionError as exc:
            raise MessageError(f"reply {reply.message_id}: {exc}") from None
        step, st = d.steps[index], inst.steps[index]
        t = _Transition(self, inst, now, reply.message_id)
        # No separate check for a saga that already ended: every phase below waits only
        # in RUNNING or COMPENSATING, so such a reply is stale anyway, and ``_stale``
        # records why in words an operator reads ("saga is already COMPENSATED"). (A
        # guard here was redundant: no proof could tell the code with it from without.)
        if reply.fence < st.fence_floor:
            why = "answers a try sent before a person resumed the step"
            return self._stale(t, key.step, why, reply, outcome)
        if key.phase == "action":
            # ``inst.cursor == index`` here and in the compensation check below is
            # redundant by construction: only the cursor's step is ever RUNNING,
            # WAITING_RETRY, QUERYING, COMPENSATING or COMPENSATION_WAITING (dispatching
            # moves the cursor; compensating turns a step in flight UNKNOWN). No checker
            # scenario can tell it apart; kept as a cheap statement of intent.
            waiting = (
                inst.state is SagaState.RUNNING
                and inst.cursor == index
                and st.status in (StepStatus.RUNNING, StepStatus.WAITING_RETRY)
            )
            # Any success of the action counts (every attempt shares one idempotency
            # key, so they report one effect); a failure counts only for the current try.
            # A failure counts only for the try in flight: a duplicate of the failure that
            # put the step in WAITING_RETRY must not schedule the retry again.
            if not waiting or (
                not outcome.ok
                and (reply.attempt != st.attempt or st.status is not StepStatus.RUNNING)
            ):
                return self._stale(t, key.step, "not waiting for this action", reply, outcome)
            self._on_action_outcome(t, index, outcome)
            return t.decision()
        if key.phase == "query":
            waiting = (
                inst.state is SagaState.RUNNING
                and inst.cursor == index
                and st.status is StepStatus.QUERYING
                and reply.attempt == st.queries
                and st.next_retry_at is None
            )
            if not waiting:
                return self._stale(
                    t, key.step, "not waiting for this status answer", reply, outcome
                )
            self._on_status_answer(t, index, outcome)
            return t.decision()
        waiting = (
            inst.state is SagaState.COMPENSATING
            and inst.cursor == index
            and st.status in (StepStatus.COMPENSATING, StepStatus.COMPENSATION_WAITING)
            and st.rung == key.rung
        )
        if not waiting or (
            not outcome.ok
            and (reply.attempt != st.rung_attempt or st.status is not StepStatus.COMPENSATING)
        ):
            return self._stale(t, key.step, "not waiting for this compensation", reply, outcome)
        ts = t.inst.steps[index]
        if outcome.ok:
            ts.status = StepStatus.COMPENSATED
            ts.finished_at = now
            t.cancel.append(STEP_TIMER)
            t.log("compensation.succeeded", step.name, rung=key.rung, result=outcome.result)
            t.next_compensation(index - 1)
            return t.decision()
        ts.error = outcome.reason
        rung = step.ladder[ts.rung]
        if outcome.retryable and ts.rung_attempt < rung.retry.max_attempts:
            seed = f"{inst.saga_id}:{step.name}:comp:{ts.rung}"
            delay = rung.retry.backoff(ts.rung_attempt, seed)
            self._schedule_retry(t, index, "comp", delay, outcome.reason)
            return t.decision()
        t.log("compensation.failed", step.name, rung=ts.rung, reason=outcome.reason)
        if outcome.retryable:
            # Out of attempts on "try again": an earlier try may have worked. Only a
            # definite failure may move down the ladder (refunding money whose void went
            # through would pay twice), so a person decides.
            ts.status = StepStatus.COMPENSATION_FAILED
            t.needs_manual(
                f"compensation {rung.label} of step {step.name!r} failed {ts.rung_attempt} "
                f"times: {outcome.reason}; outcome unknown",
                step.name,
            )
            return t.decision()
        self._next_rung(t, index, outcome.reason)
        return t.decision()

    def on_timer(self, inst: SagaInstance, timer: Timer, now: float) -> Decision:
        """Apply a fired timer; a timer fenced to an earlier step or attempt is stale."""
        t = _Transition(self, inst, now, None)
        d = self.definition
        if inst.terminal:
            return self._stale_timer(t, timer, f"saga is already {inst.state.value}")
        if timer.name == DEADLINE_TIMER:
            set_for = _deadline_of(timer.fence)
            if set_for is not None and set_for != inst.deadline_at:
                # A person's decision since gave the saga a new deadline, or none (it sent
                # the saga back to compensating); this timer was read before it.
                return self._stale_timer(t, timer, "its deadline is no longer in force")
            # Observable only in history: a second firing (another worker's copy) while
            # compensating would log the deadline again and bump the version, nothing
            # else (terminal sagas are refused above; a person's decision that sends the
            # saga forward resets ``timed_out`` with a new deadline). Kept so the
            # deadline is counted once.
            if inst.timed_out:
                return self._stale_timer(t, timer, "the deadline already passed")
            t.inst.timed_out = True
            t.log("deadline.passed", None)
            if inst.state is SagaState.COMPENSATING:
                return t.decision()  # compensation keeps going; it is never skipped
            p = d.pivot_index
            if (
                p is not None
                and inst.cursor >= p
                and inst.steps[p].status is not StepStatus.PENDING
            ):
                current = t.inst.steps[inst.cursor]
                if current.status in (StepStatus.RUNNING, StepStatus.WAITING_RETRY):
                    current.status = StepStatus.UNKNOWN
                name = d.steps[inst.cursor].name
                t.needs_manual(
                    f"deadline passed at or after the pivot (step {name!r} not done)", name
                )
                return t.decision()
            t.begin_compensation(inst.cursor, "deadline passed")
            return t.decision()
        try:
            kind, idx, phase, rung_s, attempt_s, *floor_s = timer.fence.split(":")
            index, rung, attempt = int(idx), int(rung_s), int(attempt_s)
            floor = int(floor_s[0]) if floor_s else 0  # fences set before 0.x had none
        except (ValueError, IndexError):
            return self._stale_timer(t, timer, f"unreadable fence {timer.fence!r}")
        if kind not in ("timeout", "retry") or phase not in ("action", "comp", "query"):
            return self._stale_timer(t, timer, f"unknown fence {timer.fence!r}")
        # ``index != inst.cursor`` is redundant with the phase checks below (only the
        # cursor's step has a status a timer acts on); kept for the clearer reason.
        if index != inst.cursor or not 0 <= index < len(d.steps):
            return self._stale_timer(t, timer, "saga moved to another step")
        step, st = d.steps[index], inst.steps[index]
        if floor < st.fence_floor:
            return self._stale_timer(t, timer, "set before a person decided on the step")
        if phase == "query":
            if (
                inst.state is not SagaState.RUNNING
                or st.status is not StepStatus.QUERYING
                or st.queries != attempt
                or (kind == "retry") != (st.next_retry_at is not None)
            ):
                return self._stale_timer(t, timer, "status query moved on")
            if kind == "timeout":
                t.log("status.timed_out", step.name, query=attempt)
            self._query_again(t, index, "no answer to the status query")
            return t.decision()
        if phase == "action":
            expect = StepStatus.RUNNING if kind == "timeout" else StepStatus.WAITING_RETRY
            if (
                inst.state is not SagaState.RUNNING
                or st.status is not expect
                or st.attempt != attempt
            ):
                return self._stale_timer(t, timer, "step moved on")
            if kind == "retry":
                t.dispatch_action(index)
                return t.decision()
            t.log("step.timed_out", step.name, attempt=attempt)
            if st.attempts_used < step.retry.max_attempts:
                t.dispatch_action(index)  # same idempotency key: the participant answers once
                return t.decision()
            t.outcome_unknown(
                index, f"step {step.name!r} timed out {st.attempt} times; outcome unknown"
            )
            return t.decision()
        expect = StepStatus.COMPENSATING if kind == "timeout" else StepStatus.COMPENSATION_WAITING
        if (
            inst.state is not SagaState.COMPENSATING
            or st.status is not expect
            or st.rung != rung
            or st.rung_attempt != attempt
        ):
            return self._stale_timer(t, timer, "compensation moved on")
        if kind == "retry":
            t.dispatch_compensation(index)
            return t.decision()
        t.log("compensation.timed_out", step.name, rung=rung, attempt=attempt)
        if st.rung_attempt < step.ladder[rung].retry.max_attempts:
            t.dispatch_compensation(index)
            return t.decision()
        t.inst.steps[index].status = StepStatus.COMPENSATION_FAILED
        t.needs_manual(
            f"compensation {step.ladder[rung].label} of step {step.name!r} timed out "
            f"{attempt} times; outcome unknown",
            step.name,
        )
        return t.decision()

    def on_cancel(self, inst: SagaInstance, reason: str, now: float) -> Decision:
        """A cancel request: compensate before the pivot, refuse after it."""
        t = _Transition(self, inst, now, None)
        d = self.definition
        if inst.terminal:
            why = f"saga is already {inst.state.value}"
            return t.unchanged("cancel.refused", None, reason=reason, why=why)
        # Without ``inst.cancel_requested`` a second cancel while the pivot is in flight
        # would set the same flag again (and log it): harmless, kept for the history.
        if inst.state is SagaState.COMPENSATING or inst.cancel_requested:
            return t.unchanged("cancel.duplicate", None, reason=reason)
        if t.pivot_passed():
            why = "the saga is past its point of no return"
            return t.unchanged("cancel.refused", None, reason=reason, why=why)
        p = d.pivot_index
        t.log("cancel.requested", None, reason=reason)
        if p is not None and inst.cursor == p:
            # The pivot is in flight: its outcome decides. Success refuses the cancel,
            # failure compensates; guessing either way could lose money.
            t.inst.cancel_requested = True
            t.inst.reason = f"cancelled: {reason}"
            return t.decision()
        t.begin_compensation(inst.cursor, f"cancelled: {reason}")
        return t.decision()

    def on_manual(
        self,
        inst: SagaInstance,
        action: ManualAction | str,
        *,
        reason: str,
        actor: str,
        now: float,
        rung: int | None = None,
        expected_version: int | None = None,
        force: bool = False,
    ) -> Decision:
        """Apply a person's decision to a saga in the manual queue; audited in history.

        ``expected_version``: the saga version the person decided on; another one
        raises :class:`~sagakit.errors.SagaMoved`. ``force``: accept a partial saga
        although a compensation or a hold is still open (recorded in history).

        Raises :class:`~sagakit.errors.ManualActionRefused` when the action does not fit
        the saga's state (the message says why and what would), and its subclass
        :class:`~sagakit.errors.OpenHolds` for an unforced ``accept_partial`` that
        would leave holds open.
        """
        action = manual_action(action)
        check_manual(inst, reason=reason, actor=actor, expected_version=expected_version)
        t = _Transition(self, inst, now, None)
        return resolve_manual(t, action, reason=reason, actor=actor, rung=rung, force=force)

    # -- helpers ----------------------------------------------------------------------
    def _on_status_answer(self, t: _Transition, index: int, outcome: Outcome) -> None:
        """Act on a status query's answer.

        The answer's result is ``{"state": "done" | "failed" | "not_found" | "pending",
        "result": {...}, "reason": "..."}``: the action happened (its result), failed
        for good, never happened, or is still being worked on.
        """
        d = self.definition
        step, st = d.steps[index], t.inst.steps[index]
        if not outcome.ok:
            self._query_again(t, index, outcome.reason or "status query failed")
            return
        state = outcome.result.get("state")
        t.log("status.answered", step.name, state=state, query=st.queries)
        if state == "done":
            result = outcome.result.get("result", {})
            st.status = StepStatus.RUNNING  # settle it as the action's own success would
            self._on_action_outcome(t, index, Outcome(ok=True, result=dict(result or {})))
        elif state == "failed":
            st.status = StepStatus.RUNNING
            reason = str(outcome.result.get("reason") or "failed (per status query)")
            self._on_action_outcome(t, index, Outcome(ok=False, reason=reason))
        elif state == "not_found":
            # It never happened. Before the pivot, compensating tombstones the key so a
            # late copy is refused; at or after it, the step must move forward: send the
            # action again with the same key and a fresh budget, a bounded number of times.
            if d.pivot_index is None or index < d.pivot_index:
                t.begin_compensation(index, f"step {step.name!r} never happened (status query)")
            elif st.attempt < 3 * step.retry.max_attempts:
                st.retry_base = st.attempt
                st.queries = 0
                t.dispatch_action(index)
            else:
                t.needs_manual(
                    f"step {step.name!r} keeps not happening after {st.attempt} attempts",
                    step.name,
                )
        elif state == "pending":
            self._query_again(t, index, "the participant is still working on it")
        else:
            raise MessageError(
                f"status answer for step {step.name!r} has state {state!r}; "
                "expected done, failed, not_found or pending"
            )

    def _on_action_outcome(self, t: _Transition, index: int, outcome: Outcome) -> None:
        d = self.definition
        step, st = d.steps[index], t.inst.steps[index]
        if outcome.ok:
            st.status = StepStatus.SUCCEEDED
            st.result = outcome.result
            st.error = None
            st.finished_at = t.now
            t.cancel.append(STEP_TIMER)
            t.log("step.succeeded", step.name, attempt=st.attempt)
            if t.inst.cancel_requested and d.pivot_index == index:
                t.inst.cancel_requested = False
                t.inst.reason = None
                t.log("cancel.refused", None, why="the pivot succeeded first")
            t.advance(index)
            return
        st.error = outcome.reason
        if outcome.retryable and st.attempts_used < step.retry.max_attempts:
            delay = step.retry.backoff(st.attempt, f"{t.inst.saga_id}:{step.name}")
            self._schedule_retry(t, index, "action", delay, outcome.reason)
            return
        st.finished_at = t.now
        t.cancel.append(STEP_TIMER)
        if outcome.retryable and (step.status_query is not None or not d.past_pivot(index)):
            # Out of attempts on "try again" answers: an earlier try may still have had an
            # effect (it may have timed out at the participant), so the outcome is unknown.
            t.log("step.failed", step.name, reason=outcome.reason, attempt=st.attempt)
            t.outcome_unknown(
                index, f"step {step.name!r} failed {st.attempt} times: {outcome.reason}"
            )
            return
        if d.past_pivot(index):
            st.status = StepStatus.FAILED
            t.log("step.failed", step.name, reason=outcome.reason, attempt=st.attempt)
            t.needs_manual(
                f"step {step.name!r} failed after the pivot: {outcome.reason}", step.name
            )
            return
        if step.optional:
            st.status = StepStatus.SKIPPED
            t.log("step.skipped", step.name, reason=outcome.reason)
            t.advance(index)
            return
        st.status = StepStatus.FAILED
        t.log("step.failed", step.name, reason=outcome.reason, attempt=st.attempt)
        t.begin_compensation(index - 1, f"step {step.name!r} failed: {outcome.reason}")

    @staticmethod
    def _stale(t: _Transition, step: str, why: str, reply: Envelope, outcome: Outcome) -> Decision:
        if t.inst.terminal:  # the first thing an operator needs to know
            why = f"saga is already {t.inst.state.value}"
        return t.unchanged(
            "reply.stale", step, why=why, ok=outcome.ok, attempt=reply.attempt, fence=reply.fence
        )

    @staticmethod
    def _stale_timer(t: _Transition, timer: Timer, why: str) -> Decision:
        return t.unchanged("timer.stale", None, timer=timer.name, fence=timer.fence, why=why)
