"""The final check of a run with a broker: wait for what the broker holds, then report
it apart from what is lost.

A message nak'ed with a delay, or held for a retry, is neither in its consumer's inbox
nor dead-lettered while the broker still has it. The demo used to check right after
the stores were quiet, and reported such messages as lost ("published but neither
processed nor dead-lettered") while every saga was terminal. Now ``drain`` also waits
for the broker's backlog, and ``check_invariants`` counts a message the broker still
holds as late, not lost.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sagakit_checkout.invariants import InvariantReport, _nothing_lost

from sagakit.app_demo import drain
from sagakit.core.envelope import Envelope, MessageKind
from sagakit.stores.sqlite import SQLiteStore
from sagakit.transports.base import ACK, Backlog, EndpointBacklog, Settle

NATS_URL = os.environ.get("SAGAKIT_TEST_NATS_URL", "nats://127.0.0.1:4222")


def command(message_id: str, destination: str = "payment") -> Envelope:
    return Envelope(
        message_id=message_id,
        type="AuthorizePayment",
        kind=MessageKind.COMMAND,
        source="orchestrator",
        destination=destination,
        correlation_id="c",
        occurred_at=time.time(),
        payload={},
    )


def test_a_broker_that_names_its_messages_must_name_the_late_one() -> None:
    report = InvariantReport(
        broker=Backlog((EndpointBacklog("payment", unsettled=1),), (("m-1", "payment"),))
    )
    assert report.held_by_broker("m-1", "payment", "message m-1")
    assert not report.held_by_broker("m-2", "payment", "message m-2")
    assert not report.held_by_broker("m-1", "shipping", "message m-1 to shipping")
    assert report.in_broker == ["message m-1"]


def test_a_broker_that_only_counts_covers_as_many_messages_as_it_holds() -> None:
    report = InvariantReport(broker=Backlog((EndpointBacklog("payment", waiting=2),)))
    assert report.held_by_broker("m-1", "payment", "a")
    assert report.held_by_broker("m-2", "payment", "b")
    assert not report.held_by_broker("m-3", "payment", "c")  # a third one is lost
    assert len(report.in_broker) == 2


def test_without_a_broker_nothing_is_held() -> None:
    assert not InvariantReport().held_by_broker("m-1", "payment", "a")


async def test_the_check_reports_a_message_in_the_broker_apart_from_lost_ones(
    tmp_path: Path,
) -> None:
    orchestrator = SQLiteStore(tmp_path / "o.db", name="orchestrator")
    payment = SQLiteStore(tmp_path / "p.db", name="payment")
    for s in (orchestrator, payment):
        await s.open()
    try:
        async with orchestrator.transaction() as tx:
            await tx.outbox_add([command("late"), command("lost")], now=1.0)
        rows = await orchestrator.outbox_claim(10, 2.0, 5.0)
        await orchestrator.outbox_mark_published([r.id for r in rows], 2.0)
        routes = {"orchestrator": orchestrator, "payment": payment}

        held = Backlog((EndpointBacklog("payment", unsettled=1),), (("late", "payment"),))
        report = InvariantReport(broker=held)
        await _nothing_lost(report, routes)
        (violation,) = report.violations
        assert "message lost (AuthorizePayment)" in violation
        assert "neither processed, dead-lettered nor held by the broker" in violation
        (late,) = report.in_broker
        assert "message late" in late

        blind = InvariantReport()  # no broker: both count as lost
        await _nothing_lost(blind, routes)
        assert len(blind.violations) == 2
    finally:
        for s in (orchestrator, payment):
            await s.close()


@pytest.mark.nats
@pytest.mark.fault("F-DELAY")
async def test_drain_waits_for_the_broker_and_returns_what_it_still_holds() -> None:
    from sagakit.transports.nats import NatsTransport

    stream = f"sagakit_test_{uuid.uuid4().hex[:10]}"
    transport = NatsTransport(NATS_URL, stream=stream, endpoints=("payment",), ack_wait=2.0)
    engine: Any = SimpleNamespace(stores=(), transport=transport)
    try:
        await transport.open()
        await transport.publish([command("m-1")])
        # Nobody consumes: drain gives up after its limit and names the message.
        t0 = time.monotonic()
        left = await drain(engine, quiet_for=0.1, limit=0.5)
        assert time.monotonic() - t0 >= 0.5
        assert left is not None and left.total == 1
        assert left.message_ids == (("m-1", "payment"),)

        # A consumer that settles it one second later: drain waits for it.
        async def slow(deliveries: Any) -> list[Settle]:
            await asyncio.sleep(1.0)
            return [ACK for _ in deliveries]

        transport.subscribe("payment", slow)
        await transport.start()
        left = await drain(engine, quiet_for=0.2, limit=10.0)
        assert left is not None and left.total == 0, left
    finally:
        await transport.close()
        await NatsTransport(NATS_URL, stream=stream, endpoints=("payment",)).delete_topology()
