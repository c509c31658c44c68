"""Publishing on the RabbitMQ transport: persistent, mandatory messages to the
``<prefix>`` exchange, returning once the broker confirmed every routable one (see
:mod:`sagakit.transports.rabbitmq`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sagakit.core.envelope import Envelope
from sagakit.errors import TransportError
from sagakit.transports.rabbitmq_connection import RabbitMqConnection, redact
from sagakit.transports.shared import split_routable, unroutable_error

if TYPE_CHECKING:
    from aio_pika.abc import AbstractExchange


class RabbitMqPublisher(RabbitMqConnection):
    """The publishing part of :class:`~sagakit.transports.rabbitmq.RabbitMqTransport`."""

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
        routable, unroutable = split_routable(envelopes, self.endpoints)
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
                f"RabbitMQ at {redact(self.url)} did not confirm {len(failures)} of "
                f"{len(routable)} message(s): {failures[0]!r}"
            ) from failures[0]
        if unroutable:
            raise unroutable_error(unroutable, self.endpoints)

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
