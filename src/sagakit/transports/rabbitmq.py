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

Modules
    This one holds :class:`RabbitMqTransport` and its settings; it is put together
    from parts, each in a module of its own: the connection, names and topology
    (:mod:`~sagakit.transports.rabbitmq_connection`, with the guard for the optional
    driver), publishing (:mod:`~sagakit.transports.rabbitmq_publish`), consuming
    (:mod:`~sagakit.transports.rabbitmq_consumer`), the dead letters
    (:mod:`~sagakit.transports.rabbitmq_dead_letters`) and the backlog
    (:mod:`~sagakit.transports.rabbitmq_backlog`).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

from sagakit.errors import ConfigurationError
from sagakit.transports.rabbitmq_backlog import RabbitMqBacklog
from sagakit.transports.rabbitmq_connection import RECONNECT_INTERVAL, require_aio_pika
from sagakit.transports.rabbitmq_consumer import (
    BATCH_IDLE_ROUNDS,
    BATCH_LINGER,
    CLOSE_TIMEOUT,
    DELIVERIES_HEADER,
    ERROR_HEADER,
)
from sagakit.transports.rabbitmq_dead_letters import RabbitMqDeadLetters
from sagakit.transports.rabbitmq_publish import RabbitMqPublisher

__all__ = [
    "BATCH_IDLE_ROUNDS",
    "BATCH_LINGER",
    "CLOSE_TIMEOUT",
    "DELIVERIES_HEADER",
    "ERROR_HEADER",
    "RECONNECT_INTERVAL",
    "RabbitMqTransport",
]


class RabbitMqTransport(RabbitMqBacklog, RabbitMqPublisher, RabbitMqDeadLetters):
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
        require_aio_pika()
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
        self._connection = None
        self._channel = None
        self._exchange = None
        self._open_lock = asyncio.Lock()
        self._subs = []
        self._handles = itertools.count(1)
        self._stopping = False
