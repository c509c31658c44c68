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
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

from sagakit.core.definition import CommandAction, RetryPolicy, SagaDefinition
from sagakit.core.envelope import (
    MANUAL_RETRY,
    Envelope,
    MessageKind,
    Outcome,
    failure,
    reply_to,
    success,
)
from sagakit.core.instance import (
    MAY_HAVE_EFFECT,
    HistoryEntry,
    SagaInstance,
    SagaState,
    StepStatus,
    Timer,
)
from sagakit.core.machine import Decision, Machine, ManualAction, parse_key
from sagakit.errors import ManualActionRefused
from sagakit.testing.coverage import exercised

NOW = 1_000.0
ORCHESTRATOR = "orchestrator"

TimerRow = tuple[str, str, str]  # (saga id, name, fence)


@dataclass(frozen=True)
class Bounds:
    """How much of the world the checker explores (see the module docstring)."""

    sagas: int = 2
    stock: int = 1
    faults: int = 1
    failures: int = 1
    cancels: int = 0
    max_states: int = 2_000_000
    attempts: int | None = None
    """Cap every retry policy's ``max_attempts`` at this (``None``: as defined). The
    machine's logic does not depend on the number, only on "attempts left or not", so a
    cap of 2 reaches every exhaustion path in far fewer states."""
    silences: int = 0
    """How many participant endpoints may go silent (never answer again)."""
    manual: int = 0
    """How many decisions a person may take on sagas in FAILED_NEEDS_MANUAL."""


class World(NamedTuple):
    """One state of the modelled system. Immutable: transitions build new worlds."""

    insts: tuple[SagaInstance, ...]
    net: frozenset[str]  # envelopes as JSON: two branches may emit one id with other content
    timers: frozenset[TimerRow]
    records: frozenset[tuple[str, str, bool]]  # (endpoint:record key, outcome json, tombstone)
    inbox: frozenset[tuple[str, str]]  # (endpoint, message id)
    effects: frozenset[tuple[str, str]]  # (action key, "applied" | "undone")
    stock: int
    faults: int
    failures: int
    cancels: int
    ghosts: frozenset[TimerRow] = frozenset()  # due timers a second worker still holds
    # Held timers whose saga a person decided on since: firing them must move nothing.
    old_ghosts: frozenset[TimerRow] = frozenset()
    silent: frozenset[str] = frozenset()  # endpoints that never answer again
    silences: int = 0
    manual: int = 0
    # A person's decisions: (saga id, step, what, version), what is "done",
    # "compensated", "accepted", "rung:<r>" or "decided" (every decision).
    decided: frozenset[tuple[str, str, str, int]] = frozenset()
    # Tries the saga concluded from a failure, a timeout or a status answer: (saga id,
    # step, phase, rung or round, person's retries, attempt). Each try is concluded once.
    concluded: frozenset[tuple[str, str, str, int, int, int]] = frozenset()
    late: frozenset[str] = frozenset()  # messages already paid for as slow (a fault)


@dataclass
class CheckReport:
    """What the exploration found."""

    states: int = 0
    transitions: int = 0
    final_states: int = 0
    complete: bool = True
    violations: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    exercised: Counter[str] = field(default_factory=Counter)
    """Kinds of transition (:data:`sagakit.testing.coverage.KINDS`) over every explored
    transition, each transition counted once."""

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {
            "states": self.states,
            "transitions": self.transitions,
            "final_states": self.final_states,
            "complete": self.complete,
            "violations": self.violations,
            "trace": self.trace,
            "final_outcomes": self.outcomes,
            "exercised": dict(sorted(self.exercised.items())),
        }


class _Violation(Exception):
    pass


class Checker:
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

    # -- moves --------------------------------------------------------------------------
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

    # -- orchestrator -------------------------------------------------------------------
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

    def _register(self, env: Envelope) -> str:
        raw = env.to_json()
        self.envelopes.setdefault(raw, env)
        return raw

    def _check_status(self, old: SagaInstance, new: SagaInstance) -> None:
        if not self.d.status_may_follow(old.status, new.status):
            raise _Violation(
                f"{old.saga_id}: user-visible status went {old.status} -> {new.status}"
            )

    # -- participants -------------------------------------------------------------------
    def _participant_outcomes(
        self, w: World, env: Envelope, remember: bool = True
    ) -> Iterator[tuple[str, Callable[[], World]]]:
        endpoint = env.destination or ""
        seen = (endpoint, env.message_id)
        if seen in w.inbox:
            yield "duplicate dropped by inbox", partial(lambda b: b, w)
            return
        if remember:
            w = w._replace(inbox=w.inbox | {seen})
        key = env.idempotency_key or ""
        records = _records(w)
        gen = _generation(env)
        if env.kind is MessageKind.QUERY:
            action = str(env.payload.get("action_key", ""))
            answer = self._answer(_latest(records, endpoint, action, gen))
            yield "status answered", partial(self._reply, w, env, answer)
            return
        recorded = _latest(records, endpoint, key, gen)
        record_key = key
        if recorded is not None:
            name, outcome_json, tomb = recorded
            if tomb:
                outcome = failure("refused: already compensated")
                yield "refused (tombstone)", partial(self._reply, w, env, outcome)
                return
            if json.loads(outcome_json).get("ok") or not gen or name == f"{key}#m{gen}":
                outcome = Outcome.from_payload(json.loads(outcome_json))
                yield "recorded answer", partial(self._reply, w, env, outcome)
                return
            # A definite failure, and a person asked to try again: the handler runs once
            # more and its answer is kept beside the old one; the retries in between are
            # recorded as superseded (as Participant does), so an older retry's command
            # still in flight gets that answer instead of running the handler again.
            record_key = f"{key}#m{gen}"
            start = 0 if name == key else int(name[len(key) + 2 :])
            superseded = json.dumps(failure("superseded").to_payload(), sort_keys=True)
            rows = {(f"{endpoint}:{key}#m{n}", superseded, False) for n in range(start + 1, gen)}
            w = w._replace(records=w.records | rows)
        if env.compensates is not None:
            yield from self._compensations(w, env, endpoint, record_key, records, gen)
            return
        if env.type == self.reserve and w.stock <= 0:
            yield (
                "out of stock",
                partial(self._record, w, env, endpoint, record_key, failure("out of stock")),
            )
            return
        yield "succeeds", partial(self._apply, w, env, endpoint, key, record_key)
        if w.failures > 0:
            spent = w._replace(failures=w.failures - 1)
            yield "fails", partial(self._record, spent, env, endpoint, record_key, failure("no"))
            again = failure("try again", retryable=True)
            yield "fails (retryable)", partial(self._reply, spent, env, again)

    def _apply(self, w: World, env: Envelope, endpoint: str, key: str, record_key: str) -> World:
        effects = dict(w.effects)
        if key in effects:
            raise _Violation(f"effect {key} applied twice ({effects[key]} before)")
        nw = w._replace(effects=w.effects | {(key, "applied")})
        if env.type == self.reserve:
            nw = nw._replace(stock=nw.stock - 1)
            if nw.stock < 0:
                raise _Violation("stock went negative")
        return self._record(nw, env, endpoint, record_key, success({"ref": key}))

    def _compensations(
        self,
        w: World,
        env: Envelope,
        endpoint: str,
        record_key: str,
        records: Mapping[str, tuple[str, bool]],
        gen: int,
    ) -> Iterator[tuple[str, Callable[[], World]]]:
        action = env.compensates or ""
        rec = _latest(records, endpoint, action, gen)
        if rec is not None and not rec[2] and not json.loads(rec[1]).get("ok"):
            yield (
                "nothing to undo",
                partial(self._record, w, env, endpoint, record_key, success()),
            )
            return
        base = w
        if rec is None:
            tomb = (f"{endpoint}:{action}", json.dumps(failure("tombstone").to_payload()), True)
            base = w._replace(records=w.records | {tomb})
        yield (
            "undoes",
            partial(self._record, self._undo(base, env), env, endpoint, record_key, success()),
        )
        if base.failures > 0:
            spent = base._replace(failures=base.failures - 1)
            yield (
                "rung fails",
                partial(self._record, spent, env, endpoint, record_key, failure("refused")),
            )
            again = failure("try again", retryable=True)
            yield "rung fails (retryable)", partial(self._reply, spent, env, again)
            # A provider that undid the effect and then timed out towards the participant:
            # "try again", although the undo went through.
            yield (
                "rung undoes, then fails (retryable)",
                partial(self._reply, self._undo(spent, env), env, again),
            )

    def _undo(self, w: World, env: Envelope) -> World:
        action = env.compensates or ""
        if (action, "applied") not in w.effects:
            return w
        nw = w._replace(effects=(w.effects - {(action, "applied")}) | {(action, "undone")})
        if env.type == self.release:
            nw = nw._replace(stock=nw.stock + 1)
        return nw

    @staticmethod
    def _answer(rec: tuple[str, str, bool] | None) -> Outcome:
        if rec is None or rec[2]:
            return success({"state": "not_found"})
        recorded = json.loads(rec[1])
        if recorded.get("ok"):
            return success({"state": "done", "result": recorded.get("result", {})})
        return success({"state": "failed", "reason": recorded.get("reason", "")})

    def _record(
        self, w: World, env: Envelope, endpoint: str, record_key: str, outcome: Outcome
    ) -> World:
        row = (f"{endpoint}:{record_key}", json.dumps(outcome.to_payload(), sort_keys=True), False)
        return self._reply(w._replace(records=w.records | {row}), env, outcome)

    def _reply(self, w: World, env: Envelope, outcome: Outcome) -> World:
        reply = reply_to(env, outcome, source=env.destination or "", now=NOW)
        return w._replace(net=w.net | {self._register(reply)})

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


def _records(w: World) -> dict[str, tuple[str, bool]]:
    return {r[0]: (r[1], r[2]) for r in w.records}


def _latest(
    records: Mapping[str, tuple[str, bool]], endpoint: str, key: str, generation: int
) -> tuple[str, str, bool] | None:
    """The newest record of ``key`` at ``endpoint`` as the participant reads it (a person's
    latest retry first, then the original): (record key, outcome json, tombstone)."""
    names = [f"{key}#m{n}" for n in range(generation, 0, -1)] + [key]
    for name in names:
        rec = records.get(f"{endpoint}:{name}")
        if rec is not None:
            return name, rec[0], rec[1]
    return None


def _generation(env: Envelope) -> int:
    raw = env.headers.get(MANUAL_RETRY, "0")
    return int(raw) if raw.isdigit() else 0


def _unanswered(base: World, handle: Callable[[], World]) -> World:
    """``handle``'s world without the reply it sent (the endpoint went silent)."""
    nw = handle()
    return nw._replace(net=nw.net & base.net)


def cap_attempts(definition: SagaDefinition, attempts: int) -> SagaDefinition:
    """``definition`` with every retry policy (steps and ladder rungs) capped at
    ``attempts`` tries."""

    def cap(policy: RetryPolicy) -> RetryPolicy:
        return dataclasses.replace(policy, max_attempts=min(policy.max_attempts, attempts))

    steps = []
    for step in definition.steps:
        capped = copy.copy(step)
        capped.retry = cap(step.retry)
        capped.ladder = tuple(dataclasses.replace(r, retry=cap(r.retry)) for r in step.ladder)
        steps.append(capped)
    d = definition
    capped_definition = SagaDefinition(
        d.name,
        steps,
        version=d.version,
        deadline=d.deadline,
        completed_status=d.completed_status,
        cancelling_status=d.cancelling_status,
        cancelled_status=d.cancelled_status,
        attention_status=d.attention_status,
        started_status=d.started_status,
        partial_status=d.partial_status,
    )
    capped_definition.personal = d.personal
    return capped_definition


def _drop(w: World, raw: str) -> World:
    return w._replace(net=w.net - {raw})


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
