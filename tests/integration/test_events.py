"""Events (facts) fan out to every subscriber; one nobody hears is parked, not lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from sagakit import Engine, Envelope, Participant, SagaDefinition, Step, command
from sagakit.stores.base import Tx
from sagakit.stores.sqlite import SQLiteStore

NOTES = ["CREATE TABLE notes (message_id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, kind TEXT)"]


def participants(tmp: Path) -> tuple[Participant, Participant, Participant]:
    shop = Participant("shop", SQLiteStore(tmp / "shop.db", name="shop"))
    mail = Participant("mail", SQLiteStore(tmp / "mail.db", name="mail"))
    audit = Participant("audit", SQLiteStore(tmp / "audit.db", name="audit"))

    @shop.handles("Sell")
    async def sell(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        await shop.emit(tx, "ItemSold", {"sku": cmd.payload["sku"]}, cause=cmd, now=time.time())
        await shop.emit(tx, "NobodyListens", {}, cause=cmd, now=time.time())
        return {"sold": True}

    for p in (mail, audit):

        def note(p: Participant = p) -> Any:
            async def on_sold(tx: Tx, event: Envelope) -> None:
                await tx.execute(
                    "INSERT INTO notes (message_id, endpoint, kind) VALUES (?, ?, ?)",
                    (event.message_id, p.name, event.type),
                )

            return on_sold

        p.on_event("ItemSold")(note())
    return shop, mail, audit


async def test_an_event_reaches_every_subscriber_once_with_its_trace(tmp_path: Path) -> None:
    shop, mail, audit = participants(tmp_path)
    d = SagaDefinition("sale", [Step("sell", command("shop", "Sell"))])
    engine = Engine(
        SQLiteStore(tmp_path / "orch.db", name="orchestrator"),
        [d],
        participants=[shop, mail, audit],
    )
    assert engine.event_routes == {"ItemSold": ["mail", "audit"]}
    for p in (mail, audit):
        engine.before_start(lambda p=p: p.store.apply_migrations("notes", NOTES))
    async with engine:
        inst = await engine.start("sale", "s-1", {"sku": "A"})
        await engine.wait(inst.saga_id, timeout=10)
        for _ in range(100):
            rows = {p.name: await _notes(p) for p in (mail, audit)}
            if all(rows.values()):
                break
            await asyncio.sleep(0.05)
        parked = await shop.store.dead_letters()
        sent = [e for e, _ in await shop.store.outbox_all() if e.type == "ItemSold"]
    assert len(sent) == 1
    event = sent[0]
    assert rows == {
        "mail": [(event.message_id, "ItemSold")],
        "audit": [(event.message_id, "ItemSold")],
    }
    assert event.correlation_id == inst.correlation_id
    assert event.causation_id is not None and event.causation_id.startswith(inst.saga_id)
    assert event.destination is None and event.kind.value == "event"
    assert [(d.reason, Envelope.from_json(d.body).type) for d in parked] == [
        ("no endpoint subscribes to event 'NobodyListens'", "NobodyListens")
    ]


async def _notes(p: Participant) -> list[tuple[Any, ...]]:
    async with p.store.transaction() as tx:
        return await tx.fetchall("SELECT message_id, kind FROM notes")
