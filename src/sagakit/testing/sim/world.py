"""What the seeded scheduler works with: the schedule's actions and the fault kinds,
the world it drives (:class:`World`), how hard it pushes (:class:`SimConfig`) and what
a run found (:class:`Verdict`, :class:`RunResult`). The scheduler itself is
:mod:`sagakit.testing.sim.scheduler`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sagakit.core.machine import ManualAction
from sagakit.runtime.relay import Relay
from sagakit.stores.base import Store
from sagakit.testing.sim.network import SimFaultHook, SimNetwork, VirtualClock
from sagakit.testing.sim.timers import Timers

FAULT_KINDS = (
    "drop",
    "lost_reply",
    "duplicate",
    "delay",
    "partition",
    "crash_before_commit",
    "crash_after_commit",
    "ack_lost",
    "publish_lost",
    "timeout",
    "stale_timer",
    "late_timer",
)
"""Schedule actions that are faults: what the budget bounds and shrinking removes."""

MANUAL_ACTIONS = tuple(a.value for a in ManualAction)
"""What the simulated operator may decide (the machine's manual actions)."""

RETRY_THEN_CANCEL = "retry_then_cancel"
"""A decision that is two: a person retries a step before the pivot, and its customer
cancels the saga while the retried command is on its way (so that the compensation
may reach the participant first). A world offers it among a saga's
:meth:`World.manual_options` when a retry would let a cancel compensate the step."""

RETRY_THEN_CANCEL_COUNT = f"operator_{RETRY_THEN_CANCEL}"
"""How :attr:`RunResult.faults` counts them (beside ``operator_retry`` and ``cancel``)."""

DECISIONS = (*MANUAL_ACTIONS, RETRY_THEN_CANCEL)
"""Every decision :meth:`World.manual_options` may offer, in the order it lists them."""

OPERATOR = "simulated operator"
"""The actor the simulated operator's decisions are audited under."""


@dataclass(frozen=True, slots=True)
class Action:
    """One scheduler decision. ``target``: message addresses (see
    :attr:`InFlight.address`), a store, an endpoint or a saga id;
    ``value``: a delay in virtual seconds, or (for ticks, informational) the time."""

    kind: str
    target: tuple[str, ...] = ()
    value: float | None = None

    @property
    def fault(self) -> bool:
        """True for the faults the budget bounds and :func:`~sagakit.testing.sim.shrink` removes."""
        return self.kind in FAULT_KINDS

    def to_json(self) -> list[Any]:
        """``[kind, *target]`` plus the value if any (round-trips through :meth:`from_json`)."""
        out: list[Any] = [self.kind, *self.target]
        if self.value is not None:
            out.append(self.value)
        return out

    @classmethod
    def from_json(cls, item: Sequence[Any]) -> Action:
        """The action :meth:`to_json` wrote."""
        kind, *rest = item
        value = float(rest.pop()) if rest and isinstance(rest[-1], int | float) else None
        return cls(str(kind), tuple(str(x) for x in rest), value)


@dataclass
class Verdict:
    """A world's invariant check: which hold, and every violation as text."""

    invariants: dict[str, bool]
    violations: list[str]
    outcomes: dict[str, int] = field(default_factory=dict)
    """How many sagas ended in each state."""
    notes: list[str] = field(default_factory=list)
    """Worth a look, not violations (e.g. sagas waiting in the manual queue)."""
    exercised: Counter[str] = field(default_factory=Counter)
    """What the sagas' histories show was exercised
    (:func:`sagakit.testing.coverage.exercised`)."""

    @property
    def ok(self) -> bool:
        """True when every invariant holds and nothing else went wrong."""
        return all(self.invariants.values()) and not self.violations


class World(Protocol):
    """What the scheduler drives: built fresh per run by a :data:`WorldFactory`."""

    @property
    def clock(self) -> VirtualClock:
        """The clock every component of the world reads."""
        ...

    @property
    def network(self) -> SimNetwork:
        """The transport every relay publishes to and every consumer subscribed on."""
        ...

    @property
    def hook(self) -> SimFaultHook:
        """The fault hook every consumer was given."""
        ...

    @property
    def timers(self) -> Timers:
        """What ticks fire: the orchestrator's timers, or a choreography's periodic jobs."""
        ...

    @property
    def relays(self) -> Mapping[str, Relay]:
        """One relay per store, by store name."""
        ...

    @property
    def routes(self) -> Mapping[str, Store]:
        """Each endpoint's store."""
        ...

    async def begin(self) -> int:
        """Start the sagas of this run; return how many."""
        ...

    async def all_terminal(self) -> bool:
        """True when every saga is in a terminal state."""
        ...

    async def running(self) -> list[str]:
        """The ids of the sagas a customer may cancel now, sorted (none: no cancelling)."""
        ...

    async def cancel(self, saga_id: str, reason: str) -> str:
        """Cancel a saga; return the store it wrote to. :class:`SagaNotFound` if none."""
        ...

    async def manual(self) -> list[str]:
        """The ids of the sagas waiting for a person, sorted (none: no operator)."""
        ...

    async def manual_options(self, saga_id: str) -> list[tuple[str, int | None]]:
        """The decisions the machine would accept for ``saga_id`` now: ``(action, rung)``
        pairs (a rung only for ``use_rung``), in :data:`DECISIONS` order
        (:data:`RETRY_THEN_CANCEL` when a retry would let the customer cancel)."""
        ...

    async def resolve(self, saga_id: str, action: str, rung: int | None, reason: str) -> str:
        """Apply a person's decision; return the store it wrote to.

        :class:`ManualActionRefused` if the machine refuses it, :class:`SagaNotFound`
        if there is no such saga.
        """
        ...

    async def watch(self) -> list[str]:
        """Check what must hold at every moment (after every step; ``"name: text"`` per
        violation, an empty list when all hold)."""
        ...

    async def check(self) -> Verdict:
        """Check the invariants (the system is quiescent)."""
        ...

    async def fingerprint(self) -> str:
        """A digest of the outcome (same seed, same schedule: same fingerprint)."""
        ...

    async def close(self) -> None:
        """Release everything (files included)."""
        ...


WorldFactory = Callable[[int], Awaitable[World]]
"""Builds a fresh world for a seed (the seed decides the world, e.g. its orders)."""


@dataclass
class RunResult:
    """What one simulated run did and found."""

    seed: int
    schedule: list[Action]
    faults: Counter[str]
    verdict: Verdict
    sagas: int
    steps: int
    fingerprint: str
    applied: list[Action] = field(default_factory=list)
    """For replays: the actions of the given schedule that applied (the rest were skipped)."""

    @property
    def ok(self) -> bool:
        """True when the run kept every invariant."""
        return self.verdict.ok

    @property
    def failed_invariants(self) -> set[str]:
        """The names of the violated invariants (and ``liveness``/``engine_error``)."""
        names = {k for k, ok in self.verdict.invariants.items() if not ok}
        return names | {v.split(":", 1)[0] for v in self.verdict.violations}

    def fault_count(self) -> int:
        """How many faults the schedule injected."""
        return sum(1 for a in self.schedule if a.fault)


@dataclass(frozen=True)
class SimConfig:
    """How hard the scheduler pushes: fault budget, rates, step limits."""

    budget: int = 8
    fault_rate: float = 0.15
    max_steps: int = 400
    fair_steps: int = 5000
    batch_rate: float = 0.2
    newest_rate: float = 0.3
    """How often the newest deliverable message goes first (overtaking is what breaks
    ordering assumptions; a uniform pick rarely lets the last of many messages win)."""
    max_batch: int = 3
    cancel_rate: float = 0.01
    """How often (per step, at most ``max_cancels`` per run) a running saga is cancelled:
    not a fault but a customer changing their mind, at the worst possible moment."""
    max_cancels: int = 1
    operator_rate: float = 0.1
    """How often (per step, while a saga waits for a person) the simulated operator
    decides: not a fault but a person, while late replies from before the decision are
    still on their way (at most ``max_decisions`` decisions per run, fair phase included)."""
    max_decisions: int = 3
    fair_decision_rate: float = 0.8
    """In the fair phase, once nothing else can happen: the chance that a waiting saga
    gets a decision (the rest stay in the manual queue, as some do in production)."""
    refused_rate: float = 0.1
    """How often the operator picks any action instead of one the machine accepts (a
    refused decision changes nothing and is recorded as such)."""
    overtake_rate: float = 0.75
    """After a :data:`RETRY_THEN_CANCEL`: how often the retried command is slow on its
    way (a delay), so that the compensation reaches the participant first. (In the other
    order the retry's effect is undone.)"""
    delay: tuple[float, float] = (0.5, 8.0)
    partition: tuple[float, float] = (2.0, 25.0)
    long_partition: tuple[float, float] = (60.0, 200.0)
    long_partition_rate: float = 0.15
    """How often a partition is an outage instead: longer than every retry of a command
    (its outcome becomes unknown, a compensation's goes to a person) and than the
    saga's deadline."""
    fingerprint: bool = False
    """Compute :attr:`RunResult.fingerprint` (a digest of the outcome; costs a few ms)."""
