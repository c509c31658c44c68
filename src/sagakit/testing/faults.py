"""Fault injection for the real runtime: lost, duplicated, delayed and reordered
messages, and crashes between commit and acknowledgement or publish and mark.

Faults are injected where they happen in production, so the runtime's own recovery
(outbox re-publish, inbox dedup, lease expiry, step timeouts with the same idempotency
key) is what repairs them:

* ``publish_lost``: the transport does not acknowledge a publish; nothing arrived.
* ``ack_lost``: the publish arrived but its acknowledgement was lost: it is re-published.
* ``delay`` / ``long_delay``: a delivery is postponed (which also reorders it); a long
  delay outlasts a step's timeout, so the orchestrator retries with the same key.
* ``duplicate``: the consumer committed but its acknowledgement was lost: redelivered.
* ``crash_before_commit``: a consumer dies inside its transaction: rolled back, redelivered.
* ``crash_after_publish``: a relay dies between publish and mark: re-published.

The schedule is drawn from one seeded generator, so a seed reproduces it.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from sagakit.core.envelope import Envelope
from sagakit.errors import TransportError
from sagakit.runtime.consumer import FaultHook
from sagakit.transports.base import BatchHandler, Delivery, Settle, Transport, retry


class InjectedCrash(Exception):
    """A crash injected on purpose (the component restarts from what was committed)."""


@dataclass
class FaultProfile:
    """Probabilities of each fault (0..1) and delay bounds in seconds."""

    publish_lost: float = 0.0
    ack_lost: float = 0.0
    delay: float = 0.0
    max_delay: float = 0.3
    long_delay: float = 0.0
    long_delay_s: float = 2.5
    duplicate: float = 0.0
    crash_before_commit: float = 0.0
    crash_after_publish: float = 0.0


PROFILES: dict[str, FaultProfile] = {
    "none": FaultProfile(),
    "default": FaultProfile(
        publish_lost=0.02,
        ack_lost=0.02,
        delay=0.05,
        duplicate=0.03,
        crash_before_commit=0.01,
        crash_after_publish=0.02,
    ),
    "chaos": FaultProfile(
        publish_lost=0.05,
        ack_lost=0.05,
        delay=0.15,
        max_delay=0.5,
        long_delay=0.05,
        duplicate=0.08,
        crash_before_commit=0.03,
        crash_after_publish=0.05,
    ),
}


@dataclass
class Faults(FaultHook):
    """A seeded fault schedule; pass it as ``Engine(..., faults=Faults(...))``."""

    profile: FaultProfile = field(default_factory=FaultProfile)
    seed: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @classmethod
    def named(cls, name: str, seed: int = 0) -> Faults:
        """A schedule from a named profile: ``none``, ``default`` or ``chaos``."""
        try:
            return cls(PROFILES[name], seed)
        except KeyError:
            raise ValueError(
                f"unknown fault profile {name!r}; choose from {sorted(PROFILES)}"
            ) from None

    def _hit(self, p: float, kind: str) -> bool:
        if p > 0 and self._rng.random() < p:
            self.counts[kind] += 1
            return True
        return False

    def point(self, name: str, endpoint: str) -> None:
        """Crash at a named point of a consumer or relay."""
        p = {
            "before_commit": self.profile.crash_before_commit,
            "after_publish": self.profile.crash_after_publish,
        }.get(name, 0.0)
        if self._hit(p, f"crash_{name}"):
            raise InjectedCrash(f"injected crash {name} in {endpoint}")

    def wrap_transport(self, transport: Transport) -> Transport:
        """A transport that loses publishes and acknowledgements."""
        return _FaultyTransport(transport, self)

    def wrap_consumer(self, endpoint: str, handler: BatchHandler) -> BatchHandler:
        """A consumer that sees delayed, reordered and redelivered messages."""

        async def faulty(deliveries: Sequence[Delivery]) -> list[Settle]:
            out: dict[int, Settle] = {}
            now_batch: list[Delivery] = []
            for d in deliveries:
                if self._hit(self.profile.long_delay, "long_delay"):
                    out[d.handle] = retry(
                        self.profile.long_delay_s * (1 + self._rng.random()), "injected long delay"
                    )
                elif self._hit(self.profile.delay, "delay"):
                    out[d.handle] = retry(
                        self.profile.max_delay * self._rng.random(), "injected delay"
                    )
                else:
                    now_batch.append(d)
            if now_batch:
                settles = await handler(now_batch)
                for d, s in zip(now_batch, settles, strict=True):
                    if s.ack and self._hit(self.profile.duplicate, "duplicate"):
                        s = retry(0.0, "injected: ack lost after commit")
                    out[d.handle] = s
            return [out[d.handle] for d in deliveries]

        return faulty


class _FaultyTransport:
    def __init__(self, inner: Transport, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults

    async def open(self) -> None:
        await self.inner.open()

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if self.faults._hit(self.faults.profile.publish_lost, "publish_lost"):
            raise TransportError("injected: publish lost, not acknowledged")
        await self.inner.publish(envelopes)
        if self.faults._hit(self.faults.profile.ack_lost, "ack_lost"):
            raise TransportError("injected: publish acknowledgement lost")

    def subscribe(
        self, endpoint: str, handler: BatchHandler, *, batch_size: int = 256, concurrency: int = 1
    ) -> None:
        self.inner.subscribe(endpoint, handler, batch_size=batch_size, concurrency=concurrency)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()
