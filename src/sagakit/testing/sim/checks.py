"""Invariant checks the simulator adds: "nothing lost", knowing what the network dropped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sagakit.core.envelope import Envelope
from sagakit.stores.base import Store
from sagakit.stores.sqlite import SQLiteStore
from sagakit.testing.sim.network import SimNetwork


async def nothing_lost(
    routes: Mapping[str, Store],
    network: SimNetwork,
    event_routes: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """The design's "nothing lost", where the simulator's own drops count as accounted for.

    Every outbox row must be published, and then processed by its destination's inbox,
    or dead-lettered (by the producer or the consumer), or recorded by the network as
    deliberately dropped (a fault the system had to recover from). An event (no
    destination) must have reached, in the same way, every endpoint ``event_routes``
    fans it out to; one nobody subscribes to must have been parked by its producer.
    No message may still be in flight.
    """
    problems: list[str] = []
    stores = list({id(s): s for s in routes.values()}.values())
    dead: dict[int, set[str]] = {}
    for s in stores:
        dead[id(s)] = {d.message_id for d in await s.dead_letters() if d.message_id}
    inboxes: dict[str, set[str]] = {}

    async def arrived(message_id: str, destination: str, address: str) -> str | None:
        target = routes.get(destination)
        if target is None:
            return "no such endpoint, not dead-lettered"
        if destination not in inboxes:
            inboxes[destination] = await target.inbox_ids(destination)
        if (
            message_id in inboxes[destination]
            or message_id in dead[id(target)]
            or address in network.dropped
        ):
            return None
        return "neither processed, parked nor dropped"

    for s in stores:
        for message_id, destination, published_at, event in await _outbox_index(s):
            what = f"message {message_id} from {s.name} to {destination or 'subscribers'}"
            if published_at is None:
                problems.append(f"nothing_lost: {what} was never published")
                continue
            if message_id in dead[id(s)]:
                continue
            if destination is not None:
                problem = await arrived(message_id, destination, message_id)
                if problem:
                    problems.append(f"nothing_lost: {what}: {problem}")
                continue
            for endpoint in (event_routes or {}).get(event or "", ()):
                problem = await arrived(message_id, endpoint, f"{message_id}@{endpoint}")
                if problem:
                    problems.append(f"nothing_lost: event {message_id} to {endpoint}: {problem}")
    for m in network.in_flight.values():
        problems.append(f"nothing_lost: message {m.message_id} to {m.endpoint} still in flight")
    return problems


async def _outbox_index(store: Store) -> list[tuple[str, str | None, float | None, str | None]]:
    """``(message_id, destination, published_at, event type)`` of every outbox row, oldest
    first; the type only for events (rows without a destination)."""
    if isinstance(store, SQLiteStore):
        # The same rows as outbox_all, parsing only the events' envelopes.
        async with store.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT message_id, destination, published_at, "
                "CASE WHEN destination IS NULL THEN body END FROM outbox ORDER BY id"
            )
        return [
            (str(r[0]), r[1], r[2], None if r[3] is None else Envelope.from_json(r[3]).type)
            for r in rows
        ]
    return [
        (e.message_id, e.destination, p, e.type if e.destination is None else None)
        for e, p in await store.outbox_all()
    ]


async def no_dead_letters(routes: Mapping[str, Store]) -> list[str]:
    """Messages parked in a dead-letter table (the simulator sends no poison messages).

    The design allows a message to be parked with its reason; but the simulator only
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
