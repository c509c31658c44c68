"""The RabbitMQ transport: quorum queues, publisher confirms and manual acks.

Topology, all durable, named after ``prefix``:

- ``<prefix>``: a direct exchange; each endpoint has a quorum queue ``<prefix>.<endpoint>``
  bound with routing key ``<endpoint>``.
- ``<prefix>.<endpoint>.retry``: a quorum queue without consumers that holds copies of
  messages to be retried after a long delay (per-message ``expiration``); expired copies
  are dead-lettered back to ``<prefix>`` with routing key ``<endpoint>``.
- ``<prefix>.dlx`` (fanout) -> ``<prefix>.dead``: where a quorum queue puts a message
  that was handed out ``delivery_limit`` times without an ack (a consumer that keeps
  crashing on it). The message keeps its ``x-death`` headers (reason ``delivery_limit``,
  the queue it came from), so nothing is dropped silently.

Dead-lettering uses the ``at-least-once`` strategy (RabbitMQ >= 3.10): the source queue
keeps a message until the dead-letter queue confirmed it.

Publishing waits for the broker's confirm of every message, with ``mandatory`` set so
that a message no queue accepted comes back as unroutable instead of vanishing.

Consuming hands batches to the handler and settles each delivery afterwards: ACK acks
it; ``retry(delay)`` keeps it unacked in this process for ``delay`` seconds and then
requeues it (the quorum queue counts the delivery), or, for delays above ``max_hold``,
publishes a confirmed copy into the retry queue and only then acks the original. A
retry delay therefore ends when the consumer stops (its unacked messages go back to the
queue at once), like the embedded transport's leases, while long delays neither pin
prefetch slots nor run into the broker's consumer timeout. A handler that raises gets
its batch again after ``failure_pause``. With a subscription's ``concurrency`` above 1
the consumer hands out up to that many batches at once (its prefetch grows to match),
each settled when its own handler returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from sagakit.core.envelope import Envelope
from sagakit.errors import ConfigurationError, TransportError, UnroutableMessage
from sagakit.transports.base import (
    Backlog,
    BatchHandler,
    Delivery,
    EndpointBacklog,
    InFlight,
    ParkedByBroker,
    ParkSink,
    Settle,
)

if TYPE_CHECKING:
    from aio_pika.abc import (
        AbstractChannel,
        AbstractExchange,
        AbstractIncomingMessage,
        AbstractQueue,
        AbstractRobustConnection,
    )

log = logging.getLogger(__name__)

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
#: Seconds between reconnection attempts (unless the URL sets ``reconnect_interval``).
RECONNECT_INTERVAL = 1.0
#: How long :meth:`RabbitMqTransport.close` waits for an in-flight batch.
CLOSE_TIMEOUT = 30.0


def _require_aio_pika() -> None:
    try:
        import aio_pika  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            "the RabbitMQ transport needs aio-pika: pip install 'sagakit[rabbitmq]'"
        ) from exc


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


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


class RabbitMqTransport:
    """Moves envelopes through RabbitMQ quorum queues, one per endpoint.

    ``endpoints`` lists every destination this process publishes to or consumes; all
    their queues are declared by :meth:`open` (the same arguments everywhere, so any
    number of processes may declare them). ``delivery_limit`` is the broker's backstop
    for messages no consumer ever settles (a handler crash, a process killed mid-batch);
    held retries count towards it too, so keep the consumers' own ``max_deliveries``
    below it and they park a failing message with its real reason first.
    ``max_hold`` splits retry delays between held-in-process (up to it) and the retry
    queue (longer); ``failure_pause`` is how long a batch whose handler raised waits
    before it is requeued.
    """

    publishes_to_broker = True
    """Publishing writes to no store: a relay may publish inside its store transaction.

    (Quorum-queue confirms can take longer than a relay's lease; the relay then claims
    and marks for a while, see :mod:`sagakit.runtime.relay`.)"""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sagakit",
        endpoints: Sequence[str],
        delivery_limit: int = 50,
        prefetch: int = 256,
        connect_timeout: float = 5.0,
        publish_timeout: float = 30.0,
        max_hold: float = 60.0,
        failure_pause: float = 1.0,
    ) -> None:
        _require_aio_pika()
        if not endpoints:
            raise ConfigurationError("RabbitMqTransport needs at least one endpoint")
        if delivery_limit < 1 or prefetch < 1:
            raise ConfigurationError("delivery_limit and prefetch must be at least 1")
        self.url = url
        self.prefix = prefix
        self.endpoints = tuple(dict.fromkeys(endpoints))
        self.delivery_limit = delivery_limit
        self.prefetch = prefetch
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self.max_hold = max_hold
        self.failure_pause = failure_pause
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._open_lock = asyncio.Lock()
        self._subs: list[_Subscription] = []
        self._handles = itertools.count(1)
        self._stopping = False

    # -- names -----------------------------------------------------------------------

    def queue_name(self, endpoint: str) -> str:
        """The quorum queue that holds ``endpoint``'s messages."""
        return f"{self.prefix}.{endpoint}"

    def retry_queue_name(self, endpoint: str) -> str:
        """The queue where long retry delays of ``endpoint``'s messages run out."""
        return f"{self.prefix}.{endpoint}.retry"

    @property
    def dead_letter_exchange(self) -> str:
        """The fanout exchange the endpoint queues dead-letter into."""
        return f"{self.prefix}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        """Messages handed out ``delivery_limit`` times without an ack end up here."""
        return f"{self.prefix}.dead"

    def _queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",  # required by at-least-once dead-lettering
        }

    def _retry_queue_arguments(self, endpoint: str) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.prefix,
            "x-dead-letter-routing-key": endpoint,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (reconnecting by itself later) and declare the topology; idempotent."""
        async with self._open_lock:
            if self._exchange is not None:
                return
            import aio_pika

            where = _redact(self.url)
            options: dict[str, Any] = {
                "timeout": self.connect_timeout,
                "client_properties": {"connection_name": f"sagakit {self.prefix}"},
            }
            if "reconnect_interval" not in parse_qs(urlsplit(self.url).query):
                # aio-pika waits 5 s between attempts; publishes fail until it is back.
                options["reconnect_interval"] = RECONNECT_INTERVAL
            try:
                connection = await aio_pika.connect_robust(self.url, **options)
            except Exception as exc:
                raise TransportError(f"cannot connect to RabbitMQ at {where}: {exc!r}") from exc
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                exchange = await self._declare(channel)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await connection.close()
                raise TransportError(
                    f"cannot declare the sagakit topology {self.prefix!r} at {where}: {exc!r}"
                ) from exc
            self._connection, self._channel, self._exchange = connection, channel, exchange

    async def _declare(self, channel: AbstractChannel) -> AbstractExchange:
        import aio_pika

        exchange = await channel.declare_exchange(
            self.prefix, aio_pika.ExchangeType.DIRECT, durable=True
        )
        dlx = await channel.declare_exchange(
            self.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead = await channel.declare_queue(
            self.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.bind(dlx)
        for endpoint in self.endpoints:
            queue = await channel.declare_queue(
                self.queue_name(endpoint), durable=True, arguments=self._queue_arguments()
            )
            await queue.bind(exchange, routing_key=endpoint)
            await channel.declare_queue(
                self.retry_queue_name(endpoint),
                durable=True,
                arguments=self._retry_queue_arguments(endpoint),
            )
        return exchange

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

    async def delete_topology(self) -> None:
        """Delete this prefix's queues and exchanges, messages included (for tests)."""
        import aio_pika

        try:
            connection = await aio_pika.connect(self.url, timeout=self.connect_timeout)
            async with connection:
                channel = await connection.channel()
                for endpoint in self.endpoints:
                    await channel.queue_delete(self.queue_name(endpoint))
                    await channel.queue_delete(self.retry_queue_name(endpoint))
                await channel.queue_delete(self.dead_letter_queue)
                await channel.exchange_delete(self.prefix)
                await channel.exchange_delete(self.dead_letter_exchange)
        except Exception as exc:
            raise TransportError(
                f"cannot delete the topology {self.prefix!r} at {_redact(self.url)}: {exc!r}"
            ) from exc

    # -- the broker's dead letters ---------------------------------------------------

    async def drain_dead_letters(self, park: ParkSink, limit: int = 100) -> int:
        """Take up to ``limit`` messages from ``<prefix>.dead``, hand them to ``park``,
        and acknowledge them only once it returned; return how many.

        They are taken unacknowledged on a channel of their own: if ``park`` fails, or
        this process dies, closing the channel puts them back in the queue.
        """
        await self.open()
        connection = self._connection
        assert connection is not None
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(
                self.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
            )
            taken: list[AbstractIncomingMessage] = []
            while len(taken) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                taken.append(message)
            if not taken:
                return 0
            await park([self._parked(m) for m in taken])
            for m in taken:
                await m.ack()
            return len(taken)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    def _parked(self, message: AbstractIncomingMessage) -> ParkedByBroker:
        headers = dict(message.headers or {})
        queue = str(headers.get("x-first-death-queue") or "")
        why = str(headers.get("x-first-death-reason") or "unknown")
        endpoint = queue.removeprefix(f"{self.prefix}.") if queue else ""
        return ParkedByBroker(
            endpoint=endpoint,
            message_id=message.message_id,
            body=message.body.decode("utf-8", errors="replace"),
            reason=f"RabbitMQ dead-lettered it from {queue or 'a queue'!r}: {why} "
            f"(delivery_limit={self.delivery_limit})",
        )

    # -- publishing ------------------------------------------------------------------

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish persistently and return once RabbitMQ confirmed every routable envelope.

        Raises :class:`TransportError` if any was nacked, timed out or hit a connection
        error (publish them all again later), else :class:`UnroutableMessage` listing
        those with no queue (the others were published and confirmed).
        """
        if not envelopes:
            return
        await self.open()
        exchange = self._exchange
        if exchange is None:  # closed concurrently
            raise TransportError("the RabbitMQ transport is closed")
        routable = [e for e in envelopes if e.destination in self.endpoints]
        unroutable = [
            (e.message_id, e.destination) for e in envelopes if e.destination not in self.endpoints
        ]
        results = await asyncio.gather(
            *(self._publish_one(exchange, env) for env in routable), return_exceptions=True
        )
        from aio_pika.exceptions import PublishError

        failures: list[BaseException] = []
        for env, result in zip(routable, results, strict=True):
            if isinstance(result, PublishError):
                unroutable.append((env.message_id, env.destination))
            elif isinstance(result, Exception):
                failures.append(result)
            elif isinstance(result, BaseException):
                raise result
        if failures:
            raise TransportError(
                f"RabbitMQ at {_redact(self.url)} did not confirm {len(failures)} of "
                f"{len(routable)} message(s): {failures[0]!r}"
            ) from failures[0]
        if unroutable:
            destinations = sorted({repr(d) for _, d in unroutable})
            raise UnroutableMessage(
                f"no route to {', '.join(destinations)} for {len(unroutable)} message(s); "
                f"known endpoints: {sorted(self.endpoints)}",
                unroutable,
            )

    async def _publish_one(self, exchange: AbstractExchange, env: Envelope) -> None:
        import aio_pika

        headers: dict[str, Any] = {}
        if env.traceparent:
            headers["traceparent"] = env.traceparent
        message = aio_pika.Message(
            env.to_json().encode(),
            message_id=env.message_id,
            type=env.type,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=headers,
        )
        assert env.destination is not None  # filtered by publish()
        await exchange.publish(
            message, routing_key=env.destination, mandatory=True, timeout=self.publish_timeout
        )

    # -- consuming -------------------------------------------------------------------

    def subscribe(
        self, endpoint: str, handler: BatchHandler, *, batch_size: int = 256, concurrency: int = 1
    ) -> None:
        """Consume ``endpoint``'s queue with ``handler`` once started, ``concurrency``
        batches at once (see :class:`~sagakit.transports.base.Transport`)."""
        if endpoint not in self.endpoints:
            raise UnroutableMessage(
                f"cannot subscribe: {endpoint!r} is not one of {list(self.endpoints)}",
                [],
            )
        if batch_size < 1 or concurrency < 1:
            raise ConfigurationError(
                f"batch_size and concurrency must be >= 1, got {batch_size} and {concurrency}"
            )
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
                    f"{_redact(self.url)}: {exc!r}"
                ) from exc
            sub.task = asyncio.create_task(self._consume(sub), name=f"consume:{sub.endpoint}")

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

    async def backlog(self, *, names: bool = True) -> Backlog:
        """What the queues still hold for this transport's endpoints.

        ``waiting``: ready messages of ``<prefix>.<endpoint>`` plus what this process
        received and has not yet settled (buffered, being handled, or held for a retry
        delay); ``delayed``: copies in ``<prefix>.<endpoint>.retry``. AMQP reports only
        ready messages, so messages other processes hold unacknowledged are not counted
        (``complete`` is False while another consumer is attached); they go back to
        their queue when that process stops. Message ids: those this process holds
        (they cost nothing, so ``names`` changes nothing).
        """
        if self._channel is None:
            await self.open()
        channel = self._channel
        assert channel is not None
        held: dict[str, list[str]] = {}
        for sub in self._subs:
            held.setdefault(sub.endpoint, []).extend(sub.unsettled.values())
        ours = {sub.endpoint for sub in self._subs if sub.task is not None}
        counts: list[EndpointBacklog] = []
        complete = True
        try:
            # The underlying channel: aio-pika's robust channel answers a passive
            # declare of a queue it knows from its cache, with the counts of back then.
            amqp = await channel.get_underlay_channel()
            for endpoint in self.endpoints:
                ready = await amqp.queue_declare(self.queue_name(endpoint), passive=True)
                retry = await amqp.queue_declare(self.retry_queue_name(endpoint), passive=True)
                assert ready is not None and retry is not None  # None only with nowait
                if (ready.consumer_count or 0) > (1 if endpoint in ours else 0):
                    complete = False
                counts.append(
                    EndpointBacklog(
                        endpoint,
                        waiting=ready.message_count or 0,
                        unsettled=len(held.get(endpoint, ())),
                        delayed=retry.message_count or 0,
                    )
                )
        except Exception as exc:
            raise TransportError(
                f"cannot read the queues of {self.prefix!r} at {_redact(self.url)}: {exc!r}"
            ) from exc
        ids = tuple((m, e) for e, ms in held.items() for m in ms if m)
        return Backlog(tuple(counts), ids, complete)
