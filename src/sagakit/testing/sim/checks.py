"""Invariant checks the simulator adds: "nothing lost", knowing what the network dropped."""

from __future__ import annotations

from collections.abc import Mapping

from sagakit.stores.base import Store
from sagakit.stores.sqlite import SQLiteStore
from sagakit.testing.sim.network import SimNetwork


async def nothing_lost(routes: Mapping[str, Store], network: SimNetwork) -> list[str]:
    """DESIGN's "nothing lost", where the simulator's own drops count as accounted for.

    Every outbox row must be published, and then processed by its destination's inbox,
    or dead-lettered (by the producer or the consumer), or recorded by the network as
    deliberately dropped (a fault the system had to recover from). No message may
    still be in flight.
    """
    problems: list[str] = []
    stores = list({id(s): s for s in routes.values()}.values())
    dead: dict[int, set[str]] = {}
    for s in stores:
        dead[id(s)] = {d.message_id for d in await s.dead_letters() if d.message_id}
    inboxes: dict[str, set[str]] = {}
    for s in stores:
        for message_id, destination, published_at in await _outbox_index(s):
            what = f"message {message_id} from {s.name} to {destination}"
            if published_at is None:
                problems.append(f"nothing_lost: {what} was never published")
                continue
            if destination is None or message_id in dead[id(s)]:
                continue
            target = routes.get(destination)
            if target is None:
                problems.append(f"nothing_lost: {what}: no such endpoint, not dead-lettered")
                continue
            if destination not in inboxes:
                inboxes[destination] = await target.inbox_ids(destination)
            if not (
                message_id in inboxes[destination]
                or message_id in dead[id(target)]
                or message_id in network.dropped
            ):
                problems.append(f"nothing_lost: {what} was neither processed, parked nor dropped")
    for m in network.in_flight.values():
        problems.append(f"nothing_lost: message {m.message_id} to {m.endpoint} still in flight")
    return problems


async def _outbox_index(store: Store) -> list[tuple[str, str | None, float | None]]:
    """``(message_id, destination, published_at)`` of every outbox row, oldest first."""
    if isinstance(store, SQLiteStore):
        # The same rows as outbox_all, without parsing every envelope.
        async with store.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT message_id, destination, published_at FROM outbox ORDER BY id"
            )
        return [(str(r[0]), r[1], r[2]) for r in rows]
    return [(e.message_id, e.destination, p) for e, p in await store.outbox_all()]


async def no_dead_letters(routes: Mapping[str, Store]) -> list[str]:
    """Messages parked in a dead-letter table (the simulator sends no poison messages).

    DESIGN allows a message to be parked with its reason; but the simulator only
    delivers what the system itself published, and its crash faults are too few to
    exhaust a consumer's redelivery limit, so a parked message means a handler or the
    runtime failed on a legitimate message.
    """
    problems: list[str] = []
    for s in {id(s): s for s in routes.values()}.values():
        for d in await s.dead_letters():
            problems.append(
                f"dead_letters: {d.endpoint} parked message {d.message_id}: {d.reason[:300]}"
            )
    return problems
