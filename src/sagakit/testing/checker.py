"""An exhaustive checker: every interleaving of a few sagas, within fault bounds.

The real :class:`~sagakit.core.machine.Machine` runs against model participants that
behave like :class:`~sagakit.runtime.participant.Participant` (inbox dedup, one outcome
recorded per idempotency key, tombstones when a compensation overtakes its action,
status queries answered from what was recorded). From the start state, the checker
explores every order in which in-flight messages are delivered and timers fire, plus
every placement of a bounded number of faults (a lost message, a duplicated delivery,
a timeout or deadline that fires while the answer is still on its way), business
failures (an action or compensation rung that fails for good) and cancel requests.
States are deduplicated, so the bounded space is covered completely.

Checked in every state: user-visible status never goes back, terminal states are
absorbing, no effect is applied twice, no action is applied after its undo, stock
never goes negative. Checked in every final state (nothing in flight, no timer left):
every saga is terminal; a SUCCEEDED saga has every effect applied and none undone; a
COMPENSATED or TIMED_OUT saga has no effect left applied; a saga in the manual queue
has a reason; stock is conserved. A violation comes with the trace that leads to it.

Timers fire in any order relative to messages: since any message may be delayed
arbitrarily, that over-approximates real time (``due_at`` is not modelled).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

from sagakit.core.definition import CommandAction, SagaDefinition
from sagakit.core.envelope import Envelope, MessageKind, Outcome, failure, reply_to, success
from sagakit.core.instance import SagaInstance, SagaState, StepStatus, Timer
from sagakit.core.machine import Decision, Machine, parse_key

NOW = 1_000.0
ORCHESTRATOR = "orchestrator"


@dataclass(frozen=True)
class Bounds:
    """How much of the world the checker explores."""

    sagas: int = 2
    stock: int = 1
    faults: int = 1
    failures: int = 1
    cancels: int = 0
    max_states: int = 2_000_000


class World(NamedTuple):
    """One state of the modelled system. Immutable: transitions build new worlds."""

    insts: tuple[SagaInstance, ...]
    net: frozenset[str]  # envelopes as JSON: two branches may emit one id with other content
    timers: frozenset[tuple[str, str, str]]
    records: frozenset[tuple[str, str, bool]]  # (endpoint:key, outcome json, tombstone)
    inbox: frozenset[tuple[str, str]]  # (endpoint, message id)
    effects: frozenset[tuple[str, str]]  # (action key, "applied" | "undone")
    stock: int
    faults: int
    failures: int
    cancels: int


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
        self.d = definition
        self.bounds = bounds or Bounds()
        self.machine = Machine(definition, ORCHESTRATOR)
        self.data = data or (lambda i: {"n": i})
        self.reserve = reserve
        self.release = release
        self.envelopes: dict[str, Envelope] = {}
        forward = [definition.started_status]
        forward += [s.status for s in definition.steps if s.status]
        forward.append(definition.completed_status)
        self._rank = {label: i for i, label in enumerate(forward)}
        self._rank[definition.partial_status] = self._rank[definition.completed_status]

    # -- exploration --------------------------------------------------------------------
    def run(self) -> CheckReport:
        """Explore depth-first; stop at the first violation (with its trace)."""
        report = CheckReport()
        start = self._initial()
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
                try:
                    nxt = step()
                except _Violation as exc:
                    report.violations.append(f"{exc} (at: {label})")
                    report.trace = [*self._trace(parents, key), label]
                    failed = True
                    break
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
        world = World(
            (),
            frozenset(),
            frozenset(),
            frozenset(),
            frozenset(),
            frozenset(),
            self.bounds.stock,
            self.bounds.faults,
            self.bounds.failures,
            self.bounds.cancels,
        )
        for i in range(self.bounds.sagas):
            decision = self.machine.start(f"s{i}", f"k{i}", self.data(i), NOW)
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
                tuple(
                    (s.status, s.attempt, s.rung, s.rung_attempt, s.queries, s.retry_base)
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
        for timer in sorted(w.timers):
            saga_id, name, fence = timer
            busy = any(self.envelopes[m].saga_id == saga_id for m in w.net)
            # A timer that fires while its saga still has a message on the way means
            # that message was slow: a fault. Otherwise it is just time passing.
            costly = busy or name == "deadline"
            if costly and w.faults == 0:
                continue
            base = w._replace(faults=w.faults - 1) if costly else w
            yield f"fire {name} timer of {saga_id} ({fence})", partial(self._fire, base, timer)
        if w.cancels > 0:
            for i, inst in enumerate(w.insts):
                if not inst.terminal:
                    spent = w._replace(cancels=w.cancels - 1)
                    yield f"cancel {inst.saga_id}", partial(self._cancel, spent, i)

    def _name(self, env: Envelope) -> str:
        what = env.type
        if env.kind is MessageKind.REPLY:
            ok = "ok" if env.payload.get("ok") else "fail"
            what = f"{env.type}({ok})"
        return f"{what} #{env.attempt} of {env.saga_id} [{env.message_id}]"

    def _deliveries(
        self, w: World, raw: str, env: Envelope, *, keep: bool
    ) -> Iterator[tuple[str, Callable[[], World]]]:
        how = "deliver twice" if keep else "deliver"
        net = w.net if keep else w.net - {raw}
        base = w._replace(net=net)
        if env.destination == ORCHESTRATOR:
            yield f"{how} {self._name(env)}", lambda: self._to_orchestrator(base, env)
            return
        for outcome_label, outcome_fn in self._participant_outcomes(base, env):
            yield f"{how} {self._name(env)} -> {outcome_label}", outcome_fn

    # -- orchestrator -------------------------------------------------------------------
    def _to_orchestrator(self, w: World, env: Envelope) -> World:
        seen = (ORCHESTRATOR, env.message_id)
        if seen in w.inbox:
            return w
        w = w._replace(inbox=w.inbox | {seen})
        i = self._index(w, env.saga_id)
        return self._transition(w, i, self.machine.on_reply(w.insts[i], env, NOW))

    def _fire(self, w: World, timer: tuple[str, str, str]) -> World:
        saga_id, name, fence = timer
        w = w._replace(timers=w.timers - {timer})
        i = self._index(w, saga_id)
        return self._transition(
            w, i, self.machine.on_timer(w.insts[i], Timer(saga_id, name, NOW, fence), NOW)
        )

    def _cancel(self, w: World, i: int) -> World:
        return self._transition(w, i, self.machine.on_cancel(w.insts[i], "checker cancel", NOW))

    @staticmethod
    def _index(w: World, saga_id: str | None) -> int:
        for i, inst in enumerate(w.insts):
            if inst.saga_id == saga_id:
                return i
        raise _Violation(f"message for unknown saga {saga_id}")

    def _transition(self, w: World, i: int, d: Decision) -> World:
        old, new = w.insts[i], d.instance
        if old.terminal and new.version != old.version:
            raise _Violation(f"{old.saga_id}: terminal state {old.state.value} changed")
        self._check_status(old, new)
        w = self._apply_effects(w, d)
        insts = list(w.insts)
        insts[i] = new
        return w._replace(insts=tuple(insts))

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
        a, b, d = old.status, new.status, self.d
        if a == b:
            return
        if a == d.cancelling_status:
            ok = b in (d.cancelled_status, d.attention_status)
        elif a in (d.cancelled_status, d.attention_status, d.completed_status, d.partial_status):
            ok = False
        elif b in self._rank:
            ok = a in self._rank and self._rank[b] > self._rank[a]
        else:
            ok = b in (d.cancelling_status, d.cancelled_status, d.attention_status)
        if not ok:
            raise _Violation(f"{old.saga_id}: user-visible status went {a} -> {b}")

    # -- participants -------------------------------------------------------------------
    def _participant_outcomes(
        self, w: World, env: Envelope
    ) -> Iterator[tuple[str, Callable[[], World]]]:
        endpoint = env.destination or ""
        seen = (endpoint, env.message_id)
        if seen in w.inbox:
            yield "duplicate dropped by inbox", lambda: w
            return
        w = w._replace(inbox=w.inbox | {seen})
        key = env.idempotency_key or ""
        records = {r[0]: (r[1], r[2]) for r in w.records}
        if env.kind is MessageKind.QUERY:
            action = str(env.payload.get("action_key", ""))
            yield (
                "status answered",
                lambda: self._reply(w, env, self._answer(records, endpoint, action)),
            )
            return
        recorded = records.get(f"{endpoint}:{key}")
        if recorded is not None:
            outcome = (
                failure("refused: already compensated")
                if recorded[1]
                else Outcome.from_payload(json.loads(recorded[0]))
            )
            yield "recorded answer", lambda: self._reply(w, env, outcome)
            return
        if env.compensates is not None:
            yield from self._compensations(w, env, endpoint, key, records)
            return
        if env.type == self.reserve and w.stock <= 0:
            yield (
                "out of stock",
                lambda: self._record(w, env, endpoint, key, failure("out of stock")),
            )
            return

        def apply() -> World:
            effects = dict(w.effects)
            if key in effects:
                raise _Violation(f"effect {key} applied twice ({effects[key]} before)")
            nw = w._replace(effects=w.effects | {(key, "applied")})
            if env.type == self.reserve:
                nw = nw._replace(stock=nw.stock - 1)
                if nw.stock < 0:
                    raise _Violation("stock went negative")
            return self._record(nw, env, endpoint, key, success({"ref": key}))

        yield "succeeds", apply
        if w.failures > 0:
            spent = w._replace(failures=w.failures - 1)
            yield "fails", lambda: self._record(spent, env, endpoint, key, failure("refused"))

    def _compensations(
        self,
        w: World,
        env: Envelope,
        endpoint: str,
        key: str,
        records: Mapping[str, tuple[str, bool]],
    ) -> Iterator[tuple[str, Callable[[], World]]]:
        action = env.compensates or ""
        rec = records.get(f"{endpoint}:{action}")
        if rec is not None and not rec[1] and not json.loads(rec[0]).get("ok"):
            yield "nothing to undo", lambda: self._record(w, env, endpoint, key, success())
            return
        base = w
        if rec is None:
            tomb = (f"{endpoint}:{action}", json.dumps(failure("tombstone").to_payload()), True)
            base = w._replace(records=w.records | {tomb})

        def undo() -> World:
            effects = dict(base.effects)
            nw = base
            if effects.get(action) == "applied":
                nw = nw._replace(
                    effects=(nw.effects - {(action, "applied")}) | {(action, "undone")}
                )
                if env.type == self.release:
                    nw = nw._replace(stock=nw.stock + 1)
            return self._record(nw, env, endpoint, key, success())

        yield "undoes", undo
        if base.failures > 0:
            spent = base._replace(failures=base.failures - 1)
            yield "rung fails", lambda: self._record(spent, env, endpoint, key, failure("refused"))

    @staticmethod
    def _answer(records: Mapping[str, tuple[str, bool]], endpoint: str, action: str) -> Outcome:
        rec = records.get(f"{endpoint}:{action}")
        if rec is None or rec[1]:
            return success({"state": "not_found"})
        recorded = json.loads(rec[0])
        if recorded.get("ok"):
            return success({"state": "done", "result": recorded.get("result", {})})
        return success({"state": "failed", "reason": recorded.get("reason", "")})

    def _record(self, w: World, env: Envelope, endpoint: str, key: str, outcome: Outcome) -> World:
        row = (f"{endpoint}:{key}", json.dumps(outcome.to_payload(), sort_keys=True), False)
        return self._reply(w._replace(records=w.records | {row}), env, outcome)

    def _reply(self, w: World, env: Envelope, outcome: Outcome) -> World:
        reply = reply_to(env, outcome, source=env.destination or "", now=NOW)
        return w._replace(net=w.net | {self._register(reply)})

    # -- final states -------------------------------------------------------------------
    def _check_final(self, w: World) -> None:
        effects = dict(w.effects)
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
            if inst.state in (SagaState.SUCCEEDED, SagaState.PARTIAL_ACCEPTED):
                for (step, key), st in zip(keys, inst.steps, strict=False):
                    if st.status is StepStatus.SKIPPED:
                        continue
                    if effects.get(key) != "applied":
                        raise _Violation(
                            f"{inst.saga_id} SUCCEEDED but {step.name} is {effects.get(key)}"
                        )
            elif inst.state in (SagaState.COMPENSATED, SagaState.TIMED_OUT):
                for step, key in keys:
                    if effects.get(key) == "applied":
                        state = inst.state.value
                        raise _Violation(
                            f"{inst.saga_id} {state} but the effect of {step.name} remains"
                        )
            elif not inst.reason:
                raise _Violation(f"{inst.saga_id} needs a person but has no reason")
        if self.reserve is not None:
            held = sum(
                1 for k, v in effects.items() if v == "applied" and self._type_of(k) == self.reserve
            )
            if w.stock + held != self.bounds.stock:
                raise _Violation(f"stock not conserved: {w.stock} available + {held} held")

    def _type_of(self, key: str) -> str | None:
        step = self.d.steps[self.d.step_index(parse_key(key).step)]
        return step.action.type if isinstance(step.action, CommandAction) else None


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
