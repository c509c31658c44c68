"""Invariant 6 (nothing lost) for facts: every subscriber handled each event, or parked it.

``check_invariants`` follows addressed messages (commands and replies) from outbox to
inbox. An event has no single destination: the relay fans it out to every endpoint
subscribed to its type. Here each event of every outbox is followed to each
subscriber's inbox (or its dead letters), and an event nobody subscribes to must be
parked by its producer's relay with that reason. Stores the main check does not know
(the tracker's, the shipping domain's) are checked for unpublished rows and waiting
mailboxes too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sagakit import MessageKind

from .invariants import InvariantReport


async def check_event_delivery(
    report: InvariantReport,
    endpoints: Mapping[str, Any],
    event_routes: Mapping[str, Sequence[str]],
) -> None:
    """Add ``nothing_lost`` violations for events to ``report``.

    ``endpoints`` maps every endpoint name to its store; ``event_routes`` is the
    engine's fan-out table (event type -> subscribed endpoints).
    """
    stores = list({id(s): s for s in endpoints.values()}.values())
    dead: dict[int, set[str]] = {}
    for s in stores:
        dead[id(s)] = {d.message_id for d in await s.dead_letters() if d.message_id}
    inboxes: dict[str, set[str]] = {}
    for s in stores:
        for env, published_at in await s.outbox_all():
            if env.kind is not MessageKind.EVENT or env.destination is not None:
                continue
            what = f"event {env.message_id} ({env.type}) from {s.name}"
            if published_at is None:
                report.fail("nothing_lost", f"{what} was never published")
                continue
            subscribers = event_routes.get(env.type, ())
            if not subscribers and env.message_id not in dead[id(s)]:
                report.fail("nothing_lost", f"{what}: nobody subscribes and it was not parked")
            for endpoint in subscribers:
                target = endpoints.get(endpoint)
                if target is None:
                    report.fail("nothing_lost", f"{what}: subscriber {endpoint} has no store")
                    continue
                if endpoint not in inboxes:
                    inboxes[endpoint] = await target.inbox_ids(endpoint)
                if any(
                    env.message_id in ids
                    for ids in (inboxes[endpoint], dead[id(target)], dead[id(s)])
                ):
                    continue
                if not report.held_by_broker(env.message_id, endpoint, f"{what} to {endpoint}"):
                    report.fail(
                        "nothing_lost",
                        f"{what} was neither handled nor parked by subscriber {endpoint}, "
                        "nor held by the broker",
                    )
        pending = await s.outbox_pending()
        if pending:
            report.fail("nothing_lost", f"store {s.name}: {pending} outbox rows never published")
        depth = await s.queue_depth()
        if depth:
            report.fail("nothing_lost", f"store {s.name}: {depth} messages wait in its mailboxes")


async def message_counts(stores: Sequence[Any], endpoints: Mapping[str, Any]) -> dict[str, Any]:
    """How many messages a run wrote (by kind) and handled (by endpoint)."""
    written: dict[str, int] = {}
    for s in {id(s): s for s in stores}.values():
        for env, _ in await s.outbox_all():
            written[env.kind.value] = written.get(env.kind.value, 0) + 1
    handled = {e: len(await store.inbox_ids(e)) for e, store in sorted(endpoints.items())}
    return {"written": dict(sorted(written.items())), "handled": handled}
