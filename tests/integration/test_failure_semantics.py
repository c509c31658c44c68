"""Failure semantics end to end, on the real SQLite runtime.

Timeouts on durable timers (and across a restart), retries with backoff, definite
errors, the saga deadline, unknown outcomes settled by a status query, the payment
compensation ladder down to a person, a person's decisions, fencing, tombstones, the
pivot, cancellation, the last item under a rush of orders, and reservations that
outlive their saga.

Faults are scripted, not random: a test holds (or drops) exactly the deliveries it is
about, at the consumer, where the runtime's own recovery has to deal with them. The
reference checkout (``sagakit_checkout``) runs with short timeouts; small sagas of
local steps and a tiny ``svc`` participant cover the engine on its own.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sagakit_checkout import inventory
from sagakit_checkout.invariants import InvariantReport, check_invariants
from sagakit_checkout.payment import ledger
from sagakit_checkout.sagas import CHECKOUT, checkout_definition
from sagakit_checkout.services import Checkout, checkout_engine, migrate, open_checkout

from sagakit import (
    Engine,
    Envelope,
    HistoryEntry,
    ManualAction,
    ManualActionRefused,
    Participant,
    RetryPolicy,
    SagaDefinition,
    SagaInstance,
    SagaState,
    SagaView,
    Step,
    StepContext,
    StepFailed,
    StepKind,
    StepStatus,
    command,
    embedded,
    failure,
    local,
)
from sagakit.core.envelope import reply_to
from sagakit.errors import MessageError
from sagakit.runtime.consumer import FaultHook
from sagakit.runtime.participant import REFUSED_AFTER_COMPENSATION
from sagakit.stores.base import Tx
from sagakit.stores.sqlite import SQLiteStore
from sagakit.transports.base import ACK, BatchHandler, Delivery, Settle, retry

QUICK = RetryPolicy(max_attempts=3, initial_backoff=0.02, max_backoff=0.1, jitter=0.0)
FORWARD = RetryPolicy(max_attempts=6, initial_backoff=0.02, max_backoff=0.1, jitter=0.0)
STOCK = {"sku-1": 10, "sku-last": 1}

# -- scripted faults -------------------------------------------------------------------


@dataclass
class Rule:
    """Deliveries to ``endpoint`` that ``match`` are held back (or dropped) while active."""

    endpoint: str
    match: Callable[[Envelope], bool]
    drop: bool = False
    times: int | None = None
    active: bool = True
    hits: int = 0

    def release(self) -> None:
        self.active = False


class Script(FaultHook):
    """Deterministic consumer faults: hold or drop the deliveries a test is about.

    A held delivery is handed back to the transport to be delivered again shortly (a
    message stuck on the way); a dropped one is acknowledged without being handled (a
    message lost after the consumer took it).
    """

    def __init__(self) -> None:
        self.rules: list[Rule] = []

    def hold(self, endpoint: str, match: Callable[[Envelope], bool]) -> Rule:
        rule = Rule(endpoint, match)
        self.rules.append(rule)
        return rule

    def drop(self, endpoint: str, match: Callable[[Envelope], bool], times: int = 1) -> Rule:
        rule = Rule(endpoint, match, drop=True, times=times)
        self.rules.append(rule)
        return rule

    def _rule_for(self, endpoint: str, body: str) -> Rule | None:
        try:
            env = Envelope.from_json(body)
        except MessageError:
            return None
        for rule in self.rules:
            if rule.active and rule.endpoint == endpoint and rule.match(env):
                return rule
        return None

    def wrap_consumer(self, endpoint: str, handler: BatchHandler) -> BatchHandler:
        async def scripted(deliveries: Sequence[Delivery]) -> list[Settle]:
            settled: dict[int, Settle] = {}
            passing: list[Delivery] = []
            for d in deliveries:
                rule = self._rule_for(endpoint, d.body)
                if rule is None:
                    passing.append(d)
                    continue
                rule.hits += 1
                if rule.drop:
                    settled[d.handle] = ACK
                    if rule.times is not None and rule.hits >= rule.times:
                        rule.active = False
                else:
                    settled[d.handle] = retry(0.03, "held by the test")
            if passing:
                for d, s in zip(passing, await handler(passing), strict=True):
                    settled[d.handle] = s
            return [settled[d.handle] for d in deliveries]

        return scripted


def of_type(type_: str, attempt: int | None = None) -> Callable[[Envelope], bool]:
    return lambda env: env.type == type_ and (attempt is None or env.attempt == attempt)


# -- waiting and reading ---------------------------------------------------------------


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def history(engine: Engine, saga_id: str) -> list[HistoryEntry]:
    return await engine.store.history(saga_id)


async def events(engine: Engine, saga_id: str, step: str | None = None) -> list[str]:
    return [h.event for h in await history(engine, saga_id) if step is None or h.step == step]


async def step_status(engine: Engine, saga_id: str, step: str, definition: str = CHECKOUT) -> Any:
    inst = await engine.get(saga_id)
    d = engine.orchestrator.latest[definition]
    return inst.steps[d.step_index(step)]


async def running(engine: Engine, saga_id: str, step: str, definition: str = CHECKOUT) -> None:
    async def check() -> bool:
        st = await step_status(engine, saga_id, step, definition)
        return bool(st.status is StepStatus.RUNNING)

    await until(check, f"step {step} to run")


async def hit(rule: Rule, times: int = 1) -> None:
    async def check() -> bool:
        return rule.hits >= times

    await until(check, f"a delivery to {rule.endpoint} to be held")


async def rows(store: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async with store.transaction() as tx:
        result: list[tuple[Any, ...]] = await tx.fetchall(sql, params)
    return result


async def stock(c: Checkout, sku: str) -> tuple[int, int, int, int]:
    got = await rows(
        c.inventory_store,
        "SELECT initial, available, reserved, shipped FROM stock WHERE sku = ?",
        (sku,),
    )
    initial, available, reserved, shipped = got[0]
    return initial, available, reserved, shipped


# -- the checkout ----------------------------------------------------------------------


def order(
    card: str = "card-ok-1", address: str = "addr-ok-1", sku: str = "sku-1", amount: int = 1500
) -> dict[str, Any]:
    return {
        "customer": "cust-1",
        "sku": sku,
        "qty": 1,
        "amount": amount,
        "currency": "EUR",
        "card": card,
        "ship_to": address,
    }


def fast(
    *,
    deadline: float = 30.0,
    timeout: float = 5.0,
    retry: RetryPolicy = QUICK,
    forward: RetryPolicy = FORWARD,
) -> SagaDefinition:
    """The checkout with short waits (holds in these tests are shorter than ``timeout``)."""
    return checkout_definition(deadline=deadline, timeout=timeout, retry=retry, forward=forward)


@asynccontextmanager
async def checkout(
    tmp_path: Path,
    *,
    definition: SagaDefinition | None = None,
    script: Script | None = None,
    reservation_ttl: float | None = None,
    stock: Mapping[str, int] = STOCK,
) -> AsyncIterator[tuple[Checkout, Engine]]:
    c = open_checkout(tmp_path, synchronous="NORMAL")
    if reservation_ttl is not None:
        c.inventory = inventory.build_inventory(c.inventory_store, reservation_ttl=reservation_ttl)
    engine = checkout_engine(
        c, definition=definition or fast(), faults=script or FaultHook(), idle_poll=0.05
    )
    try:
        async with engine:
            await migrate(c, initial_stock=stock)
            yield c, engine
    finally:
        c.provider.close()


async def drain(c: Checkout, quiet: float = 0.15, limit: float = 20.0) -> None:
    """Wait until no outbox row is pending and no mailbox holds a message."""
    stores = [c.orchestrator_store, *c.service_stores.values()]
    end, calm = time.monotonic() + limit, time.monotonic()
    while time.monotonic() < end:
        busy = sum([await s.outbox_pending() + await s.queue_depth() for s in stores])
        if busy:
            calm = time.monotonic()
        elif time.monotonic() - calm >= quiet:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the checkout did not go quiet")


async def settled_invariants(c: Checkout, stock: Mapping[str, int] = STOCK) -> InvariantReport:
    await drain(c)
    return await check_invariants(**c.invariant_stores(), initial_stock=stock)


async def provider_ops(c: Checkout, order_id: str) -> list[tuple[str, int]]:
    return [(e.op, e.amount) for e in await c.provider.effects(order_id)]


async def payment_ledger(c: Checkout, order_id: str) -> dict[str, int]:
    async with c.payment_store.transaction() as tx:
        got = await ledger(tx, order_id)
    return {op: row.amount for op, row in got.items()}


def edit(path: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Change a database by hand, as a person with database access would."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        with conn:
            conn.execute(sql, params)
    finally:
        conn.close()


# -- a tiny participant and small sagas for the engine on its own -----------------------


def build_svc(store: SQLiteStore, calls: list[tuple[str, int]]) -> Participant:
    p = Participant("svc", store)

    @p.handles("Do")
    def do(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        calls.append(("Do", cmd.attempt))
        return {"done": cmd.attempt}

    @p.handles("Undo")
    def undo(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        calls.append(("Undo", cmd.attempt))
        return {}

    return p


def work_definition(timeout: float, attempts: int = 10) -> SagaDefinition:
    def finish(ctx: StepContext) -> dict[str, Any]:
        return {"finished": True}

    return SagaDefinition(
        "work",
        [
            Step(
                "do",
                command("svc", "Do"),
                command("svc", "Undo"),
                timeout=timeout,
                retry=RetryPolicy(max_attempts=attempts, initial_backoff=0.01, jitter=0.0),
            ),
            Step("finish", local(finish), kind=StepKind.PIVOT),
        ],
    )


def svc_engine(tmp_path: Path, definition: SagaDefinition, script: Script, calls: Any) -> Engine:
    svc = build_svc(SQLiteStore(tmp_path / "svc.db", name="svc", synchronous="NORMAL"), calls)
    return embedded(
        tmp_path / "orchestrator.db",
        [definition],
        participants=[svc],
        synchronous="NORMAL",
        faults=script,
        idle_poll=0.05,
    )


# -- timeouts, retries, definite errors --------------------------------------------------


@pytest.mark.fault("F-PROCESS-RESTART", "F-STALE-TIMER")
async def test_step_timeout_timer_survives_a_restart_and_fires_once(tmp_path: Path) -> None:
    definition = work_definition(timeout=1.0)
    calls: list[tuple[str, int]] = []
    script = Script()
    lost = script.drop("svc", of_type("Do", attempt=1))  # the first Do never gets answered
    engine = svc_engine(tmp_path, definition, script, calls)
    await engine.open()
    try:
        inst = await engine.start("work", "job-1")
        await hit(lost)
        due = await engine.store.next_timer_due()
        assert due is not None and due > time.time()  # the step timeout, in the database
        assert (await engine.get(inst.saga_id)).steps[0].attempt == 1
    finally:
        await engine.close()  # the process stops before the timeout is due
    await asyncio.sleep(max(due - time.time(), 0) + 0.1)  # ...and stays down past it

    async with svc_engine(tmp_path, definition, script, calls) as engine:
        done = await engine.wait(inst.saga_id, timeout=10)
        h = await history(engine, inst.saga_id)
    assert done.state is SagaState.SUCCEEDED
    assert [e.event for e in h].count("step.timed_out") == 1
    assert [e.detail["attempt"] for e in h if e.event == "step.started" and e.step == "do"] == [
        1,
        2,
    ]
    assert not any(e.event == "timer.stale" for e in h)
    assert calls == [("Do", 2)]  # attempt 1 was lost; the timer re-sent it once
    assert done.steps[0].result == {"done": 2}

    async with svc_engine(tmp_path, definition, script, calls) as engine:
        assert await engine.store.next_timer_due() is None  # nothing left to fire again
        await asyncio.sleep(0.2)
        assert len(await history(engine, inst.saga_id)) == len(h)


def local_saga(name: str, steps: Sequence[Step]) -> SagaDefinition:
    return SagaDefinition(name, steps)


async def test_retries_back_off_with_the_same_key(tmp_path: Path) -> None:
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.1, multiplier=2.0, jitter=0.0)
    calls: list[tuple[int, str]] = []

    def charge(ctx: StepContext) -> dict[str, Any]:
        calls.append((ctx.attempt, ctx.idempotency_key))
        if ctx.attempt <= 2:
            raise StepFailed("provider busy", retryable=True)
        return {"charged": ctx.attempt}

    definition = local_saga("pay", [Step("charge", local(charge), retry=policy, timeout=5)])
    async with embedded(tmp_path / "o.db", [definition], synchronous="NORMAL") as engine:
        inst = await engine.start("pay", "p-1")
        done = await engine.wait(inst.saga_id, timeout=10)
        h = await history(engine, inst.saga_id)
    assert done.state is SagaState.SUCCEEDED
    assert done.steps[0].attempt == 3
    assert [a for a, _ in calls] == [1, 2, 3]
    assert {k for _, k in calls} == {f"{inst.saga_id}:charge:action"}
    waits = [e for e in h if e.event == "retry.scheduled"]
    assert [e.detail["delay"] for e in waits] == [0.1, 0.2]  # 0.1 * 2 ** (n - 1)
    starts = [e for e in h if e.event == "step.started"][1:]
    for wait, start in zip(waits, starts, strict=True):
        assert start.at - wait.at >= wait.detail["delay"] - 1e-6


async def test_a_definite_error_is_not_retried_and_compensates(tmp_path: Path) -> None:
    calls: list[str] = []

    def hold_seat(ctx: StepContext) -> dict[str, Any]:
        calls.append("hold_seat")
        return {"seat": "12A"}

    def free_seat(ctx: StepContext) -> None:
        calls.append("free_seat")

    def charge(ctx: StepContext) -> dict[str, Any]:
        calls.append("charge")
        raise StepFailed("card declined")

    definition = local_saga(
        "seat",
        [
            Step("seat", local(hold_seat), local(free_seat)),
            Step("charge", local(charge), kind=StepKind.PIVOT, retry=QUICK),
        ],
    )
    async with embedded(tmp_path / "o.db", [definition], synchronous="NORMAL") as engine:
        inst = await engine.start("seat", "s-1")
        done = await engine.wait(inst.saga_id, timeout=10)
        seen = await events(engine, inst.saga_id)
    assert done.state is SagaState.COMPENSATED
    assert done.reason == "step 'charge' failed: card declined"
    assert calls == ["hold_seat", "charge", "free_seat"]
    assert done.steps[1].attempt == 1 and done.steps[1].status is StepStatus.FAILED
    assert "retry.scheduled" not in seen


# -- the deadline ------------------------------------------------------------------------


@pytest.mark.parametrize("late", ["reply", "action"])
@pytest.mark.fault("F-DELAY")
async def test_deadline_times_out_and_a_late_answer_is_fenced(tmp_path: Path, late: str) -> None:
    """``reply``: the authorization happened, its answer comes after the deadline: the
    void already gave the money back. ``action``: the command itself comes late: the
    void got there first, left a tombstone, and the late authorization is refused."""
    script = Script()
    if late == "reply":
        held = script.hold("orchestrator", of_type("AuthorizePayment.reply"))
    else:
        held = script.hold("payment", of_type("AuthorizePayment"))
    async with checkout(tmp_path, definition=fast(deadline=0.8), script=script) as (c, engine):
        inst = await engine.start(CHECKOUT, "o-late", order())
        await hit(held)
        done = await engine.wait(inst.saga_id, timeout=10)
        assert done.state is SagaState.TIMED_OUT
        assert done.reason == "deadline passed"
        assert done.status == "CANCELLED"
        assert done.timed_out
        held.release()

        async def fenced() -> bool:
            return "reply.stale" in await events(engine, inst.saga_id, "authorize_payment")

        await until(fenced, "the late answer to be recorded as stale")
        stale = next(h for h in await history(engine, inst.saga_id) if h.event == "reply.stale")
        assert stale.detail["why"] == "saga is already TIMED_OUT"
        after = await engine.get(inst.saga_id)
        assert (after.state, after.version) == (SagaState.TIMED_OUT, done.version)
        # Fully compensated: nothing for a person to decide, so not in the manual queue.
        assert inst.saga_id not in {s.saga_id for s in await engine.manual_cases()}
        auths = await c.provider.authorizations("o-late")
        if late == "reply":
            assert stale.detail["ok"] is True  # the money was taken, and given back
            assert [a.status for a in auths] == ["VOIDED"]
        else:
            assert stale.detail["ok"] is False  # refused: its undo came first
            assert auths == []
            key = f"{inst.saga_id}:authorize_payment:action"
            assert await c.provider.calls(key) == 0
        report = await settled_invariants(c)
        assert report.ok, str(report)


# -- unknown outcomes ------------------------------------------------------------------


@pytest.mark.fault("F-PROVIDER-OUTAGE", "F-MESSAGE-LOST")
async def test_provider_timeout_after_success_is_settled_by_the_status_query(
    tmp_path: Path,
) -> None:
    """The provider authorizes, then its answer is lost; with no attempt left the saga
    asks GetPaymentStatus, which finds the authorization under the action's key."""
    once = RetryPolicy(max_attempts=1)
    definition = fast(retry=once, forward=once)
    async with checkout(tmp_path, definition=definition) as (c, engine):
        inst = await engine.start(CHECKOUT, "o-slow", order(card="card-slow-1"))
        done = await engine.wait(inst.saga_id, timeout=15)
        assert done.state is SagaState.SUCCEEDED, done.reason
        h = await history(engine, inst.saga_id)
        for step in ("authorize_payment", "capture_payment"):
            seen = [e.event for e in h if e.step == step]
            assert seen[:5] == [
                "step.started",
                "step.failed",
                "outcome.unknown",
                "status.queried",
                "status.answered",
            ], (step, seen)
            answered = [e for e in h if e.step == step and e.event == "status.answered"]
            assert answered[0].detail == {"state": "done", "query": 1}
        auths = await c.provider.authorizations("o-slow")
        assert len(auths) == 1 and auths[0].status == "CAPTURED"
        assert await provider_ops(c, "o-slow") == [("authorize", 1500), ("capture", 1500)]
        # The status query wrote down what the provider did; the ledgers agree.
        assert await payment_ledger(c, "o-slow") == {"authorize": 1500, "capture": 1500}
        assert done.steps[1].result == {"authorization": auths[0].authorization, "amount": 1500}
        assert done.steps[4].result == {"captured": 1500}
        report = await settled_invariants(c)
        assert report.ok, str(report)


async def test_status_query_not_found_before_the_pivot_compensates(tmp_path: Path) -> None:
    """The provider was down (nothing happened); the answer is not_found and the saga
    compensates, tombstoning the authorization's key."""
    definition = fast(retry=RetryPolicy(max_attempts=1))
    async with checkout(tmp_path, definition=definition) as (c, engine):
        inst = await engine.start(CHECKOUT, "o-down", order(card="card-flaky-1"))
        done = await engine.wait(inst.saga_id, timeout=15)
        assert done.state is SagaState.COMPENSATED
        assert done.reason == "step 'authorize_payment' never happened (status query)"
        answered = [h for h in await history(engine, inst.saga_id) if h.event == "status.answered"]
        assert [h.detail["state"] for h in answered] == ["not_found"]
        assert await c.provider.authorizations("o-down") == []
        async with c.payment_store.transaction() as tx:
            record = await tx.idempotency_get("payment", f"{inst.saga_id}:authorize_payment:action")
        assert record is not None and record.tombstone
        report = await settled_invariants(c)
        assert report.ok, str(report)


# -- the compensation ladder and the manual queue --------------------------------------


def rungs(h: list[HistoryEntry], step: str = "authorize_payment") -> list[tuple[str, int]]:
    return [
        (e.event, e.detail["rung"])
        for e in h
        if e.step == step
        and e.event in ("compensation.failed", "compensation.escalated", "compensation.succeeded")
    ]


async def test_void_refused_moves_to_refund(tmp_path: Path) -> None:
    async with checkout(tmp_path) as (c, engine):
        inst = await engine.start(
            CHECKOUT, "o-nv", order(card="card-novoid-1", address="addr-bad-1")
        )
        done = await engine.wait(inst.saga_id, timeout=10)
        assert done.state is SagaState.COMPENSATED
        assert rungs(await history(engine, inst.saga_id)) == [
            ("compensation.failed", 0),
            ("compensation.escalated", 1),
            ("compensation.succeeded", 1),
        ]
        assert [a.status for a in await c.provider.authorizations("o-nv")] == ["RELEASED"]
        report = await settled_invariants(c)
        assert report.ok, str(report)


def capture_first_definition() -> SagaDefinition:
    """Money is captured before a later step fails: only a refund or a credit note
    can give it back (the checkout never does this; its capture is the pivot)."""

    def payment(v: SagaView) -> dict[str, Any]:
        d = v.data
        return {
            "order_id": v.business_key,
            "amount": d["amount"],
            "currency": "EUR",
            "card": d["card"],
        }

    def ref(v: SagaView) -> dict[str, Any]:
        return {"order_id": v.business_key}

    def stock_of(v: SagaView) -> dict[str, Any]:
        return {"order_id": v.business_key, "sku": v.data["sku"], "qty": 1}

    return SagaDefinition(
        "capture-first",
        [
            Step(
                "authorize_payment",
                command("payment", "AuthorizePayment", payment),
                [
                    command("payment", "VoidAuthorization", ref),
                    command("payment", "RefundPayment", ref),
                    command("payment", "IssueCreditNote", ref),
                ],
                status="PENDING_PAYMENT",
                retry=QUICK,
            ),
            Step("capture_payment", command("payment", "CapturePayment", ref), retry=QUICK),
            Step(
                "reserve_inventory",
                command("inventory", "ReserveInventory", stock_of),
                command("inventory", "ReleaseInventory", ref),
                status="PENDING_INVENTORY",
                retry=QUICK,
            ),
        ],
        started_status="PENDING_PAYMENT",
    )


async def test_void_and_refund_refused_then_the_credit_note_pays_back(tmp_path: Path) -> None:
    c = open_checkout(tmp_path, synchronous="NORMAL")
    try:
        engine = checkout_engine(c, definition=capture_first_definition(), idle_poll=0.05)
        async with engine:
            await migrate(c, initial_stock={"sku-gone": 0})
            inst = await engine.start(
                "capture-first",
                "o-cn",
                {"amount": 2500, "card": "card-norefund-1", "sku": "sku-gone"},
            )
            done = await engine.wait(inst.saga_id, timeout=10)
            assert done.state is SagaState.COMPENSATED, done.reason
            assert done.reason == "step 'reserve_inventory' failed: out of stock"
            assert rungs(await history(engine, inst.saga_id)) == [
                ("compensation.failed", 0),
                ("compensation.escalated", 1),
                ("compensation.failed", 1),
                ("compensation.escalated", 2),
                ("compensation.succeeded", 2),
            ]
            assert await payment_ledger(c, "o-cn") == {
                "authorize": 2500,
                "capture": 2500,
                "credit": 2500,
            }
            assert await provider_ops(c, "o-cn") == [("authorize", 2500), ("capture", 2500)]
            report = await settled_invariants(c, {"sku-gone": 0})
            assert report.ok, str(report)
    finally:
        c.provider.close()


async def stuck_hold(engine: Engine) -> SagaInstance:
    """A card whose hold can be neither voided nor refunded: a person must act."""
    inst = await engine.start(
        CHECKOUT, "o-stuck", order(card="card-novoid-norefund-1", address="addr-bad-1")
    )
    return await engine.wait(inst.saga_id, timeout=10)


async def test_every_rung_refused_goes_to_the_manual_queue_with_the_reason(
    tmp_path: Path,
) -> None:
    async with checkout(tmp_path) as (c, engine):
        done = await stuck_hold(engine)
        assert done.state is SagaState.FAILED_NEEDS_MANUAL
        assert done.status == "NEEDS_ATTENTION"
        assert done.reason == (
            "compensation of step 'authorize_payment' failed on every rung: the card hold "
            "of order o-stuck is still open at the provider (void and refund refused); it "
            "needs a person"
        )
        assert rungs(await history(engine, done.saga_id)) == [
            ("compensation.failed", 0),
            ("compensation.escalated", 1),
            ("compensation.failed", 1),
            ("compensation.escalated", 2),
            ("compensation.failed", 2),
        ]
        cases = await engine.manual_cases()
        assert [(s.saga_id, s.reason) for s in cases] == [(done.saga_id, done.reason)]
        assert done.steps[1].status is StepStatus.COMPENSATION_FAILED
        # The saga stopped where it stood: the order is not cancelled yet.
        assert done.steps[0].status is StepStatus.SUCCEEDED
        report = await settled_invariants(c)
        assert report.ok, str(report)  # the open hold is in a person's queue
        assert any("in the manual queue" in n for n in report.notes)


async def test_a_person_resolves_the_case_and_the_saga_continues(tmp_path: Path) -> None:
    async with checkout(tmp_path) as (c, engine):
        done = await stuck_hold(engine)
        before = await history(engine, done.saga_id)
        with pytest.raises(ManualActionRefused, match="rung must be one of"):
            await engine.resolve(done.saga_id, ManualAction.USE_RUNG, rung=7, reason="x", actor="a")
        with pytest.raises(ManualActionRefused, match="needs a reason"):
            await engine.resolve(done.saga_id, "mark_compensated", reason=" ", actor="ops:alice")
        with pytest.raises(ManualActionRefused, match="needs the actor"):
            await engine.resolve(done.saga_id, "mark_compensated", reason="done", actor="")
        assert len(await history(engine, done.saga_id)) == len(before)  # refusals change nothing

        # The person has the acquirer release the hold by phone, then records it.
        edit(
            c.data_dir / "provider.db",
            "UPDATE authorizations SET status = 'RELEASED' WHERE order_id = ?",
            ("o-stuck",),
        )
        resumed = await engine.resolve(
            done.saga_id,
            ManualAction.MARK_COMPENSATED,
            reason="hold released by the acquirer, ticket 4711",
            actor="ops:alice",
        )
        assert resumed.state is SagaState.COMPENSATING
        final = await engine.wait(done.saga_id, timeout=10)
        assert final.state is SagaState.COMPENSATED
        assert final.status == "CANCELLED"
        h = await history(engine, done.saga_id)
        audit = [e for e in h if e.event == "manual.resolved"]
        assert len(audit) == 1
        assert audit[0].step == "authorize_payment"
        assert audit[0].detail["actor"] == "ops:alice"
        assert audit[0].detail["reason"] == "hold released by the acquirer, ticket 4711"
        assert audit[0].detail["action"] == "mark_compensated"
        assert audit[0].detail["previous_reason"] == done.reason
        assert audit[0].state is SagaState.FAILED_NEEDS_MANUAL
        assert [e.event for e in h if e.version >= audit[0].version] == [
            "manual.resolved",
            "compensation.sent",  # CancelOrder: the undoing goes on where it stopped
            "compensation.succeeded",
            "saga.finished",
        ]
        assert final.steps[0].status is StepStatus.COMPENSATED  # the order was cancelled
        assert await engine.manual_cases() == []
        report = await settled_invariants(c)
        assert report.ok, str(report)  # the status path through NEEDS_ATTENTION is honest


async def test_a_person_retries_a_compensation_that_timed_out(tmp_path: Path) -> None:
    """A void whose outcome stayed unknown goes to a person (refunding could pay twice);
    once the provider is reachable, a retry under the same key voids exactly once."""
    script = Script()
    held = script.hold("payment", of_type("VoidAuthorization"))
    definition = fast(timeout=0.4)
    async with checkout(tmp_path, definition=definition, script=script) as (c, engine):
        inst = await engine.start(CHECKOUT, "o-void", order(address="addr-bad-1"))
        stuck = await engine.wait(inst.saga_id, timeout=10)
        assert stuck.state is SagaState.FAILED_NEEDS_MANUAL
        assert stuck.reason == (
            "compensation payment.VoidAuthorization of step 'authorize_payment' timed out "
            "3 times; outcome unknown"
        )
        assert not any(
            e in ("RefundPayment", "IssueCreditNote")
            for e in (env.type for env, _ in await c.orchestrator_store.outbox_all())
        )
        held.release()
        await engine.resolve(
            inst.saga_id, ManualAction.RETRY, reason="provider reachable again", actor="ops:bob"
        )
        final = await engine.wait(inst.saga_id, timeout=10)
        assert final.state is SagaState.COMPENSATED
        assert [a.status for a in await c.provider.authorizations("o-void")] == ["VOIDED"]
        # One void at the provider, however many copies of it were sent and retried.
        assert await provider_ops(c, "o-void") == [("authorize", 1500), ("void", 1500)]
        report = await settled_invariants(c)
        assert report.ok, str(report)


# -- fencing and tombstones ------------------------------------------------------------


@pytest.mark.fault("F-DELAY")
async def test_a_reply_with_an_older_fence_is_ignored(tmp_path: Path) -> None:
    script = Script()
    held = script.hold("svc", of_type("Do"))
    calls: list[tuple[str, int]] = []
    async with svc_engine(tmp_path, work_definition(timeout=0.3), script, calls) as engine:
        inst = await engine.start("work", "job-f")

        async def second_try() -> bool:
            return bool((await engine.get(inst.saga_id)).steps[0].attempt >= 2)

        await until(second_try, "the step to be sent again")
        first = next(
            env
            for env, _ in await engine.store.outbox_all()
            if env.type == "Do" and env.attempt == 1
        )
        # An answer to the first try, minted from its (older) fence, arrives now.
        old = reply_to(first, failure("declined"), source="svc", now=time.time()).with_changes(
            message_id=f"{first.message_id}/forged"
        )
        await engine.store.queue_push("orchestrator", [old.to_json()], time.time())

        async def recorded() -> bool:
            return "reply.stale" in await events(engine, inst.saga_id)

        await until(recorded, "the old reply to be recorded as stale")
        stale = [h for h in await history(engine, inst.saga_id) if h.event == "reply.stale"]
        assert stale[0].detail == {
            "why": "not waiting for this action",
            "ok": False,
            "attempt": 1,
            "fence": first.fence,
        }
        now = await engine.get(inst.saga_id)
        assert now.state is SagaState.RUNNING and now.steps[0].status is StepStatus.RUNNING
        held.release()
        done = await engine.wait(inst.saga_id, timeout=10)
        assert done.state is SagaState.SUCCEEDED
        assert "compensation.started" not in await events(engine, inst.saga_id)
        assert calls.count(("Undo", 1)) == 0
        assert len([c for c in calls if c[0] == "Do"]) == 1  # one effect, whatever the tries

        # After the end, an old answer is recorded and changes nothing either.
        late = old.with_changes(message_id=f"{first.message_id}/forged-2")
        await engine.store.queue_push("orchestrator", [late.to_json()], time.time())

        async def recorded_twice() -> bool:
            return (await events(engine, inst.saga_id)).count("reply.stale") >= 2

        await until(recorded_twice, "the second old reply")
        assert (await engine.get(inst.saga_id)).version == done.version


@pytest.mark.fault("F-REORDER")
async def test_compensation_before_its_action_leaves_a_tombstone(tmp_path: Path) -> None:
    script = Script()
    held = script.hold("payment", of_type("AuthorizePayment"))
    async with checkout(tmp_path, script=script) as (c, engine):
        inst = await engine.start(CHECKOUT, "o-tomb", order())
        await hit(held)  # the authorization is on its way, not yet handled
        await engine.cancel(inst.saga_id, "customer changed their mind")
        done = await engine.wait(inst.saga_id, timeout=10)
        assert done.state is SagaState.COMPENSATED
        assert done.reason == "cancelled: customer changed their mind"
        key = f"{inst.saga_id}:authorize_payment:action"
        async with c.payment_store.transaction() as tx:
            record = await tx.idempotency_get("payment", key)
        assert record is not None and record.tombstone
        held.release()

        async def refused() -> bool:
            return "reply.stale" in await events(engine, inst.saga_id, "authorize_payment")

        await until(refused, "the late authorization's answer")
        replies = [
            env
            for env, _ in await c.payment_store.outbox_all()
            if env.type == "AuthorizePayment.reply"
        ]
        assert [r.payload for r in replies] == [
            {"ok": False, "reason": REFUSED_AFTER_COMPENSATION, "retryable": False}
        ]
        assert await c.provider.calls(key) == 0
        assert await c.provider.authorizations("o-tomb") == []
        report = await settled_invariants(c)
        assert report.ok, str(report)


# -- the pivot -------------------------------------------------------------------------


def after_pivot_saga(
    calls: list[str], email_failures: int, definite: bool = False
) -> SagaDefinition:
    left = {"email": email_failures}

    def reserve(ctx: StepContext) -> None:
        calls.append("reserve")

    def release(ctx: StepContext) -> None:
        calls.append("release")

    def charge(ctx: StepContext) -> dict[str, Any]:
        calls.append("charge")
        return {"charged": 10}

    def email(ctx: StepContext) -> None:
        calls.append(f"email:{ctx.attempt}")
        if definite:
            raise StepFailed("mailbox does not exist")
        if left["email"] > 0:
            left["email"] -= 1
            raise StepFailed("mail server busy", retryable=True)

    patient = RetryPolicy(max_attempts=10, initial_backoff=0.01, max_backoff=0.05, jitter=0.0)
    return local_saga(
        "order",
        [
            Step("reserve", local(reserve), local(release)),
            Step("charge", local(charge), kind=StepKind.PIVOT),
            Step("email", local(email), kind=StepKind.RETRIABLE, retry=patient),
        ],
    )


async def test_after_the_pivot_a_flaky_step_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    calls: list[str] = []
    async with embedded(
        tmp_path / "o.db", [after_pivot_saga(calls, email_failures=4)], synchronous="NORMAL"
    ) as engine:
        inst = await engine.start("order", "o-1")
        done = await engine.wait(inst.saga_id, timeout=10)
        seen = await events(engine, inst.saga_id)
    assert done.state is SagaState.SUCCEEDED
    assert calls == ["reserve", "charge", *(f"email:{n}" for n in range(1, 6))]
    assert seen.count("retry.scheduled") == 4
    assert not any(e.startswith("compensation") for e in seen)


async def test_after_the_pivot_nothing_is_compensated(tmp_path: Path) -> None:
    calls: list[str] = []
    async with embedded(
        tmp_path / "o.db",
        [after_pivot_saga(calls, email_failures=0, definite=True)],
        synchronous="NORMAL",
    ) as engine:
        inst = await engine.start("order", "o-2")
        done = await engine.wait(inst.saga_id, timeout=10)
        seen = await events(engine, inst.saga_id)
        assert [s.saga_id for s in await engine.manual_cases()] == [inst.saga_id]
    assert done.state is SagaState.FAILED_NEEDS_MANUAL
    assert done.reason == "step 'email' failed after the pivot: mailbox does not exist"
    assert "release" not in calls
    assert not any(e.startswith("compensation") for e in seen)


# -- cancellation ----------------------------------------------------------------------


async def test_cancel_before_the_pivot_compensates_every_step_done(tmp_path: Path) -> None:
    script = Script()
    held = script.hold("shipping", of_type("CreateShipment"))
    async with checkout(tmp_path, script=script) as (c, engine):
        inst = await engine.start(CHECKOUT, "o-cancel", order())
        await hit(held)
        cancelled = await engine.cancel(inst.saga_id, "customer cancelled in the app")
        assert cancelled.state in (SagaState.COMPENSATING, SagaState.COMPENSATED)
        done = await engine.wait(inst.saga_id, timeout=10)
        held.release()
        assert done.state is SagaState.COMPENSATED
        assert done.status == "CANCELLED"
        assert [s.status for s in done.steps[:4]] == [StepStatus.COMPENSATED] * 4
        assert [a.status for a in await c.provider.authorizations("o-cancel")] == ["VOIDED"]
        assert await stock(c, "sku-1") == (10, 10, 0, 0)
        report = await settled_invariants(c)
        assert report.ok, str(report)
        # The shipment command, arriving after its undo, was refused: nothing shipped.
        assert await rows(c.shipping_store, "SELECT order_id FROM shipments") == []


@pytest.mark.fault("F-CANCEL-RACE")
async def test_cancel_landing_while_the_outcome_is_unknown_undoes_it(tmp_path: Path) -> None:
    """The provider authorized but its answer was lost; the cancel lands while the retry
    is on its way. The void asks the provider under the action's key and releases the
    hold; the retry, arriving after its undo, is refused."""
    script = Script()
    retry_held = script.hold("payment", of_type("AuthorizePayment", attempt=2))
    async with checkout(tmp_path, script=script) as (c, engine):
        inst = await engine.start(CHECKOUT, "o-unk", order(card="card-slow-1"))
        await hit(retry_held)
        st = await step_status(engine, inst.saga_id, "authorize_payment")
        assert (st.status, st.attempt) == (StepStatus.RUNNING, 2)
        assert [a.status for a in await c.provider.authorizations("o-unk")] == ["AUTHORIZED"]
        await engine.cancel(inst.saga_id, "changed mind")
        done = await engine.wait(inst.saga_id, timeout=10)
        assert done.state is SagaState.COMPENSATED
        assert done.steps[1].status is StepStatus.COMPENSATED
        assert [a.status for a in await c.provider.authorizations("o-unk")] == ["VOIDED"]
        retry_held.release()

        async def refused() -> bool:
            return "reply.stale" in await events(engine, inst.saga_id, "authorize_payment")

        await until(refused, "the late retry's answer")
        assert await provider_ops(c, "o-unk") == [("authorize", 1500), ("void", 1500)]
        report = await settled_invariants(c)
        assert report.ok, str(report)


async def test_cancel_after_the_pivot_is_refused_with_the_reason(tmp_path: Path) -> None:
    script = Script()
    held = script.hold("inventory", of_type("CommitReservation"))
    async with checkout(tmp_path, script=script) as (c, engine):
        inst = await engine.start(CHECKOUT, "o-late-cancel", order())
        await hit(held)
        answer = await engine.cancel(inst.saga_id, "customer cancelled too late")
        assert answer.state is SagaState.RUNNING
        refused = [h for h in await history(engine, inst.saga_id) if h.event == "cancel.refused"]
        assert len(refused) == 1
        assert refused[0].detail == {
            "reason": "customer cancelled too late",
            "why": "the saga is past its point of no return",
        }
        held.release()
        done = await engine.wait(inst.saga_id, timeout=10)
        assert done.state is SagaState.SUCCEEDED
        assert not done.cancel_requested
        report = await settled_invariants(c)
        assert report.ok, str(report)


# -- the last item ---------------------------------------------------------------------


@pytest.mark.fault("F-LAST-ITEM")
async def test_fifty_orders_for_the_last_item(tmp_path: Path) -> None:
    async with checkout(tmp_path, definition=fast(timeout=10.0)) as (c, engine):
        requests = [
            (CHECKOUT, f"o-{i}", order(card=f"card-ok-{i}", sku="sku-last", amount=1000 + i))
            for i in range(50)
        ]
        started = await engine.start_many(requests)
        assert len({s.saga_id for s in started}) == 50
        done = [await engine.wait(s.saga_id, timeout=60) for s in started]
        states = [d.state for d in done]
        assert states.count(SagaState.SUCCEEDED) == 1
        assert states.count(SagaState.COMPENSATED) == 49
        lost = [d for d in done if d.state is SagaState.COMPENSATED]
        assert {d.reason for d in lost} == {"step 'reserve_inventory' failed: out of stock"}
        assert await stock(c, "sku-last") == (1, 0, 0, 1)
        report = await settled_invariants(c)
        assert report.ok, str(report)


# -- reservations that outlive their saga ----------------------------------------------


async def test_a_reservation_left_by_a_dead_saga_expires_back_to_stock(tmp_path: Path) -> None:
    async with checkout(tmp_path) as (c, _engine):
        # A saga that died after reserving (its orchestrator database lost, say): the
        # reservation is all that is left of it.
        now = time.time()
        async with c.inventory_store.transaction() as tx:
            await tx.execute(
                "UPDATE stock SET available = available - 2, reserved = reserved + 2 "
                "WHERE sku = 'sku-1'"
            )
            await tx.execute(
                "INSERT INTO reservations "
                "(order_id, sku, qty, status, created_at, updated_at, expires_at) "
                "VALUES ('o-ghost', 'sku-1', 2, 'RESERVED', ?, ?, ?)",
                (now - 10, now - 10, now - 1),
            )
        report = await settled_invariants(c)
        assert not report.invariants["stock"]
        assert any("o-ghost" in v and "outlives its saga" in v for v in report.violations)

        assert await inventory.expire_reservations(c.inventory_store, now) == 1
        assert await inventory.expire_reservations(c.inventory_store, now) == 0
        assert await stock(c, "sku-1") == (10, 10, 0, 0)
        assert await rows(
            c.inventory_store, "SELECT status FROM reservations WHERE order_id = 'o-ghost'"
        ) == [("EXPIRED",)]
        report = await settled_invariants(c)
        assert report.ok, str(report)
        assert any("expired" in n for n in report.notes)


async def stall_until_expired(
    c: Checkout, engine: Engine, held: Rule, order_id: str, address: str
) -> SagaInstance:
    """Start an order, stall it at the shipment until its reservation expired, go on."""
    inst = await engine.start(CHECKOUT, order_id, order(address=address))
    await hit(held)
    assert await stock(c, "sku-1") == (10, 9, 1, 0)
    await asyncio.sleep(0.3)  # the reservation's TTL (0.2 s) runs out while it stalls
    assert await inventory.expire_reservations(c.inventory_store, time.time()) == 1
    assert await stock(c, "sku-1") == (10, 10, 0, 0)
    held.release()
    return await engine.wait(inst.saga_id, timeout=10)


@pytest.mark.parametrize(
    ("address", "expected"),
    [("addr-ok-1", SagaState.FAILED_NEEDS_MANUAL), ("addr-bad-1", SagaState.COMPENSATED)],
)
async def test_a_stalled_saga_loses_its_expired_reservation(
    tmp_path: Path, address: str, expected: SagaState
) -> None:
    """Past the pivot the commit fails for good and a person decides; before it, the
    release of the expired reservation is a no-op (the units came back once)."""
    script = Script()
    held = script.hold("shipping", of_type("CreateShipment"))
    async with checkout(tmp_path, script=script, reservation_ttl=0.2) as (c, engine):
        done = await stall_until_expired(c, engine, held, "o-ttl", address)
        assert done.state is expected, done.reason
        assert await stock(c, "sku-1") == (10, 10, 0, 0)
        if expected is SagaState.FAILED_NEEDS_MANUAL:
            assert done.reason == (
                "step 'commit_inventory' failed after the pivot: "
                "the reservation of order o-ttl expired"
            )
            assert [s.saga_id for s in await engine.manual_cases()] == [done.saga_id]
            assert await payment_ledger(c, "o-ttl") == {"authorize": 1500, "capture": 1500}
        else:
            releases = [
                env.payload
                for env, _ in await c.inventory_store.outbox_all()
                if env.type == "ReleaseInventory.reply"
            ]
            assert releases == [{"ok": True, "result": {"released": 0}}]
        report = await settled_invariants(c)
        assert report.ok, str(report)  # the stock equation holds; money waits for a person


async def test_a_person_fixes_the_expired_reservation_and_retries(tmp_path: Path) -> None:
    script = Script()
    held = script.hold("shipping", of_type("CreateShipment"))
    async with checkout(tmp_path, script=script, reservation_ttl=0.2) as (c, engine):
        stuck = await stall_until_expired(c, engine, held, "o-fix", "addr-ok-1")
        assert stuck.state is SagaState.FAILED_NEEDS_MANUAL
        # The person puts the unit back on hold for the order by hand...
        async with c.inventory_store.transaction() as tx:
            await tx.execute(
                "UPDATE stock SET available = available - 1, reserved = reserved + 1 "
                "WHERE sku = 'sku-1'"
            )
            await tx.execute(
                "UPDATE reservations SET status = 'RESERVED', expires_at = ? "
                "WHERE order_id = 'o-fix'",
                (time.time() + 600,),
            )
        # ...and asks the saga to try the commit again.
        await engine.resolve(
            stuck.saga_id, ManualAction.RETRY, reason="unit re-reserved by hand", actor="ops:cy"
        )
        done = await engine.wait(stuck.saga_id, timeout=10)
        assert done.state is SagaState.SUCCEEDED, done.reason
