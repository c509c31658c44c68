"""Saga instances, step states, timers and history entries: the data the machine moves.

Instances serialise to plain JSON-ready dicts so that every store keeps them the same
way; ``version`` increases by one on every applied transition and doubles as the
fencing token carried by the messages that transition emitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any


class SagaState(StrEnum):
    """Where a saga is. The last five are terminal."""

    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    SUCCEEDED = "SUCCEEDED"
    COMPENSATED = "COMPENSATED"
    FAILED_NEEDS_MANUAL = "FAILED_NEEDS_MANUAL"
    TIMED_OUT = "TIMED_OUT"
    PARTIAL_ACCEPTED = "PARTIAL_ACCEPTED"

    @property
    def terminal(self) -> bool:
        """True for states a saga never leaves on its own."""
        return self not in (SagaState.RUNNING, SagaState.COMPENSATING)


TERMINAL_STATES = frozenset(s for s in SagaState if s.terminal)

MANUAL_STATES: tuple[SagaState, ...] = (SagaState.FAILED_NEEDS_MANUAL,)
"""The states of the manual queue: a person must decide.

``TIMED_OUT`` is not one of them: a saga ends so only once every step it had done is
compensated (one whose compensation fails goes to ``FAILED_NEEDS_MANUAL`` instead),
so there is nothing left to decide, and no manual action applies to it. Listing it
here made a queue that could never be emptied; timed-out sagas are counted by the
metrics and found with the state filter.
"""


class StepStatus(StrEnum):
    """Where one step is."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    WAITING_RETRY = "WAITING_RETRY"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    UNKNOWN = "UNKNOWN"
    """The action may or may not have happened (timed out, or cancelled mid-flight)."""
    QUERYING = "QUERYING"
    """The outcome is unknown and the step's status query is asking the participant."""
    COMPENSATING = "COMPENSATING"
    COMPENSATION_WAITING = "COMPENSATION_WAITING"
    COMPENSATED = "COMPENSATED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"


# Steps in these states may have had an effect that a compensation must undo.
MAY_HAVE_EFFECT = frozenset(
    {
        StepStatus.SUCCEEDED,
        StepStatus.UNKNOWN,
        StepStatus.QUERYING,
        StepStatus.RUNNING,
        StepStatus.WAITING_RETRY,
    }
)


@dataclass(slots=True)
class StepState:
    """The progress of one step in one saga instance.

    Stores keep it positionally (:meth:`to_row`): a new field goes last, with a default.
    """

    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    rung: int = 0
    rung_attempt: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    next_retry_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    queries: int = 0
    """Status queries sent since the outcome became unknown."""
    retry_base: int = 0
    """``attempt`` when a person last asked for a retry: the retry budget counts from here."""
    fence_floor: int = 0
    """Replies to messages sent before this saga version are stale for this step.

    Set when a person resumes the step, so a late answer to a try sent before the
    decision is never mistaken for an answer to the new try."""
    manual_retries: int = 0
    """How often a person asked for this step (or its rung) to be tried again."""

    def copy(self) -> StepState:
        """A shallow copy (``result`` is never mutated in place)."""
        return StepState(
            self.status,
            self.attempt,
            self.rung,
            self.rung_attempt,
            self.result,
            self.error,
            self.next_retry_at,
            self.started_at,
            self.finished_at,
            self.queries,
            self.retry_base,
            self.fence_floor,
            self.manual_retries,
        )

    @property
    def attempts_used(self) -> int:
        """Attempts of the action counted against its retry policy."""
        return self.attempt - self.retry_base

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, by field name (the API's; stores keep :meth:`to_row`)."""
        return dict(zip(_STEP_FIELDS, self.to_row(), strict=True))

    def to_row(self) -> list[Any]:
        """Compact JSON-ready form, the fields in declaration order (how stores keep it).

        A third of the size of :meth:`to_dict` and half the time to encode and decode;
        a saga's steps are written and read at every transition.
        """
        return [
            self.status.value,
            self.attempt,
            self.rung,
            self.rung_attempt,
            self.result,
            self.error,
            self.next_retry_at,
            self.started_at,
            self.finished_at,
            self.queries,
            self.retry_base,
            self.fence_floor,
            self.manual_retries,
        ]

    @classmethod
    def from_row(cls, raw: list[Any] | dict[str, Any]) -> StepState:
        """Inverse of :meth:`to_row`; also reads :meth:`to_dict`'s form (older rows).

        A shorter list (written before a field was added) leaves the missing fields at
        their defaults: new fields are only ever appended.
        """
        if isinstance(raw, dict):
            return cls.from_dict(raw)
        # A dict lookup: calling the enum costs ~1 us, and every load decodes every step.
        status = _STEP_STATUS.get(raw[0]) or StepStatus(raw[0])  # unknown: ValueError
        return cls(status, *raw[1:])

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StepState:
        """Inverse of :meth:`to_dict`."""
        return cls(
            status=StepStatus(raw["status"]),
            attempt=raw["attempt"],
            rung=raw["rung"],
            rung_attempt=raw["rung_attempt"],
            result=raw.get("result"),
            error=raw.get("error"),
            next_retry_at=raw.get("next_retry_at"),
            started_at=raw.get("started_at"),
            finished_at=raw.get("finished_at"),
            queries=raw.get("queries", 0),
            retry_base=raw.get("retry_base", 0),
            fence_floor=raw.get("fence_floor", 0),
            manual_retries=raw.get("manual_retries", 0),
        )


_STEP_STATUS: dict[str, StepStatus] = {s.value: s for s in StepStatus}
_STEP_FIELDS = tuple(f.name for f in fields(StepState))
"""StepState's fields in declaration order: the keys of to_dict, the order of to_row."""


@dataclass(slots=True)
class SagaInstance:
    """One run of a saga definition."""

    saga_id: str
    definition: str
    definition_version: int
    business_key: str
    correlation_id: str
    state: SagaState
    status: str
    data: dict[str, Any]
    steps: list[StepState]
    created_at: float
    updated_at: float
    cursor: int = 0
    version: int = 0
    deadline_at: float | None = None
    reason: str | None = None
    cancel_requested: bool = False
    timed_out: bool = False

    @property
    def terminal(self) -> bool:
        """True once the saga reached a terminal state."""
        return self.state.terminal

    def copy(self) -> SagaInstance:
        """A copy whose steps can be changed without touching this one."""
        return SagaInstance(
            saga_id=self.saga_id,
            definition=self.definition,
            definition_version=self.definition_version,
            business_key=self.business_key,
            correlation_id=self.correlation_id,
            state=self.state,
            status=self.status,
            data=self.data,
            steps=[s.copy() for s in self.steps],
            created_at=self.created_at,
            updated_at=self.updated_at,
            cursor=self.cursor,
            version=self.version,
            deadline_at=self.deadline_at,
            reason=self.reason,
            cancel_requested=self.cancel_requested,
            timed_out=self.timed_out,
        )

    def results(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """Results of the steps that succeeded, by step name (``names`` in step order)."""
        return {
            n: s.result
            for n, s in zip(names, self.steps, strict=True)
            if s.result is not None and s.status is not StepStatus.FAILED
        }

    def steps_to_json(self) -> list[list[Any]]:
        """Per-step state, JSON-ready, compact (:meth:`StepState.to_row`): what stores keep."""
        return [s.to_row() for s in self.steps]

    @staticmethod
    def steps_from_json(raw: list[Any]) -> list[StepState]:
        """Inverse of :meth:`steps_to_json` (reads the older per-step objects too)."""
        return [StepState.from_row(s) for s in raw]


@dataclass(frozen=True, slots=True)
class Timer:
    """A durable timer of one saga. ``name`` is unique per saga: setting it again replaces it.

    ``fence`` says which step, phase and attempt it was set for, so a timer that fires
    after the saga moved on is recognised as stale and changes nothing.
    """

    saga_id: str
    name: str
    due_at: float
    fence: str


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One row of a saga's append-only history."""

    saga_id: str
    version: int
    at: float
    event: str
    state: SagaState
    status: str
    step: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
