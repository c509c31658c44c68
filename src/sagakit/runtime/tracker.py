"""A saga view for choreographies: a passive participant that watches the facts go by.

In a choreography no one owns the saga: each service reacts to the facts of the others.
The :class:`Tracker` subscribes to every event type of a flow, follows correlation ids
(one saga view per correlation id) and causation ids (an event that arrives before its
cause is noted), and keeps, in its own store, the same :class:`SagaInstance` an
orchestrated saga has: state, user-visible status, per-step status, reason and an
append-only history. It writes through the ordinary saga table API
(``saga_insert`` / ``saga_update`` / ``history_add``, under the flow's definition name),
so ``list_sagas``, ``count_sagas``, ``history`` and the manual queue work unchanged.

It never sends a command: it only watches. Facts arrive late, twice, or out of order,
so every change is monotonic: a step's status only moves forward (a failure that
arrives after a success is recorded and ignored), the status a user sees only moves
forward, and a fact for a saga that already ended is recorded as late. A periodic
:meth:`Tracker.check_stuck` puts every saga without progress for ``sla`` seconds in
the manual queue (FAILED_NEEDS_MANUAL with the reason), because in a choreography no
timer of anyone's would notice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sagakit.core.envelope import Envelope
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState, StepState, StepStatus
from sagakit.errors import ConfigurationError
from sagakit.metrics import record_history
from sagakit.runtime.alerts import AlertWriter
from sagakit.runtime.participant import Participant
from sagakit.stores.base import Store, Tx

log = logging.getLogger(__name__)

_RANK = {
    StepStatus.PENDING: 0,
    StepStatus.RUNNING: 1,
    StepStatus.SUCCEEDED: 2,
    StepStatus.FAILED: 2,
    StepStatus.COMPENSATED: 3,
    StepStatus.COMPENSATION_FAILED: 3,
}
_PAGE = 500
# A view is escalated with "manual.escalated" alone (no "saga.finished" row follows).
_FINISHING = frozenset({"saga.finished", "manual.escalated"})


@dataclass(frozen=True, slots=True)
class Fact:
    """What one event type says about a tracked saga."""

    step: str
    outcome: StepStatus
    """SUCCEEDED or FAILED (the step's action), COMPENSATED or COMPENSATION_FAILED."""
    status: str | None = None
    """The status a user sees once this happened (forward facts)."""
    ends: SagaState | None = None
    """SUCCEEDED or COMPENSATED: this fact ends the saga."""
    manual: bool = False
    """A person must decide: the saga goes to the manual queue."""


@dataclass(frozen=True, slots=True)
class TrackedFlow:
    """The shape of a choreographed saga, for its :class:`Tracker`."""

    definition: str
    steps: tuple[str, ...]
    facts: Mapping[str, Fact]
    sla: float
    """Seconds without progress after which a saga is stuck."""
    forward: tuple[str, ...]
    """Forward statuses in the order a user may see them (``started_status`` first)."""
    version: int = 1
    completed_status: str = "COMPLETED"
    cancelling_status: str = "CANCELLING"
    cancelled_status: str = "CANCELLED"
    attention_status: str = "NEEDS_ATTENTION"
    partial_status: str = "PARTIALLY_COMPLETED"
    """Shown once a person accepted the saga as it stands (``accept_partial``)."""

    def __post_init__(self) -> None:
        if not self.sla > 0:
            raise ConfigurationError(f"flow {self.definition}: sla must be > 0 seconds")
        for name, fact in self.facts.items():
            if fact.step not in self.steps:
                raise ConfigurationError(f"fact {name}: no step {fact.step!r} in {self.steps}")
            if fact.ends not in (None, SagaState.SUCCEEDED, SagaState.COMPENSATED):
                raise ConfigurationError(f"fact {name}: ends must be SUCCEEDED or COMPENSATED")
            expected = {
                SagaState.SUCCEEDED: StepStatus.SUCCEEDED,
                SagaState.COMPENSATED: StepStatus.COMPENSATED,
            }
            if fact.ends is not None and fact.outcome is not expected[fact.ends]:
                raise ConfigurationError(
                    f"fact {name}: a saga ends SUCCEEDED on a success, COMPENSATED on an undo"
                )
            if fact.status is not None and fact.status not in self.forward:
                raise ConfigurationError(f"fact {name}: status {fact.status!r} is not forward")

    @property
    def started_status(self) -> str:
        """What a user sees before any step finished."""
        return self.forward[0]


@dataclass(slots=True)
class Observation:
    """What one event did to a saga view (``changed`` False: history only)."""

    instance: SagaInstance
    history: list[HistoryEntry]
    created: bool = False
    changed: bool = True


def observe(flow: TrackedFlow, inst: SagaInstance | None, ev: Envelope, now: float) -> Observation:
    """Apply one fact to a saga view: a pure function (no I/O)."""
    fact = flow.facts[ev.type]
    created = inst is None
    if inst is None:
        inst = SagaInstance(
            saga_id=ev.correlation_id,
            definition=flow.definition,
            definition_version=flow.version,
            business_key=ev.business_key or ev.correlation_id,
            correlation_id=ev.correlation_id,
            state=SagaState.RUNNING,
            status=flow.started_status,
            data={"facts": {}, "last": None, "finished_at": None},
            steps=[StepState() for _ in flow.steps],
            created_at=ev.occurred_at,
            updated_at=now,
            deadline_at=ev.occurred_at + flow.sla,
        )
    new = inst.copy()
    new.data = {**inst.data, "facts": dict(inst.data.get("facts", {}))}
    new.version = inst.version + 1
    new.created_at = min(inst.created_at, ev.occurred_at)  # the flow began with its first fact
    rows: list[HistoryEntry] = []

    def row(event: str, **detail: Any) -> None:
        rows.append(
            HistoryEntry(
                new.saga_id,
                new.version,
                now,
                event,
                new.state,
                new.status,
                fact.step,
                {"type": ev.type, "source": ev.source, **detail},
                ev.message_id,
            )
        )

    if created:
        row("saga.started", definition=f"{flow.definition}@{flow.version}", first=ev.type)
    facts: dict[str, str] = new.data["facts"]
    seen = set(facts.values())
    detail: dict[str, Any] = {"causation_id": ev.causation_id}
    if ev.causation_id is not None and ev.causation_id not in seen:
        detail["before_its_cause"] = True  # reordered on the way: the cause is still coming
    if ev.type in facts:
        return _unchanged(
            inst, rows, "event.duplicate", ev, fact, now, created, first=facts[ev.type]
        )
    index = flow.steps.index(fact.step)
    step = new.steps[index]
    if _RANK[fact.outcome] <= _RANK[step.status]:
        why = f"step {fact.step} is already {step.status.value}"
        return _unchanged(inst, rows, "event.ignored", ev, fact, now, created, reason=why)
    facts[ev.type] = ev.message_id
    new.data["last"] = ev.type
    step.status = fact.outcome
    step.finished_at = ev.occurred_at
    reason = ev.payload.get("reason")
    if fact.outcome in (StepStatus.FAILED, StepStatus.COMPENSATION_FAILED):
        step.error = str(reason) if reason else ev.type
    if new.terminal:
        row("event.late", **detail, reason=f"saga already {new.state.value}")
        return Observation(new, rows, created)
    new.updated_at = now
    if fact.manual or (fact.ends is SagaState.SUCCEEDED and new.state is not SagaState.RUNNING):
        new.reason = f"{ev.type} from {ev.source}" + (f": {reason}" if reason else "")
        if not fact.manual:
            new.reason = f"{ev.type} contradicts the compensation under way ({new.reason})"
        row("event.applied", **detail)
        _finish(new, flow, SagaState.FAILED_NEEDS_MANUAL, flow.attention_status, ev)
        row("manual.escalated", reason=new.reason)
        return Observation(new, rows, created)
    if fact.outcome is not StepStatus.SUCCEEDED and new.state is SagaState.RUNNING:
        new.state, new.status = SagaState.COMPENSATING, flow.cancelling_status
        new.reason = str(reason) if reason else ev.type
        row("compensation.started", **detail, reason=new.reason)
    elif (
        fact.status is not None
        and new.state is SagaState.RUNNING
        and _ahead(flow, fact.status, new.status)
    ):
        new.status = fact.status
    row("event.applied", **detail)
    if fact.ends is SagaState.SUCCEEDED:
        _finish(new, flow, SagaState.SUCCEEDED, flow.completed_status, ev)
        row("saga.finished", outcome=SagaState.SUCCEEDED.value)
    elif fact.ends is SagaState.COMPENSATED:
        # Always through CANCELLING (the branch above): a user never sees a forward
        # status followed directly by CANCELLED.
        _finish(new, flow, SagaState.COMPENSATED, flow.cancelled_status, ev)
        row("saga.finished", outcome=SagaState.COMPENSATED.value)
    return Observation(new, rows, created)


def _unchanged(
    inst: SagaInstance,
    rows: list[HistoryEntry],
    event: str,
    ev: Envelope,
    fact: Fact,
    now: float,
    created: bool,
    **detail: Any,
) -> Observation:
    """Record an event that moves nothing (a new view is still written once)."""
    version = inst.version + 1 if created else inst.version
    rows.append(
        HistoryEntry(
            inst.saga_id,
            version,
            now,
            event,
            inst.state,
            inst.status,
            fact.step,
            {"type": ev.type, "source": ev.source, **detail},
            ev.message_id,
        )
    )
    if created:
        inst.version = version
    return Observation(inst, rows, created, changed=created)


def _ahead(flow: TrackedFlow, status: str, current: str) -> bool:
    if current not in flow.forward:
        return False
    return flow.forward.index(status) > flow.forward.index(current)


def _finish(
    inst: SagaInstance, flow: TrackedFlow, state: SagaState, status: str, ev: Envelope
) -> None:
    inst.state, inst.status = state, status
    inst.data["finished_at"] = ev.occurred_at


class Tracker(Participant):
    """A participant that builds saga views of one choreographed flow (see module doc)."""

    def __init__(self, name: str, store: Store, flow: TrackedFlow, **kwargs: Any) -> None:
        super().__init__(name, store, **kwargs)
        self.flow = flow
        self.alerts: AlertWriter | None = None
        """Writes the alert of a view escalated to a person (set by the Engine)."""
        for event_type in sorted(flow.facts):
            self.on_event(event_type)(self._on_fact)

    async def _on_fact(self, tx: Tx, ev: Envelope) -> None:
        inst = await tx.saga_get(ev.correlation_id)
        if inst is not None and inst.definition != self.flow.definition:
            raise ConfigurationError(
                f"correlation id {ev.correlation_id} belongs to a {inst.definition} saga"
            )
        seen = await self.observe(tx, inst, ev)
        if seen.instance.state is SagaState.FAILED_NEEDS_MANUAL and seen.changed:
            log.warning(
                "saga %s needs a person: %s",
                seen.instance.saga_id,
                seen.instance.reason,
                extra={"saga_id": seen.instance.saga_id, "step": ev.type},
            )

    async def observe(self, tx: Tx, inst: SagaInstance | None, ev: Envelope) -> Observation:
        """Apply ``ev`` to ``inst`` (None: no view yet) and write the result in ``tx``."""
        seen = observe(self.flow, inst, ev, self.clock())
        if seen.created:
            await tx.saga_insert(seen.instance)
        elif seen.changed and inst is not None:
            await tx.saga_update(seen.instance, inst.version)
        await tx.history_add(seen.history)
        record_history(seen.instance, (), seen.history, finishing=_FINISHING)
        if self.alerts is not None and seen.changed:
            await self.alerts.saga_changed(tx, seen.instance, seen.history, self.clock())
        for h in seen.history:
            log.debug(
                "%s %s",
                h.event,
                h.detail.get("type"),
                extra={"saga_id": h.saga_id, "step": h.step, "state": h.state.value},
            )
        return seen

    async def check_stuck(self, now: float | None = None) -> int:
        """Put every running view without progress for ``sla`` seconds in the manual queue.

        Returns how many were escalated. Run it periodically (``Engine.every``).
        """
        now = self.clock() if now is None else now
        cutoff = now - self.flow.sla
        stale: list[str] = []
        offset = 0
        while True:
            page = await self.store.list_sagas(
                states=[SagaState.RUNNING, SagaState.COMPENSATING],
                definition=self.flow.definition,
                limit=_PAGE,
                offset=offset,
            )
            stale += [s.saga_id for s in page if s.updated_at <= cutoff]
            if len(page) < _PAGE:
                break
            offset += _PAGE
        if not stale:
            return 0
        escalated = 0
        async with self.transaction() as tx:
            for saga_id in stale:
                inst = await tx.saga_get(saga_id)
                if inst is None or inst.terminal or inst.updated_at > cutoff:
                    continue  # it moved since the scan
                await self._escalate(tx, inst, now)
                escalated += 1
        self.after_commit()
        return escalated

    async def _escalate(self, tx: Tx, inst: SagaInstance, now: float) -> None:
        new = inst.copy()
        new.version = inst.version + 1
        last = inst.data.get("last") or "nothing"
        new.reason = (
            f"stuck: no progress for {now - inst.updated_at:.0f}s (SLA {self.flow.sla:.0f}s); "
            f"last fact {last} while {inst.status}"
        )
        new.state, new.status, new.updated_at = (
            SagaState.FAILED_NEEDS_MANUAL,
            self.flow.attention_status,
            now,
        )
        await tx.saga_update(new, inst.version)
        entry = HistoryEntry(
            new.saga_id,
            new.version,
            now,
            "manual.escalated",
            new.state,
            new.status,
            None,
            {"reason": new.reason},
        )
        await tx.history_add([entry])
        record_history(new, (), [entry], finishing=_FINISHING)
        if self.alerts is not None:
            await self.alerts.saga_changed(tx, new, [entry], now)
        log.warning(
            "saga %s is stuck: %s",
            new.saga_id,
            new.reason,
            extra={"saga_id": new.saga_id, "step": None},
        )
