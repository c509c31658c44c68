"""Saga definitions: named, versioned lists of steps, validated when they are built.

A definition is plain data plus the callables that build command payloads or run local
steps. It is checked once, at construction, so a mistake (a compensation on the pivot,
a retriable step before it) is a :class:`~sagakit.errors.DefinitionError` at import
time rather than a stuck saga in production.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias

from sagakit.core.personal import Handling, PersonalField, PersonalPolicy, Tokeniser
from sagakit.errors import DefinitionError

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,99}")


class StepKind(StrEnum):
    """Where a step stands relative to the point of no return."""

    COMPENSATABLE = "compensatable"
    """Before the pivot; undone by its compensation if the saga fails later."""
    PIVOT = "pivot"
    """The point of no return: once it succeeds the saga only moves forward."""
    RETRIABLE = "retriable"
    """After the pivot; retried until it succeeds or a person decides."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently an action (or a compensation rung) is retried.

    ``max_attempts`` counts the first try. Backoff grows by ``multiplier`` from
    ``initial_backoff`` up to ``max_backoff``; ``jitter`` spreads it by that fraction,
    deterministically per (saga, step, attempt) so that replays compute the same delay.

    ``timeout_multiplier`` makes the wait for an answer grow from one attempt to the
    next (the step's ``timeout`` for the first, times the multiplier for each later one,
    at most ``max_timeout``). A fixed timeout mistakes a queue backlog for a lost
    message: under a burst every attempt times out while the command still waits in
    line, the retries lengthen the line, and the saga runs out of attempts in seconds.
    Growing timeouts keep the first answer fast on a healthy system and make the whole
    budget span minutes on a loaded one.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.2
    multiplier: float = 2.0
    max_backoff: float = 30.0
    jitter: float = 0.2
    timeout_multiplier: float = 1.0
    max_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise DefinitionError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        # Written as "not >=" so that NaN is refused too.
        if not (self.initial_backoff >= 0 and self.max_backoff >= 0):
            raise DefinitionError("RetryPolicy backoffs must be >= 0 seconds")
        if not (self.initial_backoff < float("inf") and self.max_backoff < float("inf")):
            raise DefinitionError("RetryPolicy backoffs must be finite")
        if not 1 <= self.multiplier < float("inf"):
            raise DefinitionError(f"RetryPolicy.multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:  # NaN fails this comparison too
            raise DefinitionError(f"RetryPolicy.jitter must be within [0, 1], got {self.jitter}")
        if not 1 <= self.timeout_multiplier < float("inf"):
            raise DefinitionError(
                f"RetryPolicy.timeout_multiplier must be >= 1, got {self.timeout_multiplier}"
            )
        if self.max_timeout is not None and not 0 < self.max_timeout < float("inf"):
            raise DefinitionError(
                f"RetryPolicy.max_timeout must be a positive number of seconds, "
                f"got {self.max_timeout}"
            )

    def timeout(self, base: float, attempt: int) -> float:
        """Seconds to wait for an answer to attempt ``attempt`` (>= 1) of an action.

        ``base`` is the timeout of the first attempt (the step's or the rung's); a
        ``max_timeout`` below ``base`` never shortens it.
        """
        if self.timeout_multiplier == 1.0:
            return base
        cap = float("inf") if self.max_timeout is None else max(base, self.max_timeout)
        value = base
        for _ in range(max(attempt - 1, 0)):  # stepwise: no float overflow
            if value >= cap:
                break
            value *= self.timeout_multiplier
        return min(value, cap)

    def backoff(self, attempt: int, seed: str) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` >= 1)."""
        base = self.initial_backoff
        # Grow step by step and stop at the cap: multiplier ** attempt overflows a float
        # long before a patient retriable step runs out of attempts.
        for _ in range(max(attempt - 1, 0)):
            if base >= self.max_backoff:
                break
            base *= self.multiplier
        base = min(base, self.max_backoff)
        if not self.jitter or not base:
            return base
        digest = hashlib.blake2b(f"{seed}:{attempt}".encode(), digest_size=8).digest()
        unit = int.from_bytes(digest, "big") / 2**64  # in [0, 1)
        return base * (1 - self.jitter + 2 * self.jitter * unit)


@dataclass(frozen=True, slots=True)
class SagaView:
    """What a payload builder or a local step sees of a running saga."""

    saga_id: str
    business_key: str
    data: Mapping[str, Any]
    results: Mapping[str, Mapping[str, Any]]


PayloadBuilder: TypeAlias = Callable[[SagaView], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class StepContext:
    """Handed to a local step callable; ``idempotency_key`` is stable across retries."""

    saga_id: str
    business_key: str
    step: str
    attempt: int
    idempotency_key: str
    data: Mapping[str, Any]
    results: Mapping[str, Mapping[str, Any]]


LocalFn: TypeAlias = Callable[
    [StepContext], "Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None"
]


@dataclass(frozen=True, slots=True)
class CommandAction:
    """Send command ``type`` to the participant at ``endpoint`` and wait for its reply."""

    endpoint: str
    type: str
    payload: PayloadBuilder | None = None
    version: int = 1

    @property
    def label(self) -> str:
        """A short name for history and diagrams."""
        return f"{self.endpoint}.{self.type}"

    def build(self, view: SagaView) -> dict[str, Any]:
        """The command payload for this saga (the saga data when no builder is set)."""
        source = self.payload(view) if self.payload is not None else view.data
        return dict(source)


@dataclass(frozen=True, slots=True)
class LocalAction:
    """Run ``fn`` in the worker process, at least once, with a stable idempotency key."""

    fn: LocalFn
    name: str = ""

    @property
    def label(self) -> str:
        """A short name for history and diagrams."""
        return self.name or getattr(self.fn, "__name__", "local")


Action: TypeAlias = CommandAction | LocalAction
ActionLike: TypeAlias = "CommandAction | LocalAction | LocalFn"


def command(
    endpoint: str, type: str, payload: PayloadBuilder | None = None, *, version: int = 1
) -> CommandAction:
    """Build a step action that sends a command to a participant service."""
    return CommandAction(endpoint=endpoint, type=type, payload=payload, version=version)


def local(fn: LocalFn, name: str = "") -> LocalAction:
    """Build a step action that runs a Python callable (sync or async) in the worker."""
    return LocalAction(fn=fn, name=name)


def _as_action(value: object, where: str) -> Action:
    if isinstance(value, CommandAction | LocalAction):
        return value
    if callable(value):
        return LocalAction(fn=value)
    raise DefinitionError(
        f"{where}: expected command(...), local(...) or a callable, got {value!r}"
    )


@dataclass(frozen=True, slots=True)
class Rung:
    """One rung of a compensation ladder: an action with its own retry and timeout."""

    action: Action
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float = 30.0

    @property
    def label(self) -> str:
        """A short name for history and diagrams."""
        return self.action.label


class Step:
    """One step of a saga.

    ``compensation`` is a single action, or a ladder: a sequence of actions or
    :class:`Rung` s tried in order (void -> refund -> credit note); when the last rung
    fails, the saga goes to the manual queue with the reason.
    """

    __slots__ = (
        "action",
        "kind",
        "ladder",
        "name",
        "optional",
        "retry",
        "status",
        "status_query",
        "timeout",
    )

    def __init__(
        self,
        name: str,
        action: ActionLike,
        compensation: ActionLike | Rung | Sequence[ActionLike | Rung] | None = None,
        *,
        kind: StepKind | str = StepKind.COMPENSATABLE,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        status_query: ActionLike | None = None,
        status: str | None = None,
        optional: bool = False,
    ) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise DefinitionError(
                f"step name {name!r} is invalid: use letters, digits, '_', '.', '-' "
                "(starting with a letter, at most 100 characters)"
            )
        try:
            self.kind = StepKind(kind)
        except ValueError:
            raise DefinitionError(
                f"step {name!r}: kind {kind!r} is not one of {', '.join(k.value for k in StepKind)}"
            ) from None
        if not timeout > 0:
            raise DefinitionError(f"step {name!r}: timeout must be > 0 seconds, got {timeout}")
        self.name = name
        self.action: Action = _as_action(action, f"step {name!r} action")
        self.retry = retry or RetryPolicy()
        self.timeout = float(timeout)
        self.status_query: Action | None = (
            None
            if status_query is None
            else _as_action(status_query, f"step {name!r} status_query")
        )
        self.status = status
        self.optional = optional
        rungs: list[Rung] = []
        if compensation is not None:
            items: Sequence[object]
            if isinstance(compensation, CommandAction | LocalAction | Rung) or callable(
                compensation
            ):
                items = [compensation]
            elif isinstance(compensation, Sequence) and not isinstance(compensation, str):
                items = compensation
            else:
                raise DefinitionError(
                    f"step {name!r}: compensation {compensation!r} is not an action"
                )
            for i, item in enumerate(items):
                if isinstance(item, Rung):
                    rungs.append(item)
                else:
                    rungs.append(
                        Rung(
                            action=_as_action(item, f"step {name!r} compensation rung {i}"),
                            retry=self.retry,
                            timeout=self.timeout,
                        )
                    )
            if not rungs:
                raise DefinitionError(f"step {name!r}: compensation ladder is empty")
        self.ladder: tuple[Rung, ...] = tuple(rungs)

    @property
    def compensatable(self) -> bool:
        """True when the step has a compensation to run if the saga fails after it."""
        return bool(self.ladder)

    def __repr__(self) -> str:
        return f"Step({self.name!r}, {self.action.label}, kind={self.kind.value})"


class SagaDefinition:
    """A named, versioned saga: an ordered list of steps.

    ``deadline`` is the saga's SLA in seconds: past it a saga that has not reached its
    pivot is compensated and ends TIMED_OUT; one past its pivot goes to the manual queue.
    Status labels are what a user sees: each step's ``status`` while it runs, then
    ``completed_status`` (``partial_status`` when an optional step was skipped),
    ``cancelling_status``/``cancelled_status`` or ``attention_status``.

    ``personal`` declares the personal fields of the saga's data: field name (a dotted
    path into nested mappings) -> ``"refuse"`` (only a token is taken), ``"tokenise"``
    (the engine replaces the value by a stable token, made by ``tokeniser`` or by
    default an HMAC with the deployment's ``SAGAKIT_PERSONAL_KEY``), ``"public"`` (not
    personal, never scanned) or a :class:`~sagakit.core.personal.PersonalField`. Every
    start is checked before anything is stored: other strings of the data and the
    business key holding an e-mail address, a card number or a street address are
    refused too, unless ``scan_personal=False`` (see :mod:`sagakit.core.personal`).
    """

    def __init__(
        self,
        name: str,
        steps: Sequence[Step],
        *,
        version: int = 1,
        deadline: float | None = None,
        completed_status: str = "COMPLETED",
        cancelling_status: str = "CANCELLING",
        cancelled_status: str = "CANCELLED",
        attention_status: str = "NEEDS_ATTENTION",
        started_status: str = "PENDING",
        partial_status: str = "PARTIALLY_COMPLETED",
        personal: Mapping[str, Handling | str | PersonalField] | None = None,
        tokeniser: Tokeniser | None = None,
        scan_personal: bool = True,
    ) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise DefinitionError(
                f"saga name {name!r} is invalid: use letters, digits, '_', '.', '-' "
                "(starting with a letter, at most 100 characters)"
            )
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise DefinitionError(
                f"saga {name!r}: version must be an integer >= 1, got {version!r}"
            )
        if deadline is not None and not deadline > 0:
            raise DefinitionError(f"saga {name!r}: deadline must be > 0 seconds, got {deadline}")
        steps = list(steps)
        if not steps:
            raise DefinitionError(f"saga {name!r} has no steps")
        for s in steps:
            if not isinstance(s, Step):
                raise DefinitionError(f"saga {name!r}: {s!r} is not a Step")
        seen: set[str] = set()
        for s in steps:
            if s.name in seen:
                raise DefinitionError(f"saga {name!r}: duplicate step name {s.name!r}")
            seen.add(s.name)
        pivots = [i for i, s in enumerate(steps) if s.kind is StepKind.PIVOT]
        if len(pivots) > 1:
            names = ", ".join(repr(steps[i].name) for i in pivots)
            raise DefinitionError(f"saga {name!r} has more than one pivot step: {names}")
        pivot = pivots[0] if pivots else None
        for i, s in enumerate(steps):
            if s.kind is StepKind.PIVOT and s.ladder:
                raise DefinitionError(
                    f"saga {name!r}: pivot step {s.name!r} cannot have a compensation "
                    "(it is the point of no return)"
                )
            if s.kind is StepKind.RETRIABLE:
                if pivot is None or i < pivot:
                    raise DefinitionError(
                        f"saga {name!r}: retriable step {s.name!r} must come after the pivot "
                        "(before it, steps are compensatable)"
                    )
                if s.ladder:
                    raise DefinitionError(
                        f"saga {name!r}: retriable step {s.name!r} cannot have a compensation "
                        "(nothing after the pivot is undone)"
                    )
            if s.kind is StepKind.COMPENSATABLE and pivot is not None and i > pivot:
                raise DefinitionError(
                    f"saga {name!r}: step {s.name!r} comes after the pivot "
                    f"{steps[pivot].name!r} and must be kind='retriable'"
                )
            if s.optional and s.kind is not StepKind.COMPENSATABLE:
                raise DefinitionError(
                    f"saga {name!r}: only compensatable steps can be optional "
                    f"({s.name!r} is {s.kind.value})"
                )
        self.name = name
        self.version = version
        self.steps: tuple[Step, ...] = tuple(steps)
        self.pivot_index = pivot
        self.deadline = deadline
        self.completed_status = completed_status
        self.cancelling_status = cancelling_status
        self.cancelled_status = cancelled_status
        self.attention_status = attention_status
        self.started_status = started_status
        self.partial_status = partial_status
        self.personal = PersonalPolicy(name, personal, tokeniser=tokeniser, scan=scan_personal)
        """How starts treat personal data; :meth:`PersonalPolicy.admit` applies it."""
        self._index = {s.name: i for i, s in enumerate(steps)}

    @property
    def key(self) -> str:
        """``name@version``, how instances refer to their definition."""
        return f"{self.name}@{self.version}"

    def step_index(self, name: str) -> int:
        """Index of the step called ``name``; ``DefinitionError`` if there is none."""
        try:
            return self._index[name]
        except KeyError:
            raise DefinitionError(f"saga {self.key} has no step {name!r}") from None

    def past_pivot(self, index: int) -> bool:
        """True when step ``index`` comes after the pivot (its failure is never compensated)."""
        return self.pivot_index is not None and index > self.pivot_index

    def status_may_follow(self, before: str, after: str) -> bool:
        """Whether a saga's user-visible status may change from ``before`` to ``after``:
        progress never goes back (the started status, then each step's, then the
        completed or partial one), a saga being cancelled only ends cancelled or in
        the attention status, and a final status never changes (statuses that say
        "undoing" or "needs attention" may come from any progress)."""
        if before == after:
            return True
        if before == self.cancelling_status:
            return after in (self.cancelled_status, self.attention_status)
        finals = (
            self.cancelled_status,
            self.attention_status,
            self.completed_status,
            self.partial_status,
        )
        if before in finals:
            return False
        rank = self._status_rank
        if after in rank:
            return before in rank and rank[after] > rank[before]
        return after in (self.cancelling_status, self.cancelled_status, self.attention_status)

    @functools.cached_property
    def _status_rank(self) -> dict[str, int]:
        """Each forward status's place: started, each step's, completed (= partial)."""
        forward = [self.started_status, *(s.status for s in self.steps if s.status)]
        forward.append(self.completed_status)
        rank = {label: i for i, label in enumerate(forward)}
        rank[self.partial_status] = rank[self.completed_status]
        return rank

    def endpoints(self) -> set[str]:
        """Participant endpoints this saga sends commands to."""
        out: set[str] = set()
        for s in self.steps:
            for a in (s.action, s.status_query, *(r.action for r in s.ladder)):
                if isinstance(a, CommandAction):
                    out.add(a.endpoint)
        return out

    def __repr__(self) -> str:
        return f"SagaDefinition({self.key}, {len(self.steps)} steps)"
