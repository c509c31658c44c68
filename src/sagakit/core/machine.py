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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sagakit.core.definition import CommandAction, LocalAction, SagaDefinition, SagaView, Step
from sagakit.core.envelope import MANUAL_RETRY, Envelope, MessageKind, Outcome, traceparent_for
from sagakit.core.instance import (
    MAY_HAVE_EFFECT,
    HistoryEntry,
    SagaInstance,
    SagaState,
    StepState,
    StepStatus,
    Timer,
)
from sagakit.errors import DefinitionError, ManualActionRefused, MessageError

STEP_TIMER = "step"
DEADLINE_TIMER = "deadline"
LOCAL_COMMAND = "sagakit.local"


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


@dataclass(slots=True)
class Decision:
    """What a transition decided. ``changed`` is False for stale or refused inputs."""

    instance: SagaInstance
    outgoing: list[Envelope] = field(default_factory=list)
    set_timers: list[Timer] = field(default_factory=list)
    cancel_timers: list[str] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)
    changed: bool = True


@dataclass(frozen=True, slots=True)
class KeyParts:
    """An idempotency key split into its parts."""

    saga_id: str
    step: str
    phase: str  # "action" | "comp" | "query"
    rung: int = 0


def deadline_timer(saga_id: str, deadline_at: float) -> Timer:
    """The saga's deadline timer; its fence names the deadline it was set for."""
    return Timer(saga_id, DEADLINE_TIMER, deadline_at, f"deadline@{deadline_at!r}")


def _deadline_of(fence: str) -> float | None:
    """The deadline a deadline timer's fence was set for (None: an older, bare fence)."""
    _, at, set_for = fence.partition("@")
    try:
        return float(set_for) if at else None
    except ValueError:
        return None


def action_key(saga_id: str, step: str) -> str:
    """Idempotency key of a step's action."""
    return f"{saga_id}:{step}:action"


def compensation_key(saga_id: str, step: str, rung: int) -> str:
    """Idempotency key of one rung of a step's compensation."""
    return f"{saga_id}:{step}:comp:{rung}"


def query_key(saga_id: str, step: str) -> str:
    """Key of a step's status queries (queries have no effect; the key routes the answer)."""
    return f"{saga_id}:{step}:query"


def parse_key(key: str) -> KeyParts:
    """Split a key made by :func:`action_key`, :func:`compensation_key` or :func:`query_key`."""
    parts = key.split(":")
    if len(parts) >= 3 and parts[-1] in ("action", "query"):
        return KeyParts(":".join(parts[:-2]), parts[-2], parts[-1])
    if len(parts) >= 4 and parts[-2] == "comp" and parts[-1].isdigit():
        return KeyParts(":".join(parts[:-3]), parts[-3], "comp", int(parts[-1]))
    raise MessageError(f"idempotency key {key!r} is not a sagakit step key")


class _Transition:
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

    # -- forward ----------------------------------------------------------------------
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
        self._send(
            step,
            step.action,
            key=action_key(self.inst.saga_id, step.name),
            attempt=st.attempt,
            compensates=None,
            phase="action",
        )
        self.set_step_timer(
            "timeout",
            index,
            "action",
            st.attempt,
            self.now + step.retry.timeout(step.timeout, st.attempt),
        )
        self.log("step.started", step.name, attempt=st.attempt, action=step.action.label)

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

    def dispatch_query(self, index: int) -> None:
        """Ask the participant what became of the step's action (its outcome is unknown)."""
        step, st = self.d.steps[index], self.inst.steps[index]
        assert step.status_query is not None
        st.queries += 1
        st.status = StepStatus.QUERYING
        st.next_retry_at = None
        self._send(
            step,
            step.status_query,
            key=query_key(self.inst.saga_id, step.name),
            attempt=st.queries,
            compensates=None,
            phase="query",
        )
        self.set_step_timer(
            "timeout",
            index,
            "query",
            st.queries,
            self.now + step.retry.timeout(step.timeout, st.queries),
        )
        self.log("status.queried", step.name, query=st.queries, action=step.status_query.label)

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

    def dispatch_compensation(self, index: int) -> None:
        step, st = self.d.steps[index], self.inst.steps[index]
        rung = step.ladder[st.rung]
        st.rung_attempt += 1
        st.status = StepStatus.COMPENSATING
        st.next_retry_at = None
        self.inst.cursor = index
        self._send(
            step,
            rung.action,
            key=compensation_key(self.inst.saga_id, step.name, st.rung),
            attempt=st.rung_attempt,
            compensates=action_key(self.inst.saga_id, step.name),
            phase="comp",
        )
        self.set_step_timer(
            "timeout",
            index,
            "comp",
            st.rung_attempt,
            self.now + rung.retry.timeout(rung.timeout, st.rung_attempt),
        )
        self.log(
            "compensation.sent", step.name, rung=st.rung, attempt=st.rung_attempt, action=rung.label
        )


class Machine:
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
    ) -> Decision:
        """Apply a person's decision to a saga in the manual queue; audited in history.

        Raises :class:`~sagakit.errors.ManualActionRefused` when the action does not fit
        the saga's state (the message says why and what would).
        """
        action = manual_action(action)
        check_manual(inst, reason=reason, actor=actor)
        d = self.definition
        index = inst.cursor
        step = d.steps[index]
        undoing = inst.steps[index].status in (
            StepStatus.COMPENSATION_FAILED,
            StepStatus.COMPENSATING,
            StepStatus.COMPENSATION_WAITING,
        )
        t = _Transition(self, inst, now, None)
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
            return ManualActionRefused(
                f"{action.value} does not apply to saga {inst.saga_id}: {why}"
            )

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
