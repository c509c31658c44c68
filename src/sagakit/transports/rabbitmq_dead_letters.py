"""The RabbitMQ transport's dead letters: what a quorum queue gave up on (after
``delivery_limit`` deliveries) waits in ``<prefix>.dead`` until it is drained into a
store's dead-letter table (see :mod:`sagakit.transports.rabbitmq`)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from sagakit.transports.base import ParkedByBroker, ParkSink
from sagakit.transports.rabbitmq_connection import RabbitMqConnection

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage


class RabbitMqDeadLetters(RabbitMqConnection):
    """The dead-letter part of :class:`~sagakit.transports.rabbitmq.RabbitMqTransport`."""

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
