"""Poison messages are parked with their reason, in the right store, and hold up nothing.

Each test puts good and bad messages into one mailbox *together*, so the consumer takes
them in one batch: the bad ones must end in that consumer's ``dead_letters()`` with a
reason naming what was wrong, the good ones must be handled exactly once, and every
message must be accounted for (handled, or parked) with the mailbox empty at the end.
"""

from __future__ import annotations

import asyncio
import json
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
    Participant,
    RetryPolicy,
    SagaDefinition,
    SagaState,
    Step,
    StepStatus,
    command,
    success,
)
from sagakit.core.envelope import reply_to
from sagakit.runtime.consumer import FaultHook
from sagakit.runtime.orchestrator import Orchestrator
from sagakit.runtime.relay import Relay
from sagakit.stores.base import DeadLetter, Tx
from sagakit.stores.sqlite import SQLiteStore
from sagakit.testing.faults import InjectedCrash
from sagakit.transports.base import Delivery, Settle
from sagakit.transports.embedded import EmbeddedTransport

BANK = "bank"
MIGRATIONS = [
    "CREATE TABLE effects (id INTEGER PRIMARY KEY, message_id TEXT NOT NULL, op TEXT NOT NULL);"
]


def build_bank(store: SQLiteStore, **kwargs: Any) -> Participant:
    p = Participant(BANK, store, **kwargs)

    async def record(tx: Tx, cmd: Envelope, op: str) -> None:
        await tx.execute("INSERT INTO effects (message_id, op) VALUES (?, ?)", (cmd.message_id, op))

    @p.handles("Do")
    async def do(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        await record(tx, cmd, "do")
        return {"done": True}

    @p.handles("Undo")
    async def undo(tx: Tx, cmd: Envelope) -> None:
        await record(tx, cmd, "undo")

    @p.handles("Explode")
    async def explode(tx: Tx, cmd: Envelope) -> None:
        await record(tx, cmd, "explode")  # rolled back with the failure
        raise RuntimeError("boom: the ledger is offline")

    return p


_n = 0


def envelope(type_: str = "Do", *, destination: str | None = BANK, **changes: Any) -> Envelope:
    global _n
    _n += 1
    saga = f"s-{_n}"
    env = Envelope(
        message_id=f"{saga}:1:0",
        type=type_,
        kind=MessageKind.COMMAND,
        source="orchestrator",
        destination=destination,
        correlation_id=saga,
        occurred_at=time.time(),
        payload={"amount": _n},
        saga_id=saga,
        business_key=saga,
        step="debit",
        attempt=1,
        fence=1,
        idempotency_key=f"{saga}:debit:action",
        reply_to="orchestrator",
    )
    return env.with_changes(**changes)


@asynccontextmanager
async def opened(*stores: SQLiteStore) -> AsyncIterator[None]:
    for s in stores:
        await s.open()
    try:
        yield
    finally:
        for s in stores:
            await s.close()


class Recorder:
    """Wraps a consumer and remembers the batches it was handed."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.batches: list[list[str]] = []

    async def __call__(self, deliveries: Sequence[Delivery]) -> Sequence[Settle]:
        self.batches.append([d.body for d in deliveries])
        settles: Sequence[Settle] = await self.handler(deliveries)
        return settles


async def consume(
    endpoint: str, store: SQLiteStore, handler: Any, bodies: Sequence[str], limit: float = 5.0
) -> Recorder:
    """Push ``bodies`` into ``endpoint``'s mailbox in one go, consume until it is empty."""
    await store.queue_push(endpoint, bodies, time.time())
    recorder = Recorder(handler)
    transport = EmbeddedTransport({endpoint: store}, idle_poll=0.05)
    transport.subscribe(endpoint, recorder)
    await transport.start()
    try:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if not await store.queue_depth(endpoint):
                break
            await asyncio.sleep(0.02)
    finally:
        await transport.close()
    assert await store.queue_depth(endpoint) == 0, "messages left in the mailbox"
    return recorder


async def effects(store: SQLiteStore) -> Counter[tuple[str, str]]:
    async with store.transaction() as tx:
        rows = await tx.fetchall("SELECT message_id, op FROM effects")
    return Counter((r[0], r[1]) for r in rows)


def by_message(letters: Sequence[DeadLetter]) -> dict[str | None, DeadLetter]:
    out = {d.message_id: d for d in letters}
    assert len(out) == len(letters), f"a message was parked twice: {letters}"
    return out


# -- a participant's mailbox --------------------------------------------------------------


@pytest.mark.fault("F-MALFORMED", "F-POISON")
async def test_poison_in_a_participant_batch_is_parked_and_the_rest_processed(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "bank.db", name=BANK, synchronous="NORMAL")
    async with opened(store):
        await store.apply_migrations("test.bank", MIGRATIONS)
        bank = build_bank(store)
        good1, good2 = envelope("Do"), envelope("Undo")
        unknown = envelope("Frobnicate")
        elsewhere = envelope("Do", destination="shipping")
        bad_field = envelope("Do").to_dict() | {"kind": "telegram"}
        bad_field["message_id"] = "bad-field:1:0"
        bodies = [
            good1.to_json(),
            "not json",
            unknown.to_json(),
            elsewhere.to_json(),
            json.dumps(bad_field),
            good2.to_json(),
        ]
        recorder = await consume(BANK, store, bank, bodies)

        assert len(recorder.batches[0]) == len(bodies), "expected one batch"
        # The good ones were handled exactly once, with a reply each.
        assert await effects(store) == Counter(
            {(good1.message_id, "do"): 1, (good2.message_id, "undo"): 1}
        )
        replies = Counter(e.causation_id for e, _ in await store.outbox_all())
        assert replies == Counter({good1.message_id: 1, good2.message_id: 1})
        # The bad ones are parked in the bank's own store, each with its reason.
        letters = await store.dead_letters(BANK)
        assert {d.endpoint for d in await store.dead_letters()} == {BANK}
        assert len(letters) == 4
        parked = by_message([d for d in letters if d.message_id is not None])
        assert set(parked) == {unknown.message_id, elsewhere.message_id}
        malformed = [d for d in letters if d.message_id is None]
        assert sorted(d.body for d in malformed) == sorted(["not json", json.dumps(bad_field)])
        reasons = {d.body: d.reason for d in malformed}
        assert "malformed message" in reasons["not json"]
        assert "not valid JSON" in reasons["not json"]
        assert "'kind'" in reasons[json.dumps(bad_field)]
        assert "telegram" in reasons[json.dumps(bad_field)]
        why = parked[unknown.message_id].reason
        assert "UnknownMessageType" in why and "'Frobnicate'" in why and "'Do'" in why
        assert parked[unknown.message_id].body == unknown.to_json()
        assert parked[elsewhere.message_id].reason == "addressed to 'shipping', not 'bank'"
        # Nothing dropped: every message handled or parked, the mailbox empty.
        inbox = await store.inbox_ids(BANK)
        assert inbox == {good1.message_id, good2.message_id}
        assert len(inbox) + len(letters) == len(bodies)


@pytest.mark.fault("F-POISON")
async def test_handler_that_always_raises_is_parked_after_max_deliveries(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "bank.db", name=BANK, synchronous="NORMAL")
    async with opened(store):
        await store.apply_migrations("test.bank", MIGRATIONS)
        bank = build_bank(store, max_deliveries=3)
        good1, bad, good2 = envelope("Do"), envelope("Explode"), envelope("Do")
        recorder = await consume(BANK, store, bank, [e.to_json() for e in (good1, bad, good2)])

        assert len(recorder.batches[0]) == 3
        tries = sum(batch.count(bad.to_json()) for batch in recorder.batches)
        assert tries == 3
        # The good ones did not wait for the bad one's retries: handled in batch one.
        assert await effects(store) == Counter(
            {(good1.message_id, "do"): 1, (good2.message_id, "do"): 1}
        )
        [letter] = await store.dead_letters(BANK)
        assert letter.message_id == bad.message_id and letter.body == bad.to_json()
        assert letter.reason == (
            "failed 3 deliveries; last error RuntimeError: boom: the ledger is offline"
        )
        # The failing handler's writes were rolled back; it left no inbox row or reply.
        assert bad.message_id not in await store.inbox_ids(BANK)
        assert {e.causation_id for e, _ in await store.outbox_all()} == {
            good1.message_id,
            good2.message_id,
        }


# -- the orchestrator's mailbox -----------------------------------------------------------


def two_steps(timeout: float = 30.0) -> SagaDefinition:
    policy = RetryPolicy(max_attempts=2, initial_backoff=0.05, max_backoff=0.1)
    return SagaDefinition(
        "transfer",
        steps=[
            Step("debit", command(BANK, "Do"), command(BANK, "Undo"), retry=policy),
            Step("notify", command("nowhere", "Notify"), timeout=timeout, retry=policy),
        ],
    )


@pytest.mark.fault("F-MALFORMED")
async def test_replies_for_unknown_sagas_and_bad_replies_are_parked_by_the_orchestrator(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "orchestrator.db", name="orchestrator", synchronous="NORMAL")
    async with opened(store):
        orchestrator = Orchestrator(store, [two_steps()])
        inst, _ = await orchestrator.start("transfer", "t-1", {})
        [(cmd, _)] = await store.outbox_all()
        good = reply_to(cmd, success({"ref": "r-1"}), source=BANK, now=time.time())
        stranger = good.with_changes(
            message_id="stray/reply",
            saga_id="no-such-saga",
            idempotency_key="no-such-saga:x:action",
        )
        garbled = good.with_changes(message_id="garbled/reply", payload={"status": "fine"})
        bodies = [stranger.to_json(), garbled.to_json(), good.to_json()]
        recorder = await consume("orchestrator", store, orchestrator, bodies)

        assert len(recorder.batches[0]) == 3
        # The good reply moved the saga on, once.
        after = await store.get_saga(inst.saga_id)
        assert after is not None and after.steps[0].status is StepStatus.SUCCEEDED
        assert after.steps[0].result == {"ref": "r-1"}
        assert after.cursor == 1
        history = await store.history(inst.saga_id)
        assert [h.event for h in history].count("step.succeeded") == 1
        # The others are parked in the orchestrator's store with their reasons.
        parked = by_message(await store.dead_letters("orchestrator"))
        assert set(parked) == {stranger.message_id, garbled.message_id}
        assert "SagaNotFound" in parked[stranger.message_id].reason
        assert "unknown saga 'no-such-saga'" in parked[stranger.message_id].reason
        assert "reply payload needs 'ok'" in parked[garbled.message_id].reason
        assert await store.inbox_ids("orchestrator") == {good.message_id}


@pytest.mark.fault("F-POISON")
async def test_a_local_step_command_that_cannot_run_is_parked_not_redelivered_forever(
    tmp_path: Path,
) -> None:
    calls: list[str] = []

    def hotel(ctx: Any) -> dict[str, Any]:
        calls.append(ctx.idempotency_key)
        return {"ok": 1}

    definition = SagaDefinition("trip", steps=[Step("hotel", hotel)])
    store = SQLiteStore(tmp_path / "orchestrator.db", name="orchestrator", synchronous="NORMAL")
    engine = Engine(store, [definition], idle_poll=0.05)
    await store.open()
    # A real saga's local command, and a poison one (no definition in its payload), put
    # into the local runner's mailbox together so that they share one batch.
    inst = await engine.start("trip", "trip-1")
    [row] = await store.outbox_claim(10, time.time(), 60.0)
    await store.outbox_mark_published([row.id], time.time())
    poison = row.envelope.with_changes(message_id="poison:1:0", payload={})
    await store.queue_push(
        "orchestrator.local", [poison.to_json(), row.envelope.to_json()], time.time()
    )
    async with engine:
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            if (await engine.get(inst.saga_id)).terminal:
                break
            await asyncio.sleep(0.05)
        state = (await engine.get(inst.saga_id)).state
        letters = await store.dead_letters("orchestrator.local")
    assert state is SagaState.SUCCEEDED
    assert [d.message_id for d in letters] == ["poison:1:0"]
    assert "not runnable" in letters[0].reason


# -- the producer's relay ----------------------------------------------------------------


@pytest.mark.fault("F-UNROUTABLE")
async def test_unroutable_outbox_messages_are_parked_by_the_producers_relay(
    tmp_path: Path,
) -> None:
    producer = SQLiteStore(tmp_path / "bank.db", name=BANK, synchronous="NORMAL")
    consumer = SQLiteStore(tmp_path / "orchestrator.db", name="orchestrator", synchronous="NORMAL")
    async with opened(producer, consumer):
        routable = envelope("Do.reply", destination="orchestrator")
        lost = envelope("Notify", destination="nowhere")
        now = time.time()
        async with producer.transaction() as tx:
            await tx.outbox_add([routable, lost], now)
        relay = Relay(producer, EmbeddedTransport({"orchestrator": consumer}))
        assert await relay.relay_once() == 2

        # The routable one was delivered in the same publish batch.
        assert await consumer.queue_depth("orchestrator") == 1
        [queued] = await consumer.queue_fetch("orchestrator", 10, time.time(), 5.0)
        assert queued.body == routable.to_json()
        # The unroutable one is parked in the producer's store, under its destination.
        [letter] = await producer.dead_letters()
        assert letter.endpoint == "nowhere" and letter.message_id == lost.message_id
        assert letter.body == lost.to_json()
        assert letter.reason.startswith("unroutable:")
        assert "no route" in letter.reason and "'orchestrator'" in letter.reason
        assert await consumer.dead_letters() == []
        # Nothing is left pending, so nothing is retried forever or silently dropped.
        assert await producer.outbox_pending() == 0
        assert await relay.relay_once() == 0


@pytest.mark.fault("F-UNROUTABLE")
async def test_only_the_unroutable_copy_of_a_fanned_out_event_is_parked(tmp_path: Path) -> None:
    """Copies of one event share a message id: the delivered ones are not dead letters."""
    producer = SQLiteStore(tmp_path / "bank.db", name=BANK, synchronous="NORMAL")
    consumer = SQLiteStore(tmp_path / "audit.db", name="audit", synchronous="NORMAL")
    async with opened(producer, consumer):
        event = envelope("Debited", destination=None, kind=MessageKind.EVENT)
        async with producer.transaction() as tx:
            await tx.outbox_add([event], time.time())
        relay = Relay(
            producer,
            EmbeddedTransport({"audit": consumer}),
            event_routes={"Debited": ["audit", "mail"]},  # nobody routes "mail"
        )
        assert await relay.relay_once() == 1
        [queued] = await consumer.queue_fetch("audit", 10, time.time(), 5.0)
        assert Envelope.from_json(queued.body).message_id == event.message_id
        [letter] = await producer.dead_letters()
        assert (letter.endpoint, letter.message_id) == ("mail", event.message_id)
        assert letter.reason.startswith("unroutable:")


@pytest.mark.fault("F-UNROUTABLE")
async def test_a_saga_step_to_an_unroutable_endpoint_is_parked_and_the_saga_compensates(
    tmp_path: Path,
) -> None:
    orch = SQLiteStore(tmp_path / "orchestrator.db", name="orchestrator", synchronous="NORMAL")
    bank_store = SQLiteStore(tmp_path / "bank.db", name=BANK, synchronous="NORMAL")
    engine = Engine(
        orch, [two_steps(timeout=0.2)], participants=[build_bank(bank_store)], idle_poll=0.05
    )
    async with engine:
        await bank_store.apply_migrations("test.bank", MIGRATIONS)
        inst = await engine.start("transfer", "t-1", {})
        done = await engine.wait(inst.saga_id, timeout=8)
        letters = await orch.dead_letters("nowhere")
        sent = [e for e, _ in await orch.outbox_all() if e.destination == "nowhere"]
        bank_effects = await effects(bank_store)
    # Both tries of the unroutable step were parked by the orchestrator's relay; its
    # outcome stayed unknown, so the saga compensated the debit.
    assert done.state is SagaState.COMPENSATED, done.reason
    assert sorted(d.message_id or "" for d in letters) == sorted(e.message_id for e in sent)
    assert len(sent) == 2
    assert all(d.reason.startswith("unroutable:") for d in letters)
    assert sorted(op for _, op in bank_effects) == ["do", "undo"]


class _CrashOnceAfterPublish(FaultHook):
    def __init__(self) -> None:
        self.crashed = False

    def point(self, name: str, endpoint: str) -> None:
        if name == "after_publish" and not self.crashed:
            self.crashed = True
            raise InjectedCrash(f"injected crash {name} in {endpoint}")


@pytest.mark.fault("F-UNROUTABLE", "F-CRASH-AFTER-PUBLISH")
async def test_an_unroutable_message_is_parked_once_even_if_the_relay_dies_after_publish(
    tmp_path: Path,
) -> None:
    producer = SQLiteStore(tmp_path / "bank.db", name=BANK, synchronous="NORMAL")
    async with opened(producer):
        lost = envelope("Notify", destination="nowhere")
        async with producer.transaction() as tx:
            await tx.outbox_add([lost], time.time())
        hook = _CrashOnceAfterPublish()
        relay = Relay(producer, EmbeddedTransport({}), lease=0.1, faults=hook)
        with pytest.raises(InjectedCrash):
            await relay.relay_once()
        await asyncio.sleep(0.15)  # the claim lease runs out: the row is published again
        assert await relay.relay_once() == 1
        assert await producer.outbox_pending() == 0
        letters = await producer.dead_letters()
    assert [d.message_id for d in letters] == [lost.message_id]
