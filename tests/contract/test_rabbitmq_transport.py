"""What the RabbitMQ transport promises beyond the shared transport contract.

Runs against the server on 127.0.0.1:5672; each test has its own prefix (exchange and
queues), deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from sagakit.core.envelope import Envelope, MessageKind
from sagakit.errors import TransportError, UnroutableMessage
from sagakit.runtime.dead_letters import DeadLetterDesk
from sagakit.stores.memory import MemoryStore
from sagakit.transports.base import ACK, Delivery, ParkedByBroker, Settle, retry
from sagakit.transports.rabbitmq import RabbitMqTransport

aio_pika = pytest.importorskip("aio_pika")

pytestmark = pytest.mark.rabbitmq

AMQP_URL = os.environ.get("SAGAKIT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ENDPOINTS = ("alpha", "beta")


def envelope(n: int, destination: str | None = "alpha") -> Envelope:
    return Envelope(
        message_id=f"m-{n}-{uuid.uuid4().hex[:6]}",
        type="Ping",
        kind=MessageKind.COMMAND,
        source="test",
        destination=destination,
        correlation_id="c",
        occurred_at=time.time(),
        payload={"n": n},
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )


class World:
    """A unique prefix, transports built on it, and a look at the broker's queues."""

    def __init__(self) -> None:
        self.prefix = f"sagakit_test_{uuid.uuid4().hex[:10]}"
        self.opened: list[RabbitMqTransport] = []

    def transport(self, **kwargs: Any) -> RabbitMqTransport:
        t = RabbitMqTransport(AMQP_URL, prefix=self.prefix, endpoints=ENDPOINTS, **kwargs)
        self.opened.append(t)
        return t

    async def depth(self, queue: str) -> int:
        """Ready messages in ``queue`` (a passive declare)."""
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            q = await channel.declare_queue(queue, passive=True)
            count: int = q.declaration_result.message_count
            return count

    async def wait_depth(self, queue: str, count: int, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while (depth := await self.depth(queue)) != count:
            if time.monotonic() > end:
                raise AssertionError(f"{queue} holds {depth} messages, wanted {count}")
            await asyncio.sleep(0.05)

    async def take(self, queue: str) -> Any:
        """Get (and ack) one message from ``queue``."""
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            q = await channel.declare_queue(queue, passive=True)
            message = await q.get(timeout=5)
            await message.ack()
            return message


@contextlib.asynccontextmanager
async def world() -> AsyncIterator[World]:
    w = World()
    try:
        yield w
    finally:
        for t in w.opened:
            await t.close()
        cleaner = RabbitMqTransport(AMQP_URL, prefix=w.prefix, endpoints=ENDPOINTS)
        await cleaner.delete_topology()


class Recorder:
    def __init__(self, settle: Any = None, *, fail: bool = False) -> None:
        self.got: list[tuple[float, Envelope, Delivery]] = []
        self.calls = 0
        self.fail = fail
        self.settle = settle or (lambda env, d: ACK)

    async def __call__(self, deliveries: Sequence[Delivery]) -> list[Settle]:
        self.calls += 1
        now = time.monotonic()
        for d in deliveries:
            self.got.append((now, Envelope.from_json(d.body), d))
        if self.fail:
            raise RuntimeError("consumer bug")
        return [self.settle(Envelope.from_json(d.body), d) for d in deliveries]

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while len(self.got) < count:
            if time.monotonic() > end:
                raise AssertionError(f"got {len(self.got)} deliveries, wanted {count}")
            await asyncio.sleep(0.01)


async def test_publish_returns_only_after_the_broker_confirmed() -> None:
    async with world() as w:
        t = w.transport()
        await t.open()
        sent = [envelope(i) for i in range(200)] + [envelope(1000, "beta")]
        await t.publish(sent)
        # Confirmed means enqueued: no waiting, no polling.
        assert await w.depth(t.queue_name("alpha")) == 200
        assert await w.depth(t.queue_name("beta")) == 1
        message = await w.take(t.queue_name("beta"))
        assert message.message_id == sent[-1].message_id
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.headers["traceparent"] == sent[-1].traceparent
        assert Envelope.from_json(message.body.decode()) == sent[-1]


async def test_open_is_idempotent_and_so_is_the_topology() -> None:
    async with world() as w:
        first, second = w.transport(), w.transport()
        await first.open()
        await first.open()
        await second.open()  # another process declaring the same queues
        await second.publish([envelope(1)])
        assert await w.depth(first.queue_name("alpha")) == 1


@pytest.mark.fault("F-POISON")
async def test_the_delivery_limit_dead_letters_with_the_reason() -> None:
    async with world() as w:
        t = w.transport(delivery_limit=2, failure_pause=0.02)
        always_fails = Recorder(fail=True)
        t.subscribe("alpha", always_fails)
        await t.open()
        msg = envelope(1)
        await t.publish([msg])
        await t.start()
        await w.wait_depth(t.dead_letter_queue, 1)
        # Handed out once plus ``delivery_limit`` redeliveries, each counted.
        assert [d.deliveries for _, _, d in always_fails.got] == [1, 2, 3]
        await t.close()
        assert await w.depth(t.queue_name("alpha")) == 0
        dead = await w.take(t.dead_letter_queue)
        assert dead.message_id == msg.message_id
        assert Envelope.from_json(dead.body.decode()) == msg
        assert dead.headers["x-first-death-reason"] == "delivery_limit"
        death = dead.headers["x-death"][0]
        assert death["reason"] == "delivery_limit"
        assert death["queue"] == t.queue_name("alpha")


async def test_dead_letters_are_drained_into_a_store_and_only_then_acknowledged() -> None:
    async with world() as w:
        t = w.transport(delivery_limit=1, failure_pause=0.02)
        t.subscribe("alpha", Recorder(fail=True))
        await t.open()
        msgs = [envelope(1), envelope(2)]
        await t.publish(msgs)
        await t.start()
        await w.wait_depth(t.dead_letter_queue, 2)
        await t.close()

        async def broken(items: Sequence[ParkedByBroker]) -> None:
            raise RuntimeError("the store is down")

        with pytest.raises(RuntimeError, match="the store is down"):
            await t.drain_dead_letters(broken)
        await w.wait_depth(t.dead_letter_queue, 2)  # put back, nothing lost
        store = MemoryStore("alpha")
        await store.open()
        desk = DeadLetterDesk([store], saga_store=store, consumers={}, clock=time.time, transport=t)
        assert await desk.adopt_broker_dead_letters(limit=1) == 1
        assert await desk.adopt_broker_dead_letters() == 1
        assert await desk.adopt_broker_dead_letters() == 0
        assert await w.depth(t.dead_letter_queue) == 0
        parked = await store.dead_letters(settled=False)
        assert sorted(d.message_id or "" for d in parked) == sorted(m.message_id for m in msgs)
        assert {d.endpoint for d in parked} == {"alpha"}
        assert "delivery_limit" in parked[0].reason and t.queue_name("alpha") in parked[0].reason
        assert sorted(d.body for d in parked) == sorted(m.to_json() for m in msgs)
        # From there a replay goes out through the store's outbox like any other.
        await desk.replay("alpha", parked[0].id, actor="ada", reason="consumer fixed")
        [(copy, _)] = await store.outbox_all()
        assert copy.message_id == parked[0].message_id


@pytest.mark.parametrize("max_hold", [60.0, 0.1], ids=["held", "retry-queue"])
async def test_retries_wait_their_delay_and_count_deliveries(max_hold: float) -> None:
    # Short delays are held unacked by the consumer, long ones (above max_hold) wait in
    # the retry queue; both must come back after the delay, counting every delivery.
    async with world() as w:
        t = w.transport(max_hold=max_hold)
        alpha = Recorder(lambda env, d: retry(0.3, "not yet") if d.deliveries < 3 else ACK)
        t.subscribe("alpha", alpha)
        await t.start()
        msg = envelope(1)
        await t.publish([msg])
        await alpha.wait_for(3)
        await asyncio.sleep(0.3)  # nothing more may arrive
        assert [e.message_id for _, e, _ in alpha.got] == [msg.message_id] * 3
        assert [d.deliveries for _, _, d in alpha.got] == [1, 2, 3]
        times = [at for at, _, _ in alpha.got]
        assert all(b - a >= 0.28 for a, b in itertools.pairwise(times))
        await t.close()
        assert await w.depth(t.queue_name("alpha")) == 0
        assert await w.depth(t.retry_queue_name("alpha")) == 0


async def test_a_long_retry_waits_in_the_retry_queue_not_in_the_consumer() -> None:
    async with world() as w:
        t = w.transport(max_hold=0.1)
        alpha = Recorder(lambda env, d: retry(30.0, "later") if d.deliveries == 1 else ACK)
        t.subscribe("alpha", alpha)
        await t.start()
        await t.publish([envelope(1)])
        await alpha.wait_for(1)
        await w.wait_depth(t.retry_queue_name("alpha"), 1)
        await t.close()
        # The original was acked only after its copy was confirmed: exactly one copy exists.
        assert await w.depth(t.queue_name("alpha")) == 0
        copy = await w.take(t.retry_queue_name("alpha"))
        assert copy.headers["sagakit-deliveries"] == 1
        assert copy.headers["sagakit-error"] == "later"
        assert copy.expiration == 30.0


@pytest.mark.fault("F-UNROUTABLE")
async def test_unroutable_destinations_are_refused_and_the_rest_published() -> None:
    async with world() as w:
        t = w.transport()
        await t.open()
        good, bad, broadcast = envelope(1), envelope(2, "nowhere"), envelope(3, None)
        with pytest.raises(UnroutableMessage) as info:
            await t.publish([good, bad, broadcast])
        assert sorted(info.value.message_ids) == sorted([bad.message_id, broadcast.message_id])
        assert "nowhere" in str(info.value)
        assert await w.depth(t.queue_name("alpha")) == 1


@pytest.mark.fault("F-UNROUTABLE")
async def test_a_message_the_broker_returns_is_unroutable() -> None:
    async with world() as w:
        t = w.transport()
        await t.open()
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(t.queue_name("beta"))  # a known endpoint without a queue
        good, lost = envelope(1), envelope(2, "beta")
        with pytest.raises(UnroutableMessage) as info:
            await t.publish([good, lost])
        assert info.value.message_ids == [lost.message_id]
        assert "beta" in str(info.value)
        assert await w.depth(t.queue_name("alpha")) == 1


@pytest.mark.fault("F-BROKER-RESTART")
async def test_an_unreachable_server_raises_transport_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"amqp://guest:secret@127.0.0.1:{port}/"
    t = RabbitMqTransport(url, prefix="nobody", endpoints=ENDPOINTS, connect_timeout=1.0)
    async with asyncio.timeout(10):
        with pytest.raises(TransportError) as info:
            await t.open()
        assert "secret" not in str(info.value)
        with pytest.raises(TransportError):
            await t.publish([envelope(1)])
        await t.close()
