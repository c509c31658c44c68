"""Property tests of the saga state machine: random definitions, random input sequences.

A small driver applies each :class:`Decision` like a runtime would (timers: cancels are
applied before sets, a set replaces a timer of the same name) and checks the machine's
invariants after every input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sagakit.core.definition import (
    RetryPolicy,
    Rung,
    SagaDefinition,
    Step,
    StepContext,
    command,
    local,
)
from sagakit.core.envelope import Envelope, MessageKind, Outcome, failure, reply_to, success
from sagakit.core.instance import (
    MAY_HAVE_EFFECT,
    SagaInstance,
    SagaState,
    StepStatus,
    Timer,
)
from sagakit.core.machine import (
    DEADLINE_TIMER,
    STEP_TIMER,
    Decision,
    Machine,
    action_key,
    compensation_key,
    parse_key,
)

SAGA = "saga-1"
NOW = 10_000.0
ENDPOINT = "orchestrator"
ACTIVE = frozenset(
    {
        StepStatus.RUNNING,
        StepStatus.WAITING_RETRY,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATION_WAITING,
    }
)
OUTCOMES = (success({"v": 1}), failure("no"), failure("busy", retryable=True))


def local_fn(ctx: StepContext) -> None:
    return None


# --- definitions --------------------------------------------------------------------------


def policies() -> st.SearchStrategy[RetryPolicy]:
    return st.builds(
        RetryPolicy,
        max_attempts=st.integers(1, 3),
        initial_backoff=st.sampled_from([0.0, 0.5, 2.0]),
        multiplier=st.sampled_from([1.0, 2.0]),
        max_backoff=st.sampled_from([1.0, 30.0]),
        jitter=st.sampled_from([0.0, 0.3]),
    )


@st.composite
def definitions(draw: st.DrawFn) -> SagaDefinition:
    n = draw(st.integers(1, 6))
    pivot = draw(st.none() | st.integers(0, n - 1))
    steps = []
    for i in range(n):
        action: Any = draw(
            st.sampled_from([command(f"svc{i}", f"Do{i}"), local(local_fn, f"do{i}")])
        )
        kw: dict[str, Any] = {
            "retry": draw(policies()),
            "timeout": draw(st.sampled_from([1.0, 5.0, 30.0])),
            "status": draw(st.sampled_from([None, f"S{i}"])),
        }
        if pivot is None or i < pivot:
            rungs: list[Any] = []
            for r in range(draw(st.integers(0, 3))):
                undo = command(f"svc{i}", f"Undo{i}_{r}")
                if draw(st.booleans()):
                    rungs.append(Rung(undo, draw(policies()), draw(st.sampled_from([1.0, 10.0]))))
                else:
                    rungs.append(undo)
            steps.append(
                Step(f"step{i}", action, rungs or None, optional=draw(st.booleans()), **kw)
            )
        elif i == pivot:
            steps.append(Step(f"step{i}", action, kind="pivot", **kw))
        else:
            steps.append(Step(f"step{i}", action, kind="retriable", **kw))
    deadline = draw(st.none() | st.sampled_from([3.0, 40.0, 400.0]))
    return SagaDefinition(
        "prop",
        steps,
        deadline=deadline,
        started_status="S_START",
        completed_status="S_DONE",
    )


# --- the driver -------------------------------------------------------------------------


def snapshot(inst: SagaInstance) -> tuple[Any, ...]:
    return (
        inst.version,
        inst.state,
        inst.status,
        inst.cursor,
        inst.reason,
        inst.cancel_requested,
        inst.timed_out,
        tuple(tuple(sorted(s.to_dict().items(), key=lambda kv: kv[0])) for s in inst.steps),
    )


Input = Callable[[Machine, SagaInstance, float], Decision]


@dataclass
class Driver:
    d: SagaDefinition
    machine: Machine = field(init=False)
    inst: SagaInstance = field(init=False)
    now: float = NOW
    sent: list[Envelope] = field(default_factory=list)
    timers: dict[str, Timer] = field(default_factory=dict)
    all_timers: list[Timer] = field(default_factory=list)
    message_ids: set[str] = field(default_factory=set)
    statuses: list[str] = field(default_factory=list)
    last_input: tuple[str, Input] | None = None
    inputs: int = 0

    def __post_init__(self) -> None:
        self.machine = Machine(self.d, ENDPOINT)
        dec = self.machine.start(SAGA, "order-1", {"amount": 10}, self.now)
        self.check(None, dec)

    # -- applying --------------------------------------------------------------------------
    def apply(self, label: str, fn: Input) -> Decision:
        self.inputs += 1
        self.now += 1
        before = self.inst
        snap = snapshot(before)
        dec = fn(self.machine, before, self.now)
        assert snapshot(before) == snap, f"{label} mutated the instance it was given"
        self.check(before, dec)
        self.last_input = (label, fn)
        return dec

    def reply(self, rep: Envelope) -> Decision:
        return self.apply("reply", lambda m, i, now: m.on_reply(i, rep, now))

    def fire(self, timer: Timer) -> Decision:
        self.now = max(self.now, timer.due_at)
        return self.apply("timer", lambda m, i, now: m.on_timer(i, timer, now))

    def cancel(self) -> Decision:
        return self.apply("cancel", lambda m, i, now: m.on_cancel(i, "user", now))

    def outstanding(self) -> Envelope | None:
        """The command the saga is waiting for, if any (the latest one sent)."""
        if self.inst.terminal or not self.sent:
            return None
        st_ = self.inst.steps[self.inst.cursor]
        if st_.status in (StepStatus.RUNNING, StepStatus.COMPENSATING):
            return self.sent[-1]
        return None

    # -- invariants -----------------------------------------------------------------------
    def check(self, before: SagaInstance | None, dec: Decision) -> None:
        d = self.d
        inst = dec.instance
        assert dec.history, "every input leaves a history row"
        if before is None:
            assert dec.changed and inst.version == 1
        else:
            if before.terminal:
                assert not dec.changed, "terminal states are absorbing"
            if dec.changed:
                assert inst.version == before.version + 1
                assert inst is not before
            else:
                assert inst is before
                assert inst.version == before.version
                assert not dec.outgoing and not dec.set_timers and not dec.cancel_timers
        assert all(h.version == inst.version and h.saga_id == SAGA for h in dec.history)

        # timers, as a runtime applies them
        if dec.changed:
            for name in dec.cancel_timers:
                self.timers.pop(name, None)
            for t in dec.set_timers:
                assert t.saga_id == SAGA
                self.timers[t.name] = t
                self.all_timers.append(t)

        # steps
        running = [i for i, s in enumerate(inst.steps) if s.status is StepStatus.RUNNING]
        assert len(running) <= 1, "never two steps running"
        if not inst.terminal:
            active = [i for i, s in enumerate(inst.steps) if s.status in ACTIVE]
            assert active == [inst.cursor]
            assert STEP_TIMER in self.timers, "a live saga always has a step timer"
            fence = self.timers[STEP_TIMER].fence.split(":")
            assert int(fence[1]) == inst.cursor
        else:
            assert self.timers == {}, "a finished saga leaves no timers behind"
        pivot = d.pivot_index
        if inst.state in (SagaState.SUCCEEDED, SagaState.PARTIAL_ACCEPTED):
            for step, s in zip(d.steps, inst.steps, strict=True):
                assert s.status is StepStatus.SUCCEEDED or (
                    s.status is StepStatus.SKIPPED and step.optional
                )
            skipped = any(s.status is StepStatus.SKIPPED for s in inst.steps)
            assert skipped == (inst.state is SagaState.PARTIAL_ACCEPTED)
            assert inst.status == (d.partial_status if skipped else d.completed_status)
        if inst.state in (SagaState.COMPENSATED, SagaState.TIMED_OUT):
            for i, (step, s) in enumerate(zip(d.steps, inst.steps, strict=True)):
                if step.ladder:
                    assert pivot is None or i < pivot
                    assert s.status not in MAY_HAVE_EFFECT, f"step {i} left {s.status}"
            assert inst.timed_out == (inst.state is SagaState.TIMED_OUT)
            assert inst.status == d.cancelled_status
        if inst.state is SagaState.FAILED_NEEDS_MANUAL:
            assert inst.reason
            assert inst.status == d.attention_status

        # outgoing commands
        assert len(dec.outgoing) <= 1
        for n, env in enumerate(dec.outgoing):
            assert env.kind is MessageKind.COMMAND
            assert env.saga_id == SAGA
            assert env.fence == inst.version
            assert env.message_id == f"{SAGA}:{inst.version}:{n}"
            assert env.message_id not in self.message_ids
            self.message_ids.add(env.message_id)
            assert env.reply_to == ENDPOINT
            assert env.idempotency_key
            key = parse_key(env.idempotency_key)
            assert key.saga_id == SAGA
            assert key.step == env.step
            index = d.step_index(key.step)
            assert index == inst.cursor
            if key.phase == "comp":
                step = d.steps[index]
                assert step.ladder and key.rung < len(step.ladder)
                assert pivot is None or index < pivot, "never compensate the pivot or after it"
                assert env.compensates == action_key(SAGA, step.name)
                assert env.attempt == inst.steps[index].rung_attempt
            else:
                assert env.compensates is None
                assert env.attempt == inst.steps[index].attempt
            self.sent.append(env)

        # user-visible status
        self.check_status(before.status if before is not None else None, inst.status)
        self.statuses.append(inst.status)
        self.inst = inst

    def check_status(self, old: str | None, new: str) -> None:
        d = self.d
        forward = [d.started_status, *(s.status for s in d.steps if s.status), d.completed_status]
        rank = {label: i for i, label in enumerate(forward)}
        rank[d.partial_status] = rank[d.completed_status]
        if old is None:
            assert new in rank
            return
        if old == new:
            return
        if old == d.cancelling_status:
            assert new in (d.cancelled_status, d.attention_status), f"{old} -> {new}"
        elif old in (d.cancelled_status, d.attention_status, d.completed_status, d.partial_status):
            raise AssertionError(f"a final status changed: {old} -> {new}")
        elif new in rank:
            assert rank[new] > rank[old], f"status went backwards: {old} -> {new}"
        else:
            assert new in (d.cancelling_status, d.cancelled_status, d.attention_status)


# --- random input sequences -------------------------------------------------------------

OPS = (
    "reply_latest",
    "reply_any",
    "reply_forged",
    "timer_current",
    "timer_old",
    "timer_forged",
    "deadline",
    "cancel",
    "duplicate",
)
ops_strategy = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, 50), st.integers(0, 2), st.integers(0, 5)),
    max_size=60,
)


def forged_reply(drv: Driver, a: int, b: int, c: int) -> Envelope:
    step = drv.d.steps[a % len(drv.d.steps)]
    key = compensation_key(SAGA, step.name, c % 3) if c % 2 else action_key(SAGA, step.name)
    return Envelope(
        message_id=f"forged-{drv.inputs}",
        type="Forged.reply",
        kind=MessageKind.REPLY,
        source="svc",
        correlation_id=SAGA,
        occurred_at=drv.now,
        saga_id=SAGA,
        step=step.name,
        attempt=a % 4,
        fence=a,
        idempotency_key=key,
        payload=OUTCOMES[b].to_payload(),
    )


def run_op(drv: Driver, op: str, a: int, b: int, c: int) -> Decision | None:
    outcome: Outcome = OUTCOMES[b]
    if op == "reply_latest" and drv.sent:
        cmd = drv.sent[-1]
        return drv.reply(reply_to(cmd, outcome, source="svc", now=drv.now))
    if op == "reply_any" and drv.sent:
        cmd = drv.sent[a % len(drv.sent)]
        return drv.reply(reply_to(cmd, outcome, source="svc", now=drv.now))
    if op == "reply_forged":
        return drv.reply(forged_reply(drv, a, b, c))
    if op == "timer_current" and STEP_TIMER in drv.timers:
        return drv.fire(drv.timers[STEP_TIMER])
    if op == "timer_old" and drv.all_timers:
        return drv.fire(drv.all_timers[a % len(drv.all_timers)])
    if op == "timer_forged":
        kind = ("timeout", "retry")[b % 2]
        phase = ("action", "comp")[c % 2]
        fence = f"{kind}:{a % (len(drv.d.steps) + 1)}:{phase}:{c % 3}:{a % 4}"
        return drv.fire(Timer(SAGA, STEP_TIMER, drv.now, fence))
    if op == "deadline" and drv.inst.deadline_at is not None:
        return drv.fire(Timer(SAGA, DEADLINE_TIMER, drv.inst.deadline_at, "deadline"))
    if op == "cancel":
        return drv.cancel()
    if op == "duplicate" and drv.last_input is not None:
        return drv.apply(*drv.last_input)
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(definitions(), ops_strategy)
def test_invariants_hold_under_random_inputs(
    definition: SagaDefinition, ops: list[tuple[str, int, int, int]]
) -> None:
    drv = Driver(definition)
    for op in ops:
        run_op(drv, *op)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(definitions(), ops_strategy)
def test_terminal_states_are_absorbing(
    definition: SagaDefinition, ops: list[tuple[str, int, int, int]]
) -> None:
    drv = Driver(definition)
    for op in ops:
        run_op(drv, *op)
        if drv.inst.terminal:
            break
    if not drv.inst.terminal:
        return
    final = drv.inst
    for op in ops:
        dec = run_op(drv, *op)
        assert dec is None or (not dec.changed and dec.instance is final)
    assert drv.cancel().instance is final


_SIMPLE = SagaDefinition(
    "prop", [Step("step0", command("svc0", "Do0"), retry=RetryPolicy(max_attempts=3))]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(definitions(), ops_strategy)
@example(_SIMPLE, [("reply_latest", 0, 2, 0)])
def test_a_duplicated_input_changes_nothing(
    definition: SagaDefinition, ops: list[tuple[str, int, int, int]]
) -> None:
    drv = Driver(definition)
    for op in ops:
        dec = run_op(drv, *op)
        if dec is not None and dec.changed and drv.last_input is not None:
            again = drv.apply(*drv.last_input)
            assert not again.changed, f"duplicate of {op} changed the saga again"


# --- liveness: a fair scheduler drives every saga to a terminal state -------------------


def input_bound(d: SagaDefinition) -> int:
    """Changing inputs a saga can take at most: 2 per attempt (reply + retry timer)."""
    bound = 0
    for s in d.steps:
        bound += 2 * s.retry.max_attempts
        bound += sum(2 * r.retry.max_attempts for r in s.ladder)
    return bound + 2  # a deadline and a cancel


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(definitions(), st.data())
def test_fair_scheduler_drives_every_saga_to_a_terminal_state(
    definition: SagaDefinition, data: st.DataObject
) -> None:
    drv = Driver(definition)
    bound = input_bound(definition)
    changing = 0
    cancels = deadlines = 0
    while not drv.inst.terminal:
        assert changing <= bound, f"saga still {drv.inst.state} after {changing} inputs"
        choices = ["answer", "timeout"]
        if cancels < 2:
            choices.append("cancel")
        if deadlines < 1 and DEADLINE_TIMER in drv.timers:
            choices.append("deadline")
        choice = data.draw(st.sampled_from(choices))
        cmd = drv.outstanding()
        if choice == "cancel":
            cancels += 1
            dec = drv.cancel()
            changing += dec.changed
            continue
        if choice == "deadline":
            deadlines += 1
            dec = drv.fire(drv.timers[DEADLINE_TIMER])
            assert dec.changed
            changing += 1
            continue
        if choice == "answer" and cmd is not None:
            outcome = data.draw(st.sampled_from(OUTCOMES))
            dec = drv.reply(reply_to(cmd, outcome, source="svc", now=drv.now))
        else:
            # Nothing to answer (waiting for a retry) or the answer is lost: the timer fires.
            dec = drv.fire(drv.timers[STEP_TIMER])
        assert dec.changed, "an answer to the outstanding command or its timer always moves"
        changing += 1
    assert drv.inst.state in (
        SagaState.SUCCEEDED,
        SagaState.PARTIAL_ACCEPTED,
        SagaState.COMPENSATED,
        SagaState.TIMED_OUT,
        SagaState.FAILED_NEEDS_MANUAL,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(definitions())
def test_all_successes_succeed_and_statuses_follow_the_steps(definition: SagaDefinition) -> None:
    drv = Driver(definition)
    while not drv.inst.terminal:
        cmd = drv.outstanding()
        assert cmd is not None
        drv.reply(reply_to(cmd, success({"ok": 1}), source="svc", now=drv.now))
    assert drv.inst.state is SagaState.SUCCEEDED
    assert drv.inst.version == len(definition.steps) + 1
    labels = [s.status for s in definition.steps if s.status]
    expected = [definition.started_status, *labels, definition.completed_status]
    seen = [s for i, s in enumerate(drv.statuses) if i == 0 or s != drv.statuses[i - 1]]
    first = definition.steps[0].status
    if first:  # the first step's label replaces the started status at once
        expected.remove(definition.started_status)
    assert seen == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(definitions(), st.integers(0, 5))
def test_failure_before_the_pivot_undoes_exactly_what_may_have_happened(
    definition: SagaDefinition, fail_at: int
) -> None:
    pivot = definition.pivot_index
    last = len(definition.steps) - 1 if pivot is None else pivot
    fail_at = min(fail_at, last)
    drv = Driver(definition)
    while drv.inst.cursor < fail_at:
        cmd = drv.outstanding()
        assert cmd is not None
        drv.reply(reply_to(cmd, success(), source="svc", now=drv.now))
    if definition.steps[fail_at].optional:
        return
    cmd = drv.outstanding()
    assert cmd is not None
    drv.reply(reply_to(cmd, failure("no"), source="svc", now=drv.now))
    undone = []
    while not drv.inst.terminal:
        cmd = drv.outstanding()
        assert cmd is not None and cmd.compensates is not None
        undone.append(cmd.step)
        drv.reply(reply_to(cmd, success(), source="svc", now=drv.now))
    expected = [
        s.name
        for i, s in reversed(list(enumerate(definition.steps)))
        if i < fail_at and s.ladder and drv.inst.steps[i].status is not StepStatus.SKIPPED
    ]
    assert undone == expected
    assert drv.inst.state is SagaState.COMPENSATED
