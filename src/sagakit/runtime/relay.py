"""The outbox relay: publishes committed outbox rows and marks them only once acknowledged.

A crash between publish and mark means the rows are published again after their claim
lease runs out: duplicates are allowed, losses are not. A store that can lock the batch
in the transaction that marks it (PostgreSQL's ``outbox_locked``) is relayed that way
when the transport publishes to a broker (``publishes_to_broker``): one commit per
batch, and a relay that dies mid-publish frees its rows at once. The server ends a
transaction left idle for the lease (a stopped relay), so a publish must fit in the
lease: one that does not is abandoned (its copies may arrive: duplicates only), and the
relay claims and marks instead for :data:`SLOW_BROKER_PAUSE` seconds -- else a broker
whose confirms take longer than the lease would get the same batch forever while the
rows are never marked. Rows the
transport cannot route are parked in the producer's dead-letter table with the reason,
never dropped.

Events (facts, no destination) are fanned out here: one addressed copy per endpoint
that subscribes to the event's type, all with the event's message id (each consumer's
inbox deduplicates on its own). An event nobody subscribes to is parked with that
reason: a fact nobody hears is a flow bug to see, not to lose.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from sagakit.core.envelope import Envelope, MessageKind
from sagakit.errors import TransportError, UnroutableMessage
from sagakit.runtime.consumer import FaultHook
from sagakit.stores.base import OutboxRow, Store
from sagakit.transports.base import Transport

log = logging.getLogger(__name__)

SLOW_BROKER_PAUSE = 30.0
"""Seconds a relay claims and marks after a publish did not fit in its locked batch."""
LOCK_SHARE = 0.6
"""The share of the lease a locked batch's publish may take; the rest is for the mark
and the commit before the server's idle-in-transaction timeout (the lease) ends it."""


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
        event_routes: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.clock = clock
        self.batch_size = batch_size
        self.lease = lease
        self.faults = faults or FaultHook()
        self.event_routes = {k: tuple(v) for k, v in (event_routes or {}).items()}
        self.published = 0
        self._claim_until = 0.0  # monotonic time until which locked batches are off
        # The batch is locked in the store transaction that marks it only with a broker
        # transport: the embedded one publishes into stores' mailboxes, maybe this very
        # store, which must not happen inside this store's transaction.
        self._locked: _LockBatch | None = (
            getattr(store, "outbox_locked", None)
            if getattr(transport, "publishes_to_broker", False)
            else None
        )

    async def relay_once(self) -> int:
        """Publish one batch; return how many rows were marked published (or parked)."""
        if self._locked is not None and time.monotonic() >= self._claim_until:
            return await self._relay_locked(self._locked)
        now = self.clock()
        rows = await self.store.outbox_claim(self.batch_size, now, self.lease)
        if not rows:
            return 0
        parked = await self._publish(rows)
        if parked is None:
            return 0  # left claimed: retried when the lease ends
        if parked:
            async with self.store.transaction() as tx:
                for env, reason in parked:
                    await tx.dead_letter(
                        env.destination or "", env.message_id, env.to_json(), reason, now
                    )
        self.faults.point("after_publish", self.store.name)
        await self.store.outbox_mark_published([r.id for r in rows], self.clock())
        self.published += len(rows)
        return len(rows)

    async def _relay_locked(self, locked: _LockBatch) -> int:
        """The same with a store that locks the batch in the transaction that marks it
        (PostgreSQL): one commit per batch instead of a claim and a mark."""
        now = self.clock()
        batch: _LockedBatch
        try:
            async with locked(self.batch_size, now, self.lease) as batch:
                if not batch.rows:
                    return 0
                try:
                    parked = await asyncio.wait_for(
                        self._publish(batch.rows), self.lease * LOCK_SHARE
                    )
                except TimeoutError:
                    self._claim_until = time.monotonic() + SLOW_BROKER_PAUSE
                    log.warning(
                        "publishing %d rows of %s took over %.2fs, longer than its locked "
                        "batch may stay open; claiming and marking for %.0fs instead",
                        len(batch.rows),
                        self.store.name,
                        self.lease * LOCK_SHARE,
                        SLOW_BROKER_PAUSE,
                    )
                    raise _NotAcknowledged from None
                if parked is None:
                    raise _NotAcknowledged
                for env, reason in parked:
                    await batch.dead_letter(
                        env.destination or "", env.message_id, env.to_json(), reason, now
                    )
                self.faults.point("after_publish", self.store.name)
                await batch.mark_published([r.id for r in batch.rows], self.clock())
        except _NotAcknowledged:
            return 0  # rolled back: the rows are free for the next attempt
        self.published += len(batch.rows)
        return len(batch.rows)

    async def _publish(self, rows: Sequence[OutboxRow]) -> list[tuple[Envelope, str]] | None:
        """Publish ``rows``; return the copies to park with their reasons, or ``None`` if
        the transport did not acknowledge (nothing may be marked then)."""
        envelopes: list[Envelope] = []
        unheard: list[Envelope] = []
        for r in rows:
            env = r.envelope
            if env.destination is None and env.kind is MessageKind.EVENT:
                subscribers = self.event_routes.get(env.type, ())
                if not subscribers:
                    unheard.append(env)
                envelopes.extend(env.with_changes(destination=e) for e in subscribers)
            else:
                envelopes.append(env)
        parked: list[tuple[Envelope, str]] = [
            (e, f"no endpoint subscribes to event {e.type!r}") for e in unheard
        ]
        try:
            await self.transport.publish(envelopes)
        except UnroutableMessage as exc:
            # By copy, not by id: the other copies of a fanned-out event were published.
            bad = set(exc.copies)
            parked += [
                (e, f"unroutable: {exc}") for e in envelopes if (e.message_id, e.destination) in bad
            ]
        except TransportError as exc:
            log.warning("publish of %d messages failed: %s", len(rows), exc)
            return None
        return parked


class _NotAcknowledged(Exception):
    """Leaves a locked batch unmarked (its transaction rolls back)."""


class _LockedBatch(Protocol):
    rows: list[OutboxRow]

    async def mark_published(self, ids: Sequence[int], now: float) -> None: ...

    async def dead_letter(
        self, endpoint: str, message_id: str | None, body: str, reason: str, now: float
    ) -> None: ...


_LockBatch = Callable[[int, float, float], AbstractAsyncContextManager[_LockedBatch]]
"""``PostgresStore.outbox_locked``: (limit, now, lease) -> the locked batch."""
