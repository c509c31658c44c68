"""Consuming on the RabbitMQ transport: one channel and consumer per subscription,
batches filled from its buffer, each delivery settled after its batch's handler
returned (ack, requeue now, requeue after a delay held in this process, or a copy in
the retry queue for long delays), and closing (see :mod:`sagakit.transports.rabbitmq`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagakit.errors import TransportError
from sagakit.transports.base import BatchHandler, Delivery, InFlight, Settle
from sagakit.transports.rabbitmq_connection import RabbitMqConnection, redact
from sagakit.transports.shared import check_subscription

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

log = logging.getLogger("sagakit.transports.rabbitmq")

#: Deliveries before the current copy of a message (a retry copy starts a new count).
DELIVERIES_HEADER = "sagakit-deliveries"
#: The error that made the consumer ask for the retry (for people reading the queue).
ERROR_HEADER = "sagakit-error"
#: A batch keeps filling while messages keep landing within BATCH_IDLE_ROUNDS turns of
#: the event loop (frames already received are dispatched), for at most BATCH_LINGER
#: after its first message: a burst becomes one batch (one commit), while a lone message
#: is handled at once. (A timer would cost a lone message a scheduler wake-up.)
BATCH_IDLE_ROUNDS = 4
BATCH_LINGER = 0.005
#: How long :meth:`RabbitMqTransport.close` waits for an in-flight batch.
CLOSE_TIMEOUT = 30.0


def _int_header(headers: dict[str, Any], name: str) -> int:
    value = headers.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _deliveries(message: AbstractIncomingMessage) -> int:
    """This delivery's number: earlier copies + earlier deliveries of this copy + 1."""
    headers = dict(message.headers or {})
    returned = _int_header(headers, "x-delivery-count")  # set by quorum queues
    if returned == 0 and message.redelivered:
        returned = 1
    return _int_header(headers, DELIVERIES_HEADER) + returned + 1


@dataclass(eq=False)
class _Subscription:
    endpoint: str
    handler: BatchHandler
    batch_size: int
    concurrency: int = 1
    channel: AbstractChannel | None = None
    queue: AbstractQueue | None = None
    consumer_tag: str | None = None
    buffer: asyncio.Queue[AbstractIncomingMessage | None] | None = None
    task: asyncio.Task[None] | None = None
    holds: set[asyncio.Task[None]] = field(default_factory=set)
    # Received and not yet acked or given back (buffered, being handled or held for a
    # retry): what this process holds of the queue, for :meth:`RabbitMqTransport.backlog`.
    unsettled: dict[int, str] = field(default_factory=dict)


class RabbitMqConsumer(RabbitMqConnection):
    """The consuming part of :class:`~sagakit.transports.rabbitmq.RabbitMqTransport`."""

    _subs: list[_Subscription]
    _handles: itertools.count[int]
    _stopping: bool

    def subscribe(
        self, endpoint: str, handler: BatchHandler, *, batch_size: int = 256, concurrency: int = 1
    ) -> None:
        """Consume ``endpoint``'s queue with ``handler`` once started, ``concurrency``
        batches at once (see :class:`~sagakit.transports.base.Transport`)."""
        check_subscription(endpoint, list(self.endpoints), batch_size, concurrency)
        self._subs.append(_Subscription(endpoint, handler, batch_size, concurrency))

    async def start(self) -> None:
        """Start one consumer (own channel, manual acks, prefetch) per subscription."""
        await self.open()
        self._stopping = False
        connection = self._connection
        assert connection is not None
        for sub in self._subs:
            if sub.task is not None:
                continue
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                # A batch can only fill up if the broker may hand out that many at once,
                # and a slow batch holds its messages unacked until it is settled.
                await channel.set_qos(
                    prefetch_count=max(self.prefetch, sub.batch_size * sub.concurrency)
                )
                queue = await channel.declare_queue(
                    self.queue_name(sub.endpoint),
                    durable=True,
                    arguments=self._queue_arguments(),
                )
                buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()

                async def on_message(
                    message: AbstractIncomingMessage,
                    buffer: asyncio.Queue[AbstractIncomingMessage | None] = buffer,
                    sub: _Subscription = sub,
                ) -> None:
                    sub.unsettled[id(message)] = message.message_id or ""
                    buffer.put_nowait(message)

                sub.channel, sub.queue, sub.buffer = channel, queue, buffer
                sub.consumer_tag = await queue.consume(on_message, no_ack=False)
            except Exception as exc:
                raise TransportError(
                    f"cannot consume {self.queue_name(sub.endpoint)!r} at "
                    f"{redact(self.url)}: {exc!r}"
                ) from exc
            sub.task = asyncio.create_task(self._consume(sub), name=f"consume:{sub.endpoint}")

    async def close(self) -> None:
        """Stop consuming, let in-flight batches finish, then disconnect.

        Messages received but not yet handed to a handler, and those held for a retry
        delay, are unacked: the broker gives them out again as soon as the channel closes.
        """
        self._stopping = True
        for sub in self._subs:
            if sub.queue is not None and sub.consumer_tag is not None:
                with contextlib.suppress(Exception):
                    await sub.queue.cancel(sub.consumer_tag)
            if sub.buffer is not None:
                sub.buffer.put_nowait(None)
        tasks = [s.task for s in self._subs if s.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            for task in pending:
                log.warning(
                    "a batch handler did not finish within %.0fs; cancelling", CLOSE_TIMEOUT
                )
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for sub in self._subs:
            for hold in list(sub.holds):
                hold.cancel()
            await asyncio.gather(*sub.holds, return_exceptions=True)
            if sub.channel is not None:
                with contextlib.suppress(Exception):
                    await sub.channel.close()
            sub.unsettled.clear()  # the closed channel gave them back to their queue
            sub.channel = sub.queue = sub.consumer_tag = sub.buffer = sub.task = None
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def _consume(self, sub: _Subscription) -> None:
        running = InFlight(sub.concurrency)
        try:
            while not self._stopping:
                await running.slot()
                batch = await self._next_batch(sub)
                if self._stopping:
                    break  # not handed out: unacked, so the broker gives them out again
                if not batch:
                    continue
                if sub.concurrency == 1:
                    await self._handle(sub, batch)
                else:
                    running.spawn(self._guarded(sub, batch))
        finally:
            await running.finish()  # in-flight batches settle first (close() waits for it)

    async def _guarded(self, sub: _Subscription, batch: list[AbstractIncomingMessage]) -> None:
        try:
            await self._handle(sub, batch)
        except Exception:  # a bug here must not go unseen; unsettled messages come back
            log.exception(
                "settling a batch of %s failed", sub.endpoint, extra={"endpoint": sub.endpoint}
            )

    async def _next_batch(self, sub: _Subscription) -> list[AbstractIncomingMessage]:
        buffer = sub.buffer
        assert buffer is not None
        first = await buffer.get()
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + BATCH_LINGER
        idle = 0
        while len(batch) < sub.batch_size:
            try:
                item = buffer.get_nowait()
            except asyncio.QueueEmpty:
                if idle >= BATCH_IDLE_ROUNDS or time.monotonic() >= deadline:
                    break
                idle += 1
                await asyncio.sleep(0)
                continue
            if item is None:
                break
            batch.append(item)
            idle = 0
        return batch

    async def _handle(self, sub: _Subscription, batch: list[AbstractIncomingMessage]) -> None:
        deliveries = [
            Delivery(next(self._handles), m.body.decode("utf-8", errors="replace"), _deliveries(m))
            for m in batch
        ]
        try:
            settles = list(await sub.handler(deliveries))
            if len(settles) != len(deliveries):
                raise TransportError(
                    f"the handler settled {len(settles)} of {len(deliveries)} deliveries"
                )
        except Exception:
            # The consumer settles poison messages itself; reaching here is a bug or an
            # outage. Pause, then requeue the batch: the quorum queue counts the delivery
            # and parks the message in the dead-letter queue at the delivery limit.
            log.exception(
                "consumer of %s failed; batch of %d will be redelivered",
                sub.endpoint,
                len(batch),
                extra={"endpoint": sub.endpoint},
            )
            await asyncio.sleep(self.failure_pause)
            for m in batch:
                await self._settle(sub, m, requeue=True)
            return
        delayed: list[tuple[AbstractIncomingMessage, Delivery, Settle]] = []
        for m, d, s in zip(batch, deliveries, settles, strict=True):
            if s.ack:
                await self._settle(sub, m, requeue=None)
            elif s.delay <= 0:
                await self._settle(sub, m, requeue=True)
            elif s.delay <= self.max_hold:
                self._hold(sub, m, s.delay)
            else:
                delayed.append((m, d, s))
        if delayed:
            await self._delay(sub, delayed)

    async def _settle(
        self, sub: _Subscription, message: AbstractIncomingMessage, *, requeue: bool | None
    ) -> None:
        """Ack (``requeue=None``) or requeue one message; a lost channel already requeued it."""
        sub.unsettled.pop(id(message), None)  # settled, or back with the broker either way
        try:
            if requeue is None:
                await message.ack()
            else:
                await message.nack(requeue=requeue)
        except Exception as exc:
            log.warning(
                "could not settle message %s on %s (%r); the broker will redeliver it",
                message.message_id,
                sub.endpoint,
                exc,
                extra={"endpoint": sub.endpoint, "message_id": message.message_id},
            )

    def _hold(self, sub: _Subscription, message: AbstractIncomingMessage, delay: float) -> None:
        async def requeue_later() -> None:
            await asyncio.sleep(delay)
            await self._settle(sub, message, requeue=True)

        task = asyncio.create_task(requeue_later(), name=f"hold:{sub.endpoint}")
        sub.holds.add(task)
        task.add_done_callback(sub.holds.discard)

    async def _delay(
        self, sub: _Subscription, items: list[tuple[AbstractIncomingMessage, Delivery, Settle]]
    ) -> None:
        """Move long-delayed retries into the retry queue: confirmed copy first, then ack."""
        import aio_pika

        channel = sub.channel
        assert channel is not None
        routing_key = self.retry_queue_name(sub.endpoint)

        async def move(m: AbstractIncomingMessage, d: Delivery, s: Settle) -> None:
            headers = {k: v for k, v in (m.headers or {}).items() if k != "x-delivery-count"}
            headers[DELIVERIES_HEADER] = d.deliveries
            headers[ERROR_HEADER] = s.error[:1000]
            copy = aio_pika.Message(
                m.body,
                message_id=m.message_id,
                type=m.type,
                content_type=m.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers=headers,
                expiration=max(int(s.delay * 1000), 1) / 1000,
            )
            try:
                await channel.default_exchange.publish(
                    copy, routing_key=routing_key, mandatory=True, timeout=self.publish_timeout
                )
            except Exception as exc:
                log.warning(
                    "could not move %s to %s (%r); retrying it in %.1fs instead",
                    m.message_id,
                    routing_key,
                    exc,
                    self.max_hold,
                    extra={"endpoint": sub.endpoint, "message_id": m.message_id},
                )
                self._hold(sub, m, self.max_hold)
                return
            await self._settle(sub, m, requeue=None)

        await asyncio.gather(*(move(m, d, s) for m, d, s in items))
