"""Operators replay and discard dead letters (sagakit.runtime.dead_letters).

A replayed message goes back through the store's outbox with its message id and body,
so after the handler is fixed it is handled exactly once; replays that could change
nothing are refused with the reason and leave the dead letter open.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
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
    command,
)
from sagakit.core.envelope import REPLAYED_FROM
from sagakit.errors import DeadLetterNotFound, DeadLetterRefused
from sagakit.runtime.dead_letters import DeadLetterDesk
from sagakit.runtime.relay import Relay
from sagakit.stores.base import Tx
from sagakit.stores.memory import MemoryStore
from sagakit.stores.sqlite import SQLiteStore
from sagakit.transports.embedded import EmbeddedTransport

BANK = "bank"
PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
EFFECTS = ["CREATE TABLE effects (message_id TEXT NOT NULL, op TEXT NOT NULL);"]


async def until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < end, "timed out waiting"
        await asyncio.sleep(0.02)


def bank_engine(tmp_path: Path, broken: list[bool]) -> tuple[Engine, SQLiteStore]:
    orch = SQLiteStore(tmp_path / "orchestrator.db", name="orchestrator", synchronous="NORMAL")
    bank_store = SQLiteStore(tmp_path / "bank.db", name=BANK, synchronous="NORMAL")
    bank = Participant(BANK, bank_store, max_deliveries=2)

    @bank.handles("Debit")
    async def debit(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        if broken[0]:
            raise RuntimeError("bug: the ledger rejects every debit")
        await tx.execute("INSERT INTO effects VALUES (?, 'debit')", (cmd.message_id,))
        return {"debited": True}

    @bank.handles("Credit")
    async def credit(tx: Tx, cmd: Envelope) -> None:
        await tx.execute("INSERT INTO effects VALUES (?, 'credit')", (cmd.message_id,))

    once = RetryPolicy(max_attempts=1, initial_backoff=0.05, max_backoff=0.1)
    pay = SagaDefinition(
        "pay",
        steps=[Step("debit", command(BANK, "Debit"), command(BANK, "Credit"), retry=once)],
    )
    engine = Engine(orch, [pay], participants=[bank], idle_poll=0.05)
    engine.before_start(lambda: bank_store.apply_migrations("test.bank", EFFECTS))
    return engine, bank_store


async def effects(store: SQLiteStore) -> list[tuple[str, str]]:
    async with store.transaction() as tx:
        return [(r[0], r[1]) for r in await tx.fetchall("SELECT message_id, op FROM effects")]


@pytest.mark.fault("F-POISON")
async def test_a_poison_command_replayed_after_the_fix_is_handled_exactly_once(
    tmp_path: Path,
) -> None:
    broken = [True]
    engine, bank_store = bank_engine(tmp_path, broken)
    async with engine:
        inst = await engine.start("pay", "order-1")
        await until(lambda: bank_store.dead_letter_count(BANK))
        [letter] = await bank_store.dead_letters(BANK)
        assert "RuntimeError: bug" in letter.reason and letter.open
        assert (await engine.get(inst.saga_id)).state is SagaState.RUNNING

        broken[0] = False  # the handler is fixed and redeployed
        replayed = await engine.dead_letters.replay(
            BANK, letter.id, actor="ada", reason="ledger fixed in 1.4.2"
        )
        assert (replayed.letter.settlement, replayed.letter.settled_by) == ("replayed", "ada")
        done = await engine.wait(inst.saga_id, timeout=10)
        assert done.state is SagaState.SUCCEEDED
        assert await effects(bank_store) == [(letter.message_id, "debit")]
        assert await bank_store.dead_letter_count() == 0
        # The copy went through the bank's outbox: same id and body, marked as a replay.
        copies = [e for e, _ in await bank_store.outbox_all() if e.message_id == letter.message_id]
        assert [c.headers[REPLAYED_FROM] for c in copies] == [f"{BANK}:{letter.id}"]
        original = Envelope.from_json(letter.body)
        assert copies[0].with_changes(headers=original.headers) == original

        with pytest.raises(DeadLetterRefused, match="already replayed by ada"):
            await engine.dead_letters.replay(BANK, letter.id, actor="bob", reason="again")
        # A late copy parked again: its saga is over, so a replay is refused.
        async with bank_store.transaction() as tx:
            await tx.dead_letter(BANK, letter.message_id, letter.body, "late copy", time.time())
        [late] = await bank_store.dead_letters(BANK, settled=False)
        with pytest.raises(DeadLetterRefused, match="is already SUCCEEDED"):
            await engine.dead_letters.replay(BANK, late.id, actor="ada", reason="why not")
        assert (await bank_store.get_dead_letter(late.id)) == late  # still open
        discarded = await engine.dead_letters.discard(
            BANK, late.id, actor="ada", reason="duplicate of a handled debit"
        )
        assert discarded.letter.settlement == "discarded"
        with pytest.raises(DeadLetterRefused, match="already discarded"):
            await engine.dead_letters.discard(BANK, late.id, actor="ada", reason="twice")
        await asyncio.sleep(0.2)
        assert await effects(bank_store) == [(letter.message_id, "debit")]


def message(message_id: str, *, saga_id: str | None = None) -> Envelope:
    return Envelope(
        message_id=message_id,
        type="Debit",
        kind=MessageKind.COMMAND,
        source="orchestrator",
        correlation_id="c",
        occurred_at=1.0,
        destination=BANK,
        saga_id=saga_id,
    )


async def desk_with(letters: list[tuple[str | None, str]]) -> tuple[DeadLetterDesk, MemoryStore]:
    store = MemoryStore(BANK)
    await store.open()
    async with store.transaction() as tx:
        for message_id, body in letters:
            await tx.dead_letter(BANK, message_id, body, "why", 1.0)
    desk = DeadLetterDesk(
        [store], saga_store=MemoryStore(), consumers={BANK: store}, clock=lambda: 5.0
    )
    await desk.saga_store.open()
    return desk, store


@pytest.mark.fault("F-MALFORMED")
async def test_replays_that_could_change_nothing_are_refused() -> None:
    handled = message("m-handled")
    desk, store = await desk_with([(None, "not json"), ("m-handled", handled.to_json())])
    async with store.transaction() as tx:
        await tx.inbox_add(BANK, "m-handled", 1.0)
    malformed, seen = await store.dead_letters()
    with pytest.raises(DeadLetterRefused, match="not a valid envelope"):
        await desk.replay(BANK, malformed.id, actor="ada", reason="r")
    with pytest.raises(DeadLetterRefused, match="'bank' already handled message m-handled"):
        await desk.replay(BANK, seen.id, actor="ada", reason="r")
    assert await store.dead_letter_count() == 2 and await store.outbox_pending() == 0
    with pytest.raises(DeadLetterNotFound, match="no dead letter 999"):
        await desk.replay(BANK, 999, actor="ada", reason="r")
    with pytest.raises(DeadLetterNotFound, match="no store named 'nowhere'"):
        await desk.get("nowhere", 1)


async def test_listing_pages_across_stores() -> None:
    desk, bank = await desk_with([(f"m{n}", message(f"m{n}").to_json()) for n in range(3)])
    other = MemoryStore("shipping")
    await other.open()
    async with other.transaction() as tx:
        for n in range(2):
            await tx.dead_letter("shipping", f"s{n}", "{}", "why", 1.0)
    desk = DeadLetterDesk(
        [bank, other], saga_store=desk.saga_store, consumers={}, clock=lambda: 5.0
    )
    page = await desk.find(limit=2, offset=2)
    assert page.total == 5
    assert [(i.store, i.letter.message_id) for i in page.items] == [
        (BANK, "m2"),
        ("shipping", "s0"),
    ]
    await desk.discard(BANK, page.items[0].letter.id, actor="ada", reason="test")
    assert (await desk.find()).total == 4
    settled = await desk.find(settled=True)
    assert [(i.store, i.letter.message_id) for i in settled.items] == [(BANK, "m2")]
    assert (await desk.find(store="shipping", endpoint="nowhere")).total == 0


@pytest.mark.postgres
async def test_a_replay_on_postgresql_is_one_transaction_with_its_settlement() -> None:
    import psycopg

    from sagakit.stores.postgres import PostgresStore

    schema = f"sagakit_test_{uuid.uuid4().hex[:12]}"
    store = PostgresStore(PG_DSN, schema=schema, name=BANK)
    await store.open()
    try:
        sagas = MemoryStore()
        await sagas.open()
        desk = DeadLetterDesk([store], saga_store=sagas, consumers={BANK: store}, clock=time.time)
        body = message("m-pg").to_json()
        async with store.transaction() as tx:
            await tx.dead_letter(BANK, "m-pg", body, "handler bug", 1.0)
        [letter] = await store.dead_letters()
        done = await desk.replay(BANK, letter.id, actor="ada", reason="fixed")
        assert (done.letter.settlement, done.letter.settled_by) == ("replayed", "ada")
        [(copy, published)] = await store.outbox_all()
        assert published is None and copy.message_id == "m-pg"
        assert copy.headers == {REPLAYED_FROM: f"{BANK}:{letter.id}"}
        with pytest.raises(DeadLetterRefused, match="already replayed by ada"):
            await desk.replay(BANK, letter.id, actor="bob", reason="again")
        assert await store.outbox_pending() == 1
    finally:
        await store.close()
        with psycopg.connect(PG_DSN, autocommit=True) as pg:
            pg.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.mark.fault("F-UNROUTABLE")
async def test_an_unroutable_message_replayed_too_early_is_parked_again() -> None:
    store = MemoryStore("orchestrator")
    await store.open()
    relay = Relay(store, EmbeddedTransport({BANK: store}))
    async with store.transaction() as tx:
        await tx.outbox_add([message("m-lost").with_changes(destination="nowhere")], 1.0)
    await relay.relay_once()
    [letter] = await store.dead_letters()
    assert letter.endpoint == "nowhere" and "unroutable" in letter.reason
    desk = DeadLetterDesk([store], saga_store=store, consumers={}, clock=time.time)
    await desk.replay("orchestrator", letter.id, actor="ada", reason="route deployed")
    await relay.relay_once()  # it was not: the relay parks the replay again
    old, new = await store.dead_letters()
    assert (old.id, old.settlement, new.open) == (letter.id, "replayed", True)
    assert new.message_id == "m-lost" and "unroutable" in new.reason
    assert await store.dead_letter_count() == 1
