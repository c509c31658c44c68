"""The outbox relay: publishes committed outbox rows and marks them only once acknowledged.

A crash between publish and mark means the rows are published again after their claim
lease runs out: duplicates are allowed, losses are not. Rows the transport cannot route
are parked in the producer's dead-letter table with the reason, never dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sagakit.errors import TransportError, UnroutableMessage
from sagakit.runtime.consumer import FaultHook
from sagakit.stores.base import Store
from sagakit.transports.base import Transport

log = logging.getLogger(__name__)


class Relay:
    """Moves one store's outbox to the transport."""

    def __init__(
        self,
        store: Store,
        transport: Transport,
        *,
        clock: Callable[[], float] = time.time,
        batch_size: int = 512,
        lease: float = 5.0,
        faults: FaultHook | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.clock = clock
        self.batch_size = batch_size
        self.lease = lease
        self.faults = faults or FaultHook()
        self.published = 0

    async def relay_once(self) -> int:
        """Publish one batch; return how many rows were marked published (or parked)."""
        now = self.clock()
        rows = await self.store.outbox_claim(self.batch_size, now, self.lease)
        if not rows:
            return 0
        envelopes = [r.envelope for r in rows]
        done = [r.id for r in rows]
        try:
            await self.transport.publish(envelopes)
        except UnroutableMessage as exc:
            bad = set(exc.message_ids)
            async with self.store.transaction() as tx:
                for r in rows:
                    if r.envelope.message_id in bad:
                        await tx.dead_letter(
                            r.envelope.destination or "",
                            r.envelope.message_id,
                            r.envelope.to_json(),
                            f"unroutable: {exc}",
                            now,
                        )
        except TransportError as exc:
            # Not acknowledged: leave the rows claimed; they are retried when the lease ends.
            log.warning("publish of %d messages failed: %s", len(rows), exc)
            return 0
        self.faults.point("after_publish", self.store.name)
        await self.store.outbox_mark_published(done, self.clock())
        self.published += len(done)
        return len(done)
