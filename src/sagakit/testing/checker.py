"""An exhaustive checker: every interleaving of a few sagas, within fault bounds.

The real :class:`~sagakit.core.machine.Machine` runs against model participants that
behave like :class:`~sagakit.runtime.participant.Participant` (inbox dedup, one outcome
recorded per idempotency key, a retryable failure never recorded, tombstones when a
compensation overtakes its action, a definite failure run again only for a person's
retry, status queries answered from what was recorded). From the start state, the
checker explores every order in which in-flight messages are delivered and timers fire,
plus every placement of bounded budgets of:

* faults (``faults``): a lost message, a duplicated delivery (also one that comes back
  after the receiver's inbox purged the first copy's id), a timeout or deadline that
  fires while the answer is still on its way (each slow message is paid for once), and
  a second orchestrator worker that picked up a due timer and fires it again later,
  with its old fence, after the saga moved on (late and duplicated timer firings);
* business failures (``failures``): an action or compensation rung that fails for good,
  or answers "try again" (a retryable failure, not recorded; a rung may have undone
  the effect before it said so, like a card provider that timed out after voiding);
* silences (``silences``): a participant endpoint goes silent for good: every message
  it gets from then on is consumed, with or without its effect, and never answered;
* cancel requests (``cancels``) and a person's decisions (``manual``): on a saga in
  FAILED_NEEDS_MANUAL, every action :meth:`Machine.on_manual` accepts (retry,
  mark_done, compensate, mark_compensated, use_rung with each rung, accept_partial),
  while replies to earlier tries are still in flight. (The modelled person does not
  compensate a step without a compensation whose action may still take effect, e.g.
  a capture in flight when the deadline passed: the machine accepts that decision and
  a late capture then stays on a compensated saga; a person must check first.)

``attempts`` caps every retry policy's ``max_attempts`` (the machine only asks "are
attempts left?", so 2 reaches every exhaustion path in far fewer states). States are
deduplicated, so the bounded space is covered completely.

Checked on every transition: user-visible status never goes back (a person's decision
may move it), terminal states are absorbing (except by a person's decision), no effect
is applied twice, no action is applied after its undo, stock never goes negative;
compensations run in reverse order of the steps they undo (when a step's compensation is
sent, no later step with a ladder may still have its effect); a rung r > 0 is sent only
after rung r-1 failed definitely (recorded by the participant) or a person chose it
(refunding money whose void may have gone through pays twice); a reply to a message sent
before a person's decision on that step moves nothing (the decision is answered by the
try it started), and neither does a timer a second worker read before a person's
decision on its saga (the decision starts its own tries and deadline); each try (an
attempt of an action, a rung or a status query) is concluded once, by its failure or its
timeout (a status query also by its answer), so a late failure of an earlier try never
burns the retry budget of the try in flight.
Checked in every final state (nothing in flight, no timer left): every saga is terminal;
a SUCCEEDED saga has every effect applied and none undone (steps a person marked done
excepted); a COMPENSATED or TIMED_OUT saga has no effect left applied (steps a person
marked compensated excepted); a saga in the manual queue has a reason; stock is
conserved. A violation comes with the trace that leads to it.

Timers fire in any order relative to messages: since any message may be delayed
arbitrarily, that over-approximates real time (``due_at`` is not modelled).
:attr:`CheckReport.exercised` counts the kinds of transition
(:mod:`sagakit.testing.coverage`) over every explored transition, each counted once.

The checker's parts live beside it: its bounds, world and report in
:mod:`~sagakit.testing.checker_world`, the model participants in
:mod:`~sagakit.testing.checker_participants`, the real machine run on the world with
the checks of every transition in :mod:`~sagakit.testing.checker_orchestrator`, and
what may happen next in :mod:`~sagakit.testing.checker_moves`. This module explores
the state space and checks the final states; every name of those modules that callers
use is importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sagakit.core.definition import CommandAction, SagaDefinition
from sagakit.core.envelope import Envelope
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState, StepStatus
from sagakit.core.machine import Machine, parse_key
from sagakit.testing.checker_moves import Moves
from sagakit.testing.checker_world import (
    NOW,
    ORCHESTRATOR,
    Bounds,
    CheckReport,
    TimerRow,
    World,
    _Violation,
    cap_attempts,
)
from sagakit.testing.coverage import exercised

__all__ = [
    "NOW",
    "ORCHESTRATOR",
    "Bounds",
    "CheckReport",
    "Checker",
    "TimerRow",
    "World",
    "cap_attempts",
    "checkout_checker",
]


class Checker(Moves):
    """Explores the bounded state space of ``definition`` (see the module docstring).

    ``reserve`` names the command type whose success takes one unit of the shared
    stock (and ``release`` the compensation that gives it back), so races for the last
    item are part of the model; leave them ``None`` for definitions without stock.
    ``data`` builds each saga's data from its index.
    """

    def __init__(
        self,
        definition: SagaDefinition,
        bounds: Bounds | None = None,
        *,
        data: Callable[[int], dict[str, Any]] | None = None,
        reserve: str | None = None,
        release: str | None = None,
    ) -> None:
        self.bounds = bounds or Bounds()
        if self.bounds.attempts is not None:
            definition = cap_attempts(definition, self.bounds.attempts)
        self.d = definition
        self.machine = Machine(definition, ORCHESTRATOR)
        self.data = data or (lambda i: {"n": i})
        self.reserve = reserve
        self.release = release
        self.envelopes: dict[str, Envelope] = {}
        self._history: list[HistoryEntry] = []

    # -- exploration --------------------------------------------------------------------
    def run(self) -> CheckReport:
        """Explore depth-first; stop at the first violation (with its trace)."""
        report = CheckReport()
        self._history = []
        start = self._initial()
        report.exercised.update(exercised(self._history, self.d))
        start_key = self._key(start)
        parents: dict[Any, tuple[Any, str] | None] = {start_key: None}
        stack = [(start, start_key)]
        outcomes: dict[str, int] = {}
        while stack:
            world, key = stack.pop()
            report.states += 1
            if report.states > self.bounds.max_states:
                report.complete = False
                break
            moves = list(self._moves(world))
            if not moves:
                report.final_states += 1
                try:
                    self._check_final(world)
                except _Violation as exc:
                    report.violations.append(str(exc))
                    report.trace = self._trace(parents, key)
                    break
                sig = ",".join(sorted(i.state.value for i in world.insts))
                outcomes[sig] = outcomes.get(sig, 0) + 1
                continue
            failed = False
            for label, step in moves:
                report.transitions += 1
                self._history = []
                try:
                    nxt = step()
                except _Violation as exc:
                    report.violations.append(f"{exc} (at: {label})")
                    report.trace = [*self._trace(parents, key), label]
                    failed = True
                    break
                if self._history:
                    report.exercised.update(exercised(self._history, self.d))
                nkey = self._key(nxt)
                if nkey not in parents:
                    parents[nkey] = (key, label)
                    stack.append((nxt, nkey))
            if failed:
                break
        report.outcomes = dict(sorted(outcomes.items()))
        return report

    def _trace(self, parents: Mapping[Any, tuple[Any, str] | None], key: Any) -> list[str]:
        out: list[str] = []
        link = parents.get(key)
        while link is not None:
            key, label = link
            out.append(label)
            link = parents.get(key)
        return out[::-1]

    def _initial(self) -> World:
        insts: list[SagaInstance] = []
        b = self.bounds
        world = World(
            (),
            frozenset(),
            frozenset(),
            frozenset(),
            frozenset(),
            frozenset(),
            b.stock,
            b.faults,
            b.failures,
            b.cancels,
            silences=b.silences,
            manual=b.manual,
        )
        for i in range(b.sagas):
            decision = self.machine.start(f"s{i}", f"k{i}", self.data(i), NOW)
            self._history.extend(decision.history)
            insts.append(decision.instance)
            world = self._apply_effects(world, decision)
        return world._replace(insts=tuple(insts))

    def _key(self, w: World) -> Any:
        insts = tuple(
            (
                i.state,
                i.status,
                i.cursor,
                i.version,
                i.cancel_requested,
                i.timed_out,
                i.deadline_at,
                i.reason is None,
                tuple(
                    (
                        s.status,
                        s.attempt,
                        s.rung,
                        s.rung_attempt,
                        s.queries,
                        s.retry_base,
                        s.fence_floor,
                        s.manual_retries,
                        s.next_retry_at is None,
                    )
                    for s in i.steps
                ),
            )
            for i in w.insts
        )
        # An inbox entry matters only while its message can still arrive again.
        live = {self.envelopes[r].message_id for r in w.net}
        inbox = frozenset(e for e in w.inbox if e[1] in live)
        return (
            insts,
            w.net,
            w.timers,
            w.records,
            inbox,
            w.effects,
            w.stock,
            w.faults,
            w.failures,
            w.cancels,
            w.ghosts,
            w.old_ghosts,
            w.silent,
            w.silences,
            w.manual,
            w.decided,
            w.concluded,
            w.late & w.net,
        )

    # -- final states -------------------------------------------------------------------
    def _check_final(self, w: World) -> None:
        effects = dict(w.effects)
        by_hand = {(s, st, what) for s, st, what, _ in w.decided}
        for inst in w.insts:
            if not inst.terminal:
                raise _Violation(
                    f"{inst.saga_id} is stuck in {inst.state.value} with nothing left to happen"
                )
            keys = [
                (s, f"{inst.saga_id}:{s.name}:action")
                for s in self.d.steps
                if isinstance(s.action, CommandAction)
            ]
            accepted = any(s == inst.saga_id and what == "accepted" for s, _, what in by_hand)
            if inst.state is SagaState.SUCCEEDED or (
                inst.state is SagaState.PARTIAL_ACCEPTED and not accepted
            ):
                for (step, key), st in zip(keys, inst.steps, strict=False):
                    if st.status is StepStatus.SKIPPED:
                        continue
                    if (inst.saga_id, step.name, "done") in by_hand:
                        continue
                    if effects.get(key) != "applied":
                        raise _Violation(
                            f"{inst.saga_id} SUCCEEDED but {step.name} is {effects.get(key)}"
                        )
            elif inst.state in (SagaState.COMPENSATED, SagaState.TIMED_OUT):
                for step, key in keys:
                    if (inst.saga_id, step.name, "compensated") in by_hand:
                        continue
                    if effects.get(key) == "applied":
                        state = inst.state.value
                        raise _Violation(
                            f"{inst.saga_id} {state} but the effect of {step.name} remains"
                        )
            elif inst.state is SagaState.FAILED_NEEDS_MANUAL and not inst.reason:
                raise _Violation(f"{inst.saga_id} needs a person but has no reason")
        if self.reserve is not None:
            # A reservation a person marked compensated was released by hand (outside
            # the model): it counts as given back.
            held = by_hand_released = 0
            for k, v in effects.items():
                if v != "applied" or self._type_of(k) != self.reserve:
                    continue
                parts = parse_key(k)
                if (parts.saga_id, parts.step, "compensated") in by_hand:
                    by_hand_released += 1
                else:
                    held += 1
            if w.stock + held + by_hand_released != self.bounds.stock:
                raise _Violation(f"stock not conserved: {w.stock} available + {held} held")

    def _type_of(self, key: str) -> str | None:
        step = self.d.steps[self.d.step_index(parse_key(key).step)]
        return step.action.type if isinstance(step.action, CommandAction) else None


def checkout_checker(bounds: Bounds | None = None) -> Checker:
    """The checker for the reference checkout: every saga races for the same stock."""
    from sagakit_checkout.sagas import checkout_definition  # the examples stay optional

    def data(i: int) -> dict[str, Any]:
        return {
            "customer": f"cust-{i}",
            "sku": "sku-last",
            "qty": 1,
            "amount": 1000 + i,
            "currency": "EUR",
            "card": f"card-ok-{i}",
            "ship_to": f"addr-ok-{i}",
        }

    return Checker(
        checkout_definition(),
        bounds,
        data=data,
        reserve="ReserveInventory",
        release="ReleaseInventory",
    )
