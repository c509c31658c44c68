"""A test driver for the pure state machine: one saga, its timers, what it sent."""

from __future__ import annotations

from typing import Any

from sagakit.core.definition import SagaDefinition
from sagakit.core.envelope import Envelope, MessageKind, Outcome, failure, reply_to, success
from sagakit.core.instance import HistoryEntry, SagaInstance, StepStatus, Timer
from sagakit.core.machine import STEP_TIMER, Decision, Machine, ManualAction

NOW = 1000.0


class Run:
    """Drives one saga through a Machine, applying decisions like a runtime would.

    Every input moves the clock (a reply or a person's decision by a second, a timer to
    its due time), every applied decision must raise the version by one, and timers are
    kept by name as a store keeps them: cancels first, then sets (a set replaces).
    """

    def __init__(
        self,
        definition: SagaDefinition,
        *,
        saga_id: str = "s1",
        data: dict[str, Any] | None = None,
        endpoint: str = "orchestrator",
        correlation_id: str | None = None,
    ) -> None:
        self.d = definition
        self.machine = Machine(definition, endpoint)
        self.now = NOW
        self.sent: list[Envelope] = []
        self.timers: dict[str, Timer] = {}
        self.decisions: list[Decision] = []
        self.first = self.machine.start(
            saga_id,
            "order-1",
            {"amount": 100} if data is None else data,
            self.now,
            correlation_id=correlation_id,
        )
        self.inst: SagaInstance = self.first.instance
        self._record(self.first)

    def _record(self, dec: Decision) -> Decision:
        self.decisions.append(dec)
        if dec.changed:
            assert dec.instance.version == self.inst.version + 1 or dec is self.first
            self.inst = dec.instance
            for name in dec.cancel_timers:
                self.timers.pop(name, None)
            for t in dec.set_timers:
                self.timers[t.name] = t
            self.sent.extend(dec.outgoing)
        return dec

    @property
    def last(self) -> Envelope:
        """The last message the saga sent."""
        return self.sent[-1]

    def step(self, name: str) -> Any:
        return self.inst.steps[self.d.step_index(name)]

    def make_reply(self, outcome: Outcome, cmd: Envelope | None = None) -> Envelope:
        cmd = cmd or self.last
        return reply_to(cmd, outcome, source=cmd.destination or "svc", now=self.now)

    def deliver(self, rep: Envelope) -> Decision:
        self.now += 1
        return self._record(self.machine.on_reply(self.inst, rep, self.now))

    def reply(self, outcome: Outcome, cmd: Envelope | None = None) -> Decision:
        return self.deliver(self.make_reply(outcome, cmd))

    def ok(self, cmd: Envelope | None = None, **result: Any) -> Decision:
        return self.reply(success(result), cmd)

    def fail(
        self, reason: str = "declined", *, retryable: bool = False, cmd: Envelope | None = None
    ) -> Decision:
        return self.reply(failure(reason, retryable=retryable), cmd)

    def answer(self, state: str, cmd: Envelope | None = None, **extra: Any) -> Decision:
        """A status query's answer (a successful reply carrying the protocol)."""
        return self.reply(success({"state": state, **extra}), cmd)

    def fire(self, timer: str | Timer = STEP_TIMER) -> Decision:
        t = self.timers[timer] if isinstance(timer, str) else timer
        self.now = max(self.now, t.due_at)
        return self._record(self.machine.on_timer(self.inst, t, self.now))

    def cancel(self, reason: str = "customer changed mind") -> Decision:
        self.now += 1
        return self._record(self.machine.on_cancel(self.inst, reason, self.now))

    def manual(
        self,
        action: ManualAction | str,
        *,
        reason: str = "checked with the bank",
        actor: str = "ops:alice",
        rung: int | None = None,
        expected_version: int | None = None,
        force: bool = False,
    ) -> Decision:
        self.now += 1
        return self._record(
            self.machine.on_manual(
                self.inst,
                action,
                reason=reason,
                actor=actor,
                now=self.now,
                rung=rung,
                expected_version=expected_version,
                force=force,
            )
        )

    def advance_to(self, step: str) -> None:
        """Answer every command with success until ``step``'s action is in flight."""
        while self.last.step != step or self.last.kind is not MessageKind.COMMAND:
            self.ok()
        assert self.step(step).status is StepStatus.RUNNING

    def events(self, dec: Decision | None = None) -> list[str]:
        decs = [dec] if dec is not None else self.decisions
        return [h.event for d in decs for h in d.history]

    def history(self, event: str) -> list[HistoryEntry]:
        return [h for d in self.decisions for h in d.history if h.event == event]
