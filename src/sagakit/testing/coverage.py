"""What a proof exercised: counts of each kind of transition and fault, from saga history.

A proof that never reaches a code path cannot catch a bug in it. ``sagakit simulate``
and ``sagakit check`` both count, from the history rows the state machine writes, how
often each risky kind of transition happened, so that a kind at zero shows a hole in
the proof rather than a safe system. The kinds (:data:`KINDS`):

* ``compensation``: a compensation rung sent; ``compensation_rung``: a step's undo moved
  down its ladder (void -> refund -> credit note); ``compensation_timeout``: a rung's
  attempt went unanswered;
* ``unknown_outcome``: an action's outcome became unknown; ``status_query``: the saga
  asked a participant what became of an action;
* ``manual_escalation``: a saga went to the manual queue; ``manual_<action>``: a
  person's decision was applied (``manual_retry``, ``manual_mark_done``, ...);
* ``stale_timer`` / ``stale_reply``: a timer or a reply arrived for something the saga
  had moved past (fenced: it moved nothing);
* ``post_pivot_failure``: a step at or after the pivot failed, timed out or was found
  unknown (forward recovery or a person, never compensation);
* ``cancel``: a cancel request; ``deadline``: the saga's deadline passed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from sagakit.core.definition import SagaDefinition
from sagakit.core.instance import HistoryEntry

KINDS = (
    "compensation",
    "compensation_rung",
    "compensation_timeout",
    "unknown_outcome",
    "status_query",
    "manual_escalation",
    "manual_retry",
    "manual_mark_done",
    "manual_compensate",
    "manual_mark_compensated",
    "manual_use_rung",
    "manual_accept_partial",
    "stale_timer",
    "stale_reply",
    "post_pivot_failure",
    "cancel",
    "deadline",
)
"""Every kind :func:`exercised` counts, in report order."""

_SIMPLE = {
    "compensation.sent": "compensation",
    "compensation.escalated": "compensation_rung",
    "compensation.timed_out": "compensation_timeout",
    "outcome.unknown": "unknown_outcome",
    "status.queried": "status_query",
    "manual.escalated": "manual_escalation",
    "timer.stale": "stale_timer",
    "reply.stale": "stale_reply",
    "cancel.requested": "cancel",
    "deadline.passed": "deadline",
}
_POST_PIVOT = ("step.failed", "step.timed_out", "outcome.unknown")


def exercised(
    entries: Iterable[HistoryEntry], definition: SagaDefinition | None = None
) -> Counter[str]:
    """Count the kinds in :data:`KINDS` that ``entries`` (one or many sagas' history) show.

    ``definition`` (the sagas' definition) is needed to tell post-pivot failures; without
    it they are not counted. A history row is counted once per row: a transition that
    logged ``step.timed_out`` and then ``outcome.unknown`` for a step past the pivot
    counts as two post-pivot events, which is what a reader of the history would see.
    """
    counts: Counter[str] = Counter()
    pivot = None if definition is None else definition.pivot_index
    index = {} if definition is None else {s.name: i for i, s in enumerate(definition.steps)}
    for e in entries:
        kind = _SIMPLE.get(e.event)
        if kind is not None:
            counts[kind] += 1
        if e.event == "manual.resolved":
            counts[f"manual_{e.detail.get('action', 'unknown')}"] += 1
        if (
            pivot is not None
            and e.event in _POST_PIVOT
            and e.step is not None
            and index.get(e.step, -1) >= pivot
        ):
            counts["post_pivot_failure"] += 1
    return counts


def render_exercised(counts: Counter[str], *, indent: str = "  ") -> list[str]:
    """Lines for a report: every kind of :data:`KINDS` with its count (zeros shown, since a
    zero is what the report is for), then any other kind counted."""
    width = max(len(k) for k in KINDS)
    lines = [f"{indent}{k:<{width}}  {counts.get(k, 0)}" for k in KINDS]
    lines += [f"{indent}{k:<{width}}  {v}" for k, v in sorted(counts.items()) if k not in KINDS]
    return lines
