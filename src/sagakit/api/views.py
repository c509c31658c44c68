"""JSON views of sagas, orders and manual cases, built from the engine's own records.

An order's status is derived from committed history rows only: each row carries the
status label the saga showed after that transition, so the list of distinct labels,
in the order they were written, is exactly what a user could have seen, never ahead of
the truth, and a later read only ever extends it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagakit.core.definition import SagaDefinition
from sagakit.core.envelope import Envelope
from sagakit.core.instance import MANUAL_STATES, HistoryEntry, SagaInstance, SagaState
from sagakit.runtime.engine import Engine
from sagakit.runtime.tracker import TrackedFlow

"""The manual queue: what ``GET /manual-cases`` lists."""


def definition_of(engine: Engine, inst: SagaInstance) -> SagaDefinition | None:
    """The definition version ``inst`` runs, if this engine has it."""
    machine = engine.orchestrator.machines.get((inst.definition, inst.definition_version))
    return None if machine is None else machine.definition


def flow_of(engine: Engine, inst: SagaInstance) -> TrackedFlow | None:
    """The choreography whose view ``inst`` is (None: an orchestrated saga)."""
    if definition_of(engine, inst) is not None:
        return None
    tracker = engine.trackers.get(inst.definition)
    return None if tracker is None else tracker.flow


def step_name(engine: Engine, inst: SagaInstance) -> str | None:
    """The name of the step at the saga's cursor (its current or last step).

    A choreography's view has no cursor: its step is the one of the last fact heard.
    """
    d = definition_of(engine, inst)
    if d is None:
        flow = flow_of(engine, inst)
        last = inst.data.get("last") if flow is not None else None
        fact = flow.facts.get(last) if flow is not None and isinstance(last, str) else None
        return None if fact is None else fact.step
    if not 0 <= inst.cursor < len(d.steps):
        return None
    return d.steps[inst.cursor].name


def step_positions(engine: Engine, step: str) -> tuple[tuple[str, int, int], ...]:
    """Where a step named ``step`` sits: ``(definition, version, cursor)`` in every
    definition version this engine knows (what :func:`step_name` inverts)."""
    return tuple(
        (name, version, index)
        for (name, version), machine in sorted(engine.orchestrator.machines.items())
        for index, spec in enumerate(machine.definition.steps)
        if spec.name == step
    )


def _next_retry(inst: SagaInstance) -> float | None:
    due = [s.next_retry_at for s in inst.steps if s.next_retry_at is not None]
    return min(due) if due else None


def _last_error(inst: SagaInstance) -> str | None:
    if inst.reason:
        return inst.reason
    finished = [s for s in inst.steps if s.error]
    if not finished:
        return None
    return max(finished, key=lambda s: s.finished_at or s.started_at or 0.0).error


def saga_summary(engine: Engine, inst: SagaInstance, now: float) -> dict[str, Any]:
    """One saga as a row of a list."""
    return {
        "saga_id": inst.saga_id,
        "definition": inst.definition,
        "definition_version": inst.definition_version,
        "business_key": inst.business_key,
        "state": inst.state.value,
        "status": inst.status,
        "current_step": step_name(engine, inst),
        "version": inst.version,
        "created_at": inst.created_at,
        "updated_at": inst.updated_at,
        "age_s": round(max(now - inst.created_at, 0.0), 3),
        "reason": inst.reason,
        # False for a choreography's view: no retry, compensate or cancel applies to it.
        "driven": flow_of(engine, inst) is None,
    }


def manual_case(engine: Engine, inst: SagaInstance, now: float) -> dict[str, Any]:
    """One saga of the manual queue: why it is there and for how long."""
    return {
        **saga_summary(engine, inst, now),
        "waiting_s": round(max(now - inst.updated_at, 0.0), 3),
    }


def saga_detail(
    engine: Engine,
    inst: SagaInstance,
    history: Sequence[HistoryEntry],
    outbox: Sequence[tuple[Envelope, float | None]],
    now: float,
    *,
    waiting_for: str | None = None,
) -> dict[str, Any]:
    """Everything about one saga: steps, history, and the messages it sent and received.

    ``waiting_for``: the ``name@N`` its inputs are set aside for (no process that got
    them has that definition version; see :mod:`sagakit.runtime.set_aside`), or None.
    """
    d = definition_of(engine, inst)
    flow = flow_of(engine, inst)
    steps = []
    for i, st in enumerate(inst.steps):
        spec = d.steps[i] if d is not None and i < len(d.steps) else None
        name = flow.steps[i] if flow is not None and i < len(flow.steps) else f"step-{i}"
        steps.append(
            {
                "index": i,
                "name": spec.name if spec else name,
                "kind": spec.kind.value if spec else None,
                **st.to_dict(),
            }
        )
    sent = [
        {
            "message_id": env.message_id,
            "type": env.type,
            "kind": env.kind.value,
            "destination": env.destination,
            "step": env.step,
            "attempt": env.attempt,
            "fence": env.fence,
            "idempotency_key": env.idempotency_key,
            "occurred_at": env.occurred_at,
            "published_at": published,
        }
        for env, published in outbox
        if env.saga_id == inst.saga_id
    ]
    # One entry per message that moved the saga, with the history events it caused.
    received: dict[str, dict[str, Any]] = {}
    for h in history:
        if h.message_id is None:
            continue
        entry = received.setdefault(
            h.message_id,
            {
                "message_id": h.message_id,
                "step": h.step,
                "at": h.at,
                "version": h.version,
                "events": [],
            },
        )
        entry["events"].append(h.event)
    return {
        **saga_summary(engine, inst, now),
        "correlation_id": inst.correlation_id,
        "deadline_at": inst.deadline_at,
        "cancel_requested": inst.cancel_requested,
        "timed_out": inst.timed_out,
        "terminal": inst.terminal,
        "last_error": _last_error(inst),
        "next_retry_at": _next_retry(inst),
        "waiting_for": waiting_for,
        "data": inst.data,
        "steps": steps,
        "history": [history_row(h) for h in history],
        "messages": {"sent": sent, "received": list(received.values())},
    }


def history_row(h: HistoryEntry) -> dict[str, Any]:
    """One history row, JSON-ready."""
    return {
        "version": h.version,
        "at": h.at,
        "event": h.event,
        "state": h.state.value,
        "status": h.status,
        "step": h.step,
        "detail": h.detail,
        "message_id": h.message_id,
    }


def status_path(history: Sequence[HistoryEntry]) -> list[dict[str, Any]]:
    """The statuses a user saw, oldest first, each with when it was first shown."""
    path: list[dict[str, Any]] = []
    for h in history:
        if not path or path[-1]["status"] != h.status:
            path.append({"status": h.status, "at": h.at})
    return path


def order_final(state: SagaState) -> bool:
    """Whether an order whose saga is in ``state`` is final: nothing can move it on.

    A saga in FAILED_NEEDS_MANUAL (the customer sees NEEDS_ATTENTION) stopped on its
    own, but a person's decision moves it on (to COMPLETED, CANCELLED, ...): it is in
    :data:`~sagakit.core.instance.MANUAL_STATES`, the states manual actions apply to,
    so it is not final. Every other terminal state is.
    """
    return state.terminal and state not in MANUAL_STATES


def order_view(order_id: str, saga_id: str, history: Sequence[HistoryEntry]) -> dict[str, Any]:
    """An order as its customer sees it: the current status and the ones before.

    ``terminal`` is true only once the order is final (:func:`order_final`).
    """
    path = status_path(history)
    last = history[-1] if history else None
    return {
        "order_id": order_id,
        "saga_id": saga_id,
        "status": path[-1]["status"] if path else None,
        "terminal": last is not None and order_final(last.state),
        "updated_at": last.at if last else None,
        "history": path,
    }
