"""The exhaustive checker's orchestrator: the real state machine run on the world.

Every delivery to the orchestrator, timer firing, cancel and decision of a person goes
through :class:`~sagakit.core.machine.Machine`, and every transition is checked as it
happens (see :mod:`sagakit.testing.checker` for the list): status never goes back,
terminal states are absorbing, compensations run in reverse order and a lower rung
only after a definite failure, nothing sent or read before a person's decision moves
the saga, each try is concluded once.
"""

from __future__ import annotations

import json

from sagakit.core.definition import CommandAction
from sagakit.core.envelope import Envelope
from sagakit.core.instance import MAY_HAVE_EFFECT, HistoryEntry, SagaInstance, Timer
from sagakit.core.machine import Decision, Machine, parse_key
from sagakit.testing.checker_participants import ParticipantModel
from sagakit.testing.checker_world import (
    NOW,
    ORCHESTRATOR,
    Bounds,
    TimerRow,
    World,
    _generation,
    _latest,
    _records,
    _Violation,
)


class OrchestratorModel(ParticipantModel):
    """The orchestrator's side of the checker, with the checks made on every
    transition; a base of :class:`~sagakit.testing.checker.Checker`."""

    machine: Machine
    bounds: Bounds
    _history: list[HistoryEntry]

    def _to_orchestrator(self, w: World, env: Envelope, *, remember: bool = True) -> World:
        seen = (ORCHESTRATOR, env.message_id)
        if seen in w.inbox:
            return w
        if remember:
            w = w._replace(inbox=w.inbox | {seen})
        i = self._index(w, env.saga_id)
        d = self.machine.on_reply(w.insts[i], env, NOW)
        if d.changed:
            # A person's decision is answered by the try it started: a reply to a
            # message sent before it is recorded and moves nothing.
            floor = max(
                (v for s, st, what, v in w.decided if s == env.saga_id and st == env.step),
                default=0,
            )
            if env.fence < floor:
                raise _Violation(
                    f"{env.saga_id}: a reply to {env.type} sent at version {env.fence}, "
                    f"before a person decided at version {floor}, moved the saga"
                )
            # A failure concludes its try, and so does any status answer; a success does
            # not (any try's success counts: they all share one idempotency key).
            parts = parse_key(env.idempotency_key or "")
            if not env.payload.get("ok") or parts.phase == "query":
                w = self._conclude(w, i, parts.step, parts.phase, parts.rung, env.attempt)
        return self._transition(w, i, d)

    def _fire(
        self, w: World, timer: TimerRow, *, held: bool = False, predates_decision: bool = False
    ) -> World:
        saga_id, name, fence = timer
        if not held:
            w = w._replace(timers=w.timers - {timer})
        i = self._index(w, saga_id)
        d = self.machine.on_timer(w.insts[i], Timer(saga_id, name, NOW, fence), NOW)
        if d.changed and predates_decision:
            # The decision started its own tries (and deadline): a timer set before it
            # belongs to an earlier one, like a reply to a message sent before it.
            raise _Violation(
                f"{saga_id}: the {name} timer ({fence}) a worker read before a person "
                "decided moved the saga"
            )
        parts = fence.split(":")
        if d.changed and len(parts) == 6 and parts[0] == "timeout" and parts[1].isdigit():
            step = self.d.steps[int(parts[1])].name
            w = self._conclude(w, i, step, parts[2], int(parts[3]), int(parts[4]))
        return self._transition(w, i, d)

    def _conclude(self, w: World, i: int, step: str, phase: str, rung: int, attempt: int) -> World:
        """Count a try as concluded (failed or timed out); a try concluded twice burns the
        retry budget twice (a late failure of an earlier try taken for the current one)."""
        inst = w.insts[i]
        st = inst.steps[self.d.step_index(step)]
        # Tries are numbered per rung, and status queries per round of doubt (a round
        # starts again after the action is sent anew); a person's retry starts afresh.
        round_ = rung if phase == "comp" else st.attempt if phase == "query" else 0
        row = (inst.saga_id, step, phase, round_, st.manual_retries, attempt)
        if row in w.concluded:
            raise _Violation(
                f"{inst.saga_id}: try {attempt} of {step} ({phase}) concluded twice: a late "
                "failure or timeout of an earlier try was taken for the try in flight"
            )
        return w._replace(concluded=w.concluded | {row})

    def _cancel(self, w: World, i: int) -> World:
        return self._transition(w, i, self.machine.on_cancel(w.insts[i], "checker cancel", NOW))

    @staticmethod
    def _index(w: World, saga_id: str | None) -> int:
        for i, inst in enumerate(w.insts):
            if inst.saga_id == saga_id:
                return i
        raise _Violation(f"message for unknown saga {saga_id}")

    def _transition(self, w: World, i: int, d: Decision, *, manual: bool = False) -> World:
        old, new = w.insts[i], d.instance
        self._history.extend(d.history)
        if not manual:
            if old.terminal and new.version != old.version:
                raise _Violation(f"{old.saga_id}: terminal state {old.state.value} changed")
            self._check_status(old, new)
        self._check_compensations(w, new, d)
        w = self._apply_effects(w, d)
        insts = list(w.insts)
        insts[i] = new
        return w._replace(insts=tuple(insts))

    def _check_status(self, old: SagaInstance, new: SagaInstance) -> None:
        if not self.d.status_may_follow(old.status, new.status):
            raise _Violation(
                f"{old.saga_id}: user-visible status went {old.status} -> {new.status}"
            )

    def _check_compensations(self, w: World, inst: SagaInstance, d: Decision) -> None:
        """Compensations in reverse order; a lower rung only after a definite failure."""
        records = _records(w)
        for env in d.outgoing:
            if env.compensates is None or env.idempotency_key is None:
                continue
            parts = parse_key(env.idempotency_key)
            index = self.d.step_index(parts.step)
            for later in range(index + 1, len(self.d.steps)):
                if self.d.steps[later].ladder and inst.steps[later].status in MAY_HAVE_EFFECT:
                    raise _Violation(
                        f"{inst.saga_id}: compensation of {parts.step} sent while the later "
                        f"step {self.d.steps[later].name} may still have its effect "
                        f"({inst.steps[later].status.value}): compensations out of order"
                    )
            if parts.rung == 0 or (inst.saga_id, parts.step, f"rung:{parts.rung}") in {
                (s, st, what) for s, st, what, _ in w.decided
            }:
                continue
            endpoint = self._endpoint_of(index, parts.rung - 1)
            prev = f"{inst.saga_id}:{parts.step}:comp:{parts.rung - 1}"
            rec = _latest(records, endpoint, prev, _generation(env))
            if rec is None or rec[2] or json.loads(rec[1]).get("ok"):
                raise _Violation(
                    f"{inst.saga_id}: rung {parts.rung} of {parts.step} sent, but rung "
                    f"{parts.rung - 1} has no definite failure recorded (its outcome may "
                    "still be an effect: undoing twice)"
                )

    def _endpoint_of(self, index: int, rung: int) -> str:
        action = self.d.steps[index].ladder[rung].action
        return action.endpoint if isinstance(action, CommandAction) else self.machine.local_endpoint

    def _apply_effects(self, w: World, d: Decision) -> World:
        saga = d.instance.saga_id
        timers = {t for t in w.timers if not (t[0] == saga and t[1] in d.cancel_timers)}
        for t in d.set_timers:
            timers = {x for x in timers if not (x[0] == saga and x[1] == t.name)}
            timers.add((saga, t.name, t.fence))
        net = set(w.net)
        for env in d.outgoing:
            net.add(self._register(env))
        return w._replace(timers=frozenset(timers), net=frozenset(net))
