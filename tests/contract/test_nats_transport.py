"""What the NATS JetStream transport promises beyond the shared transport contract.

Runs against nats-server (JetStream) on 127.0.0.1:4222; every test has its own stream
names, deleted afterwards. The restart test starts a private nats-server of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from sagakit.core.envelope import REPLAYED_FROM, Envelope, MessageKind
from sagakit.errors import TransportError
from sagakit.runtime.dead_letters import DeadLetterDesk
from sagakit.stores.memory import MemoryStore
from sagakit.transports.base import ACK, Delivery, ParkedByBroker, Settle, retry
from sagakit.transports.nats import NatsTransport

pytest.importorskip("nats")

pytestmark = pytest.mark.nats

NATS_URL = os.environ.get("SAGAKIT_TEST_NATS_URL", "nats://127.0.0.1:4222")
ENDPOINTS = ("alpha", "beta")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


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
        traceparent=TRACEPARENT,
    )


class Recorder:
    """Records deliveries (with arrival times) and settles as told."""

    def __init__(
        self,
        settle: Callable[[Envelope, Delivery], Settle] | None = None,
        *,
        sleep: float = 0.0,
    ) -> None:
        self.got: list[tuple[Envelope, Delivery, float]] = []
        self.settle = settle or (lambda env, d: ACK)
        self.sleep = sleep
        self.calls = 0

    async def __call__(self, deliveries: Sequence[Delivery]) -> list[Settle]:
        self.calls += 1
        out = []
        for d in deliveries:
            env = Envelope.from_json(d.body)
            self.got.append((env, d, time.monotonic()))
            out.append(self.settle(env, d))
        if self.sleep:
            await asyncio.sleep(self.sleep)
        return out

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while len(self.got) < count:
            if time.monotonic() > end:
                raise AssertionError(f"got {len(self.got)} deliveries, wanted {count}")
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def topology(
    url: str = NATS_URL, **kwargs: Any
) -> AsyncIterator[Callable[..., NatsTransport]]:
    """Transports on a fresh stream name; the streams are deleted afterwards."""
    stream = f"sagakit_test_{uuid.uuid4().hex[:10]}"
    opened: list[NatsTransport] = []

    def make(**extra: Any) -> NatsTransport:
        options = {"endpoints": ENDPOINTS, **kwargs, **extra}
        t = NatsTransport(url, stream=stream, **options)
        opened.append(t)
        return t

    try:
        yield make
    finally:
        for t in opened:
            with contextlib.suppress(Exception):
                await t.close()
        with contextlib.suppress(TransportError):
            await NatsTransport(
                url, stream=stream, endpoints=ENDPOINTS, connect_timeout=2.0
            ).delete_topology()


async def consuming(t: NatsTransport, **subs: Recorder) -> NatsTransport:
    await t.open()
    for endpoint, handler in subs.items():
        t.subscribe(endpoint, handler, batch_size=50)
    await t.start()
    return t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.fault("F-ACK-LOST")
async def test_the_broker_drops_a_message_id_published_again_within_the_window() -> None:
    async with topology(ack_wait=2.0) as make:
        alpha = Recorder()
        t = await consuming(make(), alpha=alpha)
        msg = envelope(1)
        await t.publish([msg])
        await t.publish([msg])  # the relay crashed before marking the row: re-published
        await alpha.wait_for(1)
        await t.publish([msg])  # even after it was acknowledged (and removed) ...
        await t.publish([msg.with_changes(payload={"n": 2})])  # ... whatever the body
        await asyncio.sleep(0.5)
        assert [e.message_id for e, _, _ in alpha.got] == [msg.message_id]


async def test_a_replayed_dead_letter_is_a_new_copy_and_its_re_publish_is_still_dropped() -> None:
    async with topology(ack_wait=2.0) as make:
        alpha = Recorder()
        t = await consuming(make(), alpha=alpha)
        msg = envelope(1)
        await t.publish([msg])
        await alpha.wait_for(1)
        first = msg.with_changes(headers={REPLAYED_FROM: "alpha:7"})
        await t.publish([first])  # an operator replayed the parked message
        await t.publish([first])  # the relay re-published that outbox row
        await alpha.wait_for(2)
        second = msg.with_changes(headers={REPLAYED_FROM: "alpha:9"})  # parked, replayed again
        await t.publish([second])
        await alpha.wait_for(3)
        await asyncio.sleep(0.3)
        assert [e for e, _, _ in alpha.got] == [msg, first, second]


@pytest.mark.fault("F-SLOW-BROKER")
async def test_in_progress_acks_keep_a_slow_handler_s_message_from_redelivery() -> None:
    # ack_wait 1 s, the handler takes 2.5 s; two processes consume the endpoint, so a
    # redelivery would reach the other one while the first still works on it.
    async with topology(ack_wait=1.0) as make:
        first, second = Recorder(sleep=2.5), Recorder(sleep=2.5)
        await consuming(make(), alpha=first)
        other = await consuming(make(), alpha=second)
        msg = envelope(1)
        await other.publish([msg])
        for _ in range(250):
            if first.got or second.got:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(2.5 + 1.5)  # handler done, then more than ack_wait again
        got = first.got + second.got
        assert [(e.message_id, d.deliveries) for e, d, _ in got] == [(msg.message_id, 1)]


async def test_a_retry_longer_than_ack_wait_is_held_then_delivered_when_due() -> None:
    async with topology(ack_wait=1.0) as make:
        alpha = Recorder(lambda env, d: retry(3.0, "later") if d.deliveries == 1 else ACK)
        t = await consuming(make(), alpha=alpha)
        await t.publish([envelope(1)])
        await alpha.wait_for(2, timeout=8)
        (_, d1, t1), (_, d2, t2) = alpha.got
        assert (d1.deliveries, d2.deliveries) == (1, 2)
        assert 2.8 <= t2 - t1 <= 4.5  # not after ack_wait (1 s): held with in-progress acks


@pytest.mark.fault("F-POISON")
async def test_max_deliver_exhaustion_copies_the_message_into_the_dead_letter_stream() -> None:
    async with topology(ack_wait=1.0, max_deliver=2) as make:
        alpha = Recorder(lambda env, d: retry(0.05, "never works"))
        t = await consuming(make(), alpha=alpha)
        msg = envelope(1)
        await t.publish([msg])
        for _ in range(100):
            if dead := await t.dead_letters():
                break
            await asyncio.sleep(0.1)
        assert len(dead) == 1
        letter = dead[0]
        assert letter.endpoint == "alpha"
        assert letter.message_id == msg.message_id
        assert Envelope.from_json(letter.body) == msg
        assert "max_deliver=2" in letter.reason and "2 deliveries" in letter.reason
        assert letter.headers.get("traceparent") == TRACEPARENT
        assert [d.deliveries for _, d, _ in alpha.got] == [1, 2]
        # Moved, not copied: the work stream no longer holds it.
        assert t._js is not None
        assert (await t._js.stream_info(t.stream)).state.messages == 0
        # Operators see it beside the stores' dead letters.
        desk = DeadLetterDesk(
            [], saga_store=MemoryStore(), consumers={}, clock=time.time, transport=t
        )
        [listed] = await desk.broker_dead_letters()
        assert (listed.transport, listed.endpoint, listed.message_id) == (
            "NatsTransport",
            "alpha",
            msg.message_id,
        )


async def test_dead_letters_are_drained_into_a_store_then_replayed_as_a_new_copy() -> None:
    async with topology(ack_wait=1.0, max_deliver=1) as make:
        fixed = [False]
        alpha = Recorder(lambda env, d: ACK if fixed[0] else retry(0.05, "consumer bug"))
        t = await consuming(make(), alpha=alpha)
        msg = envelope(1)
        await t.publish([msg])
        for _ in range(100):
            if await t.dead_letters():
                break
            await asyncio.sleep(0.1)

        async def broken(items: Sequence[ParkedByBroker]) -> None:
            raise RuntimeError("the store is down")

        with pytest.raises(RuntimeError, match="the store is down"):
            await t.drain_dead_letters(broken)
        assert len(await t.dead_letters()) == 1  # kept at the broker
        store = MemoryStore("alpha")
        await store.open()
        desk = DeadLetterDesk([store], saga_store=store, consumers={}, clock=time.time, transport=t)
        assert await desk.adopt_broker_dead_letters() == 1
        assert await t.dead_letters() == []
        [parked] = await store.dead_letters()
        assert parked.endpoint == "alpha" and parked.message_id == msg.message_id
        assert parked.reason.startswith("parked by the broker: JetStream gave up")
        fixed[0] = True
        await desk.replay("alpha", parked.id, actor="ada", reason="consumer fixed")
        [row] = await store.outbox_claim(10, time.time(), 5.0)
        await t.publish([row.envelope])  # what the relay does; not dropped as a duplicate
        await alpha.wait_for(2)
        assert [e.message_id for e, _, _ in alpha.got] == [msg.message_id] * 2


@pytest.mark.fault("F-BROKER-RESTART")
async def test_publish_raises_transport_error_when_the_server_is_unreachable() -> None:
    t = NatsTransport(f"nats://127.0.0.1:{free_port()}", endpoints=ENDPOINTS, connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TransportError, match="cannot connect"):
        await t.publish([envelope(1)])
    with pytest.raises(TransportError):
        await t.open()
    assert time.monotonic() - started < 3


async def test_open_is_idempotent_and_merges_endpoints_across_processes() -> None:
    async with topology(ack_wait=2.0) as make:
        only_alpha, both = make(endpoints=("alpha",)), make()
        await asyncio.gather(only_alpha.open(), both.open())
        again = make(endpoints=("alpha",))
        await again.open()  # must not drop beta's subject
        beta = Recorder()
        await consuming(both, beta=beta)
        await again.publish([envelope(1)])
        msg = envelope(2, "beta")
        await both.publish([msg])
        await beta.wait_for(1)
        assert both._js is not None
        info = await both._js.stream_info(both.stream)
        assert sorted(info.config.subjects or []) == [both.subject(e) for e in ENDPOINTS]


NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


@pytest.mark.skipif(not Path(NATS_SERVER).exists(), reason="needs the nats-server binary")
@pytest.mark.fault("F-BROKER-RESTART")
async def test_publish_fails_while_the_server_is_down_and_consuming_resumes_after(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"

    async def start_server() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *(NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return proc
            except OSError:
                await asyncio.sleep(0.05)
        proc.kill()
        raise AssertionError("private nats-server did not start")

    server = await start_server()
    try:
        async with topology(url, ack_wait=2.0, connect_timeout=2.0, request_timeout=1.0) as make:
            alpha = Recorder()
            t = await consuming(make(), alpha=alpha)
            await t.publish([envelope(1)])
            await alpha.wait_for(1)

            server.terminate()
            await asyncio.wait_for(server.wait(), 5)
            with pytest.raises(TransportError):
                await t.publish([envelope(2)])

            server = await start_server()
            later = envelope(3)
            deadline = time.monotonic() + 10
            while True:  # what the relay does: publish again until acknowledged
                try:
                    await t.publish([later])
                    break
                except TransportError:
                    assert time.monotonic() < deadline, "publish never recovered"
                    await asyncio.sleep(0.2)
            await alpha.wait_for(2, timeout=10)  # the pull loop survived the outage
            assert alpha.got[-1][0].message_id == later.message_id
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
