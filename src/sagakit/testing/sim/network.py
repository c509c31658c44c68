"""The simulated network and clock: messages in flight wait for the scheduler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sagakit.core.envelope import Envelope, MessageKind
from sagakit.errors import TransportError, UnroutableMessage
from sagakit.runtime.consumer import FaultHook
from sagakit.testing.faults import InjectedCrash
from sagakit.transports.base import BatchHandler, Delivery

EPOCH = 1_000_000.0
"""Where every virtual clock starts."""

STEP_COST = 0.001
"""Virtual seconds each scheduler step takes."""


class VirtualClock:
    """A clock that only moves when the simulator moves it; call it for the time."""

    def __init__(self, start: float = EPOCH) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        """Move to ``t`` (never backwards)."""
        self.now = max(self.now, t)

    @property
    def elapsed(self) -> float:
        """Virtual seconds since :data:`EPOCH`."""
        return self.now - EPOCH


class SimFaultHook(FaultHook):
    """Crashes the next ``before_commit`` point of one armed endpoint, once."""

    def __init__(self) -> None:
        self.armed: str | None = None
        self.crashes = 0

    def point(self, name: str, endpoint: str) -> None:
        if name == "before_commit" and endpoint == self.armed:
            self.armed = None
            self.crashes += 1
            raise InjectedCrash(f"simulated crash before commit in {endpoint}")


@dataclass(slots=True)
class InFlight:
    """One copy of a published message on its way to ``endpoint``."""

    seq: int
    endpoint: str
    message_id: str
    kind: MessageKind
    body: str
    deliveries: int = 0
    not_before: float = 0.0

    @property
    def address(self) -> str:
        """How a schedule names this copy: its message id, plus the endpoint for an event.

        A relay fans an event out as one copy per subscriber, all under the event's
        message id; each copy is delivered, duplicated, delayed or dropped on its own.
        """
        if self.kind is MessageKind.EVENT:
            return f"{self.message_id}@{self.endpoint}"
        return self.message_id


class SimNetwork:
    """An in-memory :class:`~sagakit.transports.base.Transport` the scheduler drives.

    :meth:`publish` only records messages as in flight; nothing is delivered until the
    scheduler says so. ``publish_fault`` (``"publish_lost"`` or ``"ack_lost"``) makes the
    next publish fail before or after the messages arrive.
    """

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.handlers: dict[str, BatchHandler] = {}
        self.in_flight: dict[int, InFlight] = {}
        self.partitions: dict[str, float] = {}
        self.dropped: set[str] = set()
        self.delivered = 0
        self.publish_fault: str | None = None
        self._seq = 0

    # -- Transport ----------------------------------------------------------------------
    async def open(self) -> None:
        """Nothing to connect to."""

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        fault, self.publish_fault = self.publish_fault, None
        if fault == "publish_lost":
            raise TransportError("simulated: publish lost")
        bad = [
            (e.message_id, e.destination) for e in envelopes if e.destination not in self.handlers
        ]
        for env in envelopes:
            if env.destination in self.handlers:
                self.add(env.destination, env.message_id, env.kind, env.to_json())
        if bad:
            raise UnroutableMessage(f"no route for {len(bad)} message(s)", bad)
        if fault == "ack_lost":
            raise TransportError("simulated: publish acknowledgement lost")

    def subscribe(
        self, endpoint: str, handler: BatchHandler, *, batch_size: int = 256, concurrency: int = 1
    ) -> None:
        """Register ``handler``; the scheduler picks every batch (and its size), one at a
        time, so ``batch_size`` and ``concurrency`` do not apply."""
        self.handlers[endpoint] = handler

    async def start(self) -> None:
        """Nothing to start: the scheduler delivers."""

    async def close(self) -> None:
        """Nothing to stop."""

    # -- what the scheduler uses ------------------------------------------------------------
    def add(self, endpoint: str, message_id: str, kind: MessageKind, body: str) -> InFlight:
        """Put one copy of a message in flight."""
        self._seq += 1
        item = InFlight(self._seq, endpoint, message_id, kind, body)
        self.in_flight[item.seq] = item
        return item

    def ready(self, item: InFlight) -> bool:
        """True when ``item`` may be delivered now (not delayed, endpoint reachable)."""
        now = self.clock.now
        return item.not_before <= now and self.partitions.get(item.endpoint, 0.0) <= now

    def deliverable(self) -> list[InFlight]:
        """Messages that may be delivered now, oldest first."""
        now = self.clock.now
        if self.partitions:
            self.partitions = {e: t for e, t in self.partitions.items() if t > now}
        if not self.partitions and all(m.not_before <= now for m in self.in_flight.values()):
            return list(self.in_flight.values())
        return [m for m in self.in_flight.values() if self.ready(m)]

    def find(self, addresses: Sequence[str]) -> list[InFlight] | None:
        """The oldest deliverable copies at ``addresses`` (one each; see
        :attr:`InFlight.address`), or None if any is gone."""
        out: list[InFlight] = []
        taken: set[int] = set()
        for address in addresses:
            item = next(
                (
                    m
                    for m in self.in_flight.values()
                    if m.address == address and m.seq not in taken and self.ready(m)
                ),
                None,
            )
            if item is None or (out and item.endpoint != out[0].endpoint):
                return None
            taken.add(item.seq)
            out.append(item)
        return out

    def next_release(self) -> float | None:
        """When the next held-back message becomes deliverable."""
        times = [
            max(m.not_before, self.partitions.get(m.endpoint, 0.0))
            for m in self.in_flight.values()
            if not self.ready(m)
        ]
        return min(times) if times else None

    async def deliver(self, items: Sequence[InFlight], *, keep: bool = False) -> None:
        """Hand ``items`` to their consumer as one batch; settle them as it says.

        An acknowledged item leaves the network; one the consumer asks to have again
        stays, hidden for the delay it asked for. With ``keep`` the acknowledgements
        are lost: every item stays in flight and is delivered again later.
        """
        handler = self.handlers[items[0].endpoint]
        for m in items:
            m.deliveries += 1
        self.delivered += len(items)
        settles = await handler([Delivery(m.seq, m.body, m.deliveries) for m in items])
        for m, s in zip(items, settles, strict=True):
            if not s.ack:
                m.not_before = max(m.not_before, self.clock.now + s.delay)
            elif not keep:
                del self.in_flight[m.seq]

    def drop(self, item: InFlight) -> None:
        """Lose ``item`` (remembered by address: a drop the system must recover from)."""
        del self.in_flight[item.seq]
        self.dropped.add(item.address)
