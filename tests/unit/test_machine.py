"""The pure saga state machine: every transition, stale input and refusal."""

from __future__ import annotations

from typing import Any

import pytest
from machine_run import NOW, Run

from sagakit.core.definition import (
    RetryPolicy,
    Rung,
    SagaDefinition,
    Step,
    StepContext,
    command,
    local,
)
from sagakit.core.envelope import (
    Envelope,
    MessageKind,
    failure,
    success,
    traceparent_for,
)
from sagakit.core.instance import SagaInstance, SagaState, StepStatus, Timer
from sagakit.core.machine import (
    DEADLINE_TIMER,
    LOCAL_COMMAND,
    STEP_TIMER,
    Decision,
    KeyParts,
    action_key,
    compensation_key,
    parse_key,
)
from sagakit.errors import MessageError

FAST = RetryPolicy(max_attempts=3, initial_backoff=1, multiplier=2, jitter=0)


# --- harness ----------------------------------------------------------------------------


def checkout(**kw: Any) -> SagaDefinition:
    return SagaDefinition(
        "checkout",
        [
            Step("validate", command("order", "ValidateOrder")),
            Step(
                "pay",
                command("payment", "AuthorizePayment"),
                [
                    command("payment", "VoidAuthorization"),
                    command("payment", "RefundPayment"),
                    command("payment", "IssueCreditNote"),
                ],
                status="PENDING_PAYMENT",
                retry=FAST,
                timeout=10,
            ),
            Step(
                "reserve",
                command("inventory", "ReserveStock"),
                command("inventory", "ReleaseStock"),
                status="PENDING_INVENTORY",
                retry=FAST,
                timeout=20,
            ),
            Step(
                "ship",
                command("shipping", "CreateShipment"),
                kind="pivot",
                status="PENDING_SHIPMENT",
                retry=FAST,
            ),
            Step(
                "complete",
                command("order", "CompleteOrder"),
                kind="retriable",
                status="COMPLETING",
                retry=FAST,
            ),
        ],
        deadline=3600,
        **kw,
    )


def assert_unchanged(dec: Decision, before: SagaInstance, event: str) -> None:
    assert dec.changed is False
    assert dec.instance is before
    assert dec.instance.version == before.version
    assert dec.outgoing == []
    assert dec.set_timers == []
    assert dec.cancel_timers == []
    assert [h.event for h in dec.history] == [event]
    assert dec.history[0].version == before.version
    assert dec.history[0].state is before.state


# --- keys -------------------------------------------------------------------------------


def test_keys_round_trip() -> None:
    assert action_key("s1", "pay") == "s1:pay:action"
    assert compensation_key("s1", "pay", 2) == "s1:pay:comp:2"
    assert parse_key("s1:pay:action") == KeyParts("s1", "pay", "action")
    assert parse_key("s1:pay:comp:2") == KeyParts("s1", "pay", "comp", 2)


def test_keys_with_colons_in_saga_id() -> None:
    assert parse_key(action_key("a:b:c", "pay")) == KeyParts("a:b:c", "pay", "action")
    assert parse_key(compensation_key("a:b", "pay", 11)) == KeyParts("a:b", "pay", "comp", 11)


@pytest.mark.parametrize(
    "key", ["", "s1", "s1:pay", "s1:pay:undo", "s1:pay:comp:x", "s1:pay:comp:-1", "pay:comp:1"]
)
def test_bad_keys(key: str) -> None:
    with pytest.raises(MessageError, match="not a sagakit step key"):
        parse_key(key)


# --- start ------------------------------------------------------------------------------


def test_start_sends_first_command() -> None:
    run = Run(checkout(), data={"amount": 100, "token": "cus_tok"})
    dec = run.first
    assert dec.changed
    assert len(dec.outgoing) == 1
    cmd = dec.outgoing[0]
    assert cmd.message_id == "s1:1:0"
    assert cmd.type == "ValidateOrder"
    assert cmd.kind is MessageKind.COMMAND
    assert cmd.destination == "order"
    assert cmd.source == "orchestrator"
    assert cmd.reply_to == "orchestrator"
    assert cmd.saga_id == "s1"
    assert cmd.business_key == "order-1"
    assert cmd.correlation_id == "s1"
    assert cmd.causation_id is None
    assert cmd.step == "validate"
    assert cmd.attempt == 1
    assert cmd.fence == 1
    assert cmd.idempotency_key == "s1:validate:action"
    assert cmd.compensates is None
    assert cmd.occurred_at == NOW
    assert cmd.payload == {"amount": 100, "token": "cus_tok"}
    assert cmd.traceparent == traceparent_for("s1", "s1:1:0")
    assert Envelope.from_json(cmd.to_json()) == cmd


def test_start_instance() -> None:
    run = Run(checkout())
    inst = run.first.instance
    assert inst.version == 1
    assert inst.state is SagaState.RUNNING
    assert inst.definition == "checkout"
    assert inst.definition_version == 1
    assert inst.business_key == "order-1"
    assert inst.correlation_id == "s1"
    assert inst.cursor == 0
    assert inst.status == "PENDING"  # validate has no label of its own
    assert inst.created_at == inst.updated_at == NOW
    assert inst.deadline_at == NOW + 3600
    assert [s.status for s in inst.steps] == [StepStatus.RUNNING] + [StepStatus.PENDING] * 4
    assert inst.steps[0].attempt == 1
    assert inst.steps[0].started_at == NOW
    assert not inst.terminal and not inst.cancel_requested and not inst.timed_out


def test_start_timers_include_deadline() -> None:
    run = Run(checkout())
    timers = {t.name: t for t in run.first.set_timers}
    assert timers == {
        STEP_TIMER: Timer("s1", STEP_TIMER, NOW + 30, "timeout:0:action:0:1:0"),
        DEADLINE_TIMER: Timer("s1", DEADLINE_TIMER, NOW + 3600, f"deadline@{NOW + 3600!r}"),
    }
    assert run.first.cancel_timers == []


def test_start_without_deadline_sets_only_step_timer() -> None:
    d = SagaDefinition("s", [Step("a", command("x", "A"), timeout=5)])
    run = Run(d)
    assert run.first.set_timers == [Timer("s1", STEP_TIMER, NOW + 5, "timeout:0:action:0:1:0")]
    assert run.inst.deadline_at is None


def test_start_history() -> None:
    run = Run(checkout())
    h = run.first.history
    assert [e.event for e in h] == ["saga.started", "step.started"]
    assert all(e.version == 1 and e.saga_id == "s1" and e.at == NOW for e in h)
    assert h[0].detail == {"definition": "checkout@1", "business_key": "order-1"}
    assert h[1].step == "validate"
    assert h[1].detail == {"attempt": 1, "action": "order.ValidateOrder"}


def test_start_status_label_of_first_step() -> None:
    d = SagaDefinition("s", [Step("a", command("x", "A"), status="PENDING_A")])
    assert Run(d).inst.status == "PENDING_A"


def test_start_is_deterministic() -> None:
    a = Run(checkout()).first
    b = Run(checkout()).first
    assert a.outgoing == b.outgoing
    assert a.set_timers == b.set_timers
    assert a.history == b.history


def test_start_correlation_id_and_endpoint() -> None:
    run = Run(checkout(), correlation_id="corr-9", endpoint="orch-2")
    cmd = run.last
    assert cmd.correlation_id == "corr-9"
    assert run.inst.correlation_id == "corr-9"
    assert cmd.source == cmd.reply_to == "orch-2"
    assert cmd.traceparent == traceparent_for("corr-9", cmd.message_id)


# --- success path -----------------------------------------------------------------------


def test_success_path() -> None:
    run = Run(checkout())
    statuses = [run.inst.status]
    expected_types = [
        "ValidateOrder",
        "AuthorizePayment",
        "ReserveStock",
        "CreateShipment",
        "CompleteOrder",
    ]
    assert run.last.type == expected_types[0]
    for i, typ in enumerate(expected_types):
        assert run.last.type == typ
        assert run.last.fence == run.inst.version
        assert run.last.message_id == f"s1:{run.inst.version}:0"
        version = run.inst.version
        dec = run.ok(n=i)
        assert dec.changed
        assert dec.instance.version == version + 1
        # The step timer is either replaced (next step) or cancelled (saga finished).
        assert STEP_TIMER in dec.cancel_timers or STEP_TIMER in {t.name for t in dec.set_timers}
        assert all(h.version == version + 1 for h in dec.history)
        assert all(h.message_id == f"s1:{version}:0/reply" for h in dec.history)
        statuses.append(run.inst.status)
        if i < 4:
            assert dec.outgoing[0].causation_id == f"s1:{version}:0/reply"
            assert dec.set_timers[0].fence == f"timeout:{i + 1}:action:0:1:0"
    assert statuses == [
        "PENDING",
        "PENDING_PAYMENT",
        "PENDING_INVENTORY",
        "PENDING_SHIPMENT",
        "COMPLETING",
        "COMPLETED",
    ]
    inst = run.inst
    assert inst.state is SagaState.SUCCEEDED
    assert inst.terminal
    assert inst.version == 6
    assert inst.reason is None
    assert all(s.status is StepStatus.SUCCEEDED for s in inst.steps)
    assert [s.result for s in inst.steps] == [{"n": i} for i in range(5)]
    last = run.decisions[-1]
    assert last.outgoing == []
    assert set(last.cancel_timers) >= {STEP_TIMER, DEADLINE_TIMER}
    assert run.events(last)[-1] == "saga.finished"
    assert last.history[-1].detail == {"outcome": "SUCCEEDED", "reason": None}
    assert run.timers == {}


def test_status_label_carries_over_unlabelled_steps() -> None:
    d = SagaDefinition(
        "s",
        [
            Step("a", command("x", "A"), status="DOING_A"),
            Step("b", command("x", "B")),
            Step("c", command("x", "C"), status="DOING_C"),
        ],
        started_status="NEW",
        completed_status="DONE",
    )
    run = Run(d)
    seen = [run.inst.status]
    for _ in range(3):
        run.ok()
        seen.append(run.inst.status)
    assert seen == ["DOING_A", "DOING_A", "DOING_C", "DONE"]


def test_payload_builder_sees_previous_results() -> None:
    d = SagaDefinition(
        "s",
        [
            Step("pay", command("payment", "Authorize")),
            Step(
                "capture",
                command(
                    "payment",
                    "Capture",
                    lambda v: {
                        "auth": v.results["pay"]["auth"],
                        "saga": v.saga_id,
                        "amt": v.data["amount"],
                    },
                ),
            ),
        ],
    )
    run = Run(d)
    run.ok(auth="A-1")
    assert run.last.payload == {"auth": "A-1", "saga": "s1", "amt": 100}


def test_command_version_is_carried() -> None:
    d = SagaDefinition("s", [Step("a", command("x", "A", version=3))])
    assert Run(d).last.version == 3


# --- failures before the pivot ----------------------------------------------------------


def test_failure_of_first_step_needs_no_compensation() -> None:
    run = Run(checkout())
    dec = run.fail("invalid order")
    inst = run.inst
    assert inst.state is SagaState.COMPENSATED
    assert inst.status == "CANCELLED"
    assert inst.reason == "step 'validate' failed: invalid order"
    assert dec.outgoing == []
    assert inst.steps[0].status is StepStatus.FAILED
    assert inst.steps[0].error == "invalid order"
    assert set(dec.cancel_timers) >= {STEP_TIMER, DEADLINE_TIMER}
    assert run.events(dec) == ["step.failed", "compensation.started", "saga.finished"]


def ladder_def(**kw: Any) -> SagaDefinition:
    return SagaDefinition(
        "s",
        [
            Step(
                "a", command("sa", "DoA"), command("sa", "UndoA", lambda v: {"r": v.results["a"]})
            ),
            Step("b", command("sb", "DoB")),  # nothing to undo
            Step("c", command("sc", "DoC"), command("sc", "UndoC")),
            Step("d", command("sd", "DoD"), command("sd", "UndoD")),
            Step("e", command("se", "DoE"), kind="pivot"),
        ],
        **kw,
    )


def test_failure_in_the_middle_compensates_in_reverse_order() -> None:
    run = Run(ladder_def())
    run.advance_to("d")
    version = run.inst.version
    dec = run.fail("out of stock")
    assert dec.instance.version == version + 1
    assert run.inst.state is SagaState.COMPENSATING
    assert run.inst.status == "CANCELLING"
    assert run.inst.reason == "step 'd' failed: out of stock"
    assert run.step("d").status is StepStatus.FAILED
    assert len(dec.outgoing) == 1
    comp = dec.outgoing[0]
    assert (comp.destination, comp.type, comp.step) == ("sc", "UndoC", "c")
    assert comp.idempotency_key == "s1:c:comp:0"
    assert comp.compensates == "s1:c:action"
    assert comp.attempt == 1
    assert comp.fence == run.inst.version
    assert run.inst.cursor == 2
    assert run.step("c").status is StepStatus.COMPENSATING
    assert dec.set_timers == [Timer("s1", STEP_TIMER, run.now + 30, "timeout:2:comp:0:1:0")]
    assert run.events(dec) == ["step.failed", "compensation.started", "compensation.sent"]

    dec = run.ok()
    assert run.step("c").status is StepStatus.COMPENSATED
    comp = dec.outgoing[0]
    assert (comp.type, comp.step, comp.idempotency_key) == ("UndoA", "a", "s1:a:comp:0")
    assert comp.payload == {"r": {}}  # the compensation sees the step's result
    assert run.step("b").status is StepStatus.SUCCEEDED  # skipped: no ladder

    dec = run.ok()
    assert dec.outgoing == []
    assert run.inst.state is SagaState.COMPENSATED
    assert run.inst.status == "CANCELLED"
    assert [s.status for s in run.inst.steps] == [
        StepStatus.COMPENSATED,
        StepStatus.SUCCEEDED,
        StepStatus.COMPENSATED,
        StepStatus.FAILED,
        StepStatus.PENDING,
    ]
    comp_steps = [e.step for e in run.sent if e.compensates is not None]
    assert comp_steps == ["c", "a"]


def test_compensation_of_skipped_optional_step_is_not_sent() -> None:
    d = SagaDefinition(
        "s",
        [
            Step("a", command("x", "A"), command("x", "UndoA")),
            Step("coupon", command("x", "Coupon"), command("x", "UndoCoupon"), optional=True),
            Step("b", command("x", "B"), command("x", "UndoB")),
        ],
    )
    run = Run(d)
    run.ok()
    run.fail("coupon expired")
    assert run.step("coupon").status is StepStatus.SKIPPED
    assert run.last.type == "B"
    run.fail("no")
    assert run.last.type == "UndoA"
    run.ok()
    assert run.inst.state is SagaState.COMPENSATED
    assert [e.type for e in run.sent if e.compensates] == ["UndoA"]


# --- retries and timeouts of actions ----------------------------------------------------


def test_retryable_failure_waits_then_resends_same_key() -> None:
    run = Run(checkout())
    run.ok()
    first = run.last
    assert first.step == "pay"
    dec = run.fail("gateway busy", retryable=True)
    st = run.step("pay")
    assert run.inst.state is SagaState.RUNNING
    assert st.status is StepStatus.WAITING_RETRY
    assert st.error == "gateway busy"
    assert st.next_retry_at == run.now + 1.0
    assert dec.outgoing == []
    assert dec.set_timers == [Timer("s1", STEP_TIMER, run.now + 1.0, "retry:1:action:0:1:0")]
    assert run.events(dec) == ["retry.scheduled"]
    assert dec.history[0].detail["delay"] == 1.0

    dec = run.fire()
    assert dec.changed
    again = dec.outgoing[0]
    assert again.idempotency_key == first.idempotency_key == "s1:pay:action"
    assert again.attempt == 2
    assert again.message_id != first.message_id
    assert again.fence == run.inst.version
    assert st is not run.step("pay")
    assert run.step("pay").status is StepStatus.RUNNING
    assert run.step("pay").next_retry_at is None
    assert dec.set_timers[0].fence == "timeout:1:action:0:2:0"

    run.fail("still busy", retryable=True)
    assert run.timers[STEP_TIMER].fence == "retry:1:action:0:2:0"
    assert run.timers[STEP_TIMER].due_at == run.now + 2.0  # 1 * 2 ** 1


def test_retry_delay_uses_policy_backoff_with_jitter() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff=3, jitter=0.5)
    d = SagaDefinition("s", [Step("pay", command("p", "Pay"), retry=policy)])
    run = Run(d)
    run.fail("busy", retryable=True)
    assert run.timers[STEP_TIMER].due_at == pytest.approx(run.now + policy.backoff(1, "s1:pay"))


def test_retries_exhausted_on_retryable_failures_compensate_the_step_too() -> None:
    """An earlier try may have had an effect, so the step is UNKNOWN and compensated."""
    run = Run(checkout())
    run.ok()
    for attempt in (1, 2):
        run.fail("busy", retryable=True)
        run.fire()
        assert run.last.attempt == attempt + 1
    dec = run.fail("busy", retryable=True)
    assert run.step("pay").status is StepStatus.COMPENSATING
    assert run.step("pay").attempt == 3
    assert run.inst.state is SagaState.COMPENSATING
    assert run.inst.reason == "step 'pay' failed 3 times: busy"
    assert dec.outgoing[0].compensates == "s1:pay:action"
    assert "retry.scheduled" not in run.events(dec)


def test_definite_failure_is_not_compensated() -> None:
    run = Run(checkout())
    run.ok()
    run.fail("card declined")
    assert run.step("pay").status is StepStatus.FAILED
    assert run.inst.state is SagaState.COMPENSATED  # validate has nothing to undo
    assert not any(e.compensates for e in run.sent)


def test_action_timeout_resends_same_key() -> None:
    run = Run(checkout())
    run.ok()
    first = run.last
    timer = run.timers[STEP_TIMER]
    assert timer.fence == "timeout:1:action:0:1:0"
    assert timer.due_at == run.now + 10
    dec = run.fire()
    assert run.events(dec) == ["step.timed_out", "step.started"]
    again = dec.outgoing[0]
    assert again.idempotency_key == first.idempotency_key
    assert again.attempt == 2
    assert again.payload == first.payload
    assert run.step("pay").status is StepStatus.RUNNING
    assert run.timers[STEP_TIMER].fence == "timeout:1:action:0:2:0"


def test_growing_timeouts_wait_longer_for_each_attempt_of_an_action() -> None:
    patient = RetryPolicy(
        max_attempts=4, initial_backoff=1, jitter=0, timeout_multiplier=3, max_timeout=50
    )
    d = SagaDefinition(
        "s",
        [
            Step("a", command("sa", "DoA"), command("sa", "UndoA"), retry=patient, timeout=5),
            Step("b", command("sb", "DoB")),
        ],
    )
    run = Run(d)
    waits = []
    for _ in range(4):  # attempts 1..4 of step a: 5, 15, 45, then the 50 s cap
        t = run.timers[STEP_TIMER]
        waits.append(t.due_at - run.now)
        run.fire()
        if STEP_TIMER in run.timers and run.timers[STEP_TIMER].fence.startswith("retry"):
            run.fire()
    assert waits == [5, 15, 45, 50]


def test_growing_timeouts_for_status_queries_and_compensation_rungs() -> None:
    patient = RetryPolicy(max_attempts=3, initial_backoff=1, jitter=0, timeout_multiplier=2)
    d = SagaDefinition(
        "s",
        [
            Step("a", command("sa", "DoA"), command("sa", "UndoA"), retry=patient, timeout=4),
            Step(
                "b",
                command("sb", "DoB"),
                retry=patient,
                timeout=1,
                status_query=command("sb", "WhatBecameOfB"),
            ),
        ],
    )
    run = Run(d)
    run.ok()  # a done; b runs
    for _ in range(3):  # b's three attempts time out: 1, 2, 4 s
        run.fire()
        if run.timers[STEP_TIMER].fence.startswith("retry"):
            run.fire()
    query = run.timers[STEP_TIMER]
    assert query.fence.startswith("timeout:1:query:")
    assert query.due_at - run.now == 1  # first status query: the step's own timeout
    run.fire()
    if run.timers[STEP_TIMER].fence.startswith("retry"):
        run.fire()
    assert run.timers[STEP_TIMER].due_at - run.now == 2  # second query waits twice as long
    run.ok(state="not_found")  # b never happened: undo a
    comp = run.timers[STEP_TIMER]
    assert comp.fence.startswith("timeout:0:comp:")
    assert comp.due_at - run.now == 4
    run.fire()
    if run.timers[STEP_TIMER].fence.startswith("retry"):
        run.fire()
    assert run.timers[STEP_TIMER].due_at - run.now == 8


def test_timeout_exhausted_before_pivot_compensates_the_unknown_step() -> None:
    run = Run(checkout())
    run.ok()
    run.fire()
    run.fire()
    dec = run.fire()
    pay = run.step("pay")
    assert pay.status is StepStatus.COMPENSATING  # was UNKNOWN, now being undone
    assert pay.error == "step 'pay' timed out 3 times; outcome unknown"
    assert run.inst.reason == pay.error
    assert run.inst.state is SagaState.COMPENSATING
    comp = dec.outgoing[0]
    assert (comp.type, comp.idempotency_key) == ("VoidAuthorization", "s1:pay:comp:0")
    run.ok()
    assert run.inst.state is SagaState.COMPENSATED
    assert run.step("pay").status is StepStatus.COMPENSATED


def test_timeout_exhausted_without_ladder_just_compensates_earlier_steps() -> None:
    run = Run(ladder_def())
    run.advance_to("b")
    for _ in range(3):
        dec = run.fire()
    assert run.step("b").status is StepStatus.UNKNOWN
    assert dec.outgoing[0].type == "UndoA"


def test_timeout_exhausted_at_the_pivot_needs_a_person() -> None:
    run = Run(checkout())
    run.advance_to("ship")
    for _ in range(3):
        dec = run.fire()
    inst = run.inst
    assert inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert inst.status == "NEEDS_ATTENTION"
    assert inst.reason == "step 'ship' timed out 3 times; outcome unknown"
    assert run.step("ship").status is StepStatus.UNKNOWN
    assert dec.outgoing == []
    assert not any(e.compensates for e in run.sent)
    assert run.events(dec) == [
        "step.timed_out",
        "outcome.unknown",
        "manual.escalated",
        "saga.finished",
    ]
    assert set(dec.cancel_timers) >= {STEP_TIMER, DEADLINE_TIMER}


def test_timeout_exhausted_after_the_pivot_needs_a_person() -> None:
    run = Run(checkout())
    run.advance_to("complete")
    for _ in range(3):
        run.fire()
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.step("complete").status is StepStatus.UNKNOWN
    assert run.step("ship").status is StepStatus.SUCCEEDED
    assert not any(e.compensates for e in run.sent)


def test_failure_after_the_pivot_needs_a_person() -> None:
    run = Run(checkout())
    run.advance_to("complete")
    dec = run.fail("order service refused")
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.inst.reason == "step 'complete' failed after the pivot: order service refused"
    assert run.inst.status == "NEEDS_ATTENTION"
    assert run.step("complete").status is StepStatus.FAILED
    assert dec.outgoing == []
    assert run.events(dec) == ["step.failed", "manual.escalated", "saga.finished"]


def test_retryable_failures_after_the_pivot_retry_then_need_a_person() -> None:
    run = Run(checkout())
    run.advance_to("complete")
    for _ in range(2):
        run.fail("down", retryable=True)
        assert run.step("complete").status is StepStatus.WAITING_RETRY
        run.fire()
    run.fail("down", retryable=True)
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL


def test_failure_of_the_pivot_compensates_earlier_steps() -> None:
    run = Run(checkout())
    run.advance_to("ship")
    dec = run.fail("no carrier")
    assert run.step("ship").status is StepStatus.FAILED
    assert dec.outgoing[0].type == "ReleaseStock"
    run.ok()
    assert run.last.type == "VoidAuthorization"
    run.ok()
    assert run.inst.state is SagaState.COMPENSATED
    assert run.inst.reason == "step 'ship' failed: no carrier"


def test_optional_step_failure_is_skipped_and_partially_accepted() -> None:
    d = SagaDefinition(
        "s",
        [
            Step("a", command("x", "A"), command("x", "UndoA"), status="A"),
            Step(
                "gift", command("x", "Gift"), command("x", "UndoGift"), optional=True, status="GIFT"
            ),
            Step("b", command("x", "B"), kind="pivot", status="B"),
        ],
    )
    run = Run(d)
    run.ok()
    dec = run.fail("no gift wrap")
    assert run.step("gift").status is StepStatus.SKIPPED
    assert run.step("gift").error == "no gift wrap"
    assert run.events(dec) == ["step.skipped", "step.started"]
    assert run.last.type == "B"
    run.ok()
    assert run.inst.state is SagaState.PARTIAL_ACCEPTED
    assert run.inst.status == "PARTIALLY_COMPLETED"
    assert run.inst.terminal
    assert "gift" not in run.inst.results(["a", "gift", "b"])


def test_optional_step_retries_before_it_is_skipped() -> None:
    d = SagaDefinition(
        "s",
        [
            Step("gift", command("x", "Gift"), optional=True, retry=FAST),
            Step("b", command("x", "B")),
        ],
    )
    run = Run(d)
    run.fail("busy", retryable=True)
    assert run.step("gift").status is StepStatus.WAITING_RETRY
    run.fire()
    run.fail("no")
    assert run.step("gift").status is StepStatus.SKIPPED
    run.ok()
    assert run.inst.state is SagaState.PARTIAL_ACCEPTED


# --- compensation ladders ---------------------------------------------------------------


def to_pay_compensation(run: Run) -> None:
    run.advance_to("reserve")
    run.fail("out of stock")
    assert run.last.type == "VoidAuthorization"


def test_definite_compensation_failure_escalates_then_needs_a_person() -> None:
    run = Run(checkout())
    to_pay_compensation(run)
    dec = run.fail("authorization already captured")
    assert run.events(dec) == ["compensation.failed", "compensation.escalated", "compensation.sent"]
    refund = dec.outgoing[0]
    assert (refund.type, refund.idempotency_key, refund.attempt) == (
        "RefundPayment",
        "s1:pay:comp:1",
        1,
    )
    assert refund.compensates == "s1:pay:action"
    pay = run.step("pay")
    assert (pay.rung, pay.rung_attempt, pay.status) == (1, 1, StepStatus.COMPENSATING)
    assert dec.set_timers[0].fence == "timeout:1:comp:1:1:0"

    dec = run.fail("refund window closed")
    assert dec.outgoing[0].type == "IssueCreditNote"
    assert dec.outgoing[0].idempotency_key == "s1:pay:comp:2"

    dec = run.fail("ledger closed")
    assert dec.outgoing == []
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.inst.status == "NEEDS_ATTENTION"
    assert run.inst.reason == "compensation of step 'pay' failed on every rung: ledger closed"
    assert run.step("pay").status is StepStatus.COMPENSATION_FAILED
    assert run.events(dec) == ["compensation.failed", "manual.escalated", "saga.finished"]


def test_compensation_success_on_a_later_rung_continues() -> None:
    run = Run(checkout())
    run.advance_to("ship")
    run.fail("no carrier")
    run.ok()  # release
    run.fail("too late to void")
    assert run.last.type == "RefundPayment"
    run.ok(refund="R1")
    assert run.inst.state is SagaState.COMPENSATED
    assert run.step("pay").status is StepStatus.COMPENSATED
    assert run.step("pay").rung == 1


def test_retryable_compensation_failure_retries_same_rung() -> None:
    run = Run(checkout())
    to_pay_compensation(run)
    void = run.last
    dec = run.fail("gateway busy", retryable=True)
    pay = run.step("pay")
    assert pay.status is StepStatus.COMPENSATION_WAITING
    assert pay.next_retry_at == run.now + 1.0
    assert dec.outgoing == []
    assert dec.set_timers == [Timer("s1", STEP_TIMER, run.now + 1.0, "retry:1:comp:0:1:0")]
    dec = run.fire()
    again = dec.outgoing[0]
    assert (again.type, again.idempotency_key, again.attempt) == (
        "VoidAuthorization",
        void.idempotency_key,
        2,
    )
    assert run.step("pay").status is StepStatus.COMPENSATING
    run.fail("busy", retryable=True)
    run.fire()
    assert run.last.attempt == 3
    dec = run.fail("busy", retryable=True)  # retries on this rung are used up
    # An earlier try may have worked: only a definite failure goes down the ladder.
    assert dec.outgoing == []
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.step("pay").status is StepStatus.COMPENSATION_FAILED
    assert "outcome unknown" in (run.inst.reason or "")


def test_rung_uses_its_own_retry_policy_and_timeout() -> None:
    d = SagaDefinition(
        "s",
        [
            Step(
                "pay",
                command("p", "Pay"),
                [
                    Rung(command("p", "Void"), RetryPolicy(max_attempts=1), timeout=4),
                    command("p", "Refund"),
                ],
                retry=FAST,
            ),
            Step("b", command("x", "B")),
        ],
    )
    run = Run(d)
    run.ok()
    run.fail("no")
    assert run.timers[STEP_TIMER].due_at == run.now + 4
    run.fail("no such authorization")  # definite: down the ladder
    assert run.last.type == "Refund"
    assert run.timers[STEP_TIMER].due_at == run.now + 30


def test_compensation_timeout_resends_then_needs_a_person_without_escalating() -> None:
    run = Run(checkout())
    to_pay_compensation(run)
    void = run.last
    dec = run.fire()
    assert run.events(dec) == ["compensation.timed_out", "compensation.sent"]
    assert dec.outgoing[0].idempotency_key == void.idempotency_key
    assert dec.outgoing[0].attempt == 2
    run.fire()
    dec = run.fire()
    assert dec.outgoing == []
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.step("pay").status is StepStatus.COMPENSATION_FAILED
    assert run.inst.reason == (
        "compensation payment.VoidAuthorization of step 'pay' timed out 3 times; outcome unknown"
    )
    assert not any(e.type in ("RefundPayment", "IssueCreditNote") for e in run.sent)


# --- deadline ---------------------------------------------------------------------------


def test_deadline_before_pivot_compensates_and_times_out() -> None:
    run = Run(checkout())
    run.advance_to("reserve")
    dec = run.fire(DEADLINE_TIMER)
    assert run.inst.timed_out
    assert run.inst.state is SagaState.COMPENSATING
    assert run.inst.reason == "deadline passed"
    assert run.events(dec)[:2] == ["deadline.passed", "compensation.started"]
    assert run.step("reserve").status is StepStatus.COMPENSATING  # in flight: maybe happened
    assert dec.outgoing[0].type == "ReleaseStock"
    run.ok()
    run.ok()
    assert run.inst.state is SagaState.TIMED_OUT
    assert run.inst.status == "CANCELLED"
    assert run.inst.terminal


def test_deadline_while_waiting_for_retry_compensates_that_step() -> None:
    run = Run(checkout())
    run.ok()
    run.fail("busy", retryable=True)
    dec = run.fire(DEADLINE_TIMER)
    assert dec.outgoing[0].type == "VoidAuthorization"


def test_deadline_without_pivot() -> None:
    d = SagaDefinition(
        "s",
        [Step("a", command("x", "A"), command("x", "UndoA")), Step("b", command("x", "B"))],
        deadline=5,
    )
    run = Run(d)
    run.ok()
    dec = run.fire(DEADLINE_TIMER)
    assert dec.outgoing[0].type == "UndoA"
    run.ok()
    assert run.inst.state is SagaState.TIMED_OUT


def test_deadline_at_first_step_with_nothing_to_undo() -> None:
    run = Run(checkout())
    dec = run.fire(DEADLINE_TIMER)
    assert dec.outgoing == []
    assert run.inst.state is SagaState.TIMED_OUT
    assert run.step("validate").status is StepStatus.UNKNOWN


def test_deadline_while_pivot_in_flight_needs_a_person() -> None:
    run = Run(checkout())
    run.advance_to("ship")
    dec = run.fire(DEADLINE_TIMER)
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert "'ship'" in (run.inst.reason or "")
    assert dec.outgoing == []


def test_deadline_after_pivot_needs_a_person() -> None:
    run = Run(checkout())
    run.advance_to("complete")
    dec = run.fire(DEADLINE_TIMER)
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.inst.reason == "deadline passed at or after the pivot (step 'complete' not done)"
    assert run.inst.timed_out
    assert dec.outgoing == []
    assert run.events(dec) == ["deadline.passed", "manual.escalated", "saga.finished"]


def test_deadline_during_compensation_lets_it_continue() -> None:
    run = Run(checkout())
    to_pay_compensation(run)
    void_timer = run.timers[STEP_TIMER]
    before = run.inst.version
    dec = run.fire(DEADLINE_TIMER)
    assert dec.changed
    assert dec.instance.version == before + 1
    assert dec.outgoing == []
    assert dec.cancel_timers == []
    assert run.events(dec) == ["deadline.passed"]
    assert run.inst.state is SagaState.COMPENSATING
    assert run.timers[STEP_TIMER] == void_timer
    run.ok()  # the void's reply is still accepted
    assert run.inst.state is SagaState.TIMED_OUT


# --- cancel -----------------------------------------------------------------------------


def test_cancel_mid_step_compensates_the_in_flight_step_too() -> None:
    run = Run(checkout())
    run.advance_to("reserve")
    dec = run.cancel("customer changed mind")
    assert run.events(dec) == ["cancel.requested", "compensation.started", "compensation.sent"]
    assert run.inst.state is SagaState.COMPENSATING
    assert run.inst.status == "CANCELLING"
    assert run.inst.reason == "cancelled: customer changed mind"
    assert STEP_TIMER in {t.name for t in dec.set_timers}  # the timeout now guards the undo
    comp = dec.outgoing[0]
    assert (comp.type, comp.idempotency_key) == ("ReleaseStock", "s1:reserve:comp:0")
    run.ok()
    assert run.last.type == "VoidAuthorization"
    run.ok()
    assert run.inst.state is SagaState.COMPENSATED
    assert run.inst.status == "CANCELLED"
    assert [s.status for s in run.inst.steps[:3]] == [
        StepStatus.SUCCEEDED,  # validate: nothing to undo
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATED,
    ]


def test_cancel_at_first_step_without_ladder_ends_at_once() -> None:
    run = Run(checkout())
    dec = run.cancel()
    assert run.inst.state is SagaState.COMPENSATED
    assert dec.outgoing == []
    assert run.step("validate").status is StepStatus.UNKNOWN


def test_cancel_while_pivot_in_flight_then_pivot_succeeds() -> None:
    run = Run(checkout())
    run.advance_to("ship")
    before = run.inst
    dec = run.cancel("too slow")
    assert dec.changed
    assert dec.instance.version == before.version + 1
    assert dec.outgoing == [] and dec.set_timers == [] and dec.cancel_timers == []
    assert run.inst.cancel_requested
    assert run.inst.state is SagaState.RUNNING
    assert run.inst.status == "PENDING_SHIPMENT"
    assert run.events(dec) == ["cancel.requested"]
    dec = run.ok()
    assert "cancel.refused" in run.events(dec)
    assert not run.inst.cancel_requested
    assert run.last.type == "CompleteOrder"
    run.ok()
    assert run.inst.state is SagaState.SUCCEEDED


def test_cancel_while_pivot_in_flight_then_pivot_fails() -> None:
    run = Run(checkout())
    run.advance_to("ship")
    run.cancel()
    dec = run.fail("no carrier")
    assert run.inst.state is SagaState.COMPENSATING
    assert dec.outgoing[0].type == "ReleaseStock"
    run.ok()
    run.ok()
    assert run.inst.state is SagaState.COMPENSATED
    assert run.inst.status == "CANCELLED"


def test_cancel_after_pivot_is_refused() -> None:
    run = Run(checkout())
    run.advance_to("complete")
    before = run.inst
    dec = run.cancel()
    assert_unchanged(dec, before, "cancel.refused")
    assert dec.history[0].detail["why"] == "the saga is past its point of no return"


@pytest.mark.parametrize("end", ["succeeded", "compensated", "manual"])
def test_cancel_on_terminal_is_refused(end: str) -> None:
    run = Run(checkout())
    if end == "succeeded":
        for _ in range(5):
            run.ok()
    elif end == "compensated":
        run.fail()
    else:
        run.advance_to("complete")
        run.fail()
    assert run.inst.terminal
    before = run.inst
    dec = run.cancel()
    assert_unchanged(dec, before, "cancel.refused")
    assert dec.history[0].detail["why"] == f"saga is already {before.state.value}"


def test_duplicate_cancel_while_compensating() -> None:
    run = Run(checkout())
    run.advance_to("reserve")
    run.cancel()
    before = run.inst
    assert_unchanged(run.cancel(), before, "cancel.duplicate")


def test_cancel_while_compensating_after_failure_is_duplicate() -> None:
    run = Run(checkout())
    to_pay_compensation(run)
    before = run.inst
    assert_unchanged(run.cancel(), before, "cancel.duplicate")


def test_duplicate_cancel_while_pivot_in_flight() -> None:
    run = Run(checkout())
    run.advance_to("ship")
    run.cancel()
    before = run.inst
    assert_unchanged(run.cancel(), before, "cancel.duplicate")


def test_cancel_while_the_pivot_waits_for_a_retry_is_deferred_to_its_outcome() -> None:
    """An earlier try of the pivot may still be in flight (it timed out, it was not
    refused), so the machine does not guess: the pivot's outcome decides the cancel."""
    run = Run(checkout())
    run.advance_to("ship")
    run.fail("carrier busy", retryable=True)
    run.cancel()
    assert run.inst.state is SagaState.RUNNING
    assert run.inst.cancel_requested


def test_pivot_failure_after_a_deferred_cancel_compensates() -> None:
    run = Run(checkout())
    run.advance_to("ship")
    run.cancel()
    dec = run.fail("carrier refused")
    assert run.inst.state is SagaState.COMPENSATING
    assert dec.outgoing[0].type == "ReleaseStock"


# --- stale and duplicate inputs ---------------------------------------------------------


def test_reply_for_a_step_not_current_is_stale() -> None:
    run = Run(checkout())
    validate = run.last
    run.ok()
    before = run.inst
    dec = run.ok(cmd=validate)  # duplicate of the first reply
    assert_unchanged(dec, before, "reply.stale")
    h = dec.history[0]
    assert h.step == "validate"
    assert h.detail == {"why": "not waiting for this action", "ok": True, "attempt": 1, "fence": 1}
    assert h.message_id == f"{validate.message_id}/reply"


def test_reply_for_a_future_step_is_stale() -> None:
    run = Run(checkout())
    before = run.inst
    rep = run.make_reply(success()).with_changes(
        idempotency_key="s1:reserve:action", step="reserve"
    )
    assert_unchanged(run.deliver(rep), before, "reply.stale")


def test_reply_after_terminal_is_stale() -> None:
    run = Run(checkout())
    for _ in range(4):
        run.ok()
    last_cmd = run.last
    run.ok()
    assert run.inst.state is SagaState.SUCCEEDED
    before = run.inst
    for outcome in (success(), failure("x"), failure("x", retryable=True)):
        dec = run.reply(outcome, last_cmd)
        assert_unchanged(dec, before, "reply.stale")
        assert dec.history[0].detail["why"] == "saga is already SUCCEEDED"


def test_failure_from_an_older_attempt_is_ignored() -> None:
    run = Run(checkout())
    run.ok()
    attempt1 = run.last
    run.fire()  # timeout: attempt 2
    before = run.inst
    for retryable in (False, True):
        dec = run.fail("late failure", retryable=retryable, cmd=attempt1)
        assert_unchanged(dec, before, "reply.stale")
    assert run.step("pay").status is StepStatus.RUNNING


def test_success_from_an_older_attempt_is_accepted() -> None:
    run = Run(checkout())
    run.ok()
    attempt1 = run.last
    run.fire()
    dec = run.ok(cmd=attempt1, auth="A1")
    assert dec.changed
    pay = run.step("pay")
    assert pay.status is StepStatus.SUCCEEDED
    assert pay.result == {"auth": "A1"}
    assert pay.attempt == 2
    assert run.last.type == "ReserveStock"


def test_success_while_waiting_for_retry_is_accepted() -> None:
    run = Run(checkout())
    run.ok()
    attempt1 = run.last
    run.fire()
    run.fail("busy", retryable=True)  # attempt 2 failed
    dec = run.ok(cmd=attempt1)  # attempt 1 did happen after all
    assert dec.changed
    assert run.step("pay").status is StepStatus.SUCCEEDED
    assert STEP_TIMER in {t.name for t in dec.set_timers}  # the retry timer is replaced
    assert run.timers[STEP_TIMER].fence == "timeout:2:action:0:1:0"


def test_compensation_reply_for_the_wrong_rung_is_stale() -> None:
    run = Run(checkout())
    to_pay_compensation(run)
    void = run.last
    run.fail("too late")  # escalate to refund
    before = run.inst
    for outcome in (success(), failure("x")):
        dec = run.reply(outcome, void)
        assert_unchanged(dec, before, "reply.stale")
        assert dec.history[0].detail["why"] == "not waiting for this compensation"


def test_compensation_reply_while_running_is_stale() -> None:
    run = Run(checkout())
    run.ok()
    before = run.inst
    rep = run.make_reply(success()).with_changes(idempotency_key="s1:pay:comp:0")
    assert_unchanged(run.deliver(rep), before, "reply.stale")


def test_action_reply_while_compensating_that_step_is_stale() -> None:
    run = Run(checkout())
    run.advance_to("reserve")
    reserve = run.last
    run.cancel()
    before = run.inst
    # The reservation did happen after all: the release already on its way undoes it.
    assert_unchanged(run.ok(cmd=reserve), before, "reply.stale")


def test_compensation_failure_from_older_attempt_is_ignored_success_accepted() -> None:
    run = Run(checkout())
    to_pay_compensation(run)
    void1 = run.last
    run.fire()  # void attempt 2
    before = run.inst
    assert_unchanged(run.fail("late", cmd=void1), before, "reply.stale")
    dec = run.ok(cmd=void1)
    assert dec.changed
    assert run.inst.state is SagaState.COMPENSATED


def test_old_timeout_timer_is_stale() -> None:
    run = Run(checkout())
    run.ok()
    old = run.timers[STEP_TIMER]
    run.fire()  # attempt 2
    before = run.inst
    dec = run.fire(old)
    assert_unchanged(dec, before, "timer.stale")
    assert dec.history[0].detail == {
        "timer": STEP_TIMER,
        "fence": old.fence,
        "why": "step moved on",
    }


def test_retry_timer_after_resend_is_stale() -> None:
    run = Run(checkout())
    run.ok()
    run.fail("busy", retryable=True)
    retry = run.timers[STEP_TIMER]
    run.fire()
    before = run.inst
    assert_unchanged(run.fire(retry), before, "timer.stale")


def test_timeout_timer_while_waiting_for_retry_is_stale() -> None:
    run = Run(checkout())
    run.ok()
    timeout = run.timers[STEP_TIMER]
    run.fail("busy", retryable=True)
    before = run.inst
    assert_unchanged(run.fire(timeout), before, "timer.stale")


def test_timer_of_a_previous_step_is_stale() -> None:
    run = Run(checkout())
    old = run.timers[STEP_TIMER]
    run.ok()
    before = run.inst
    dec = run.fire(old)
    assert_unchanged(dec, before, "timer.stale")
    assert dec.history[0].detail["why"] == "saga moved to another step"


def test_action_timer_during_compensation_is_stale() -> None:
    run = Run(checkout())
    run.advance_to("reserve")
    action_timer = run.timers[STEP_TIMER]
    run.cancel()
    before = run.inst
    assert run.inst.cursor == 2  # compensating the same step
    assert_unchanged(run.fire(action_timer), before, "timer.stale")


def test_compensation_timer_of_previous_rung_or_attempt_is_stale() -> None:
    run = Run(checkout())
    to_pay_compensation(run)
    rung0 = run.timers[STEP_TIMER]
    run.fire()  # void attempt 2
    before = run.inst
    assert_unchanged(run.fire(rung0), before, "timer.stale")
    rung0_attempt2 = run.timers[STEP_TIMER]
    run.fail("too late")  # escalate to refund
    before = run.inst
    dec = run.fire(rung0_attempt2)
    assert_unchanged(dec, before, "timer.stale")
    assert dec.history[0].detail["why"] == "compensation moved on"


def test_compensation_retry_timer_after_resend_is_stale() -> None:
    run = Run(checkout())
    to_pay_compensation(run)
    run.fail("busy", retryable=True)
    retry = run.timers[STEP_TIMER]
    run.fire()
    before = run.inst
    assert_unchanged(run.fire(retry), before, "timer.stale")


@pytest.mark.parametrize("name", [STEP_TIMER, DEADLINE_TIMER])
def test_timers_after_terminal_are_stale(name: str) -> None:
    run = Run(checkout())
    timer = run.timers[name]
    run.fail()
    assert run.inst.terminal
    before = run.inst
    dec = run.fire(timer)
    assert_unchanged(dec, before, "timer.stale")
    assert dec.history[0].detail["why"] == "saga is already COMPENSATED"


@pytest.mark.parametrize(
    "fence",
    [
        "garbage",
        "",
        "timeout:x:action:0:1",
        "timeout:0:action:0",
        "a:b:c:d:e:f",
        "timeout:0:action:0:one",
    ],
)
def test_unreadable_fence_is_stale(fence: str) -> None:
    run = Run(checkout())
    before = run.inst
    dec = run.fire(Timer("s1", STEP_TIMER, NOW + 1, fence))
    assert_unchanged(dec, before, "timer.stale")
    assert dec.history[0].detail["why"] == f"unreadable fence {fence!r}"


def test_timer_for_out_of_range_step_is_stale() -> None:
    run = Run(checkout())
    before = run.inst
    for fence in ("timeout:9:action:0:1:0", "timeout:-1:action:0:1"):
        assert_unchanged(run.fire(Timer("s1", STEP_TIMER, NOW, fence)), before, "timer.stale")


def test_duplicate_retryable_action_failure_is_stale() -> None:
    run = Run(checkout())
    run.ok()
    rep = run.make_reply(failure("busy", retryable=True))
    run.deliver(rep)
    before = run.inst
    assert_unchanged(run.deliver(rep), before, "reply.stale")


def test_duplicate_retryable_compensation_failure_is_stale() -> None:
    run = Run(checkout())
    to_pay_compensation(run)
    rep = run.make_reply(failure("busy", retryable=True))
    run.deliver(rep)
    before = run.inst
    assert_unchanged(run.deliver(rep), before, "reply.stale")


def test_duplicate_deadline_during_compensation_is_stale() -> None:
    run = Run(checkout())
    run.advance_to("reserve")
    deadline = run.timers[DEADLINE_TIMER]
    run.fire(deadline)
    assert run.inst.state is SagaState.COMPENSATING
    before = run.inst
    assert_unchanged(run.fire(deadline), before, "timer.stale")


# --- malformed replies ------------------------------------------------------------------


def test_reply_without_idempotency_key_is_rejected() -> None:
    run = Run(checkout())
    rep = run.make_reply(success()).with_changes(idempotency_key=None)
    with pytest.raises(MessageError, match="no idempotency_key"):
        run.machine.on_reply(run.inst, rep, NOW)


def test_reply_for_another_saga_is_rejected() -> None:
    run = Run(checkout())
    rep = run.make_reply(success()).with_changes(idempotency_key="s2:validate:action")
    with pytest.raises(MessageError, match="is for saga s2, not s1"):
        run.machine.on_reply(run.inst, rep, NOW)


@pytest.mark.parametrize("key", ["garbage", "s1:validate", "s1:validate:comp:x"])
def test_reply_with_malformed_key_is_rejected(key: str) -> None:
    run = Run(checkout())
    rep = run.make_reply(success()).with_changes(idempotency_key=key)
    with pytest.raises(MessageError, match="not a sagakit step key"):
        run.machine.on_reply(run.inst, rep, NOW)


@pytest.mark.parametrize(
    "payload", [{}, {"ok": "yes"}, {"ok": True, "result": [1]}, {"ok": False, "retryable": "no"}]
)
def test_reply_with_malformed_payload_is_rejected(payload: dict[str, Any]) -> None:
    run = Run(checkout())
    rep = run.make_reply(success()).with_changes(payload=payload)
    with pytest.raises(MessageError):
        run.machine.on_reply(run.inst, rep, NOW)


def test_malformed_payload_is_rejected_even_after_terminal() -> None:
    run = Run(checkout())
    cmd = run.last
    run.fail()
    rep = run.make_reply(success(), cmd).with_changes(payload={"nope": 1})
    with pytest.raises(MessageError):
        run.machine.on_reply(run.inst, rep, NOW)


def test_reply_for_unknown_step_is_a_message_error() -> None:
    run = Run(checkout())
    rep = run.make_reply(success()).with_changes(idempotency_key="s1:nosuchstep:action")
    with pytest.raises(MessageError):
        run.machine.on_reply(run.inst, rep, NOW)


def test_inputs_do_not_mutate_the_given_instance() -> None:
    run = Run(checkout())
    before = run.inst
    snapshot = (before.version, before.state, before.status, [s.to_dict() for s in before.steps])
    run.ok()
    run.fail("busy", retryable=True)
    assert run.inst is not before
    assert snapshot == (
        before.version,
        before.state,
        before.status,
        [s.to_dict() for s in before.steps],
    )


# --- local steps ------------------------------------------------------------------------


def charge_card(ctx: StepContext) -> dict[str, Any]:
    return {"charge": ctx.idempotency_key}


def refund_card(ctx: StepContext) -> None:
    return None


def test_local_steps_are_sent_to_the_local_endpoint() -> None:
    d = SagaDefinition(
        "pay-saga",
        [
            Step("reserve", command("inventory", "Reserve"), command("inventory", "Release")),
            Step("charge", local(charge_card, "charge_card"), local(refund_card)),
            Step("ship", charge_card, kind="pivot"),
        ],
        version=4,
    )
    run = Run(d, endpoint="orch", data={"amount": 5})
    run.ok(reservation="R1")
    cmd = run.last
    assert cmd.type == LOCAL_COMMAND == "sagakit.local"
    assert cmd.destination == "orch.local"
    assert cmd.reply_to == "orch"
    assert cmd.version == 1
    assert cmd.step == "charge"
    assert cmd.idempotency_key == "s1:charge:action"
    assert cmd.payload == {
        "definition": "pay-saga",
        "definition_version": 4,
        "phase": "action",
        "data": {"amount": 5},
        "results": {"reserve": {"reservation": "R1"}},
    }
    run.ok(charge="C1")
    assert run.last.destination == "orch.local"
    assert run.last.payload["results"] == {
        "reserve": {"reservation": "R1"},
        "charge": {"charge": "C1"},
    }
    run.fail("no")  # the pivot (also local) fails: undo the charge
    comp = run.last
    assert comp.type == "sagakit.local"
    assert comp.destination == "orch.local"
    assert comp.idempotency_key == "s1:charge:comp:0"
    assert comp.compensates == "s1:charge:action"
    assert comp.payload["phase"] == "comp"
    run.ok()
    assert run.last.type == "Release"
    assert run.last.destination == "inventory"
    run.ok()
    assert run.inst.state is SagaState.COMPENSATED


def test_local_payload_is_a_copy_of_saga_data() -> None:
    data = {"a": 1}
    d = SagaDefinition("s", [Step("x", charge_card)])
    run = Run(d, data=data)
    run.last.payload["data"]["a"] = 2
    assert data == {"a": 1}
