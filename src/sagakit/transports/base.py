"""The transport port.

A transport publishes envelopes (returning only once the destination durably accepted
them: a broker acknowledgement, or a commit into the consumer's mailbox) and hands
batches of raw deliveries to a consumer's handler. The handler settles each delivery:
ACK removes it, RETRY hands it out again later. Delivery is at-least-once; consumers
deduplicate with their inbox. Parsing and dead-lettering belong to the consumer
(:mod:`sagakit.runtime.consumer`), so every transport treats poison messages alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sagakit.core.envelope import Envelope


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to a consumer. ``deliveries`` counts this one too."""

    handle: int
    body: str
    deliveries: int


@dataclass(frozen=True, slots=True)
class Settle:
    """How a consumer settles a delivery: acknowledge it, or ask for it again later."""

    ack: bool
    delay: float = 0.0
    error: str = ""


ACK = Settle(ack=True)


def retry(delay: float, error: str) -> Settle:
    """Hand the delivery out again after ``delay`` seconds."""
    return Settle(ack=False, delay=delay, error=error)


BatchHandler = Callable[[Sequence[Delivery]], Awaitable[Sequence[Settle]]]


class InFlight:
    """The batches one subscription handles at once, at most ``limit`` (its concurrency).

    A consumer loop awaits :meth:`slot` before it fetches, :meth:`spawn` s the handling
    of what it fetched, and on its way out :meth:`finish` es (lets them settle) or
    :meth:`cancel` s them. With ``limit`` 1 a loop handles its batch inline instead.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._tasks: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._tasks)

    async def slot(self) -> None:
        """Wait until fewer than ``limit`` batches are in flight."""
        while len(self._tasks) >= self.limit:
            self._freed.clear()
            await self._freed.wait()

    def spawn(self, handling: Coroutine[Any, Any, None]) -> None:
        """Handle a batch in a task of its own (which must not raise)."""
        task = asyncio.create_task(handling)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._freed.set()

    async def finish(self) -> None:
        """Wait for the batches in flight to be settled."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        """Cancel the batches in flight (their messages come back: leases, redelivery)."""
        for task in self._tasks:
            task.cancel()
        await self.finish()


@dataclass(frozen=True, slots=True)
class ParkedByBroker:
    """A message the broker itself gave up on, taken from its dead-letter place."""

    endpoint: str
    message_id: str | None
    body: str
    reason: str


ParkSink = Callable[[Sequence[ParkedByBroker]], Awaitable[None]]
"""Where :meth:`drain_dead_letters` hands broker dead letters; it must have stored them
durably when it returns (it raises otherwise, and they stay at the broker)."""


class Transport(Protocol):
    """Moves envelopes from a relay to the consumers of their destination."""

    async def open(self) -> None:
        """Connect and declare what the endpoints need (streams, queues); idempotent."""
        ...

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish and wait until every envelope is durably accepted.

        Raises :class:`~sagakit.errors.TransportError` if any was not acknowledged;
        the caller then publishes them again later (duplicates are allowed).
        """
        ...

    def subscribe(
        self, endpoint: str, handler: BatchHandler, *, batch_size: int = 256, concurrency: int = 1
    ) -> None:
        """Deliver ``endpoint``'s messages to ``handler`` once :meth:`start` ran.

        ``concurrency``: batches handed to ``handler`` at once (1: the next batch is
        fetched when the handler returned). More keep a slow batch from holding up
        the endpoint; each delivery is still settled only after its batch's handler
        returned, so nothing is acknowledged before its effect committed.
        """
        ...

    async def start(self) -> None:
        """Start consuming for every subscription."""
        ...

    async def close(self) -> None:
        """Stop consuming; in-flight batches finish first."""
        ...


class DrainsDeadLetters(Protocol):
    """A transport whose broker has a dead-letter place of its own (NATS, RabbitMQ)."""

    async def drain_dead_letters(self, park: ParkSink, limit: int = 100) -> int:
        """Hand up to ``limit`` of the broker's dead letters to ``park``; once it
        returned, remove them from the broker. Returns how many were moved.

        A crash between the two hands the same messages over again next time, so
        ``park`` must tolerate them (the stores park a message once while open).
        """
        ...


@dataclass(frozen=True, slots=True)
class EndpointBacklog:
    """What the broker still holds for one endpoint.

    ``waiting``: not yet handed to any consumer. ``unsettled``: handed out and neither
    acknowledged nor given back -- being handled, held for a retry delay, or (NATS) nak'ed
    with a delay that has not run out. ``delayed``: parked for a long retry in a queue of
    its own (RabbitMQ's ``.retry`` queue).
    """

    endpoint: str
    waiting: int = 0
    unsettled: int = 0
    delayed: int = 0

    @property
    def total(self) -> int:
        """Every message the broker still holds for the endpoint."""
        return self.waiting + self.unsettled + self.delayed


@dataclass(frozen=True, slots=True)
class Backlog:
    """What a broker still holds for a deployment: the messages not yet settled.

    A published message is either processed (its id in the consumer's inbox),
    dead-lettered, or here; a final check that finds it nowhere has found a loss.
    ``message_ids`` maps the ids the broker could name to their endpoint (NATS reads
    them from the stream; RabbitMQ can name only what this process holds).
    ``complete`` is False when the counts miss something the broker does not tell this
    process: over AMQP, messages other processes hold unacknowledged.
    """

    endpoints: tuple[EndpointBacklog, ...] = ()
    message_ids: tuple[tuple[str, str], ...] = ()
    complete: bool = True

    @property
    def total(self) -> int:
        """Every message still held, summed over the endpoints."""
        return sum(e.total for e in self.endpoints)

    def held(self) -> dict[str, tuple[str, ...]]:
        """``message_ids`` grouped by endpoint."""
        out: dict[str, list[str]] = {}
        for message_id, endpoint in self.message_ids:
            out.setdefault(endpoint, []).append(message_id)
        return {k: tuple(v) for k, v in out.items()}

    def summary(self) -> str:
        """One line: the non-empty endpoints with their counts."""
        parts = [
            f"{e.endpoint}: {e.waiting} waiting, {e.unsettled} unsettled, {e.delayed} delayed"
            for e in self.endpoints
            if e.total
        ]
        return "; ".join(parts) if parts else "nothing"


class ReportsBacklog(Protocol):
    """A transport that can tell what its broker still holds (NATS, RabbitMQ).

    The embedded transport's messages live in the stores' mailboxes, which the stores
    count themselves (``queue_depth``).
    """

    async def backlog(self, *, names: bool = True) -> Backlog:
        """What the broker holds for this transport's endpoints right now; with
        ``names``, also the ids of the messages it can name (may cost a read each)."""
        ...


async def backlog_of(transport: object, *, names: bool = True) -> Backlog | None:
    """``transport``'s backlog, looking through wrappers (``.inner``); None when the
    transport keeps nothing outside the stores."""
    seen: set[int] = set()
    current: object | None = transport
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        report = getattr(current, "backlog", None)
        if report is not None and callable(report):
            result = await report(names=names)
            if not isinstance(result, Backlog):
                raise TypeError(f"{type(current).__name__}.backlog() returned {result!r}")
            return result
        current = getattr(current, "inner", None)
    return None
