"""Invariant checks the simulator adds: "nothing lost", knowing what the network dropped;
no dead letters; compensations in reverse order of the steps they undo; stale inputs
(answers and timers for tries the saga no longer waits on) move nothing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sagakit.core.envelope import Envelope, MessageKind, Outcome
from sagakit.core.instance import HistoryEntry
from sagakit.core.machine import parse_key
from sagakit.errors import MessageError
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


async def _replies(store: Store, endpoint: str) -> list[Envelope]:
    """The replies to ``endpoint`` in ``store``'s outbox (SQLite: only those parsed)."""
    if isinstance(store, SQLiteStore):
        async with store.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT body FROM outbox WHERE destination = ? ORDER BY id", (endpoint,)
            )
        envelopes = [Envelope.from_json(r[0]) for r in rows]
    else:
        envelopes = [e for e, _ in await store.outbox_all() if e.destination == endpoint]
    return [e for e in envelopes if e.kind is MessageKind.REPLY]


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


COMPENSATION_EVENTS = frozenset(
    {
        "compensation.sent",
        "compensation.succeeded",
        "compensation.failed",
        "compensation.escalated",
        "compensation.timed_out",
    }
)
"""History events that act on a step's compensation (the step is the one undone)."""

UNDOING_DECISIONS = frozenset({"mark_compensated", "use_rung"})
"""A person's decisions that undo the stuck step (a retry is followed by a send)."""


def compensation_order(entries: Iterable[HistoryEntry], steps: Sequence[str]) -> list[str]:
    """Violations of "compensations run in reverse order of the steps they undo" in one
    saga's history (``steps``: its definition's step names, in order).

    Once the compensation of step ``j`` was sent (or a person marked it compensated, or
    chose one of its rungs), no compensation of a later step ``i > j`` may follow: that
    step's effect would outlive the undo of an effect it was built on (stock released
    while its shipment still exists, money returned before the goods are).
    """
    index = {name: i for i, name in enumerate(steps)}
    lowest: tuple[int, str] | None = None
    for e in entries:
        undoing = e.event in COMPENSATION_EVENTS or (
            e.event == "manual.resolved" and e.detail.get("action") in UNDOING_DECISIONS
        )
        if not undoing or e.step not in index:
            continue
        i = index[e.step]
        if lowest is not None and i > lowest[0]:
            # The first one says it; the rest of the saga's undo follows from it.
            return [
                f"compensation_order: saga {e.saga_id}: {e.event} of step {e.step!r} "
                f"(version {e.version}) after the compensation of the earlier step "
                f"{lowest[1]!r}"
            ]
        lowest = (i, e.step)
    return []


@dataclass(frozen=True, slots=True)
class Answer:
    """What the orchestrator was told by one reply: which try of which step, and how
    it went (read from the reply as its participant wrote it to its outbox)."""

    step: str
    phase: str
    rung: int
    attempt: int
    fence: int
    ok: bool


async def answers(stores: Iterable[Store], endpoint: str) -> dict[str, Answer]:
    """Every reply to ``endpoint`` in the outboxes of ``stores``, by message id."""
    out: dict[str, Answer] = {}
    for store in {id(s): s for s in stores}.values():
        for env in await _replies(store, endpoint):
            try:
                key = parse_key(env.idempotency_key or "")
            except MessageError:
                continue  # not a step's answer (no such replies in the checkout)
            ok = Outcome.from_payload(env.payload).ok
            out[env.message_id] = Answer(key.step, key.phase, key.rung, env.attempt, env.fence, ok)
    return out


def stale_inputs(entries: Iterable[HistoryEntry], replies: Mapping[str, Answer]) -> list[str]:
    """Violations, in one saga's history, of "an input for a try the saga no longer waits
    on is recorded and moves nothing" (the machine's first rule).

    Read from the history and the replies themselves, not from the machine's state:

    * an answer to a try sent before a person decided on its step (its fence is below
      the version of the ``manual.resolved`` row) moves nothing;
    * a failure moves the saga only if it answers the try in flight: the current attempt
      of the action, or of the compensation's current rung (a success of any try of an
      action counts: every try shares one idempotency key, so they report one effect);
    * a step's action times out only while that very attempt is in flight (not while
      the step waits to retry, nor while its outcome is being asked about).
    """
    problems: list[str] = []
    floor: dict[str, int] = {}
    attempt: dict[str, int] = {}
    comp: dict[str, tuple[int, int]] = {}
    phase: dict[str, tuple[str, int]] = {}
    seen: set[tuple[str, int]] = set()
    for e in entries:
        answer = replies.get(e.message_id or "")
        if (
            answer is not None
            and e.event != "reply.stale"
            and (e.message_id, e.version) not in seen
        ):
            seen.add((e.message_id or "", e.version))
            what = (
                f"stale_inputs: saga {e.saga_id}: {'a success' if answer.ok else 'a failure'} "
                f"of try {answer.attempt} of {answer.step!r} ({answer.phase}"
                + (f", rung {answer.rung}" if answer.phase == "comp" else "")
                + f", fence {answer.fence}) moved the saga (version {e.version}, {e.event})"
            )
            if answer.fence < floor.get(answer.step, 0):
                problems.append(f"{what}, although a person decided on the step since")
            elif (
                not answer.ok
                and answer.phase == "action"
                and answer.attempt != attempt.get(answer.step)
            ):
                problems.append(f"{what} while try {attempt.get(answer.step)} was in flight")
            elif (
                not answer.ok
                and answer.phase == "comp"
                and (answer.rung, answer.attempt) != comp.get(answer.step)
            ):
                rung, n = comp.get(answer.step, (None, None))
                problems.append(f"{what} while try {n} of rung {rung} was in flight")
        step = e.step
        if step is None:
            continue
        if e.event == "manual.resolved":
            floor[step] = e.version
        elif e.event == "step.started":
            attempt[step] = int(e.detail.get("attempt", 0))
            phase[step] = ("running", attempt[step])
        elif e.event == "compensation.sent":
            comp[step] = (int(e.detail.get("rung", 0)), int(e.detail.get("attempt", 0)))
        elif e.event == "retry.scheduled" and e.detail.get("phase") == "action":
            phase[step] = ("waiting", int(e.detail.get("attempt", 0)))
        elif e.event in ("outcome.unknown", "status.queried"):
            phase[step] = ("querying", 0)
        elif e.event == "step.timed_out":
            n = int(e.detail.get("attempt", 0))
            if phase.get(step) != ("running", n):
                state, m = phase.get(step, ("not started", 0))
                problems.append(
                    f"stale_inputs: saga {e.saga_id}: try {n} of {step!r} timed out "
                    f"(version {e.version}) while the step was {state}"
                    + (f" (try {m})" if m else "")
                )
            phase[step] = ("timed out", n)
    return problems
