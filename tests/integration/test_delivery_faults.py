"""Effectively-once from at-least-once: the embedded runtime under delivery faults.

A small ``bank`` participant on its own SQLite file records every effect it applies in
an ``effects`` table that has *no* uniqueness constraint, so a second effect for the
same (saga, step, op) would show up as a second row. Sagas of three bank commands
(debit, credit, confirm = the pivot) run through the real engine while faults are
injected where production has them: duplicated deliveries, lost publishes and lost
acknowledgements, delays beyond the step timeout, crashes before commit and between
publish and mark. Each test then checks one effect per step, one reply per command,
and that the redundant messages were absorbed by the inbox or recorded as stale.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from sagakit import (
    Engine,
    Envelope,
    MessageKind,
    Outcome,
    Participant,
    RetryPolicy,
    SagaDefinition,
    SagaInstance,
    SagaState,
    SagaView,
    Step,
    StepFailed,
    StepKind,
    command,
)
from sagakit.core.envelope import MANUAL_RETRY, success
from sagakit.runtime.consumer import FaultHook
from sagakit.runtime.participant import DEFER, REFUSED_AFTER_COMPENSATION, HandlerResult
from sagakit.stores.base import IdempotencyRecord, Tx
from sagakit.stores.sqlite import SQLiteStore, SQLiteTx
from sagakit.testing.faults import FaultProfile, Faults, InjectedCrash
from sagakit.transports.base import ACK, BatchHandler, Delivery, Settle, Transport, retry
from sagakit.transports.embedded import EmbeddedTransport

BANK = "bank"
BANK_MIGRATIONS = [
    """
    CREATE TABLE effects (
        id      INTEGER PRIMARY KEY,
        saga_id TEXT NOT NULL,
        step    TEXT NOT NULL,
        op      TEXT NOT NULL,
        key     TEXT NOT NULL,
        message_id TEXT NOT NULL
    );
    """
]
STEPS = ("debit", "credit", "confirm")
COMPENSATABLE = ("debit", "credit")

_handles = itertools.count(1)
_ids = itertools.count(1)


# -- the participant and the saga ------------------------------------------------------


def build_bank(store: SQLiteStore, **kwargs: Any) -> Participant:
    """``Do`` applies an effect (or refuses when the saga asked this step to fail);
    ``Undo`` removes one, and records nothing when there is nothing to undo."""
    p = Participant(BANK, store, **kwargs)

    async def record(tx: Tx, cmd: Envelope, op: str) -> None:
        await tx.execute(
            "INSERT INTO effects (saga_id, step, op, key, message_id) VALUES (?, ?, ?, ?, ?)",
            (cmd.saga_id, cmd.step, op, cmd.idempotency_key, cmd.message_id),
        )

    @p.handles("Do")
    async def do(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        if cmd.payload.get("fail") == cmd.step:
            raise StepFailed(f"{cmd.step} refused by the bank")
        await record(tx, cmd, "do")
        return {"ref": f"{cmd.step}-{cmd.business_key}"}

    @p.handles("Undo")
    async def undo(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        done = await tx.fetchone(
            "SELECT count(*) FROM effects WHERE saga_id = ? AND step = ? AND op = 'do'",
            (cmd.saga_id, cmd.step),
        )
        if not done or not done[0]:
            return {"undone": False}
        await record(tx, cmd, "undo")
        return {"undone": True}

    return p


def _payload(v: SagaView) -> dict[str, Any]:
    return {"amount": v.data.get("amount", 1), "fail": v.data.get("fail")}


def transfer(timeout: float = 5.0, attempts: int = 10) -> SagaDefinition:
    """debit -> credit -> confirm (pivot); ``data["fail"] = "confirm"`` compensates."""
    policy = RetryPolicy(max_attempts=attempts, initial_backoff=0.05, max_backoff=0.2)

    def step(name: str, **kw: Any) -> Step:
        return Step(name, command(BANK, "Do", _payload), timeout=timeout, retry=policy, **kw)

    return SagaDefinition(
        "transfer",
        steps=[
            step("debit", compensation=command(BANK, "Undo", _payload)),
            step("credit", compensation=command(BANK, "Undo", _payload)),
            step("confirm", kind=StepKind.PIVOT),
        ],
    )


def orders(n: int) -> list[tuple[str, str, dict[str, Any]]]:
    """Every third transfer fails at its pivot and must be compensated."""
    return [
        ("transfer", f"t-{i:03d}", {"amount": i, "fail": "confirm" if i % 3 == 0 else None})
        for i in range(n)
    ]


# -- plumbing --------------------------------------------------------------------------


@asynccontextmanager
async def running(
    tmp_path: Path, faults: FaultHook | None = None, **kw: Any
) -> AsyncIterator[tuple[Engine, Participant]]:
    """The engine with the bank participant, each on its own SQLite file."""
    orch = SQLiteStore(tmp_path / "orchestrator.db", name="orchestrator", synchronous="NORMAL")
    bank_store = SQLiteStore(tmp_path / "bank.db", name=BANK, synchronous="NORMAL")
    bank = build_bank(bank_store)
    kw.setdefault("idle_poll", 0.2)
    engine = Engine(
        orch, [kw.pop("definition", transfer())], participants=[bank], faults=faults, **kw
    )
    async with engine:
        await bank_store.apply_migrations("test.bank", BANK_MIGRATIONS)
        yield engine, bank


@asynccontextmanager
async def bank_alone(tmp_path: Path, **kw: Any) -> AsyncIterator[Participant]:
    """The bank participant with its store open, driven directly (no engine, no relay)."""
    store = SQLiteStore(tmp_path / "bank.db", name=BANK, synchronous="NORMAL")
    await store.open()
    try:
        await store.apply_migrations("test.bank", BANK_MIGRATIONS)
        yield build_bank(store, **kw)
    finally:
        await store.close()


async def run_all(engine: Engine, n: int, timeout: float = 8.0) -> list[SagaInstance]:
    started = await engine.start_many(orders(n))
    done = [await engine.wait(s.saga_id, timeout=timeout) for s in started]
    await drain(engine)
    return done


async def drain(engine: Engine, quiet_for: float = 0.3, limit: float = 8.0) -> None:
    """Wait until no outbox row is unpublished and no mailbox holds a message (late
    duplicates and delayed deliveries included), so that effects can be counted."""
    end = time.monotonic() + limit
    calm: float | None = None
    while time.monotonic() < end:
        busy = 0
        for s in engine.stores:
            busy += await s.outbox_pending() + await s.queue_depth()
        if busy:
            calm = None
        elif calm is None:
            calm = time.monotonic()
        elif time.monotonic() - calm >= quiet_for:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the engine did not go quiet: messages still in flight")


async def effects(bank: Participant) -> Counter[tuple[str, str, str]]:
    async with bank.store.transaction() as tx:
        rows = await tx.fetchall("SELECT saga_id, step, op FROM effects")
    return Counter((r[0], r[1], r[2]) for r in rows)


def assert_one_effect_per_step(
    done: Sequence[SagaInstance], got: Counter[tuple[str, str, str]]
) -> None:
    """SUCCEEDED: one ``do`` per step; COMPENSATED: one ``do`` and one ``undo`` for each
    step before the (refusing) pivot; never two effects for one (saga, step, op)."""
    assert all(n == 1 for n in got.values()), {k: n for k, n in got.items() if n > 1}
    expected: Counter[tuple[str, str, str]] = Counter()
    for inst in done:
        fail = inst.data.get("fail")
        if fail is None:
            assert inst.state is SagaState.SUCCEEDED, (inst.business_key, inst.state, inst.reason)
            expected.update((inst.saga_id, s, "do") for s in STEPS)
        else:
            assert inst.state is SagaState.COMPENSATED, (inst.business_key, inst.state)
            expected.update((inst.saga_id, s, op) for s in COMPENSATABLE for op in ("do", "undo"))
    assert got == expected


async def replies_by_command(bank: Participant) -> Counter[str]:
    """How many replies the bank wrote for each command it received."""
    return Counter(e.causation_id or "" for e, _ in await bank.store.outbox_all())


def envelope(
    type_: str,
    *,
    saga: str = "s-1",
    step: str = "debit",
    attempt: int = 1,
    rung: int | None = None,
    payload: dict[str, Any] | None = None,
) -> Envelope:
    """A bank command as the orchestrator sends it; ``rung`` makes it a compensation."""
    action_key = f"{saga}:{step}:action"
    return Envelope(
        message_id=f"{saga}:{next(_ids)}:0",
        type=type_,
        kind=MessageKind.COMMAND,
        source="orchestrator",
        destination=BANK,
        correlation_id=saga,
        occurred_at=time.time(),
        payload=payload or {"amount": 5},
        saga_id=saga,
        business_key=saga,
        step=step,
        attempt=attempt,
        fence=1,
        idempotency_key=action_key if rung is None else f"{saga}:{step}:comp:{rung}",
        compensates=None if rung is None else action_key,
        reply_to="orchestrator",
    )


async def deliver(p: Participant, env: Envelope, deliveries: int = 1) -> Settle:
    settles = await p([Delivery(next(_handles), env.to_json(), deliveries)])
    return settles[0]


async def reply_to_command(p: Participant, env: Envelope) -> Outcome:
    replies = [e for e, _ in await p.store.outbox_all() if e.causation_id == env.message_id]
    assert len(replies) == 1, f"expected one reply to {env.message_id}, got {len(replies)}"
    assert replies[0].idempotency_key == env.idempotency_key
    return Outcome.from_payload(replies[0].payload)


# -- fault hooks of our own (deterministic, bounded) ------------------------------------


class CrashAt(FaultHook):
    """Raise :class:`InjectedCrash` at ``point`` for the first ``times`` hits of each
    named endpoint (every endpoint when ``endpoints`` is None), then never again."""

    def __init__(self, point: str, times: int, endpoints: Sequence[str] | None = None) -> None:
        self.where = point
        self.times = times
        self.endpoints = None if endpoints is None else set(endpoints)
        self.hits: Counter[str] = Counter()

    def point(self, name: str, endpoint: str) -> None:
        if name != self.where:
            return
        if self.endpoints is not None and endpoint not in self.endpoints:
            return
        if self.hits[endpoint] < self.times:
            self.hits[endpoint] += 1
            raise InjectedCrash(f"injected crash {name} in {endpoint}")


class AcksLost(FaultHook):
    """``duplicate=1.0`` for a while: the first ``times`` acknowledgements of ``endpoint``
    are lost after the consumer committed, so each of those messages comes again."""

    def __init__(self, endpoint: str, times: int) -> None:
        self.endpoint = endpoint
        self.left = times
        self.redelivered: Counter[int] = Counter()

    def wrap_consumer(self, endpoint: str, handler: BatchHandler) -> BatchHandler:
        if endpoint != self.endpoint:
            return handler

        async def lossy(deliveries: Sequence[Delivery]) -> list[Settle]:
            settles = list(await handler(deliveries))
            for i, (d, s) in enumerate(zip(deliveries, settles, strict=True)):
                if s.ack and self.left > 0:
                    self.left -= 1
                    self.redelivered[d.handle] += 1
                    settles[i] = retry(0.0, "injected: ack lost after commit")
            return settles

        return lossy


class FirstTryLate(FaultHook):
    """Hold back the first delivery of every attempt-1 command to ``endpoint`` for
    ``delay`` seconds (longer than the step timeout): the orchestrator re-sends with the
    same idempotency key, the retry overtakes the original, and the original's reply
    arrives after the step moved on."""

    def __init__(self, endpoint: str, delay: float) -> None:
        self.endpoint = endpoint
        self.delay = delay
        self.held = 0

    def wrap_consumer(self, endpoint: str, handler: BatchHandler) -> BatchHandler:
        if endpoint != self.endpoint:
            return handler

        async def late(deliveries: Sequence[Delivery]) -> list[Settle]:
            out: dict[int, Settle] = {}
            now: list[Delivery] = []
            for d in deliveries:
                env = Envelope.from_json(d.body)
                if env.attempt == 1 and d.deliveries == 1:
                    self.held += 1
                    out[d.handle] = retry(self.delay, "injected: held back")
                else:
                    now.append(d)
            if now:
                out.update(zip((d.handle for d in now), await handler(now), strict=True))
            return [out[d.handle] for d in deliveries]

        return late


class CountingTransport:
    """Counts every message id the relays publish (re-publishes included)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.published: Counter[str] = Counter()

    async def open(self) -> None:
        await self.inner.open()

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        await self.inner.publish(envelopes)
        self.published.update(e.message_id for e in envelopes)

    def subscribe(
        self, endpoint: str, handler: BatchHandler, *, batch_size: int = 256, concurrency: int = 1
    ) -> None:
        self.inner.subscribe(endpoint, handler, batch_size=batch_size, concurrency=concurrency)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()


class CrashAfterPublish(CrashAt):
    """Relays die between publish and mark; the transport counts what was published."""

    def __init__(self, times: int) -> None:
        super().__init__("after_publish", times, ["orchestrator", BANK])
        self.counting: CountingTransport | None = None

    def wrap_transport(self, transport: Transport) -> Transport:
        self.counting = CountingTransport(transport)
        return self.counting


# -- (a) duplicated deliveries -----------------------------------------------------------


@pytest.mark.fault("F-DUPLICATE")
async def test_same_body_pushed_twice_into_the_mailbox_has_one_effect_and_one_reply(
    tmp_path: Path,
) -> None:
    async with bank_alone(tmp_path) as bank:
        transport = EmbeddedTransport({BANK: bank.store}, idle_poll=0.05)
        transport.subscribe(BANK, bank)
        cmd = envelope("Do", saga="dup-1")
        await bank.store.queue_push(BANK, [cmd.to_json()], time.time())
        await bank.store.queue_push(BANK, [cmd.to_json()], time.time())
        # The lost-reply case: the orchestrator re-sends the command (a new message id,
        # the same idempotency key) and must get the first answer, not a second effect.
        resend = cmd.with_changes(message_id="dup-1:resend:0", attempt=2)
        await bank.store.queue_push(BANK, [resend.to_json(), resend.to_json()], time.time())
        await transport.start()
        try:
            for _ in range(100):
                if await bank.store.queue_depth(BANK) == 0:
                    break
                await asyncio.sleep(0.02)
        finally:
            await transport.close()
        assert await bank.store.queue_depth(BANK) == 0
        assert await effects(bank) == Counter({("dup-1", "debit", "do"): 1})
        assert await replies_by_command(bank) == Counter({cmd.message_id: 1, resend.message_id: 1})
        first, again = await reply_to_command(bank, cmd), await reply_to_command(bank, resend)
        assert first.ok and again == first
        assert await bank.store.inbox_ids(BANK) == {cmd.message_id, resend.message_id}
        assert await bank.store.dead_letters() == []


@pytest.mark.fault("F-DUPLICATE")
async def test_redelivery_in_one_batch_and_across_batches_is_absorbed(tmp_path: Path) -> None:
    async with bank_alone(tmp_path) as bank:
        cmd = envelope("Do", saga="dup-2")
        body = cmd.to_json()
        # The same message twice in one batch, then once more in a later batch.
        settles = await bank([Delivery(1, body, 1), Delivery(2, body, 1)])
        assert settles == [ACK, ACK]
        assert await deliver(bank, cmd, deliveries=2) == ACK
        assert await effects(bank) == Counter({("dup-2", "debit", "do"): 1})
        assert await replies_by_command(bank) == Counter({cmd.message_id: 1})


@pytest.mark.fault("F-DUPLICATE")
async def test_acks_lost_for_a_while_every_saga_has_one_effect_and_one_reply_per_command(
    tmp_path: Path,
) -> None:
    hook = AcksLost(BANK, times=40)  # duplicate=1.0 for the first 40 bank deliveries
    async with running(tmp_path, hook) as (engine, bank):
        done = await run_all(engine, 24)
        assert hook.left == 0 and sum(hook.redelivered.values()) == 40
        assert_one_effect_per_step(done, await effects(bank))
        replies = await replies_by_command(bank)
        assert set(replies.values()) == {1}
        assert set(replies) == await bank.store.inbox_ids(BANK)
        assert await engine.store.dead_letters() == await bank.store.dead_letters() == []


@pytest.mark.fault("F-DUPLICATE")
async def test_seeded_duplicates_everywhere_keep_effects_single(tmp_path: Path) -> None:
    faults = Faults(FaultProfile(duplicate=0.5), seed=1234)
    async with running(tmp_path, faults) as (engine, bank):
        done = await run_all(engine, 24)
        assert faults.counts["duplicate"] > 20
        assert_one_effect_per_step(done, await effects(bank))
        assert set((await replies_by_command(bank)).values()) == {1}
        for inst in done:
            history = await engine.store.history(inst.saga_id)
            succeeded = Counter(h.step for h in history if h.event == "step.succeeded")
            assert all(n == 1 for n in succeeded.values()), succeeded


# -- (b) lost publishes and lost acknowledgements ----------------------------------------


@pytest.mark.fault("F-PUBLISH-LOST", "F-ACK-LOST")
async def test_lost_publishes_and_lost_acks_still_complete_every_saga_once(
    tmp_path: Path,
) -> None:
    faults = Faults(FaultProfile(publish_lost=0.3, ack_lost=0.3), seed=7)
    async with running(tmp_path, faults, relay_lease=0.2) as (engine, bank):
        done = await run_all(engine, 30)
        assert faults.counts["publish_lost"] > 0 and faults.counts["ack_lost"] > 0
        assert_one_effect_per_step(done, await effects(bank))
        # A lost ack re-publishes: the bank saw some commands twice, handled each once.
        assert set((await replies_by_command(bank)).values()) == {1}
        for s in engine.stores:
            assert await s.outbox_pending() == 0
            assert await s.dead_letters() == []


# -- (c) delayed and reordered deliveries, beyond the step timeout ---------------------


@pytest.mark.fault("F-DELAY")
async def test_long_delays_beyond_the_timeout_resend_with_the_same_key_and_go_stale(
    tmp_path: Path,
) -> None:
    hook = FirstTryLate(BANK, delay=1.0)
    async with running(tmp_path, hook, definition=transfer(timeout=0.3)) as (engine, bank):
        done = await run_all(engine, 6)
        assert_one_effect_per_step(done, await effects(bank))
        assert hook.held > 0
        commands = [e for e, _ in await engine.store.outbox_all() if e.destination == BANK]
        by_key: dict[str, list[Envelope]] = {}
        for c in commands:
            assert c.idempotency_key is not None
            by_key.setdefault(c.idempotency_key, []).append(c)
        # Every first try was held back past the timeout, so every command key was sent
        # (at least) twice, with the same key and new message ids.
        for key, sent in by_key.items():
            assert len(sent) >= 2, key
            assert len({c.message_id for c in sent}) == len(sent)
            assert [c.attempt for c in sent] == list(range(1, len(sent) + 1))
        # The bank handled every copy, answered each once, applied each key once.
        replies = await replies_by_command(bank)
        assert set(replies) == {c.message_id for c in commands}
        assert set(replies.values()) == {1}
        # The late answers to the first tries were recorded as stale and moved nothing.
        for inst in done:
            history = await engine.store.history(inst.saga_id)
            stale = [h for h in history if h.event == "reply.stale"]
            steps_sent = {c.step for c in commands if c.saga_id == inst.saga_id}
            assert {h.step for h in stale} == steps_sent, (inst.business_key, stale)
            # One answer per key moved the saga; every other copy's answer was stale.
            copies = sum(len(v) - 1 for v in by_key.values() if v[0].saga_id == inst.saga_id)
            assert len(stale) == copies, (inst.business_key, stale)
            assert any(h.detail["attempt"] == 1 for h in stale)
            succeeded = Counter(h.step for h in history if h.event == "step.succeeded")
            assert all(n == 1 for n in succeeded.values())


@pytest.mark.fault("F-DELAY", "F-REORDER")
async def test_seeded_delays_and_reordering_complete_correctly(tmp_path: Path) -> None:
    faults = Faults(
        FaultProfile(delay=0.4, max_delay=0.3, long_delay=0.08, long_delay_s=0.6), seed=42
    )
    definition = transfer(timeout=0.5, attempts=12)
    async with running(tmp_path, faults, definition=definition) as (engine, bank):
        done = await run_all(engine, 24, timeout=10)
        assert faults.counts["delay"] > 0 and faults.counts["long_delay"] > 0
        assert_one_effect_per_step(done, await effects(bank))
        assert set((await replies_by_command(bank)).values()) == {1}
        stale = 0
        for inst in done:
            history = await engine.store.history(inst.saga_id)
            stale += sum(1 for h in history if h.event == "reply.stale")
            succeeded = Counter(h.step for h in history if h.event == "step.succeeded")
            assert all(n == 1 for n in succeeded.values())
        timed_out = [
            c for c, _ in await engine.store.outbox_all() if c.attempt > 1 and c.destination == BANK
        ]
        # Some long delays outlasted the timeout: re-sent, and the late copies went stale.
        assert timed_out and stale > 0


# -- (d) crash points -------------------------------------------------------------------


@pytest.mark.fault("F-CRASH-BEFORE-COMMIT")
async def test_crash_before_commit_leaves_no_partial_state(tmp_path: Path) -> None:
    hook = CrashAt("before_commit", times=1)
    async with bank_alone(tmp_path, faults=hook) as bank:
        cmd = envelope("Do", saga="crash-1")
        settle = await deliver(bank, cmd)
        assert not settle.ack and "InjectedCrash" in settle.error
        # Rolled back as a whole: no effect, no inbox row, no idempotency record, no reply.
        assert await effects(bank) == Counter()
        assert await bank.store.inbox_ids(BANK) == set()
        assert await bank.store.outbox_all() == []
        async with bank.store.transaction() as tx:
            assert await tx.idempotency_get(BANK, cmd.idempotency_key or "") is None
        # The redelivery is handled as if the first had never happened.
        assert await deliver(bank, cmd, deliveries=2) == ACK
        assert await effects(bank) == Counter({("crash-1", "debit", "do"): 1})
        assert (await reply_to_command(bank, cmd)).ok
        assert hook.hits == Counter({BANK: 1})


@pytest.mark.fault("F-CRASH-BEFORE-COMMIT")
async def test_bounded_crashes_before_commit_everywhere_then_every_saga_finishes(
    tmp_path: Path,
) -> None:
    hook = CrashAt("before_commit", times=4, endpoints=[BANK, "orchestrator"])
    async with running(tmp_path, hook) as (engine, bank):
        done = await run_all(engine, 24)
        assert hook.hits == Counter({BANK: 4, "orchestrator": 4})
        assert_one_effect_per_step(done, await effects(bank))
        assert set((await replies_by_command(bank)).values()) == {1}
        for inst in done:
            history = await engine.store.history(inst.saga_id)
            # A transition rolled back by a crash left nothing: each happened once.
            assert [h.version for h in history] == sorted(h.version for h in history)
            started = Counter(h.step for h in history if h.event == "step.started")
            assert all(n == 1 for n in started.values()), started
        assert await engine.store.dead_letters() == await bank.store.dead_letters() == []


@pytest.mark.fault("F-CRASH-AFTER-PUBLISH")
async def test_crashes_after_publish_republish_and_the_inbox_drops_the_copies(
    tmp_path: Path,
) -> None:
    hook = CrashAfterPublish(times=5)
    async with running(tmp_path, hook, relay_lease=0.2) as (engine, bank):
        done = await run_all(engine, 24)
        assert hook.hits == Counter({"orchestrator": 5, BANK: 5})
        assert hook.counting is not None
        published = hook.counting.published
        republished = {m for m, n in published.items() if n > 1}
        assert republished, "a crash between publish and mark must re-publish"
        got = await effects(bank)
        assert_one_effect_per_step(done, got)
        # The bank received some commands twice but recorded each once in its inbox,
        # and applied exactly one effect per command (every command here has an effect
        # except the refused pivots and the undos with nothing to undo: none here).
        commands = {e.message_id: e for e, _ in await engine.store.outbox_all()}
        inbox = await bank.store.inbox_ids(BANK)
        assert inbox == {m for m, e in commands.items() if e.destination == BANK}
        refused = sum(1 for inst in done if inst.data.get("fail"))
        assert len(inbox) == sum(got.values()) + refused
        assert any(m in inbox for m in republished)
        # Re-published replies were dropped by the orchestrator's inbox, too.
        replies = {e.message_id for e, _ in await bank.store.outbox_all()}
        assert replies <= await engine.store.inbox_ids("orchestrator")
        assert set((await replies_by_command(bank)).values()) == {1}


# -- (e) a compensation that overtakes its action ---------------------------------------


@pytest.mark.fault("F-REORDER")
async def test_compensation_before_its_action_tombstones_and_the_late_action_is_refused(
    tmp_path: Path,
) -> None:
    async with bank_alone(tmp_path) as bank:
        action = envelope("Do", saga="late-1", step="debit")
        undo = envelope("Undo", saga="late-1", step="debit", rung=0)
        assert await deliver(bank, undo) == ACK
        undone = await reply_to_command(bank, undo)
        assert undone.ok and undone.result == {"undone": False}
        async with bank.store.transaction() as tx:
            stone = await tx.idempotency_get(BANK, action.idempotency_key or "")
        assert stone is not None and stone.tombstone
        # The action arrives late: refused, never applied after its undo.
        assert await deliver(bank, action) == ACK
        refused = await reply_to_command(bank, action)
        assert not refused.ok and not refused.retryable
        assert refused.reason == REFUSED_AFTER_COMPENSATION
        # A retry of the action (new message id, same key) is refused too.
        again = action.with_changes(message_id="late-1:again:0", attempt=2)
        assert await deliver(bank, again) == ACK
        assert (await reply_to_command(bank, again)).reason == REFUSED_AFTER_COMPENSATION
        # A repeated compensation returns its first answer.
        undo_again = undo.with_changes(message_id="late-1:undo-again:0", attempt=2)
        assert await deliver(bank, undo_again) == ACK
        assert await reply_to_command(bank, undo_again) == undone
        assert await effects(bank) == Counter()


async def test_compensation_after_its_action_undoes_it_once(tmp_path: Path) -> None:
    async with bank_alone(tmp_path) as bank:
        action = envelope("Do", saga="ok-1", step="credit")
        undo = envelope("Undo", saga="ok-1", step="credit", rung=0)
        for env in (action, undo, undo.with_changes(message_id="ok-1:undo2:0", attempt=2)):
            assert await deliver(bank, env) == ACK
        assert await effects(bank) == Counter(
            {("ok-1", "credit", "do"): 1, ("ok-1", "credit", "undo"): 1}
        )
        assert (await reply_to_command(bank, undo)).result == {"undone": True}


# -- commands of one step in one batch -------------------------------------------------
# A batch reads its idempotency records at once; what a message records is seen by the
# messages after it in the same batch, exactly as if each had its own transaction.


async def in_one_batch(p: Participant, envs: Sequence[Envelope]) -> list[Settle]:
    return await p([Delivery(next(_handles), e.to_json(), 1) for e in envs])


async def test_an_action_and_its_compensation_in_one_batch_undo_it_once(tmp_path: Path) -> None:
    async with bank_alone(tmp_path) as bank:
        action = envelope("Do", saga="b-1")
        undo = envelope("Undo", saga="b-1", rung=0)
        undo_again = undo.with_changes(message_id="b-1:undo-again:0", attempt=2)
        assert await in_one_batch(bank, [action, undo, undo_again]) == [ACK] * 3
        assert await effects(bank) == Counter(
            {("b-1", "debit", "do"): 1, ("b-1", "debit", "undo"): 1}
        )
        assert (await reply_to_command(bank, action)).result == {"ref": "debit-b-1"}
        undone = await reply_to_command(bank, undo)
        assert undone.result == {"undone": True}
        assert await reply_to_command(bank, undo_again) == undone


@pytest.mark.fault("F-REORDER")
async def test_a_compensation_then_its_late_action_in_one_batch_refuse_the_action(
    tmp_path: Path,
) -> None:
    async with bank_alone(tmp_path) as bank:
        undo = envelope("Undo", saga="b-2", rung=0)
        action = envelope("Do", saga="b-2")
        again = action.with_changes(message_id="b-2:again:0", attempt=2)
        assert await in_one_batch(bank, [undo, action, again]) == [ACK] * 3
        assert (await reply_to_command(bank, undo)).result == {"undone": False}
        for late in (action, again):
            refused = await reply_to_command(bank, late)
            assert not refused.ok and not refused.retryable
            assert refused.reason == REFUSED_AFTER_COMPENSATION
        assert await effects(bank) == Counter()
        async with bank.store.transaction() as tx:
            stone = await tx.idempotency_get(BANK, action.idempotency_key or "")
        assert stone is not None and stone.tombstone


@pytest.mark.fault("F-DUPLICATE")
async def test_the_same_command_twice_in_one_batch_has_one_effect_and_one_answer(
    tmp_path: Path,
) -> None:
    async with bank_alone(tmp_path) as bank:
        action = envelope("Do", saga="b-3")
        again = action.with_changes(message_id="b-3:again:0", attempt=2)
        settles = await in_one_batch(bank, [action, again, action])  # and a redelivered copy
        assert settles == [ACK] * 3
        assert await effects(bank) == Counter({("b-3", "debit", "do"): 1})
        assert await replies_by_command(bank) == Counter(
            {action.message_id: 1, again.message_id: 1}
        )
        first = await reply_to_command(bank, action)
        assert first.ok and await reply_to_command(bank, again) == first


async def test_a_failed_action_and_its_compensation_in_one_batch_undo_nothing(
    tmp_path: Path,
) -> None:
    async with bank_alone(tmp_path) as bank:
        action = envelope("Do", saga="b-4", payload={"amount": 5, "fail": "debit"})
        undo = envelope("Undo", saga="b-4", rung=0)
        assert await in_one_batch(bank, [action, undo]) == [ACK] * 2
        assert (await reply_to_command(bank, action)).reason == "debit refused by the bank"
        # The handler is not called: the definite failure had no effect to undo.
        assert (await reply_to_command(bank, undo)).result == {
            "compensated": False,
            "why": "the action had no effect",
        }
        assert await effects(bank) == Counter()


async def test_an_answer_given_in_a_batch_is_replayed_to_a_repeat_later_in_it(
    tmp_path: Path,
) -> None:
    async with bank_alone(tmp_path) as bank:
        desk = Participant("desk", bank.store)
        asked: list[Envelope] = []

        @desk.handles("Ask")
        async def ask(tx: Tx, cmd: Envelope) -> HandlerResult:
            asked.append(cmd)
            return DEFER

        @desk.on_event("Decided")
        async def decided(tx: Tx, ev: Envelope) -> None:
            assert await desk.answer(tx, asked[0], success({"yes": True}), 1.0)

        question = envelope("Ask", saga="b-5").with_changes(destination="desk")
        repeat = question.with_changes(message_id="b-5:again:0", attempt=2)
        fact = Envelope(
            message_id="b-5:decided",
            type="Decided",
            kind=MessageKind.EVENT,
            source="boss",
            correlation_id="b-5",
            occurred_at=1.0,
        )
        assert await in_one_batch(desk, [question, fact, repeat]) == [ACK] * 3
        assert asked == [question]  # the repeat got the answer, not the handler
        assert (await reply_to_command(desk, repeat)).result == {"yes": True}
        assert (await reply_to_command(desk, question)).result == {"yes": True}


async def test_a_batch_reads_its_idempotency_records_in_one_statement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    get, get_many = SQLiteTx.idempotency_get, SQLiteTx.idempotency_get_many

    async def one(self: SQLiteTx, consumer: str, key: str) -> IdempotencyRecord | None:
        reads.append("one")
        return await get(self, consumer, key)

    async def many(
        self: SQLiteTx, consumer: str, keys: Sequence[str]
    ) -> dict[str, IdempotencyRecord]:
        reads.append("many")
        return await get_many(self, consumer, keys)

    monkeypatch.setattr(SQLiteTx, "idempotency_get", one)
    monkeypatch.setattr(SQLiteTx, "idempotency_get_many", many)
    async with bank_alone(tmp_path) as bank:
        envs = [envelope("Do", saga=f"b-6-{n}") for n in range(8)]
        envs += [envelope("Undo", saga=f"b-6-{n}", rung=0) for n in range(0, 8, 2)]
        assert await in_one_batch(bank, envs) == [ACK] * 12
        assert reads == ["many"]
        assert len(await effects(bank)) == 12


@pytest.mark.fault("F-REORDER")
async def test_an_older_manual_retry_arriving_after_a_newer_one_succeeded_runs_nothing(
    tmp_path: Path,
) -> None:
    """A person retried a definitely failed step twice; the first retry's command was
    still on its way when the second one succeeded. It gets "superseded", not a second
    run of the handler (it reads only its own retry's records and older ones)."""
    async with bank_alone(tmp_path) as bank:
        failed = envelope("Do", saga="b-9", payload={"amount": 5, "fail": "debit"})
        await deliver(bank, failed)
        assert not (await reply_to_command(bank, failed)).ok
        first, second = (
            dataclasses.replace(
                envelope("Do", saga="b-9", attempt=1 + n), headers={MANUAL_RETRY: str(n)}
            )
            for n in (1, 2)
        )
        await deliver(bank, second)
        assert (await reply_to_command(bank, second)).ok
        await deliver(bank, first)
        late = await reply_to_command(bank, first)
        assert not late.ok and not late.retryable and "superseded" in late.reason
        assert await effects(bank) == Counter({("b-9", "debit", "do"): 1})
