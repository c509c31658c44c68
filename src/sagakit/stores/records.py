"""The records a store keeps and hands out (outbox rows, mailbox messages, dead letters,
idempotency records, inputs set aside) and how sagas are selected for a listing; the
protocols that use them are in :mod:`sagakit.stores.base`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from sagakit.core.envelope import Envelope
from sagakit.core.instance import SagaInstance, SagaState


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A message written by a transaction, waiting for the relay to publish it."""

    id: int
    envelope: Envelope


class SagaColumns(Protocol):
    """The fields a :class:`SagaQuery` looks at (a :class:`SagaInstance` has them)."""

    @property
    def saga_id(self) -> str: ...
    @property
    def definition(self) -> str: ...
    @property
    def definition_version(self) -> int: ...
    @property
    def state(self) -> SagaState: ...
    @property
    def cursor(self) -> int: ...
    @property
    def created_at(self) -> float: ...
    @property
    def updated_at(self) -> float: ...
    @property
    def reason(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class SagaQuery:
    """Which sagas :meth:`Store.find_sagas` returns; each field set narrows the selection.

    ``None`` leaves a criterion out; an empty tuple matches nothing (as
    ``list_sagas(states=[])`` does). ``positions`` are ``(definition, version, cursor)``
    triples: a step's name only means something in a definition, so callers that filter
    by step name translate it with the definitions they know (see ``sagakit.api``).
    Times are inclusive bounds on ``created_at`` (``created_*``) and on ``updated_at``,
    when the saga last changed (``updated_*``: for a saga in the manual queue, when it
    entered it). ``reason_contains`` selects the sagas whose reason holds that text,
    ignoring case (SQLite folds only ASCII letters; an empty text selects every saga).
    """

    states: tuple[SagaState, ...] | None = None
    definition: str | None = None
    version: int | None = None
    positions: tuple[tuple[str, int, int], ...] | None = None
    created_from: float | None = None
    created_until: float | None = None
    saga_ids: tuple[str, ...] | None = None
    updated_from: float | None = None
    updated_until: float | None = None
    reason_contains: str | None = None

    def matches(self, inst: SagaColumns) -> bool:
        """Whether ``inst`` is selected (the in-memory reference of the SQL filters)."""
        return (
            (self.states is None or inst.state in self.states)
            and (self.definition is None or inst.definition == self.definition)
            and (self.version is None or inst.definition_version == self.version)
            and (
                self.positions is None
                or (inst.definition, inst.definition_version, inst.cursor) in self.positions
            )
            and (self.created_from is None or inst.created_at >= self.created_from)
            and (self.created_until is None or inst.created_at <= self.created_until)
            and (self.saga_ids is None or inst.saga_id in self.saga_ids)
            and (self.updated_from is None or inst.updated_at >= self.updated_from)
            and (self.updated_until is None or inst.updated_at <= self.updated_until)
            and (
                self.reason_contains is None
                or ascii_lower(self.reason_contains) in ascii_lower(inst.reason or "")
            )
        )


def ascii_lower(text: str) -> str:
    """``text`` with A-Z lowered and every other character kept, as SQLite's ``lower``."""
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class SagaOrder(StrEnum):
    """How :meth:`Store.find_sagas` orders its page (ties in insertion order, the same
    direction)."""

    NEWEST = "newest"
    """Last created first (the default)."""
    OLDEST = "oldest"
    """First created first: the oldest sagas."""
    CHANGED_LAST = "changed_last"
    """Last changed first (``updated_at``, newest first)."""
    CHANGED_FIRST = "changed_first"
    """Least recently changed first: for the manual queue, the longest waiting."""

    @property
    def column(self) -> str:
        """The ``sagas`` column the order sorts on."""
        return "created_at" if self in (SagaOrder.NEWEST, SagaOrder.OLDEST) else "updated_at"

    @property
    def descending(self) -> bool:
        """Whether the largest value comes first."""
        return self in (SagaOrder.NEWEST, SagaOrder.CHANGED_LAST)


@dataclass(frozen=True, slots=True)
class SagaPage:
    """One page of :meth:`Store.find_sagas`, with how many sagas the query matches in all."""

    total: int
    items: list[SagaInstance]


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message in an endpoint's mailbox (the embedded transport's queue).

    ``body`` is the raw text as published: it may be malformed, which is why it is not
    parsed here. ``deliveries`` counts how often it was handed out, this time included.
    """

    id: int
    endpoint: str
    body: str
    deliveries: int
    enqueued_at: float


REPLAYED = "replayed"
"""Settlement of a dead letter put back on its way (its message re-queued in the outbox)."""
DISCARDED = "discarded"
"""Settlement of a dead letter a person decided to drop."""
SETTLEMENTS = (REPLAYED, DISCARDED)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be handled, parked with its reason.

    It stays *open* until a person settles it (``replayed`` or ``discarded``); the row
    is kept with who settled it, when and why, so the dead-letter table is also the
    audit trail of what became of every parked message.
    """

    id: int
    endpoint: str
    message_id: str | None
    body: str
    reason: str
    at: float
    settlement: str | None = None
    settled_by: str | None = None
    settled_at: float | None = None
    settle_reason: str | None = None

    @property
    def open(self) -> bool:
        """Whether nobody settled it yet (it still counts as parked)."""
        return self.settled_at is None


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """The outcome a participant recorded for an idempotency key.

    ``tombstone`` marks a key whose compensation arrived before (or without) its
    action: a late action for that key is refused instead of applied after its undo.
    """

    key: str
    outcome: dict[str, Any]
    tombstone: bool
    at: float


SET_ASIDE_KINDS = ("reply", "local", "timer")
"""What a :class:`SetAside` row holds: a reply, a local step's command, a fired timer."""


@dataclass(frozen=True, slots=True)
class SetAside:
    """An input of a saga set aside because its definition version was missing.

    The process that got it (a reply, a local step's command, a fired timer) does not
    have ``definition@definition_version``; a process that has it applies it later
    (see :mod:`sagakit.runtime.set_aside`). ``body`` is the message as JSON
    (``Envelope.to_json()``) for ``reply`` and ``local``, the timer for ``timer``.
    """

    id: int
    saga_id: str
    definition: str
    definition_version: int
    kind: str
    body: str
    at: float

    @property
    def waiting_for(self) -> str:
        """``name@version``: the definition version the saga waits for."""
        return f"{self.definition}@{self.definition_version}"
