"""The audit trail: every decision a person took, who took it, when and why.

Each store keeps its rows in its ``audit_trail`` table (engine migration step 7),
written in the transaction of what they record:

* a saga's manual action (retry, mark_done, compensate, mark_compensated, use_rung,
  accept_partial), from the console, the API or the command line: the database copies
  the saga's ``manual.resolved`` history row into the trail (a trigger), with the
  actor, the action, the reason and the saga's version before and after;
* a dead letter's replay or discard (:class:`~sagakit.runtime.dead_letters.DeadLetterDesk`
  calls :func:`append` in the transaction that settles it);
* what the API saw that changed no saga or changed it on its own: a refused attempt, a
  cancel, an order placed (:func:`append` in a transaction of its own).

The actor is the name of the token used, through the API or a console session. The
rows of several stores (each service's dead letters live in its own store) are read
merged newest first: a page with :func:`find`, all of them with :func:`iterate`.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagakit.stores.base import Store, Tx

__all__ = ["AuditQuery", "AuditRecord", "append", "find", "iterate"]

APPLIED = "applied"
"""The outcome of a decision that took effect."""

_COLUMNS = (
    "id",
    "at",
    "actor",
    "role",
    "action",
    "outcome",
    "saga_id",
    "dead_letter_id",
    "reason",
    "version_before",
    "version_after",
    "detail",
)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One row of the trail. ``store`` is the name of the store that keeps it (set when
    read); ``detail`` holds what is specific to the action (a dead letter's store, a
    rung, an API refusal's message)."""

    at: float
    actor: str
    action: str
    outcome: str = APPLIED
    role: str | None = None
    saga_id: str | None = None
    dead_letter_id: int | None = None
    reason: str | None = None
    version_before: int | None = None
    version_after: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    store: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as ``GET /audit`` shows it."""
        return {
            "audit_id": f"{self.store}:{self.id}" if self.store else str(self.id),
            "at": self.at,
            "actor": self.actor,
            "role": self.role,
            "action": self.action,
            "outcome": self.outcome,
            "saga_id": self.saga_id,
            "dead_letter_id": self.dead_letter_id,
            "reason": self.reason,
            "version_before": self.version_before,
            "version_after": self.version_after,
            "store": self.store,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which rows to read: each given field must match (``since`` inclusive, ``until``
    exclusive, epoch seconds)."""

    saga_id: str | None = None
    actor: str | None = None
    action: str | None = None
    since: float | None = None
    until: float | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number of epoch seconds")
        if self.since is not None and self.until is not None and self.until < self.since:
            raise ValueError("until must not be before since")

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition (qmark parameters) and its parameters."""
        parts: list[str] = []
        params: list[Any] = []
        for column in ("saga_id", "actor", "action"):
            value = getattr(self, column)
            if value is not None:
                parts.append(f"{column} = ?")
                params.append(value)
        if self.since is not None:
            parts.append("at >= ?")
            params.append(self.since)
        if self.until is not None:
            parts.append("at < ?")
            params.append(self.until)
        return (" WHERE " + " AND ".join(parts) if parts else ""), params


async def append(tx: Tx, record: AuditRecord) -> None:
    """Write ``record`` in ``tx``: it commits, or rolls back, with what it records."""
    await tx.execute(
        "INSERT INTO audit_trail (at, actor, role, action, outcome, saga_id, dead_letter_id, "
        "reason, version_before, version_after, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.at,
            record.actor,
            record.role,
            record.action,
            record.outcome,
            record.saga_id,
            record.dead_letter_id,
            record.reason,
            record.version_before,
            record.version_after,
            json.dumps(record.detail, separators=(",", ":"), sort_keys=True),
        ),
    )


async def find(
    stores: Iterable[Store], query: AuditQuery, *, limit: int, offset: int = 0
) -> list[AuditRecord]:
    """Rows of ``stores`` matching ``query``, newest first, ``[offset, offset + limit)``.

    Each store is asked for its first ``offset + limit`` rows (an indexed range scan),
    and the answers are merged by time: the page is the same as if one table held all.
    The order is ``at`` descending, then the store's name, then the id descending.
    """
    if limit < 1 or offset < 0:
        raise ValueError("limit must be at least 1 and offset at least 0")
    where, params = query.where()
    sql = f"SELECT {', '.join(_COLUMNS)} FROM audit_trail{where} ORDER BY at DESC, id DESC LIMIT ?"
    found: list[AuditRecord] = []
    seen: set[str] = set()
    for store in stores:
        if store.name in seen:  # one store serving several roles is read once
            continue
        seen.add(store.name)
        async with store.transaction() as tx:
            rows = await tx.fetchall(sql, (*params, offset + limit))
        found.extend(_record(row, store.name) for row in rows)
    found.sort(key=_order)
    return found[offset : offset + limit]


def _order(record: AuditRecord) -> tuple[float, str, int]:
    """The sort key of :func:`find` and :func:`iterate`: newest first."""
    return (-record.at, record.store or "", -(record.id or 0))


class _Reader:
    """One store's rows, newest first, read a page at a time from where the last page
    ended (keyset: ``(at, id)`` below the last row's), so each page is one index range."""

    def __init__(self, store: Store, query: AuditQuery, page: int) -> None:
        self.store, self.query, self.page = store, query, page
        self.rows: deque[AuditRecord] = deque()
        self.last: tuple[float, int] | None = None
        self.done = False

    async def fill(self) -> None:
        where, params = self.query.where()
        if self.last is not None:
            where += (" AND " if where else " WHERE ") + "(at < ? OR (at = ? AND id < ?))"
            params += [self.last[0], self.last[0], self.last[1]]
        sql = (
            f"SELECT {', '.join(_COLUMNS)} FROM audit_trail{where} "
            "ORDER BY at DESC, id DESC LIMIT ?"
        )
        async with self.store.transaction() as tx:
            rows = await tx.fetchall(sql, (*params, self.page))
        found = [_record(row, self.store.name) for row in rows]
        self.rows.extend(found)
        self.done = len(found) < self.page
        if found:
            self.last = (found[-1].at, found[-1].id or 0)


async def iterate(
    stores: Iterable[Store], query: AuditQuery, *, page: int = 500
) -> AsyncIterator[AuditRecord]:
    """Every row of ``stores`` matching ``query``, in the order of :func:`find`, read
    ``page`` rows of a store at a time: an export of any length holds little memory
    and reads each row once."""
    if page < 1:
        raise ValueError("page must be at least 1")
    readers: list[_Reader] = []
    for store in stores:
        if store.name not in {r.store.name for r in readers}:
            readers.append(_Reader(store, query, page))
    for reader in readers:
        await reader.fill()
    while live := [r for r in readers if r.rows]:
        best = min(live, key=lambda r: _order(r.rows[0]))
        yield best.rows.popleft()
        if not best.rows and not best.done:
            await best.fill()


def _record(row: Sequence[Any], store: str) -> AuditRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    detail = json.loads(values.pop("detail") or "{}")
    # SQLite's json_object keeps SQL NULLs as JSON nulls: leave them out.
    detail = {k: v for k, v in detail.items() if v is not None}

    def opt_int(name: str) -> int | None:
        value = values[name]
        return None if value is None else int(value)

    return AuditRecord(
        at=float(values["at"]),
        actor=str(values["actor"]),
        action=str(values["action"]),
        outcome=str(values["outcome"]),
        role=values["role"],
        saga_id=values["saga_id"],
        dead_letter_id=opt_int("dead_letter_id"),
        reason=values["reason"],
        version_before=opt_int("version_before"),
        version_after=opt_int("version_after"),
        detail=detail,
        id=int(values["id"]),
        store=store,
    )
