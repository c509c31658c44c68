"""How the state machine names what it sends and sets: idempotency keys and timers.

A step's action, each rung of its compensation and its status queries have keys made
from the saga id and the step name, so a participant serialises every try of one
effect on one key, and a reply routes back to its step by its key alone. Timers carry
a fence that names what they were set for (see :mod:`sagakit.core.machine`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sagakit.core.instance import Timer
from sagakit.errors import MessageError

STEP_TIMER = "step"
DEADLINE_TIMER = "deadline"


@dataclass(frozen=True, slots=True)
class KeyParts:
    """An idempotency key split into its parts."""

    saga_id: str
    step: str
    phase: str  # "action" | "comp" | "query"
    rung: int = 0


def deadline_timer(saga_id: str, deadline_at: float) -> Timer:
    """The saga's deadline timer; its fence names the deadline it was set for."""
    return Timer(saga_id, DEADLINE_TIMER, deadline_at, f"deadline@{deadline_at!r}")


def _deadline_of(fence: str) -> float | None:
    """The deadline a deadline timer's fence was set for (None: an older, bare fence)."""
    _, at, set_for = fence.partition("@")
    try:
        return float(set_for) if at else None
    except ValueError:
        return None


def action_key(saga_id: str, step: str) -> str:
    """Idempotency key of a step's action."""
    return f"{saga_id}:{step}:action"


def compensation_key(saga_id: str, step: str, rung: int) -> str:
    """Idempotency key of one rung of a step's compensation."""
    return f"{saga_id}:{step}:comp:{rung}"


def query_key(saga_id: str, step: str) -> str:
    """Key of a step's status queries (queries have no effect; the key routes the answer)."""
    return f"{saga_id}:{step}:query"


def parse_key(key: str) -> KeyParts:
    """Split a key made by :func:`action_key`, :func:`compensation_key` or :func:`query_key`."""
    parts = key.split(":")
    if len(parts) >= 3 and parts[-1] in ("action", "query"):
        return KeyParts(":".join(parts[:-2]), parts[-2], parts[-1])
    if len(parts) >= 4 and parts[-2] == "comp" and parts[-1].isdigit():
        return KeyParts(":".join(parts[:-3]), parts[-3], "comp", int(parts[-1]))
    raise MessageError(f"idempotency key {key!r} is not a sagakit step key")
