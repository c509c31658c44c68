"""``GET /audit``: the audit trail, filtered, paged, or exported as JSON lines.

The rows come from :mod:`sagakit.runtime.audit` (every store's ``audit_trail``). The
filters are ``saga_id``, ``actor``, ``action`` (exact) and ``since``/``until`` (epoch
seconds or an ISO 8601 time with its offset, ``since`` inclusive, ``until``
exclusive). A page is JSON (``limit``, ``offset``, ``items``); with
``Accept: application/x-ndjson`` or ``?format=jsonl`` the answer is one JSON object per
line, every matching row from ``offset`` on (or ``limit`` of them when given), read
from the stores a page at a time so that an export of any size holds little memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from sagakit.api.http import ApiContext, json_reply, one, query_lists
from sagakit.api.problems import FieldProblem, invalid
from sagakit.api.validation import parse_paging
from sagakit.runtime.audit import AuditQuery

NDJSON = "application/x-ndjson"
"""The media type of the JSON lines export."""
EXPORT_PAGE = 500
"""Rows sent per chunk of an export."""
_TEXT = 200

PARAMS: tuple[dict[str, Any], ...] = (
    {"name": "saga_id", "in": "query", "schema": {"type": "string", "maxLength": _TEXT}},
    {
        "name": "actor",
        "in": "query",
        "description": "The name of the token that acted.",
        "schema": {"type": "string", "maxLength": _TEXT},
    },
    {
        "name": "action",
        "in": "query",
        "description": "An action: `retry`, `mark_done`, `compensate`, `mark_compensated`, "
        "`use_rung`, `accept_partial`, `cancel`, `dead_letter.replay`, "
        "`dead_letter.discard`, `start_saga`, `place_order`.",
        "schema": {"type": "string", "maxLength": _TEXT},
    },
    {
        "name": "since",
        "in": "query",
        "description": "From this time on (inclusive): epoch seconds or ISO 8601 with an "
        "offset (`2026-12-06T08:00:00Z`).",
        "schema": {"type": "string", "maxLength": 64},
    },
    {
        "name": "until",
        "in": "query",
        "description": "Before this time (exclusive), in the form of `since`.",
        "schema": {"type": "string", "maxLength": 64},
    },
    {
        "name": "format",
        "in": "query",
        "description": "`jsonl` exports JSON lines (as `Accept: application/x-ndjson` does): "
        "every matching row from `offset`, or `limit` of them when given.",
        "schema": {"type": "string", "enum": ["json", "jsonl"]},
    },
)
"""The filter parameters of ``GET /audit`` (paging is added by the route)."""


def parse_time(raw: str) -> float:
    """Epoch seconds from ``raw`` (a number, or ISO 8601 with an offset);
    :class:`ValueError` saying what is accepted."""
    try:
        value = float(raw)
    except ValueError:
        return _iso_time(raw)
    if not math.isfinite(value):
        raise ValueError("must be a finite number of epoch seconds")
    return value


def _iso_time(raw: str) -> float:
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            "must be epoch seconds or an ISO 8601 time such as 2026-12-06T08:00:00Z"
        ) from None
    if when.tzinfo is None:
        raise ValueError("an ISO 8601 time needs its offset (Z or +01:00)")
    return when.timestamp()


def parse_audit_query(query: Mapping[str, Sequence[str]]) -> tuple[AuditQuery, list[FieldProblem]]:
    """The filter of a ``GET /audit`` query string, and what is wrong with it."""
    problems: list[FieldProblem] = []
    text: dict[str, str | None] = {}
    for name in ("saga_id", "actor", "action"):
        value = one(query, name)
        if value is not None and len(value) > _TEXT:
            problems.append(FieldProblem(name, f"must be at most {_TEXT} characters"))
            value = None
        text[name] = value
    times: dict[str, float | None] = {"since": None, "until": None}
    for name in times:
        raw = one(query, name)
        if raw is None:
            continue
        try:
            times[name] = parse_time(raw)
        except ValueError as exc:
            problems.append(FieldProblem(name, str(exc)))
    since, until = times["since"], times["until"]
    if since is not None and until is not None and until < since:
        problems.append(FieldProblem("until", "must not be before since"))
        until = None
    fmt = one(query, "format")
    if fmt is not None and fmt not in ("json", "jsonl"):
        problems.append(FieldProblem("format", "must be json or jsonl"))
    flt = AuditQuery(
        saga_id=text["saga_id"],
        actor=text["actor"],
        action=text["action"],
        since=since,
        until=until,
    )
    return flt, problems


def wants_lines(request: Request, query: Mapping[str, Sequence[str]]) -> bool:
    """True when the client asked for JSON lines (``?format=jsonl`` or its ``Accept``)."""
    fmt = one(query, "format")
    if fmt is not None:
        return fmt == "jsonl"
    accept = request.headers.get("accept", "")
    return any(part.split(";", 1)[0].strip().lower() == NDJSON for part in accept.split(","))


async def audit_reply(ctx: ApiContext, request: Request) -> Response:
    """The answer of ``GET /audit``: a JSON page, or the JSON lines export."""
    query = query_lists(request)
    flt, problems = parse_audit_query(query)
    limit, offset, paging = parse_paging(query)
    if problems or paging:
        raise invalid(problems + paging, "the query")
    if not wants_lines(request, query):
        rows = await ctx.records.audit_rows(flt, limit=limit, offset=offset)
        return json_reply(
            {
                "limit": limit,
                "offset": offset,
                "filter": _filter_json(flt),
                "items": [r.to_json() for r in rows],
            }
        )
    most = limit if query.get("limit") else None

    async def lines() -> AsyncIterator[bytes]:
        skipped, sent, batch = 0, 0, list[str]()
        async for row in ctx.records.audit_export(flt):
            if skipped < offset:
                skipped += 1
                continue
            if most is not None and sent >= most:
                break
            batch.append(json.dumps(row.to_json(), separators=(",", ":")) + "\n")
            sent += 1
            if len(batch) == EXPORT_PAGE:
                yield "".join(batch).encode()
                batch.clear()
        if batch:
            yield "".join(batch).encode()

    return StreamingResponse(lines(), media_type=NDJSON)


def _filter_json(flt: AuditQuery) -> dict[str, Any]:
    out = {
        "saga_id": flt.saga_id,
        "actor": flt.actor,
        "action": flt.action,
        "since": flt.since,
        "until": flt.until,
    }
    return {k: v for k, v in out.items() if v is not None}
