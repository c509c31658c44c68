"""One contract for every transport, run against the real thing.

Embedded runs on SQLite files; NATS JetStream and RabbitMQ run against the servers on
this machine (127.0.0.1:4222 and :5672), each test with its own uniquely named
stream / exchange and queues, deleted afterwards. In-memory fakes would not exercise
acknowledgements, redelivery or dead-lettering, which are the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from sagakit.core.envelope import Envelope, MessageKind
from sagakit.errors import UnroutableMessage
from sagakit.stores.sqlite import SQLiteStore
from sagakit.transports.base import ACK, Backlog, Delivery, Settle, Transport, backlog_of, retry

ENDPOINTS = ("alpha", "beta")
NATS_URL = os.environ.get("SAGAKIT_TEST_NATS_URL", "nats://127.0.0.1:4222")
AMQP_URL = os.environ.get("SAGAKIT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

Factory = Callable[[Path], contextlib.AbstractAsyncContextManager[Callable[[], Transport]]]


@contextlib.asynccontextmanager
async def embedded(tmp: Path) -> AsyncIterator[Callable[[], Transport]]:
    from sagakit.transports.embedded import EmbeddedTransport

    stores = {e: SQLiteStore(tmp / f"{e}.db", name=e) for e in ENDPOINTS}
    for s in stores.values():
        await s.open()
    try:
        yield lambda: EmbeddedTransport(dict(stores), idle_poll=0.05, lease=2.0)
    finally:
        for s in stores.values():
            await s.close()


@contextlib.asynccontextmanager
async def nats(tmp: Path) -> AsyncIterator[Callable[[], Transport]]:
    from sagakit.transports.nats import NatsTransport

    stream = f"sagakit_test_{uuid.uuid4().hex[:10]}"

    def make() -> Transport:
        return NatsTransport(NATS_URL, stream=stream, endpoints=ENDPOINTS, ack_wait=2.0)

    try:
        yield make
    finally:
        cleaner = NatsTransport(NATS_URL, stream=stream, endpoints=ENDPOINTS)
        await cleaner.delete_topology()


@contextlib.asynccontextmanager
async def rabbitmq(tmp: Path) -> AsyncIterator[Callable[[], Transport]]:
    from sagakit.transports.rabbitmq import RabbitMqTransport

    prefix = f"sagakit_test_{uuid.uuid4().hex[:10]}"

    def make() -> Transport:
        return RabbitMqTransport(AMQP_URL, prefix=prefix, endpoints=ENDPOINTS)

    try:
        yield make
    finally:
        cleaner = RabbitMqTransport(AMQP_URL, prefix=prefix, endpoints=ENDPOINTS)
        await cleaner.delete_topology()


@pytest.fixture(
    params=[
        pytest.param(embedded, id="embedded"),
        pytest.param(nats, id="nats", marks=pytest.mark.nats),
        pytest.param(rabbitmq, id="rabbitmq", marks=pytest.mark.rabbitmq),
    ]
)
def transport_world(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    factory: Factory = request.param
    return lambda: factory(tmp_path)


def envelope(n: int, destination: str = "alpha") -> Envelope:
    return Envelope(
        message_id=f"m-{n}-{uuid.uuid4().hex[:6]}",
        type="Ping",
        kind=MessageKind.COMMAND,
        source="test",
        destination=destination,
        correlation_id="c",
        occurred_at=time.time(),
        payload={"n": n},
    )


class Recorder:
    """A consumer that records what it got and settles as told."""

    def __init__(self, settle: Callable[[Envelope, Delivery], Settle] | None = None) -> None:
        self.got: list[tuple[Envelope, Delivery]] = []
        self.batches: list[int] = []
        self.settle = settle or (lambda env, d: ACK)
        self.changed = asyncio.Event()

    async def __call__(self, deliveries: Sequence[Delivery]) -> list[Settle]:
        self.batches.append(len(deliveries))
        out = []
        for d in deliveries:
            env = Envelope.from_json(d.body)
            self.got.append((env, d))
            out.append(self.settle(env, d))
        self.changed.set()
        return out

    def ids(self) -> list[str]:
        return [e.message_id for e, _ in self.got]

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while len(self.got) < count:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"got {len(self.got)} deliveries, wanted {count}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.2))


@contextlib.asynccontextmanager
async def running(make: Callable[[], Transport], **subs: Recorder) -> AsyncIterator[Transport]:
    t = make()
    await t.open()
    for endpoint, handler in subs.items():
        t.subscribe(endpoint, handler, batch_size=50)
    await t.start()
    try:
        yield t
    finally:
        await t.close()


async def test_published_messages_are_delivered_once_when_acked(transport_world: Any) -> None:
    async with transport_world() as make:
        alpha, beta = Recorder(), Recorder()
        async with running(make, alpha=alpha, beta=beta) as t:
            sent = [envelope(i) for i in range(30)] + [envelope(99, "beta")]
            await t.publish(sent)
            await alpha.wait_for(30)
            await beta.wait_for(1)
            await asyncio.sleep(0.5)  # nothing more may arrive
        assert sorted(alpha.ids()) == sorted(e.message_id for e in sent[:30])
        assert beta.ids() == [sent[30].message_id]
        assert all(d.deliveries == 1 for _, d in alpha.got)
        assert Envelope.from_json(alpha.got[0][1].body).payload["n"] in range(30)


async def test_batches_respect_the_batch_size(transport_world: Any) -> None:
    async with transport_world() as make:
        alpha = Recorder()
        async with running(make, alpha=alpha) as t:
            await t.publish([envelope(i) for i in range(120)])
            await alpha.wait_for(120)
        assert max(alpha.batches) <= 50
        assert len(set(alpha.ids())) == 120


async def test_retry_redelivers_after_the_delay_counting_deliveries(transport_world: Any) -> None:
    async with transport_world() as make:
        first: dict[str, float] = {}

        def settle(env: Envelope, d: Delivery) -> Settle:
            if d.deliveries == 1:
                first[env.message_id] = time.monotonic()
                return retry(0.3, "not yet")
            return ACK

        alpha = Recorder(settle)
        async with running(make, alpha=alpha) as t:
            msg = envelope(1)
            await t.publish([msg])
            await alpha.wait_for(2)
            second = time.monotonic()
            await asyncio.sleep(0.5)
        assert [d.deliveries for _, d in alpha.got] == [1, 2]
        assert second - first[msg.message_id] >= 0.25


@pytest.mark.fault("F-CRASH-BEFORE-COMMIT")
async def test_a_failing_handler_gets_the_batch_again(transport_world: Any) -> None:
    async with transport_world() as make:
        calls = 0

        class Flaky(Recorder):
            async def __call__(self, deliveries: Sequence[Delivery]) -> list[Settle]:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise RuntimeError("consumer bug")
                return await super().__call__(deliveries)

        alpha = Flaky()
        async with running(make, alpha=alpha) as t:
            msg = envelope(1)
            await t.publish([msg])
            await alpha.wait_for(1, timeout=15)
        assert alpha.ids() == [msg.message_id]
        assert alpha.got[0][1].deliveries >= 2


@pytest.mark.fault("F-PROCESS-RESTART")
async def test_unacked_messages_survive_a_consumer_restart(transport_world: Any) -> None:
    async with transport_world() as make:
        never = Recorder(lambda env, d: retry(30.0, "hold it"))
        async with running(make, alpha=never) as t:
            msg = envelope(7)
            await t.publish([msg])
            await never.wait_for(1)
        # A new transport instance (a restarted process) gets it again.
        later = Recorder()
        async with running(make, alpha=later):
            await later.wait_for(1, timeout=20)
        assert later.ids() == [msg.message_id]


async def test_messages_published_while_nobody_consumes_wait(transport_world: Any) -> None:
    async with transport_world() as make:
        publisher = make()
        await publisher.open()
        try:
            msg = envelope(3)
            await publisher.publish([msg])
        finally:
            await publisher.close()
        alpha = Recorder()
        async with running(make, alpha=alpha):
            await alpha.wait_for(1)
        assert alpha.ids() == [msg.message_id]


@pytest.mark.fault("F-UNROUTABLE")
async def test_publishing_to_an_unknown_endpoint_is_refused(transport_world: Any) -> None:
    async with transport_world() as make:
        t = make()
        await t.open()
        try:
            good, bad = envelope(1), envelope(2, "nowhere")
            with pytest.raises(UnroutableMessage) as info:
                await t.publish([good, bad])
            assert info.value.message_ids == [bad.message_id]
            assert "nowhere" in str(info.value)
        finally:
            await t.close()


# -- subscription concurrency: batches in flight at once ---------------------------------


class Gated(Recorder):
    """Holds every batch that carries message ``n == 0`` until ``release`` is set;
    ``settled`` lists the payload numbers whose batch the handler returned."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.settled: list[int] = []

    async def __call__(self, deliveries: Sequence[Delivery]) -> list[Settle]:
        out = await super().__call__(deliveries)
        numbers = [Envelope.from_json(d.body).payload["n"] for d in deliveries]
        if 0 in numbers:
            await self.release.wait()
        self.settled += numbers
        self.changed.set()
        return out

    async def wait_settled(self, count: int, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while len(self.settled) < count:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(self.settled)} settled, wanted {count}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.2))


@contextlib.asynccontextmanager
async def consuming(
    make: Callable[[], Transport], handler: Recorder, *, concurrency: int
) -> AsyncIterator[Transport]:
    t = make()
    await t.open()
    t.subscribe("alpha", handler, batch_size=1, concurrency=concurrency)
    await t.start()
    try:
        yield t
    finally:
        await t.close()


async def test_with_concurrency_a_slow_batch_holds_up_no_other(transport_world: Any) -> None:
    async with transport_world() as make:
        gated = Gated()
        async with consuming(make, gated, concurrency=3) as t:
            await t.publish([envelope(0)])
            await gated.wait_for(1)  # the slow one is being handled
            fast = [envelope(i) for i in range(1, 6)]
            await t.publish(fast)
            await gated.wait_settled(5)  # ... while these are handled and settled
            assert 0 not in gated.settled
            gated.release.set()
            await gated.wait_settled(6)
            await asyncio.sleep(0.5)  # the acknowledgements reach the broker / mailbox
        assert sorted(gated.settled) == list(range(6))
        assert all(d.deliveries == 1 for _, d in gated.got)
        # Every one was acknowledged: a restarted consumer gets none of them again.
        later = Recorder()
        async with consuming(make, later, concurrency=3):
            await asyncio.sleep(1.0)
        assert later.got == []


async def test_by_default_the_next_batch_waits_for_the_handler(transport_world: Any) -> None:
    async with transport_world() as make:
        gated = Gated()
        async with consuming(make, gated, concurrency=1) as t:
            await t.publish([envelope(0)])
            await gated.wait_for(1)
            await t.publish([envelope(1)])
            await asyncio.sleep(0.5)
            assert gated.settled == []
            assert [e.payload["n"] for e, _ in gated.got] == [0]
            gated.release.set()
            await gated.wait_settled(2)
        assert gated.settled == [0, 1]


async def test_with_concurrency_a_failing_batch_comes_back_alone(transport_world: Any) -> None:
    async with transport_world() as make:

        class FailsOnce(Recorder):
            failed = False

            async def __call__(self, deliveries: Sequence[Delivery]) -> list[Settle]:
                numbers = [Envelope.from_json(d.body).payload["n"] for d in deliveries]
                if 1 in numbers and not self.failed:
                    self.failed = True
                    raise RuntimeError("consumer bug")
                return await super().__call__(deliveries)

        alpha = FailsOnce()
        async with consuming(make, alpha, concurrency=2) as t:
            await t.publish([envelope(1), envelope(2)])
            await alpha.wait_for(2, timeout=15)
            await asyncio.sleep(0.5)
        by_n = {e.payload["n"]: d.deliveries for e, d in alpha.got}
        assert sorted(e.payload["n"] for e, _ in alpha.got) == [1, 2]
        assert by_n[1] >= 2 and by_n[2] == 1


async def test_subscription_concurrency_must_be_positive(transport_world: Any) -> None:
    from sagakit.errors import ConfigurationError

    async with transport_world() as make:
        t = make()
        with pytest.raises(ConfigurationError, match="concurrency"):
            t.subscribe("alpha", Recorder(), concurrency=0)


@pytest.fixture(
    params=[
        pytest.param(nats, id="nats", marks=pytest.mark.nats),
        pytest.param(rabbitmq, id="rabbitmq", marks=pytest.mark.rabbitmq),
    ]
)
def broker_world(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    factory: Factory = request.param
    return lambda: factory(tmp_path)


async def wait_backlog(
    t: Transport, check: Callable[[Backlog], bool], timeout: float = 10.0
) -> Backlog:
    """Poll ``t``'s backlog until ``check`` holds (the broker's counts settle a little later
    than the acks that change them)."""
    end = time.monotonic() + timeout
    while True:
        found = await backlog_of(t)
        assert found is not None
        if check(found) or time.monotonic() > end:
            return found
        await asyncio.sleep(0.1)


async def test_the_backlog_counts_waiting_held_and_settled_messages(broker_world: Any) -> None:
    """What the final check of a run relies on: the broker says what it still holds."""
    async with broker_world() as make:
        # Nobody consumes yet: every message waits, and the broker names them (NATS) or
        # counts them (RabbitMQ can name only what this process holds).
        sent = [envelope(i) for i in range(5)]
        producer = make()
        await producer.open()
        try:
            await producer.publish(sent)
            waiting = await wait_backlog(producer, lambda b: b.total == 5)
        finally:
            await producer.close()
        alpha = {e.endpoint: e for e in waiting.endpoints}["alpha"]
        assert (alpha.waiting, alpha.unsettled, alpha.delayed) == (5, 0, 0)
        if waiting.message_ids:
            assert sorted(waiting.message_ids) == sorted((e.message_id, "alpha") for e in sent)
        # A consumer holds one for a long retry and acks the rest: one left, unsettled
        # (held by this process, or nak'ed with a delay at the broker), named by both.
        keep = sent[0].message_id
        seen = Recorder(lambda env, d: retry(30.0, "later") if env.message_id == keep else ACK)
        async with running(make, alpha=seen) as t:
            await seen.wait_for(5)
            held = await wait_backlog(t, lambda b: b.total == 1)
            assert held.total == 1, held
            assert (keep, "alpha") in held.message_ids
        # Closing hands it back at once: it waits again, for the next consumer.
        again = Recorder()
        async with running(make, alpha=again) as t:
            await again.wait_for(1, timeout=10.0)
            assert again.ids() == [keep]
            empty = await wait_backlog(t, lambda b: b.total == 0)
            assert empty.total == 0, empty
            assert empty.summary() == "nothing"


async def test_the_embedded_transport_has_no_broker_backlog(tmp_path: Path) -> None:
    async with embedded(tmp_path) as make:
        assert await backlog_of(make()) is None
