"""The RabbitMQ transport's connection and topology: the optional driver's guard, the
settings every part reads, the names of the exchanges and queues, connecting (aio-pika
reconnects by itself) and declaring and deleting the topology (see
:mod:`sagakit.transports.rabbitmq`)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from sagakit.errors import ConfigurationError, TransportError

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

#: Seconds between reconnection attempts (unless the URL sets ``reconnect_interval``).
RECONNECT_INTERVAL = 1.0


def require_aio_pika() -> None:
    """Fail early, with the install hint, when the optional driver aio-pika is missing."""
    try:
        import aio_pika  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            "the RabbitMQ transport needs aio-pika: pip install 'sagakit[rabbitmq]'"
        ) from exc


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class RabbitMqConnection:
    """The connection and topology part of
    :class:`~sagakit.transports.rabbitmq.RabbitMqTransport` (which sets these
    attributes), and the base its other parts share."""

    url: str
    prefix: str
    endpoints: tuple[str, ...]
    delivery_limit: int
    prefetch: int
    connect_timeout: float
    publish_timeout: float
    max_hold: float
    failure_pause: float
    _connection: AbstractRobustConnection | None
    _channel: AbstractChannel | None
    _exchange: AbstractExchange | None
    _open_lock: asyncio.Lock

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

            where = redact(self.url)
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
                f"cannot delete the topology {self.prefix!r} at {redact(self.url)}: {exc!r}"
            ) from exc
