"""Row conversion shared by the SQL stores: instances, history and JSON columns.

Both SQL adapters keep sagas and history in the same columns, in the same order; only
how a boolean is bound differs (SQLite stores integers), hence ``flag``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState

# A prebuilt encoder: json.dumps with non-default arguments builds a new one per call.
dumps = json.JSONEncoder(separators=(",", ":")).encode
"""Compact JSON text of a column value."""
loads = json.JSONDecoder().decode
"""Parse a JSON column."""


def saga_insert_params(i: SagaInstance, flag: Callable[[bool], Any] = int) -> tuple[Any, ...]:
    """Parameters of the saga insert statement."""
    return (
        i.saga_id,
        i.definition,
        i.definition_version,
        i.business_key,
        i.state.value,
        i.status,
        i.version,
        i.cursor,
        i.correlation_id,
        i.created_at,
        i.updated_at,
        i.deadline_at,
        i.reason,
        flag(i.cancel_requested),
        flag(i.timed_out),
        dumps(i.data),
        dumps(i.steps_to_json()),
    )


def saga_update_params(
    i: SagaInstance, expected_version: int, flag: Callable[[bool], Any] = int
) -> tuple[Any, ...]:
    """Parameters of the version-checked saga update statement."""
    return (
        i.definition_version,
        i.state.value,
        i.status,
        i.version,
        i.cursor,
        i.correlation_id,
        i.updated_at,
        i.deadline_at,
        i.reason,
        flag(i.cancel_requested),
        flag(i.timed_out),
        dumps(i.data),
        dumps(i.steps_to_json()),
        i.saga_id,
        expected_version,
    )


def saga_from_row(r: Sequence[Any]) -> SagaInstance:
    """An instance from a ``sagas`` row (columns in table order)."""
    return SagaInstance(
        saga_id=r[0],
        definition=r[1],
        definition_version=r[2],
        business_key=r[3],
        state=SagaState(r[4]),
        status=r[5],
        version=r[6],
        cursor=r[7],
        correlation_id=r[8],
        created_at=r[9],
        updated_at=r[10],
        deadline_at=r[11],
        reason=r[12],
        cancel_requested=bool(r[13]),
        timed_out=bool(r[14]),
        data=loads(r[15]),
        steps=SagaInstance.steps_from_json(loads(r[16])),
    )


def history_params(entries: Iterable[HistoryEntry]) -> list[tuple[Any, ...]]:
    """Parameters of the history insert, one tuple per entry."""
    return [
        (
            e.saga_id,
            e.version,
            e.at,
            e.event,
            e.state.value,
            e.status,
            e.step,
            dumps(e.detail),
            e.message_id,
        )
        for e in entries
    ]


def history_from_row(r: Sequence[Any]) -> HistoryEntry:
    """A history entry from a ``saga_history`` row."""
    return HistoryEntry(
        saga_id=r[0],
        version=r[1],
        at=r[2],
        event=r[3],
        state=SagaState(r[4]),
        status=r[5],
        step=r[6],
        detail=loads(r[7]),
        message_id=r[8],
    )
