"""The exhaustive checker's moves: everything that may happen next in a world.

Every in-flight message may be delivered (and, within the fault budget, dropped,
delivered twice, or delivered again after the receiver's inbox forgot it), every timer
may fire (late, or twice by a second worker), an endpoint may go silent, a saga may be
cancelled, and a person may decide on a saga in the manual queue. Each move is a label
and a function that builds the next world (see :mod:`sagakit.testing.checker`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

from sagakit.core.envelope import Envelope, MessageKind
from sagakit.core.instance import MAY_HAVE_EFFECT, SagaState
from sagakit.core.machine import Decision, ManualAction
from sagakit.errors import ManualActionRefused
from sagakit.testing.checker_orchestrator import OrchestratorModel
from sagakit.testing.checker_world import NOW, ORCHESTRATOR, World


class Moves(OrchestratorModel):
    """What may happen next in a world; a base of
    :class:`~sagakit.testing.checker.Checker`."""

    def _moves(self, w: World) -> Iterator[tuple[str, Callable[[], World]]]:
        for raw in sorted(w.net):
            env = self.envelopes[raw]
            yield from self._deliveries(w, raw, env, keep=False)
            if w.faults > 0:
                spent = w._replace(faults=w.faults - 1)
                yield f"drop {self._name(env)}", partial(_drop, spent, raw)
                yield from self._deliveries(spent, raw, env, keep=True)
                # The copy comes back after the receiver's inbox purged the first one's
                # id (inbox retention): the inbox no longer tells it is a duplicate.
                yield from self._deliveries(spent, raw, env, keep=True, remember=False)
        for timer in sorted(w.timers):
            saga_id, name, fence = timer
            slow = frozenset(m for m in w.net if self.envelopes[m].saga_id == saga_id)
            # A timer that fires while its saga still has a message on the way means
            # that message was slow: a fault, paid once per message (a message already
            # late may stay late through more timers). Otherwise it is time passing.
            costly = bool(slow - w.late) or name == "deadline"
            if w.faults > 0:
                # A second orchestrator worker read the due timer too: it fires it
                # later, whatever the saga did meanwhile, with the fence it read.
                held = w._replace(faults=w.faults - 1, ghosts=w.ghosts | {timer})
                yield (
                    f"a second worker holds {name} timer of {saga_id} ({fence})",
                    partial(lambda h: h, held),
                )
            if costly and w.faults == 0:
                continue
            base = w._replace(faults=w.faults - 1, late=w.late | slow) if costly else w
            yield f"fire {name} timer of {saga_id} ({fence})", partial(self._fire, base, timer)
        for timer in sorted(w.ghosts):
            saga_id, name, fence = timer
            base = w._replace(ghosts=w.ghosts - {timer})
            yield (
                f"second worker fires {name} timer of {saga_id} ({fence})",
                partial(self._fire, base, timer, held=True),
            )
        for timer in sorted(w.old_ghosts):
            saga_id, name, fence = timer
            base = w._replace(old_ghosts=w.old_ghosts - {timer})
            yield (
                f"second worker fires {name} timer of {saga_id} ({fence}), read before a "
                "person decided",
                partial(self._fire, base, timer, held=True, predates_decision=True),
            )
        if w.silences > 0:
            for endpoint in sorted({self.envelopes[r].destination or "" for r in w.net}):
                if endpoint != ORCHESTRATOR and endpoint not in w.silent:
                    spent = w._replace(silences=w.silences - 1, silent=w.silent | {endpoint})
                    yield f"{endpoint} goes silent", partial(lambda s: s, spent)
        if w.cancels > 0:
            for i, inst in enumerate(w.insts):
                if not inst.terminal:
                    spent = w._replace(cancels=w.cancels - 1)
                    yield f"cancel {inst.saga_id}", partial(self._cancel, spent, i)
        if w.manual > 0:
            for i, inst in enumerate(w.insts):
                if inst.state is SagaState.FAILED_NEEDS_MANUAL:
                    yield from self._decisions(w._replace(manual=w.manual - 1), i)

    def _decisions(self, w: World, i: int) -> Iterator[tuple[str, Callable[[], World]]]:
        inst = w.insts[i]
        step = self.d.steps[inst.cursor]
        choices: list[tuple[ManualAction, int | None]] = [
            (a, None) for a in ManualAction if a is not ManualAction.USE_RUNG
        ]
        choices += [(ManualAction.USE_RUNG, r) for r in range(len(step.ladder))]
        in_doubt = not step.ladder and inst.steps[inst.cursor].status in MAY_HAVE_EFFECT
        for action, rung in choices:
            if action is ManualAction.COMPENSATE and in_doubt:
                # The modelled person does not compensate a step that has no
                # compensation while its action may still take effect (a capture in
                # flight when the deadline passed): the machine accepts it, and a late
                # capture then stays on a compensated saga. A person checks first.
                continue
            try:
                # A person decides later than the saga's other events (the clock moves
                # on: a deadline the decision sets is a new one).
                later = NOW + self.bounds.manual - w.manual
                d = self.machine.on_manual(
                    inst, action, reason="checker decides", actor="person", now=later, rung=rung
                )
            except ManualActionRefused:
                continue
            what = action.value if rung is None else f"{action.value} {rung}"
            yield (
                f"person decides {what} for {inst.saga_id} ({step.name})",
                partial(self._decide, w, i, action, rung, d),
            )

    def _decide(
        self, w: World, i: int, action: ManualAction, rung: int | None, d: Decision
    ) -> World:
        inst = w.insts[i]
        step = self.d.steps[inst.cursor].name
        version = d.instance.version
        marks = {(inst.saga_id, step, "decided", version)}
        if action is ManualAction.MARK_DONE:
            marks.add((inst.saga_id, step, "done", version))
        elif action is ManualAction.MARK_COMPENSATED:
            marks.add((inst.saga_id, step, "compensated", version))
        elif action is ManualAction.ACCEPT_PARTIAL:
            marks.add((inst.saga_id, step, "accepted", version))
        elif action is ManualAction.USE_RUNG:
            marks.add((inst.saga_id, step, f"rung:{rung}", version))
        held = frozenset(g for g in w.ghosts if g[0] == inst.saga_id)
        w = w._replace(
            decided=w.decided | marks,
            ghosts=w.ghosts - held,
            old_ghosts=w.old_ghosts | held,
        )
        return self._transition(w, i, d, manual=True)

    def _name(self, env: Envelope) -> str:
        what = env.type
        if env.kind is MessageKind.REPLY:
            ok = "ok" if env.payload.get("ok") else "fail"
            if env.payload.get("retryable"):
                ok = "retryable fail"
            what = f"{env.type}({ok})"
        return f"{what} #{env.attempt} of {env.saga_id} [{env.message_id}]"

    def _deliveries(
        self, w: World, raw: str, env: Envelope, *, keep: bool, remember: bool = True
    ) -> Iterator[tuple[str, Callable[[], World]]]:
        how = "deliver" if not keep else "deliver twice" if remember else "deliver, again late"
        net = w.net if keep else w.net - {raw}
        base = w._replace(net=net)
        if env.destination == ORCHESTRATOR:
            yield (
                f"{how} {self._name(env)}",
                partial(self._to_orchestrator, base, env, remember=remember),
            )
            return
        silent = env.destination in w.silent
        if silent:
            yield (
                f"{how} {self._name(env)} -> consumed by a silent endpoint",
                partial(lambda b: b, base),
            )
        for outcome_label, outcome_fn in self._participant_outcomes(base, env, remember):
            if silent:
                yield (
                    f"{how} {self._name(env)} -> {outcome_label}, never answered",
                    partial(_unanswered, base, outcome_fn),
                )
            else:
                yield f"{how} {self._name(env)} -> {outcome_label}", outcome_fn


def _unanswered(base: World, handle: Callable[[], World]) -> World:
    """``handle``'s world without the reply it sent (the endpoint went silent)."""
    nw = handle()
    return nw._replace(net=nw.net & base.net)


def _drop(w: World, raw: str) -> World:
    return w._replace(net=w.net - {raw})
