"""The exhaustive checker's vocabulary: its bounds, its modelled world, its report.

:class:`Bounds` says how much of the world :class:`~sagakit.testing.checker.Checker`
explores, :class:`World` is one state of the modelled system (immutable: transitions
build new worlds), :class:`CheckReport` is what the exploration found. The helpers read
the participants' records as a participant does; :func:`cap_attempts` caps a
definition's retry policies (see :mod:`sagakit.testing.checker`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sagakit.core.definition import RetryPolicy, SagaDefinition
from sagakit.core.envelope import MANUAL_RETRY, Envelope
from sagakit.core.instance import SagaInstance

NOW = 1_000.0
ORCHESTRATOR = "orchestrator"

TimerRow = tuple[str, str, str]  # (saga id, name, fence)


@dataclass(frozen=True)
class Bounds:
    """How much of the world the checker explores (see :mod:`sagakit.testing.checker`)."""

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
