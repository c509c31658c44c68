"""Choreography views in a given state, for tests of what reads them (API, console, queue).

A :class:`~sagakit.runtime.tracker.Tracker` builds its views from facts the services
publish; a test of the manual queue wants a view that heard some facts and then
nothing, without arranging for real services to stop half-way. :func:`heard` writes
what the tracker would have written had it heard ``facts`` (the services never see
them), and :func:`escalate` runs the tracker's SLA check as if time had passed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sagakit.core.envelope import Envelope, MessageKind
from sagakit.core.instance import SagaInstance
from sagakit.runtime.tracker import Tracker


async def heard(
    tracker: Tracker,
    correlation_id: str,
    facts: Sequence[str],
    payload: Mapping[str, Any] | None = None,
) -> SagaInstance:
    """The view of ``correlation_id`` after the tracker heard ``facts``, in order."""
    if not facts:
        raise ValueError("heard() needs at least one fact (a view begins with one)")
    inst: SagaInstance | None = None
    now = time.time()
    async with tracker.store.transaction() as tx:
        inst = await tx.saga_get(correlation_id)
        for i, type_ in enumerate(facts):
            ev = Envelope(
                message_id=uuid.uuid4().hex,
                type=type_,
                version=1,
                kind=MessageKind.EVENT,
                source="sagakit.testing",
                correlation_id=correlation_id,
                causation_id=None,
                saga_id=correlation_id,
                business_key=correlation_id,
                occurred_at=now + i * 0.001,  # in order, a millisecond apart
                payload=dict(payload or {}),
            )
            inst = (await tracker.observe(tx, inst, ev)).instance
    return inst  # type: ignore[return-value]  # set by the first fact


async def escalate(tracker: Tracker, *, after: float | None = None) -> int:
    """Run the tracker's SLA check ``after`` seconds from now (default: twice its SLA),
    putting every running view in the manual queue; returns how many were escalated."""
    later = time.time() + (2 * tracker.flow.sla if after is None else after)
    return await tracker.check_stuck(now=later)
