"""The NATS JetStream transport.

Topology (declared by :meth:`NatsTransport.open`, idempotently, by every process):

* one stream ``<stream>`` (file storage, work-queue retention: an acknowledged message
  is removed) whose subjects are ``<stream>.<endpoint>`` for every endpoint any process
  declared (a process adds its endpoints and never removes another's);
* one durable pull consumer per endpoint, named after it, filtered on its subject, with
  explicit acks, ``ack_wait`` and ``max_deliver``; every process consuming an endpoint
  pulls from the same consumer, so they share its messages;
* ``<stream>_dlq``: dead letters the broker gave up on (see below), one subject per
  endpoint, kept until an operator removes them;
* ``<stream>_adv``: the broker's max-deliveries advisories for ``<stream>``, captured
  durably so that none is missed while no sagakit process runs.

Publishing
    Every envelope is published to ``<stream>.<destination>`` with the header
    ``Nats-Msg-Id: <message_id>@<destination>`` (see :func:`copy_id`; a replayed dead
    letter gets a new one) and its ``traceparent``; :meth:`publish` returns only
    when the stream acknowledged every one (a PubAck; a duplicate's PubAck counts), so
    the relay keeps its outbox rows until then. Within ``duplicate_window`` (two
    minutes by default) the broker drops a re-published message id; beyond it only the
    consumer's inbox deduplicates, so inbox retention must cover more than the window.

Consuming
    One task per subscription pulls batches (a lingering pull for the first message,
    then a no-wait pull for the rest of the batch) and hands them to the handler; with
    a subscription's ``concurrency`` above 1 it keeps pulling while up to that many
    batches are being handled, each settled when its own handler returned. While
    the handler runs, every message of the batch gets an in-progress ack each
    ``ack_wait / 3`` seconds: an ack sent after ``ack_wait`` could otherwise land after
    the broker already handed the message to another process. ``ACK`` settles are
    acknowledged and confirmed (``ack_sync``). A retry of ``delay <= ack_wait`` is a
    ``nak`` with that delay; a longer one is held by this process (still sending
    in-progress acks) and nak'ed when due, or at once by :meth:`close` -- so, as with the
    embedded transport, a restarted consumer sees every unfinished message again at
    once, and after a crash within ``ack_wait``. A handler that raises gets its batch
    nak'ed with a short delay.

Dead letters
    Poison messages are parked by sagakit's own consumers
    (:class:`~sagakit.runtime.consumer.BatchConsumer` parks after its ``max_deliveries``,
    20 by default), long before the broker's ``max_deliver`` (50). ``max_deliver`` is
    the broker's last resort for consumers that never settle a message. When it is
    reached, JetStream stops delivering the message and publishes the advisory
    ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>``; it is captured
    in ``<stream>_adv`` and a consuming process copies the message, with the reason,
    into ``<stream>_dlq`` and removes it from ``<stream>``. Nothing is lost silently.

Limits
    Held retries and buffered messages count against the consumer's
    ``max_ack_pending`` (1000); when it is reached the broker stops handing out that
    endpoint's messages until some are settled. Consumer settings (``ack_wait``,
    ``max_deliver``, ``max_ack_pending``) are per endpoint on the broker: the process
    that opened last wins, so run every process with the same values. Work-queue
    retention allows one consumer per subject: tap a copy with a mirror stream.

Connection
    nats-py reconnects by itself (forever); meanwhile :meth:`publish` fails with
    :class:`~sagakit.errors.TransportError` after ``request_timeout`` and the pull loops
    log, back off and resume once the connection is back.

Modules
    This one holds :class:`NatsTransport` and its settings; it is put together from
    parts, each in a module of its own: the connection and topology
    (:mod:`~sagakit.transports.nats_connection`, with the guard for the optional
    driver), publishing (:mod:`~sagakit.transports.nats_publish`), consuming
    (:mod:`~sagakit.transports.nats_consumer`, over the pull subscription of
    :mod:`~sagakit.transports.nats_pull`), the dead letters
    (:mod:`~sagakit.transports.nats_dead_letters`) and the backlog
    (:mod:`~sagakit.transports.nats_backlog`). The names (subject tokens, copy ids,
    headers) are in :mod:`~sagakit.transports.nats_names`.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Sequence

from sagakit.errors import ConfigurationError
from sagakit.transports.nats_backlog import NatsBacklog
from sagakit.transports.nats_connection import require_nats
from sagakit.transports.nats_consumer import NatsConsumer
from sagakit.transports.nats_names import (
    HEADER_MESSAGE_ID,
    HEADER_REASON,
    DeadLetter,
    copy_id,
    token,
    untoken,
)
from sagakit.transports.nats_publish import NatsPublisher

__all__ = [
    "HEADER_MESSAGE_ID",
    "HEADER_REASON",
    "DeadLetter",
    "NatsTransport",
    "copy_id",
    "token",
    "untoken",
]

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


class NatsTransport(NatsConsumer, NatsPublisher, NatsBacklog):
    """JetStream streams and durable pull consumers behind the Transport protocol."""

    publishes_to_broker = True
    """Publishing writes to no store: a relay may publish inside its store transaction."""

    def __init__(
        self,
        url: str,
        *,
        stream: str = "sagakit",
        endpoints: Sequence[str],
        ack_wait: float = 30.0,
        max_deliver: int = 50,
        duplicate_window: float = 120.0,
        connect_timeout: float = 5.0,
        request_timeout: float = 5.0,
        max_ack_pending: int = 1000,
    ) -> None:
        require_nats()
        if not _TOKEN.match(stream):
            raise ConfigurationError(
                f"NATS stream names may use letters, digits, '_' and '-' only, got {stream!r}"
            )
        if not endpoints:
            raise ConfigurationError("a NATS transport needs at least one endpoint")
        if ack_wait <= 0 or max_deliver < 1 or duplicate_window <= 0:
            raise ConfigurationError("ack_wait, max_deliver and duplicate_window must be > 0")
        self.url = url
        self.stream = stream
        self.endpoints = tuple(dict.fromkeys(endpoints))
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.duplicate_window = duplicate_window
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_ack_pending = max_ack_pending
        self.dlq_stream = f"{stream}_dlq"
        self.advisory_stream = f"{stream}_adv"
        self._nc = None
        self._js = None
        self._subs = []
        self._tasks = []
        self._held = {}
        self._pullers = []
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._issue_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self._handles = itertools.count(1)
        self._beat = max(ack_wait / 3.0, 0.05)
