"""What the RabbitMQ queues still hold for the transport's endpoints (``backlog()``):
ready messages and retry copies as the broker counts them, plus what this process
received and has not settled (see :mod:`sagakit.transports.rabbitmq`)."""

from __future__ import annotations

from sagakit.errors import TransportError
from sagakit.transports.base import Backlog, EndpointBacklog
from sagakit.transports.rabbitmq_connection import redact
from sagakit.transports.rabbitmq_consumer import RabbitMqConsumer


class RabbitMqBacklog(RabbitMqConsumer):
    """The backlog part of :class:`~sagakit.transports.rabbitmq.RabbitMqTransport` (it
    counts the messages its consumers hold)."""

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
                f"cannot read the queues of {self.prefix!r} at {redact(self.url)}: {exc!r}"
            ) from exc
        ids = tuple((m, e) for e, ms in held.items() for m in ms if m)
        return Backlog(tuple(counts), ids, complete)
