"""A relay on PostgreSQL whose broker confirms more slowly than the relay's lease.

The relay locks its batch in a transaction (``PostgresStore.outbox_locked``) that the
server ends when it stays idle for the lease, so that a stopped relay frees its rows.
A RabbitMQ quorum queue under load can take longer than that (the default lease is
1 s) to confirm a batch: the session was ended before the mark, the rows went back
unmarked, and the next attempt published the same batch again -- delivered every
time, marked never. That is how a RabbitMQ chaos run ended with rows of finished
sagas "never published". Here the real RabbitMQ transport is slowed by a wrapper so
every confirm arrives after the lease; the relay must still mark every row.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest

from sagakit.core.envelope import Envelope, MessageKind
from sagakit.runtime import relay as relay_module
from sagakit.runtime.relay import Relay
from sagakit.transports.base import BatchHandler

psycopg = pytest.importorskip("psycopg", reason="needs the sagakit[postgres] extra")
aio_pika = pytest.importorskip("aio_pika", reason="needs the sagakit[rabbitmq] extra")

from sagakit.stores.postgres import PostgresStore  # noqa: E402
from sagakit.transports.rabbitmq import RabbitMqTransport  # noqa: E402

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("SAGAKIT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
LEASE = 0.5


class SlowConfirms:
    """The RabbitMQ transport with every publish confirmed ``delay`` seconds late."""

    publishes_to_broker = True

    def __init__(self, inner: RabbitMqTransport, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.publishes = 0

    async def open(self) -> None:
        await self.inner.open()

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self.publishes += 1
        await self.inner.publish(envelopes)
        await asyncio.sleep(self.delay)

    def subscribe(
        self, endpoint: str, handler: BatchHandler, *, batch_size: int = 256, concurrency: int = 1
    ) -> None:
        self.inner.subscribe(endpoint, handler, batch_size=batch_size, concurrency=concurrency)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()


def envelope(n: int) -> Envelope:
    return Envelope(
        message_id=f"m-{n}-{uuid.uuid4().hex[:6]}",
        type="Ping",
        kind=MessageKind.COMMAND,
        source="test",
        destination="alpha",
        correlation_id="c",
        occurred_at=time.time(),
        payload={"n": n},
    )


@contextlib.asynccontextmanager
async def setup() -> AsyncIterator[tuple[PostgresStore, RabbitMqTransport]]:
    """A store in a schema of its own and a transport on a prefix of its own."""
    schema = f"sagakit_test_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(PG_DSN, schema=schema)
    transport = RabbitMqTransport(
        AMQP_URL, prefix=f"sagakit_test_{uuid.uuid4().hex[:10]}", endpoints=("alpha",)
    )
    await store.open()
    await transport.open()
    try:
        yield store, transport
    finally:
        await store.close()
        await transport.close()
        await transport.delete_topology()
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def relay_until_marked(relay: Relay, store: PostgresStore, limit: float) -> int:
    """Run the relay as its loop does (an error is logged and retried) until nothing is
    pending or ``limit`` seconds passed; returns the rows still pending."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            await relay.relay_once()
        except Exception:  # the loop logs and retries
            await asyncio.sleep(0.05)
        if await store.outbox_pending() == 0:
            return 0
    return await store.outbox_pending()


@pytest.mark.fault("F-SLOW-BROKER")
async def test_confirms_slower_than_the_lease_still_get_every_row_marked() -> None:
    async with setup() as (store, rabbit):
        await confirms_slower_than_the_lease(store, rabbit)


async def confirms_slower_than_the_lease(store: PostgresStore, rabbit: RabbitMqTransport) -> None:
    async with store.transaction() as tx:
        await tx.outbox_add([envelope(n) for n in range(20)], now=time.time())
    slow = SlowConfirms(rabbit, delay=LEASE * 2)
    relay = Relay(store, slow, lease=LEASE)
    assert await relay_until_marked(relay, store, limit=10 * LEASE * 2) == 0
    # The abandoned first attempt may have delivered copies too: duplicates, no loss.
    backlog = await rabbit.backlog()
    assert backlog.endpoints[0].waiting >= 20
    assert slow.publishes >= 2  # the locked attempt, then claim + mark


async def test_a_fast_broker_keeps_the_locked_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    async with setup() as (store, rabbit):
        await fast_broker(store, rabbit, monkeypatch)


async def fast_broker(
    store: PostgresStore, rabbit: RabbitMqTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims: list[int] = []
    claim = store.outbox_claim

    async def counting_claim(limit: int, now: float, lease: float) -> list[object]:
        claims.append(limit)
        return await claim(limit, now, lease)  # type: ignore[return-value]

    monkeypatch.setattr(store, "outbox_claim", counting_claim)
    async with store.transaction() as tx:
        await tx.outbox_add([envelope(n) for n in range(20)], now=time.time())
    relay = Relay(store, rabbit, lease=5.0)
    assert await relay.relay_once() == 20
    assert claims == []  # one locked batch, one commit
    assert relay_module.SLOW_BROKER_PAUSE > 0
