"""The pure machine's status queries (unknown outcomes) and a person's manual actions.

A step whose outcome is unknown (timeouts, or "try again" answers, until its attempts
run out) asks its status query instead of guessing; the answer protocol is
``{"state": "done" | "failed" | "not_found" | "pending", "result": {...}, "reason": ...}``.
A saga in FAILED_NEEDS_MANUAL takes a person's decision (retry, mark_done, compensate,
mark_compensated, use_rung, accept_partial), each audited by a ``manual.resolved`` row.
"""

from __future__ import annotations

from typing import Any

import machine_run
import pytest

from sagakit.core.definition import RetryPolicy, SagaDefinition, Step, StepContext, command, local
from sagakit.core.envelope import Envelope, MessageKind, failure
from sagakit.core.instance import SagaInstance, SagaState, StepStatus, Timer
from sagakit.core.machine import (
    DEADLINE_TIMER,
    LOCAL_COMMAND,
    STEP_TIMER,
    Decision,
    ManualAction,
    query_key,
)
from sagakit.errors import ManualActionRefused, MessageError

FAST = RetryPolicy(max_attempts=3, initial_backoff=1, multiplier=2, jitter=0)


def _order(v: Any) -> dict[str, Any]:
    return {"order_id": v.business_key}


STATUS = command("payment", "GetPaymentStatus", _order)


def definition() -> SagaDefinition:
    """create -> pay (ladder, query) -> reserve -> capture (pivot, query) -> commit
    (retriable, query) -> complete (retriable, no query)."""
    return SagaDefinition(
        "checkout",
        [
            Step("create", command("order", "CreateOrder"), command("order", "CancelOrder")),
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
                status_query=STATUS,
            ),
            Step(
                "reserve",
                command("inventory", "Reserve"),
                command("inventory", "Release"),
                status="PENDING_INVENTORY",
                retry=FAST,
                timeout=20,
            ),
            Step(
                "capture",
                command("payment", "CapturePayment"),
                kind="pivot",
                status="COMPLETING",
                retry=FAST,
                timeout=10,
                status_query=STATUS,
            ),
            Step(
                "commit",
                command("inventory", "Commit"),
                kind="retriable",
                retry=FAST,
                timeout=10,
                status_query=command("inventory", "GetCommitStatus"),
            ),
            Step("complete", command("order", "Complete"), kind="retriable", retry=FAST),
        ],
        deadline=3600,
    )


INDEX = {"create": 0, "pay": 1, "reserve": 2, "capture": 3, "commit": 4, "complete": 5}


# --- harness ----------------------------------------------------------------------------


class Run(machine_run.Run):
    """The shared driver on this module's checkout definition; failures say "no"."""

    def __init__(self, d: SagaDefinition | None = None) -> None:
        super().__init__(d or definition())

    def fail(
        self, reason: str = "no", *, retryable: bool = False, cmd: Envelope | None = None
    ) -> Decision:
        return super().fail(reason, retryable=retryable, cmd=cmd)


def progress(inst: SagaInstance) -> list[tuple[Any, ...]]:
    """What each step did: status, attempts, rung, result."""
    return [(s.status, s.attempt, s.rung, s.rung_attempt, s.result) for s in inst.steps]


def assert_unchanged(dec: Decision, before: SagaInstance, event: str) -> None:
    assert dec.changed is False
    assert dec.instance is before
    assert dec.outgoing == [] and dec.set_timers == [] and dec.cancel_timers == []
    assert [h.event for h in dec.history] == [event]
    assert dec.history[0].version == before.version


def time_out(run: Run, step: str) -> Decision:
    """Let ``step`` time out on every attempt: its status query goes out."""
    run.advance_to(step)
    for _ in range(FAST.max_attempts):
        dec = run.fire()
    assert run.step(step).status is StepStatus.QUERYING
    return dec


def query_fails(run: Run, step: str) -> None:
    """Time ``step`` out, then let every status query fail: the saga needs a person."""
    time_out(run, step)
    for q in range(1, FAST.max_attempts + 1):
        run.fail("status service down")
        if q < FAST.max_attempts:
            run.fire()  # the retry wait is over: ask again
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL


def rungs_fail(run: Run) -> None:
    """``reserve`` fails, and every rung of pay's ladder fails for good."""
    run.advance_to("reserve")
    run.fail("out of stock")
    for _ in range(3):
        run.fail("refused")
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.step("pay").status is StepStatus.COMPENSATION_FAILED


def stuck_after_pivot(run: Run) -> None:
    """``commit`` (after the pivot) fails for good: the saga needs a person."""
    run.advance_to("commit")
    run.fail("reservation expired")
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.step("commit").status is StepStatus.FAILED


# --- status queries: sending ------------------------------------------------------------


def test_timeouts_exhausted_send_a_status_query() -> None:
    run = Run()
    run.advance_to("pay")
    action = run.last
    run.fire()
    run.fire()
    dec = run.fire()
    assert run.events(dec) == ["step.timed_out", "outcome.unknown", "status.queried"]
    assert run.inst.state is SagaState.RUNNING
    assert run.inst.status == "PENDING_PAYMENT"
    pay = run.step("pay")
    assert pay.status is StepStatus.QUERYING
    assert pay.queries == 1
    assert pay.error == "step 'pay' timed out 3 times; outcome unknown"
    assert len(dec.outgoing) == 1
    q = dec.outgoing[0]
    assert q.kind is MessageKind.QUERY
    assert (q.type, q.destination, q.step) == ("GetPaymentStatus", "payment", "pay")
    assert q.idempotency_key == query_key("s1", "pay") == "s1:pay:query"
    assert q.payload == {"order_id": "order-1", "action_key": action.idempotency_key}
    assert q.payload["action_key"] == "s1:pay:action"
    assert q.attempt == 1
    assert q.fence == run.inst.version
    assert q.compensates is None
    assert q.reply_to == "orchestrator"
    assert dec.set_timers == [Timer("s1", STEP_TIMER, run.now + 10, "timeout:1:query:0:1:0")]
    assert Envelope.from_json(q.to_json()) == q
    assert run.history("status.queried")[0].detail == {
        "query": 1,
        "action": "payment.GetPaymentStatus",
    }


def test_retryable_failures_exhausted_send_a_status_query() -> None:
    run = Run()
    run.advance_to("pay")
    for _ in range(2):
        run.fail("provider timed out", retryable=True)
        run.fire()
    dec = run.fail("provider timed out", retryable=True)
    assert run.events(dec) == ["step.failed", "outcome.unknown", "status.queried"]
    assert run.step("pay").status is StepStatus.QUERYING
    assert run.step("pay").error == "step 'pay' failed 3 times: provider timed out"
    assert dec.outgoing[0].kind is MessageKind.QUERY
    assert not any(e.compensates for e in run.sent)


def test_retryable_failures_exhausted_after_the_pivot_query_instead_of_a_person() -> None:
    run = Run()
    run.advance_to("commit")
    for _ in range(2):
        run.fail("warehouse busy", retryable=True)
        run.fire()
    dec = run.fail("warehouse busy", retryable=True)
    assert run.inst.state is SagaState.RUNNING
    assert (dec.outgoing[0].type, dec.outgoing[0].payload["action_key"]) == (
        "GetCommitStatus",
        "s1:commit:action",
    )


def test_retryable_failures_exhausted_after_the_pivot_without_a_query_need_a_person() -> None:
    run = Run()
    run.advance_to("complete")
    for _ in range(2):
        run.fail("busy", retryable=True)
        run.fire()
    dec = run.fail("busy", retryable=True)
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.inst.reason == "step 'complete' failed after the pivot: busy"
    assert dec.outgoing == []


def test_local_status_query_goes_to_the_local_endpoint() -> None:
    def pay(ctx: StepContext) -> dict[str, Any]:
        return {}

    def ask(ctx: StepContext) -> dict[str, Any]:
        return {"state": "done"}

    d = SagaDefinition(
        "local", [Step("pay", local(pay), retry=FAST, timeout=5, status_query=local(ask))]
    )
    run = Run(d)
    for _ in range(3):
        dec = run.fire()
    q = dec.outgoing[0]
    assert (q.type, q.destination, q.kind) == (
        LOCAL_COMMAND,
        "orchestrator.local",
        MessageKind.QUERY,
    )
    assert q.idempotency_key == "s1:pay:query"
    assert q.payload["phase"] == "query"
    assert q.payload["definition"] == "local"


# --- status queries: answers before, at and after the pivot -----------------------------


def test_done_before_the_pivot_settles_the_step_and_continues() -> None:
    run = Run()
    time_out(run, "pay")
    dec = run.answer("done", result={"authorization": "A-1", "amount": 100})
    assert run.events(dec) == ["status.answered", "step.succeeded", "step.started"]
    assert run.history("status.answered")[0].detail == {"state": "done", "query": 1}
    pay = run.step("pay")
    assert pay.status is StepStatus.SUCCEEDED
    assert pay.result == {"authorization": "A-1", "amount": 100}
    assert pay.error is None
    assert run.last.type == "Reserve"
    assert run.inst.status == "PENDING_INVENTORY"
    # The reserve step's own timeout replaces the query's.
    assert run.timers[STEP_TIMER].fence == "timeout:2:action:0:1:0"


def test_done_at_the_pivot_passes_it() -> None:
    run = Run()
    time_out(run, "capture")
    run.answer("done", result={"captured": 100})
    assert run.step("capture").status is StepStatus.SUCCEEDED
    assert run.step("capture").result == {"captured": 100}
    assert run.last.type == "Commit"
    run.ok()
    run.ok()
    assert run.inst.state is SagaState.SUCCEEDED
    assert not any(e.compensates for e in run.sent)


def test_done_after_the_pivot_continues() -> None:
    run = Run()
    time_out(run, "commit")
    run.answer("done")  # no result: the step's result is empty
    assert run.step("commit").status is StepStatus.SUCCEEDED
    assert run.step("commit").result == {}
    assert run.last.type == "Complete"


def test_failed_before_the_pivot_compensates_the_steps_before_it_only() -> None:
    run = Run()
    time_out(run, "pay")
    dec = run.answer("failed", reason="card declined")
    assert run.step("pay").status is StepStatus.FAILED
    assert run.step("pay").error == "card declined"
    assert run.inst.state is SagaState.COMPENSATING
    assert run.inst.reason == "step 'pay' failed: card declined"
    # A definite failure had no effect: no void, the order is cancelled.
    assert [e.type for e in dec.outgoing] == ["CancelOrder"]
    run.ok()
    assert run.inst.state is SagaState.COMPENSATED


def test_failed_without_a_reason_gets_one() -> None:
    run = Run()
    time_out(run, "pay")
    run.answer("failed")
    assert run.step("pay").error == "failed (per status query)"


def test_failed_at_the_pivot_compensates_the_steps_before_it() -> None:
    run = Run()
    time_out(run, "capture")
    dec = run.answer("failed", reason="authorization expired")
    assert run.step("capture").status is StepStatus.FAILED
    assert run.inst.state is SagaState.COMPENSATING
    assert [e.type for e in dec.outgoing] == ["Release"]


def test_failed_after_the_pivot_needs_a_person() -> None:
    run = Run()
    time_out(run, "commit")
    dec = run.answer("failed", reason="reservation expired")
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.inst.reason == "step 'commit' failed after the pivot: reservation expired"
    assert run.inst.status == "NEEDS_ATTENTION"
    assert dec.outgoing == []
    assert not any(e.compensates for e in run.sent)


def test_not_found_before_the_pivot_compensates_the_step_itself() -> None:
    """It never happened; the compensation tombstones the key so a late copy is refused."""
    run = Run()
    time_out(run, "pay")
    dec = run.answer("not_found")
    assert run.inst.state is SagaState.COMPENSATING
    assert run.inst.reason == "step 'pay' never happened (status query)"
    comp = dec.outgoing[0]
    assert (comp.type, comp.idempotency_key, comp.compensates) == (
        "VoidAuthorization",
        "s1:pay:comp:0",
        "s1:pay:action",
    )
    run.ok(voided=0)
    run.ok()
    assert run.inst.state is SagaState.COMPENSATED


@pytest.mark.parametrize("step", ["capture", "commit"])
def test_not_found_at_or_after_the_pivot_sends_the_action_again(step: str) -> None:
    run = Run()
    time_out(run, step)
    action_key = f"s1:{step}:action"
    dec = run.answer("not_found")
    again = dec.outgoing[0]
    assert again.kind is MessageKind.COMMAND
    assert (again.idempotency_key, again.attempt) == (action_key, 4)
    st = run.step(step)
    assert (st.status, st.retry_base, st.queries) == (StepStatus.RUNNING, 3, 0)
    assert run.timers[STEP_TIMER].fence == f"timeout:{INDEX[step]}:action:0:4:0"
    # A fresh budget: two more timeouts re-send, the third asks again.
    run.fire()
    run.fire()
    assert run.last.attempt == 6 and run.last.kind is MessageKind.COMMAND
    run.fire()
    assert run.last.kind is MessageKind.QUERY
    assert run.last.attempt == 1  # the query count starts over
    run.ok(cmd=None, state="done")
    assert st is not run.step(step)
    assert run.step(step).status is StepStatus.SUCCEEDED


def test_not_found_again_and_again_at_the_pivot_needs_a_person() -> None:
    run = Run()
    time_out(run, "capture")
    for _ in range(2):
        run.answer("not_found")
        for _ in range(3):
            run.fire()
    assert run.step("capture").attempt == 9
    dec = run.answer("not_found")
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.inst.reason == "step 'capture' keeps not happening after 9 attempts"
    assert dec.outgoing == []


@pytest.mark.parametrize("step", ["pay", "capture", "commit"])
def test_pending_asks_again_after_a_backoff(step: str) -> None:
    run = Run()
    time_out(run, step)
    dec = run.answer("pending")
    assert run.events(dec) == ["status.answered", "retry.scheduled"]
    assert dec.outgoing == []
    st = run.step(step)
    assert st.status is StepStatus.QUERYING
    assert st.next_retry_at == run.now + 1.0
    assert dec.set_timers == [
        Timer("s1", STEP_TIMER, run.now + 1.0, f"retry:{INDEX[step]}:query:0:1:0")
    ]
    assert run.history("retry.scheduled")[-1].detail == {
        "phase": "query",
        "attempt": 1,
        "reason": "the participant is still working on it",
    }
    dec = run.fire()
    q = dec.outgoing[0]
    assert (q.kind, q.attempt, q.idempotency_key) == (
        MessageKind.QUERY,
        2,
        f"s1:{step}:query",
    )
    assert run.step(step).next_retry_at is None
    assert run.timers[STEP_TIMER].fence == f"timeout:{INDEX[step]}:query:0:2:0"
    run.answer("done")
    assert run.step(step).status is StepStatus.SUCCEEDED


def test_pending_forever_needs_a_person() -> None:
    run = Run()
    time_out(run, "capture")
    for _ in range(2):
        run.answer("pending")
        run.fire()
    dec = run.answer("pending")
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.inst.reason == (
        "outcome of step 'capture' still unknown after 3 status queries: "
        "the participant is still working on it"
    )
    assert set(dec.cancel_timers) >= {STEP_TIMER, DEADLINE_TIMER}


def test_an_answer_with_an_unknown_state_is_a_message_error() -> None:
    run = Run()
    time_out(run, "pay")
    with pytest.raises(MessageError, match="state 'maybe'"):
        run.answer("maybe")
    with pytest.raises(MessageError, match="state None"):
        run.ok()


# --- status queries: failures and timeouts ----------------------------------------------


def test_query_failures_are_retried_then_need_a_person() -> None:
    run = Run()
    time_out(run, "capture")
    dec = run.fail("status service down")
    assert run.events(dec) == ["retry.scheduled"]
    assert run.step("capture").status is StepStatus.QUERYING
    assert run.timers[STEP_TIMER].fence == "retry:3:query:0:1:0"
    run.fire()
    assert (run.last.kind, run.last.attempt) == (MessageKind.QUERY, 2)
    run.fail("status service down")
    assert run.timers[STEP_TIMER].due_at == run.now + 2.0  # backoff grows
    run.fire()
    assert run.last.attempt == 3
    dec = run.fail("status service down")
    assert run.events(dec) == ["manual.escalated", "saga.finished"]
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.inst.reason == (
        "outcome of step 'capture' still unknown after 3 status queries: status service down"
    )
    assert [e.attempt for e in run.sent if e.kind is MessageKind.QUERY] == [1, 2, 3]
    assert not any(e.compensates for e in run.sent)


def test_query_timeouts_are_retried_then_need_a_person() -> None:
    run = Run()
    time_out(run, "pay")
    dec = run.fire()
    assert run.events(dec) == ["status.timed_out", "retry.scheduled"]
    assert dec.outgoing == []
    assert run.timers[STEP_TIMER].fence == "retry:1:query:0:1:0"
    dec = run.fire()
    assert run.events(dec) == ["status.queried"]
    assert run.timers[STEP_TIMER].fence == "timeout:1:query:0:2:0"
    run.fire()  # timeout of query 2
    run.fire()  # its retry: query 3
    assert run.last.attempt == 3
    dec = run.fire()  # timeout of query 3
    assert run.events(dec) == ["status.timed_out", "manual.escalated", "saga.finished"]
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.inst.reason == (
        "outcome of step 'pay' still unknown after 3 status queries: no answer to the status query"
    )
    # Before the pivot too a person decides: the action may have happened.
    assert not any(e.compensates for e in run.sent)


# --- status queries: stale answers ------------------------------------------------------


def test_answer_to_an_earlier_query_is_stale() -> None:
    run = Run()
    time_out(run, "pay")
    first = run.last
    run.fire()  # no answer in time
    run.fire()  # query 2 goes out
    before = run.inst
    dec = run.answer("done", cmd=first)
    assert_unchanged(dec, before, "reply.stale")
    assert dec.history[0].detail == {
        "why": "not waiting for this status answer",
        "ok": True,
        "attempt": 1,
        "fence": first.fence,
    }
    run.answer("not_found")  # the current query's answer counts
    assert run.inst.state is SagaState.COMPENSATING


def test_answer_while_waiting_to_ask_again_is_stale() -> None:
    run = Run()
    time_out(run, "pay")
    q = run.last
    run.answer("pending", cmd=q)
    before = run.inst
    assert_unchanged(run.answer("done", cmd=q), before, "reply.stale")


def test_answer_after_the_step_moved_on_is_stale() -> None:
    run = Run()
    time_out(run, "pay")
    q = run.last
    run.answer("done", cmd=q)
    before = run.inst
    assert_unchanged(run.answer("failed", cmd=q), before, "reply.stale")
    assert run.step("pay").status is StepStatus.SUCCEEDED


def test_answer_after_a_cancel_is_stale() -> None:
    run = Run()
    time_out(run, "pay")
    q = run.last
    run.cancel("customer left")
    assert run.inst.state is SagaState.COMPENSATING
    assert run.last.type == "VoidAuthorization"  # QUERYING may have had an effect
    before = run.inst
    assert_unchanged(run.answer("done", cmd=q), before, "reply.stale")


def test_answer_after_the_saga_ended_is_stale() -> None:
    run = Run()
    time_out(run, "commit")
    q = run.last
    run.answer("failed", cmd=q, reason="gone")
    before = run.inst
    dec = run.answer("done", cmd=q)
    assert_unchanged(dec, before, "reply.stale")
    assert dec.history[0].detail["why"] == "saga is already FAILED_NEEDS_MANUAL"


def test_late_action_reply_while_querying_is_stale_the_answer_decides() -> None:
    run = Run()
    run.advance_to("pay")
    action = run.last
    for _ in range(3):
        run.fire()
    before = run.inst
    assert_unchanged(run.ok(cmd=action, authorization="A-1"), before, "reply.stale")
    run.answer("done", result={"authorization": "A-1"})
    assert run.step("pay").status is StepStatus.SUCCEEDED


def test_query_timer_after_the_answer_is_stale() -> None:
    run = Run()
    time_out(run, "pay")
    old = run.timers[STEP_TIMER]
    run.answer("pending")
    before = run.inst
    dec = run.fire(old)
    assert_unchanged(dec, before, "timer.stale")
    assert dec.history[0].detail["why"] == "status query moved on"


# --- manual actions: audit and refusals -------------------------------------------------


def test_manual_resolution_is_audited() -> None:
    run = Run()
    stuck_after_pivot(run)
    version = run.inst.version
    dec = run.manual(ManualAction.MARK_DONE, reason="committed by hand, ticket 7", actor="bob")
    row = dec.history[0]
    assert row.event == "manual.resolved"
    assert row.step == "commit"
    assert row.version == version + 1
    assert row.state is SagaState.FAILED_NEEDS_MANUAL  # what the person acted on
    assert row.status == "NEEDS_ATTENTION"
    assert row.detail == {
        "action": "mark_done",
        "actor": "bob",
        "reason": "committed by hand, ticket 7",
        "rung": None,
        "previous_reason": "step 'commit' failed after the pivot: reservation expired",
    }
    assert dec.instance.version == version + 1


@pytest.mark.parametrize(
    "state",
    ["running", "compensating", "succeeded", "compensated", "timed_out", "partial"],
)
def test_manual_action_refused_outside_the_manual_queue(state: str) -> None:
    run = Run()
    if state == "running":
        run.advance_to("pay")
    elif state == "compensating":
        run.advance_to("reserve")
        run.fail("out of stock")
    elif state == "succeeded":
        for _ in range(6):
            run.ok()
    elif state == "compensated":
        run.fail("invalid order")
    elif state == "timed_out":
        run.advance_to("pay")
        run.fire(DEADLINE_TIMER)
        run.ok()
        run.ok()
    else:
        stuck_after_pivot(run)
        run.manual(ManualAction.ACCEPT_PARTIAL)
    before = run.inst
    expected = before.state.value
    for action in ManualAction:
        with pytest.raises(ManualActionRefused, match=f"is {expected}; only FAILED_NEEDS_MANUAL"):
            run.manual(action, rung=0)
    assert run.inst is before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reason": ""}, "needs a reason"),
        ({"reason": "   "}, "needs a reason"),
        ({"actor": ""}, "needs the actor"),
        ({"actor": " \t"}, "needs the actor"),
    ],
)
def test_manual_action_needs_a_reason_and_an_actor(kwargs: dict[str, str], match: str) -> None:
    run = Run()
    stuck_after_pivot(run)
    before = run.inst
    with pytest.raises(ManualActionRefused, match=match):
        run.manual(ManualAction.MARK_DONE, **kwargs)
    assert run.inst is before and before.state is SagaState.FAILED_NEEDS_MANUAL


def test_unknown_manual_action_is_refused_with_the_choices() -> None:
    run = Run()
    stuck_after_pivot(run)
    with pytest.raises(ManualActionRefused, match=r"unknown manual action 'reboot'.*mark_done"):
        run.manual("reboot")
    run.manual("mark_done")  # the string form of an action is accepted
    assert run.inst.state is SagaState.RUNNING


def test_refused_action_leaves_the_instance_untouched() -> None:
    run = Run()
    stuck_after_pivot(run)
    before = run.inst
    snapshot = before.steps_to_json()
    with pytest.raises(ManualActionRefused):
        run.manual(ManualAction.COMPENSATE)
    assert before.steps_to_json() == snapshot
    assert before.state is SagaState.FAILED_NEEDS_MANUAL


# --- manual actions: retry --------------------------------------------------------------


def test_retry_of_a_stuck_forward_step_has_a_fresh_budget() -> None:
    run = Run()
    query_fails(run, "capture")
    dec = run.manual(ManualAction.RETRY, reason="provider is back")
    assert run.events(dec) == ["manual.resolved", "step.started", "deadline.set"]
    assert run.inst.state is SagaState.RUNNING
    assert run.inst.reason is None
    assert run.inst.status == "COMPLETING"
    again = dec.outgoing[0]
    assert (again.type, again.idempotency_key, again.attempt) == (
        "CapturePayment",
        "s1:capture:action",
        4,
    )
    st = run.step("capture")
    assert (st.status, st.retry_base, st.queries) == (StepStatus.RUNNING, 3, 0)
    assert dec.set_timers == [
        # The decision's version is the step's new fence floor: timers set before it
        # never match the tries it starts.
        Timer("s1", STEP_TIMER, run.now + 10, f"timeout:3:action:0:4:{st.fence_floor}"),
        # The SLA counts again: a new deadline, which an old deadline timer does not match.
        Timer("s1", DEADLINE_TIMER, run.now + 3600, f"deadline@{run.now + 3600!r}"),
    ]
    assert st.fence_floor == run.inst.version > 0
    run.fire()
    run.fire()
    assert run.last.kind is MessageKind.COMMAND and run.last.attempt == 6
    run.fire()  # the fresh budget is used up: ask again
    assert run.last.kind is MessageKind.QUERY
    run.answer("done")
    run.ok()
    run.ok()
    assert run.inst.state is SagaState.SUCCEEDED


def test_a_saga_sent_forward_by_a_person_gets_its_deadline_back() -> None:
    """The deadline passed after the pivot (manual queue); a person retries; it can pass again."""
    run = Run()
    run.advance_to("commit")
    run.fire(DEADLINE_TIMER)
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL and run.inst.timed_out
    assert DEADLINE_TIMER not in run.timers
    run.manual(ManualAction.RETRY, reason="inventory is back")
    assert not run.inst.timed_out
    assert run.inst.deadline_at == run.now + 3600
    assert run.timers[DEADLINE_TIMER].due_at == run.now + 3600
    dec = run.fire(DEADLINE_TIMER)  # nobody answered within the SLA again: a person again
    assert "deadline.passed" in run.events(dec)
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert "deadline passed" in (run.inst.reason or "")


def test_a_compensation_resumed_by_a_person_gets_no_deadline() -> None:
    run = Run()
    rungs_fail(run)
    dec = run.manual(ManualAction.RETRY)
    assert run.inst.state is SagaState.COMPENSATING
    assert all(t.name != DEADLINE_TIMER for t in dec.set_timers)


def test_retry_of_a_definitely_failed_step_after_the_pivot() -> None:
    run = Run()
    stuck_after_pivot(run)
    dec = run.manual(ManualAction.RETRY)
    assert dec.outgoing[0].idempotency_key == "s1:commit:action"
    assert run.step("commit").attempt == 2 and run.step("commit").retry_base == 1
    run.ok()
    run.ok()
    assert run.inst.state is SagaState.SUCCEEDED


def test_retry_of_a_stuck_compensation_rung_has_a_fresh_budget() -> None:
    run = Run()
    run.advance_to("reserve")
    run.fail("out of stock")
    void = run.last
    for _ in range(3):
        run.fire()
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    assert run.step("pay").status is StepStatus.COMPENSATION_FAILED
    dec = run.manual(ManualAction.RETRY, reason="provider answered the phone")
    assert run.events(dec) == ["manual.resolved", "compensation.sent"]
    assert run.inst.state is SagaState.COMPENSATING
    assert run.inst.status == "CANCELLING"
    assert run.inst.reason is None
    again = dec.outgoing[0]
    assert (again.type, again.idempotency_key, again.attempt) == (
        "VoidAuthorization",
        void.idempotency_key,
        1,
    )
    assert again.compensates == "s1:pay:action"
    pay = run.step("pay")
    assert (pay.rung, pay.rung_attempt, pay.status) == (0, 1, StepStatus.COMPENSATING)
    run.fire()
    run.fire()
    assert run.inst.state is SagaState.COMPENSATING  # two more tries were in the budget
    run.ok(voided=100)
    assert run.last.type == "CancelOrder"
    run.ok()
    assert run.inst.state is SagaState.COMPENSATED
    assert run.inst.status == "CANCELLED"


def test_reply_from_before_a_manual_retry_is_stale() -> None:
    d = SagaDefinition(
        "checkout",
        [
            Step(
                "create",
                command("order", "CreateOrder"),
                [
                    command("order", "CancelOrder"),
                    command("order", "ArchiveOrder"),
                ],
                retry=RetryPolicy(max_attempts=1),
                timeout=10,
            ),
            Step("pay", command("payment", "AuthorizePayment"), kind="pivot"),
        ],
    )
    run = Run(d)
    run.ok()
    run.fail("declined")
    old_cancel = run.last
    run.fire()  # the cancel timed out: a person decides
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    run.manual(ManualAction.RETRY)
    assert run.last.attempt == old_cancel.attempt == 1
    before = run.inst
    # The first try's answer was only delayed; it comes now, from before the decision.
    dec = run.reply(failure("order service busy", retryable=True), old_cancel)
    assert_unchanged(dec, before, "reply.stale")


def test_status_after_a_manual_retry_of_an_unlabelled_step_is_not_needs_attention() -> None:
    run = Run()
    stuck_after_pivot(run)
    run.manual(ManualAction.RETRY)
    assert run.inst.state is SagaState.RUNNING
    assert run.inst.status == "COMPLETING"  # the label in force for 'commit'


# --- manual actions: mark_done ----------------------------------------------------------


def test_mark_done_records_the_person_and_continues_forward() -> None:
    run = Run()
    stuck_after_pivot(run)
    dec = run.manual(ManualAction.MARK_DONE, reason="shipped from the store", actor="carol")
    assert run.events(dec) == ["manual.resolved", "step.started", "deadline.set"]
    commit = run.step("commit")
    assert commit.status is StepStatus.SUCCEEDED
    assert commit.result == {"resolved_by": "carol", "reason": "shipped from the store"}
    assert commit.finished_at == run.now
    assert run.inst.state is SagaState.RUNNING
    assert run.inst.reason is None
    assert dec.outgoing[0].type == "Complete"
    run.ok()
    assert run.inst.state is SagaState.SUCCEEDED
    assert run.inst.status == "COMPLETED"


def test_mark_done_of_the_last_step_finishes() -> None:
    run = Run()
    run.advance_to("complete")
    run.fail("order service refused")
    dec = run.manual(ManualAction.MARK_DONE)
    assert run.inst.state is SagaState.SUCCEEDED
    assert dec.outgoing == []
    assert run.events(dec) == ["manual.resolved", "saga.finished"]
    assert DEADLINE_TIMER not in run.timers  # finished: no SLA to watch


def test_mark_done_of_a_stuck_pivot_passes_it() -> None:
    run = Run()
    query_fails(run, "capture")
    run.manual(ManualAction.MARK_DONE, reason="provider shows the capture")
    assert run.step("capture").status is StepStatus.SUCCEEDED
    assert run.last.type == "Commit"


def test_mark_done_refused_while_compensating() -> None:
    run = Run()
    rungs_fail(run)
    with pytest.raises(ManualActionRefused, match="being compensated; use mark_compensated"):
        run.manual(ManualAction.MARK_DONE)


# --- manual actions: compensate ---------------------------------------------------------


def test_compensate_a_stuck_step_before_the_pivot_undoes_it_too() -> None:
    run = Run()
    query_fails(run, "pay")
    dec = run.manual(ManualAction.COMPENSATE, reason="customer asked to cancel", actor="dan")
    assert run.events(dec) == ["manual.resolved", "compensation.started", "compensation.sent"]
    assert run.inst.state is SagaState.COMPENSATING
    assert run.inst.status == "CANCELLING"
    assert run.inst.reason == "compensation decided by dan: customer asked to cancel"
    void = dec.outgoing[0]
    assert (void.type, void.compensates) == ("VoidAuthorization", "s1:pay:action")
    run.ok(voided=100)
    assert run.last.type == "CancelOrder"
    run.ok()
    assert run.inst.state is SagaState.COMPENSATED


def test_compensate_at_the_pivot_undoes_the_steps_before_it() -> None:
    run = Run()
    query_fails(run, "capture")
    dec = run.manual(ManualAction.COMPENSATE)
    assert run.step("capture").status is StepStatus.FAILED  # no ladder: nothing to undo
    assert [e.type for e in dec.outgoing] == ["Release"]
    run.ok()
    assert run.last.type == "VoidAuthorization"
    run.ok()
    run.ok()
    assert run.inst.state is SagaState.COMPENSATED


def test_compensate_refused_after_the_pivot() -> None:
    run = Run()
    stuck_after_pivot(run)
    with pytest.raises(ManualActionRefused, match="past the pivot; nothing after it is undone"):
        run.manual(ManualAction.COMPENSATE)
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL


def test_compensate_refused_while_compensating() -> None:
    run = Run()
    rungs_fail(run)
    with pytest.raises(ManualActionRefused, match="already being compensated"):
        run.manual(ManualAction.COMPENSATE)


# --- manual actions: mark_compensated and use_rung --------------------------------------


def test_mark_compensated_continues_backward() -> None:
    run = Run()
    rungs_fail(run)
    dec = run.manual(
        ManualAction.MARK_COMPENSATED, reason="refunded by bank transfer", actor="erin"
    )
    assert run.events(dec) == ["manual.resolved", "compensation.sent"]
    assert run.step("pay").status is StepStatus.COMPENSATED
    assert run.inst.state is SagaState.COMPENSATING
    assert run.inst.status == "CANCELLING"
    assert dec.outgoing[0].type == "CancelOrder"
    run.ok()
    assert run.inst.state is SagaState.COMPENSATED
    assert run.inst.status == "CANCELLED"


def test_mark_compensated_of_the_first_step_finishes() -> None:
    run = Run()
    run.ok()
    run.fail("declined")  # pay failed for good: only create is undone
    for _ in range(3):
        run.fire()
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    dec = run.manual(ManualAction.MARK_COMPENSATED)
    assert dec.outgoing == []
    assert run.inst.state is SagaState.COMPENSATED


def test_mark_compensated_refused_for_a_forward_step() -> None:
    run = Run()
    stuck_after_pivot(run)
    with pytest.raises(ManualActionRefused, match="is not being compensated"):
        run.manual(ManualAction.MARK_COMPENSATED)


def test_use_rung_runs_the_credit_note() -> None:
    run = Run()
    rungs_fail(run)
    dec = run.manual(ManualAction.USE_RUNG, rung=2, reason="issue a credit note instead")
    row = dec.history[0]
    assert (row.event, row.detail["rung"], row.detail["action"]) == (
        "manual.resolved",
        2,
        "use_rung",
    )
    note = dec.outgoing[0]
    assert (note.type, note.idempotency_key, note.attempt, note.compensates) == (
        "IssueCreditNote",
        "s1:pay:comp:2",
        1,
        "s1:pay:action",
    )
    pay = run.step("pay")
    assert (pay.rung, pay.rung_attempt, pay.status) == (2, 1, StepStatus.COMPENSATING)
    assert run.inst.state is SagaState.COMPENSATING
    assert run.timers[STEP_TIMER].fence == f"timeout:1:comp:2:1:{pay.fence_floor}"
    assert pay.fence_floor > 0  # set by the person's decision
    run.ok(credited=100)
    run.ok()
    assert run.inst.state is SagaState.COMPENSATED


def test_use_rung_can_go_back_to_an_earlier_rung() -> None:
    run = Run()
    rungs_fail(run)
    dec = run.manual(ManualAction.USE_RUNG, rung=1)
    assert dec.outgoing[0].type == "RefundPayment"


@pytest.mark.parametrize("rung", [None, 3, -1])
def test_use_rung_refuses_a_rung_the_ladder_does_not_have(rung: int | None) -> None:
    run = Run()
    rungs_fail(run)
    before = run.inst
    with pytest.raises(ManualActionRefused, match=r"rung must be one of \['0: payment.Void"):
        run.manual(ManualAction.USE_RUNG, rung=rung)
    assert run.inst is before


def test_use_rung_refused_for_a_forward_step() -> None:
    run = Run()
    stuck_after_pivot(run)
    with pytest.raises(ManualActionRefused, match="is not being compensated"):
        run.manual(ManualAction.USE_RUNG, rung=0)


# --- manual actions: accept_partial -----------------------------------------------------


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_accept_partial_ends_the_saga_as_it_stands(where: str) -> None:
    run = Run()
    if where == "forward":
        stuck_after_pivot(run)
    else:
        rungs_fail(run)
    steps = progress(run.inst)
    # Backward, the failed undo is an open compensation: only a forced accept applies.
    force = where == "backward"
    dec = run.manual(
        ManualAction.ACCEPT_PARTIAL, reason="customer keeps it", actor="fay", force=force
    )
    assert run.events(dec) == ["manual.resolved", "saga.finished"]
    assert run.inst.state is SagaState.PARTIAL_ACCEPTED
    assert run.inst.terminal
    assert run.inst.status == "PARTIALLY_COMPLETED"
    assert run.inst.reason == "accepted by fay: customer keeps it"
    assert dec.outgoing == []
    assert set(dec.cancel_timers) >= {STEP_TIMER, DEADLINE_TIMER}
    assert progress(run.inst) == steps  # no step moves
    assert dec.history[-1].detail == {
        "outcome": "PARTIAL_ACCEPTED",
        "reason": "accepted by fay: customer keeps it",
    }


# --- timers read before a person's decision ----------------------------------------------


def test_a_rung_timer_read_before_a_decision_does_not_match_the_try_it_started() -> None:
    run = Run()
    run.advance_to("reserve")
    run.fail("out of stock")
    run.fail("refused")
    run.fail("refused")  # void and refund failed: the credit note (rung 2) is on its way
    held = run.timers[STEP_TIMER]  # a second worker reads its timeout when it is due
    assert held.fence == "timeout:1:comp:2:1:0"
    run.fail("refused")
    assert run.inst.state is SagaState.FAILED_NEEDS_MANUAL
    run.manual(ManualAction.USE_RUNG, rung=2)  # try 1 of the credit note, again
    pay = run.step("pay")
    assert (pay.rung, pay.rung_attempt, pay.status) == (2, 1, StepStatus.COMPENSATING)
    dec = run.fire(held)
    assert not dec.changed
    assert [(h.event, h.detail["why"]) for h in dec.history] == [
        ("timer.stale", "set before a person decided on the step")
    ]
    assert run.step("pay").rung_attempt == 1  # the new try keeps its whole timeout


def test_a_deadline_read_before_a_decision_does_not_end_the_new_one() -> None:
    run = Run()
    held = run.timers[DEADLINE_TIMER]
    stuck_after_pivot(run)
    run.manual(ManualAction.RETRY)  # the SLA counts again from the decision
    assert run.inst.deadline_at == run.timers[DEADLINE_TIMER].due_at > held.due_at
    dec = run.fire(held)
    assert not dec.changed and not run.inst.timed_out
    assert dec.history[0].detail["why"] == "its deadline is no longer in force"


def test_a_decision_to_compensate_leaves_no_deadline_in_force() -> None:
    run = Run()
    held = run.timers[DEADLINE_TIMER]
    rungs_fail(run)
    run.manual(ManualAction.USE_RUNG, rung=2)
    assert run.inst.state is SagaState.COMPENSATING and run.inst.deadline_at is None
    dec = run.fire(held)
    assert not dec.changed and not run.inst.timed_out


def test_timers_set_by_an_earlier_release_still_fire() -> None:
    # Fences written before the fence floor and the deadline were part of them.
    run = Run()
    step = run.timers[STEP_TIMER]
    dec = run.fire(Timer("s1", STEP_TIMER, step.due_at, "timeout:0:action:0:1"))
    assert dec.changed and dec.outgoing[0].attempt == 2
    deadline = run.timers[DEADLINE_TIMER]
    dec = run.fire(Timer("s1", DEADLINE_TIMER, deadline.due_at, "deadline"))
    assert dec.changed and run.inst.timed_out
