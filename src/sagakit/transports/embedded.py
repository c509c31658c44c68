"""The embedded transport: database mailboxes instead of a broker.

Publishing a message commits it into the destination service's own database (its
mailbox table); the consumer takes batches from there, and a delivery is removed only
after the consumer settled it, i.e. after the consumer's own transaction committed.
A consumer that dies leaves its leased messages to be handed out again. No broker,
no server: this is what ``sagakit demo`` runs on.

One process consumes each endpoint (the embedded deployment is one process per data
directory); on start it takes back the leases a killed predecessor left behind. With a
subscription's ``concurrency`` above 1 its consumer keeps fetching (leasing) new
batches while earlier ones are still being handled, up to that many at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence

from sagakit.core.envelope import Envelope
from sagakit.errors import ConfigurationError, UnroutableMessage
from sagakit.runtime.wakeup import Wakeups
from sagakit.stores.base import Store
from sagakit.transports.base import BatchHandler, Delivery, InFlight
from sagakit.transports.shared import split_routable, unroutable_error

log = logging.getLogger(__name__)


class EmbeddedTransport:
    """Routes each destination endpoint to the store that holds its mailbox."""

    def __init__(
        self,
        routes: Mapping[str, Store],
        *,
        wakeups: Wakeups | None = None,
        clock: Callable[[], float] = time.time,
        lease: float = 30.0,
        idle_poll: float = 1.0,
    ) -> None:
        self.routes = dict(routes)
        self.wakeups = wakeups or Wakeups()
        self.clock = clock
        self.lease = lease
        self.idle_poll = idle_poll
        self._subs: list[tuple[str, BatchHandler, int, int]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def add_route(self, endpoint: str, store: Store) -> None:
        """Deliver messages for ``endpoint`` into ``store``'s mailbox."""
        self.routes[endpoint] = store

    async def open(self) -> None:
        """Nothing to connect: the mailboxes live in the stores, opened by their owners."""

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Commit each envelope into its destination's mailbox (one commit per store)."""
        routable, unroutable = split_routable(envelopes, self.routes)
        by_dest: dict[str, list[str]] = defaultdict(list)
        for env in routable:
            by_dest[env.destination or ""].append(env.to_json())
        now = self.clock()
        for dest, bodies in by_dest.items():
            await self.routes[dest].queue_push(dest, bodies, now)
            self.wakeups.notify(f"queue:{dest}")
        if unroutable:
            raise unroutable_error(unroutable, self.routes)

    def subscribe(
        self, endpoint: str, handler: BatchHandler, *, batch_size: int = 256, concurrency: int = 1
    ) -> None:
        """Consume ``endpoint``'s mailbox with ``handler`` once started, ``concurrency``
        batches at once (see :meth:`~sagakit.transports.base.Transport.subscribe`)."""
        if endpoint not in self.routes:
            raise UnroutableMessage(f"cannot subscribe: no store routes endpoint {endpoint!r}", [])
        if batch_size < 1 or concurrency < 1:
            raise ConfigurationError(
                f"batch_size and concurrency must be >= 1, got {batch_size} and {concurrency}"
            )
        self._subs.append((endpoint, handler, batch_size, concurrency))

    async def start(self) -> None:
        """Start one consuming task per subscription."""
        self._stopping = False
        for endpoint, handler, batch, concurrency in self._subs:
            await self.routes[endpoint].queue_reset_leases(endpoint)
            self._tasks.append(
                asyncio.create_task(
                    self._consume(endpoint, handler, batch, concurrency),
                    name=f"consume:{endpoint}",
                )
            )

    async def close(self) -> None:
        """Stop the consuming tasks."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _consume(
        self, endpoint: str, handler: BatchHandler, batch: int, concurrency: int = 1
    ) -> None:
        running = InFlight(concurrency)

        def spawn(handling: Awaitable[None]) -> None:
            running.spawn(self._guarded(endpoint, handling))

        try:
            while not self._stopping:
                await running.slot()
                try:
                    await self._consume_once(
                        endpoint, handler, batch, spawn if concurrency > 1 else None
                    )
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # The mailbox's store failed (locked, closed, disk): keep the consumer
                    # alive; leased messages come back when their lease ends.
                    log.exception("consumer of %s failed reading its mailbox; retrying", endpoint)
                    await asyncio.sleep(min(self.idle_poll, 1.0))
        finally:
            await running.cancel()

    async def _guarded(self, endpoint: str, handling: Awaitable[None]) -> None:
        try:
            await handling
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("consumer of %s failed settling a batch; its lease runs out", endpoint)

    async def _consume_once(
        self,
        endpoint: str,
        handler: BatchHandler,
        batch: int,
        spawn: Callable[[Awaitable[None]], None] | None = None,
    ) -> None:
        """Fetch one batch and handle it (``spawn``: in a task of its own)."""
        store = self.routes[endpoint]
        channel = f"queue:{endpoint}"
        now = self.clock()
        msgs = await store.queue_fetch(endpoint, batch, now, self.lease)
        if not msgs:
            nxt = await store.next_queue_visible(endpoint)
            timeout = self.idle_poll if nxt is None else min(self.idle_poll, max(nxt - now, 0.001))
            await self.wakeups.wait(channel, timeout)
            return
        deliveries = [Delivery(m.id, m.body, m.deliveries) for m in msgs]
        handling = self._handle(endpoint, handler, deliveries)
        if spawn is None:
            await handling
        else:
            spawn(handling)

    async def _handle(
        self, endpoint: str, handler: BatchHandler, deliveries: Sequence[Delivery]
    ) -> None:
        """Hand a fetched batch to ``handler``; settle it as told once it returned."""
        store = self.routes[endpoint]
        channel = f"queue:{endpoint}"
        try:
            settles = await handler(deliveries)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The handler settles poison messages itself; reaching here is a bug or an
            # outage (database gone). Leave the batch leased: it comes back later.
            log.exception("consumer of %s failed; batch will be redelivered", endpoint)
            await asyncio.sleep(min(self.lease, 1.0))
            return
        acks = [d.handle for d, s in zip(deliveries, settles, strict=True) if s.ack]
        if acks:
            await store.queue_ack(acks)
        now = self.clock()
        for d, s in zip(deliveries, settles, strict=True):
            if not s.ack:
                await store.queue_retry(d.handle, now + s.delay, s.error)
                if s.delay <= 0:
                    self.wakeups.notify(channel)
