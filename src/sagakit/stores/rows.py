"""Row conversion shared by the SQL stores: instances, history and JSON columns.

Both SQL adapters keep sagas and history in the same columns, in the same order; only
how a boolean is bound differs (SQLite stores integers), hence ``flag``, and how a
parameter is marked (``?`` or ``%s``), hence ``mark``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState
from sagakit.errors import StoreError
from sagakit.stores.base import SETTLEMENTS, DeadLetter, SagaOrder, SagaQuery, SetAside

# A prebuilt encoder: json.dumps with non-default arguments builds a new one per call.
dumps = json.JSONEncoder(separators=(",", ":")).encode
"""Compact JSON text of a column value."""
loads = json.JSONDecoder().decode
"""Parse a JSON column."""


# Enum lookups by value through a dict: calling the enum costs ~1 us per row read.
_SAGA_STATE: dict[str, SagaState] = {s.value: s for s in SagaState}


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
        state=_SAGA_STATE.get(r[4]) or SagaState(r[4]),
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
        state=_SAGA_STATE.get(r[4]) or SagaState(r[4]),
        status=r[5],
        step=r[6],
        detail=loads(r[7]),
        message_id=r[8],
    )


def saga_query_where(q: SagaQuery, mark: str) -> tuple[str, list[Any]]:
    """The ``WHERE`` condition of ``q`` over ``sagas`` and its parameters.

    Only the criteria that are set appear, so that the planner sees plain equalities
    and ranges it can match with an index (a catch-all ``? IS NULL OR ...`` cannot
    be). The text depends only on which criteria are set and how many values they
    hold, which keeps the number of distinct prepared statements small.
    """
    conds: list[str] = []
    params: list[Any] = []

    def one_of(column: str, values: Sequence[Any]) -> None:
        conds.append(f"{column} IN ({', '.join([mark] * len(values))})" if values else "1 = 0")
        params.extend(values)

    if q.states is not None:
        one_of("state", [s.value for s in q.states])
    if q.saga_ids is not None:
        one_of("saga_id", q.saga_ids)
    for column, value in (("definition", q.definition), ("definition_version", q.version)):
        if value is not None:
            conds.append(f"{column} = {mark}")
            params.append(value)
    if q.positions is not None:
        # No index on cursor: it changes at every step, and indexing it would cost every
        # transition (on PostgreSQL, its HOT update). The definition index narrows first.
        at = f"(definition = {mark} AND definition_version = {mark} AND cursor = {mark})"
        conds.append("(" + " OR ".join([at] * len(q.positions)) + ")" if q.positions else "1 = 0")
        params.extend(v for position in q.positions for v in position)
    if q.created_from is not None:
        conds.append(f"created_at >= {mark}")
        params.append(q.created_from)
    if q.created_until is not None:
        conds.append(f"created_at <= {mark}")
        params.append(q.created_until)
    if q.updated_from is not None:
        conds.append(f"updated_at >= {mark}")
        params.append(q.updated_from)
    if q.updated_until is not None:
        conds.append(f"updated_at <= {mark}")
        params.append(q.updated_until)
    if q.reason_contains:
        # LIKE with the text's own wildcards escaped: a substring, whatever it holds.
        # The database lowers both sides, so the two fold letters alike.
        conds.append(f"lower(reason) LIKE lower(CAST({mark} AS TEXT)) ESCAPE '\\'")
        params.append("%" + like_escaped(q.reason_contains) + "%")
    return " AND ".join(conds) or "1 = 1", params


def like_escaped(text: str) -> str:
    """``text`` as a literal inside a LIKE pattern whose escape character is ``\\``."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def saga_find_statements(
    queries: Mapping[str, str], q: SagaQuery, mark: str, order: SagaOrder = SagaOrder.NEWEST
) -> tuple[str, str, list[Any]]:
    """``(page SQL, count SQL, parameters)`` of ``q``: the adapter's ``saga_find`` and
    ``saga_find_count`` statements with the condition in place of ``{where}``, and the
    page's ``order`` in place of ``{column}`` and ``{direction}``.

    The page statement takes ``limit`` and ``offset`` after the parameters.
    """
    where, params = saga_query_where(q, mark)
    # Only the enum's own column names and keywords reach the text: nothing of a caller's.
    page = (
        queries["saga_find"]
        .replace("{where}", where)
        .replace("{column}", SagaOrder(order).column)
        .replace("{direction}", "DESC" if SagaOrder(order).descending else "ASC")
    )
    return page, queries["saga_find_count"].replace("{where}", where), params


def dead_letter_where(
    endpoint: str | None, settled: bool | None, mark: str
) -> tuple[str, list[Any]]:
    """The ``WHERE`` condition over ``dead_letters`` of one endpoint (or all) and open
    (``settled=False``), settled (``True``) or all (``None``) ones, and its parameters."""
    conds: list[str] = []
    params: list[Any] = []
    if endpoint is not None:
        conds.append(f"endpoint = {mark}")
        params.append(endpoint)
    if settled is not None:
        conds.append("settled_at IS NOT NULL" if settled else "settled_at IS NULL")
    return " AND ".join(conds) or "1 = 1", params


def dead_letter_from_row(r: Sequence[Any]) -> DeadLetter:
    """A :class:`DeadLetter` from a ``dead_letters`` row (the columns of the queries)."""
    return DeadLetter(
        id=r[0],
        endpoint=r[1],
        message_id=r[2],
        body=r[3],
        reason=r[4],
        at=r[5],
        settlement=r[6],
        settled_by=r[7],
        settled_at=r[8],
        settle_reason=r[9],
    )


def set_aside_from_row(r: Sequence[Any]) -> SetAside:
    """A :class:`SetAside` from a ``set_aside`` row (the columns of the queries)."""
    # float(): SQLite's RETURNING may report a whole REAL as an int.
    return SetAside(r[0], r[1], r[2], r[3], r[4], r[5], float(r[6]))


def check_settlement(settlement: str) -> None:
    """Refuse a settlement that is neither ``replayed`` nor ``discarded``."""
    if settlement not in SETTLEMENTS:
        raise StoreError(f"a dead letter is settled as one of {SETTLEMENTS}, not {settlement!r}")
