"""What the participant runtime let through, recorded beside each handler run.

The checkout's ledgers show the effects its business code let through; they would hide
a runtime that forgot its idempotency records (the handlers look at their ledgers first).
So the simulator wraps every handler of a service participant to record, in the handler's
own transaction, each keyed command it carried out (table ``sim_handler_runs``), and then
checks what the runtime promises: each key's handler succeeds at most once, never after
its compensation ran, and no compensation runs for an action that failed for good.
"""

from __future__ import annotations

import inspect

from sagakit.core.envelope import Envelope, MessageKind, Outcome
from sagakit.runtime.participant import DEFER, Handler, HandlerResult, Participant
from sagakit.stores.base import Tx


def record_runs(participant: Participant) -> None:
    """Wrap every handler to record each keyed command it carried out, in its transaction.

    A rolled-back attempt leaves no row; a failure (raised or returned) is no effect.
    What the rows must show, whatever the business code does on its own: each key's
    handler succeeded at most once, and never after a compensation of that key ran.
    """
    # The runtime offers no hook around handlers; the table of handlers is private to
    # Participant, but this module belongs to the engine.
    handlers = participant._handlers
    for message_type, handler in list(handlers.items()):
        handlers[message_type] = _recording(handler)


def _recording(handler: Handler) -> Handler:
    async def run(tx: Tx, env: Envelope) -> HandlerResult:
        result = handler(tx, env)
        if inspect.isawaitable(result):
            result = await result
        # A failure is no effect; a deferred command has had none yet (it is answered
        # later, and a retry while it waits defers again).
        failed = (isinstance(result, Outcome) and not result.ok) or result is DEFER
        if env.kind is not MessageKind.QUERY and env.idempotency_key and not failed:
            await tx.execute(
                "INSERT INTO sim_handler_runs (key, compensates, type) VALUES (?, ?, ?)",
                (env.idempotency_key, env.compensates, env.type),
            )
        return result

    return run


async def handler_runs(participant: Participant) -> list[str]:
    """Violations of "each key's effect once, never after its undo" in one participant."""
    async with participant.store.transaction() as tx:
        rows = await tx.fetchall(
            "SELECT id, key, compensates, type FROM sim_handler_runs ORDER BY id"
        )
    problems: list[str] = []
    runs: dict[str, list[str]] = {}
    undone: dict[str, str] = {}
    for _, key, compensates, mtype in rows:
        runs.setdefault(key, []).append(mtype)
        if compensates is not None:
            undone.setdefault(compensates, mtype)
        elif key in undone:
            problems.append(
                f"effect_once: {participant.name} carried out {mtype} (key {key}) after "
                f"its compensation {undone[key]} had run"
            )
    for key, types in runs.items():
        if len(types) > 1:
            problems.append(
                f"effect_once: {participant.name} carried out {types[0]} (key {key}) "
                f"{len(types)} times"
            )
    # The runtime promises not to call a compensation handler for an action that failed
    # for good: it had no effect, so there is nothing to undo (handlers may assume it).
    async with participant.store.transaction() as tx:
        for action, mtype in undone.items():
            if await _failed_for_good(tx, participant.name, action):
                problems.append(
                    f"effect_once: {participant.name} ran the compensation {mtype} of "
                    f"{action}, whose action had failed for good (nothing to undo)"
                )
    return problems


async def _failed_for_good(tx: Tx, consumer: str, action: str) -> bool:
    """True when ``action``'s recorded outcome is a definite failure and no retry by a
    person (``action#mN``, see Participant) later succeeded."""
    first = await tx.idempotency_get(consumer, action)
    if first is None or first.tombstone or first.outcome.get("ok"):
        return False
    n = 1
    while (retried := await tx.idempotency_get(consumer, f"{action}#m{n}")) is not None:
        if retried.outcome.get("ok"):
            return False
        n += 1
    return True
