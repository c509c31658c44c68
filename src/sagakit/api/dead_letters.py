"""Dead-letter routes: list and inspect parked messages, replay or discard them.

A dead letter is addressed by the name of the store that holds it and its id there
(see :mod:`sagakit.runtime.dead_letters`). Replay and discard are a person's decisions:
they need the operator role and a reason, which the store keeps with the settlement,
with a row of the audit trail written in the same transaction (by the desk). Like the
saga actions, every attempt is also written to the structured audit log, and one that
did not apply to the audit trail too.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from sagakit.api.auth import Principal, Role
from sagakit.api.http import (
    ApiContext,
    Endpoint,
    Reply,
    json_reply,
    one,
    principal,
    query_lists,
    read_json,
)
from sagakit.api.problems import ApiError, FieldProblem, invalid, not_found
from sagakit.api.validation import parse_paging, reason_problem
from sagakit.core.envelope import Envelope
from sagakit.errors import DeadLetterNotFound, DeadLetterRefused, MessageError
from sagakit.runtime.dead_letters import BrokerDeadLetter, StoredDeadLetter

audit_log = logging.getLogger("sagakit.api.audit")

STATUSES = {"open": False, "settled": True, "all": None}
"""``status`` query values and the store's ``settled`` filter they stand for."""

NAME = {"type": "string", "minLength": 1, "maxLength": 200}
STORE = {"name": "store", "in": "path", "required": True, "schema": NAME}
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
LIST_PARAMS = (
    {"name": "store", "in": "query", "schema": NAME, "description": "Only this store's."},
    {"name": "endpoint", "in": "query", "schema": NAME, "description": "Only this endpoint's."},
    {
        "name": "status",
        "in": "query",
        "schema": {"type": "string", "enum": list(STATUSES), "default": "open"},
    },
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
)


def letter_summary(found: StoredDeadLetter) -> dict[str, Any]:
    """The JSON of a dead letter in a listing (no body)."""
    d = found.letter
    env = _envelope(d.body)
    return {
        "store": found.store,
        "id": d.id,
        "endpoint": d.endpoint,
        "message_id": d.message_id,
        "type": None if env is None else env.type,
        "saga_id": None if env is None else env.saga_id,
        "reason": d.reason,
        "at": d.at,
        "status": d.settlement or "open",
        "settled_by": d.settled_by,
        "settled_at": d.settled_at,
        "settle_reason": d.settle_reason,
    }


def letter_detail(found: StoredDeadLetter) -> dict[str, Any]:
    """The JSON of one dead letter: its summary, raw body and parsed envelope."""
    out = letter_summary(found)
    out["body"] = found.letter.body
    try:
        out["envelope"], out["parse_error"] = Envelope.from_json(found.letter.body).to_dict(), None
    except MessageError as exc:
        out["envelope"], out["parse_error"] = None, str(exc)
    return out


def broker_letter(d: BrokerDeadLetter) -> dict[str, Any]:
    """The JSON of a message parked by the broker itself (listed, not settled here)."""
    return {
        "transport": d.transport,
        "endpoint": d.endpoint,
        "message_id": d.message_id,
        "reason": d.reason,
        "body": d.body,
    }


def _envelope(body: str) -> Envelope | None:
    try:
        return Envelope.from_json(body)
    except MessageError:
        return None


def parse_reason(raw: object) -> str:
    """The mandatory ``reason`` of a replay or discard body (422 otherwise)."""
    if not isinstance(raw, dict):
        raise invalid([FieldProblem("body", "must be a JSON object")], "the request")
    problems = [
        FieldProblem(k, "unknown field; only reason is taken") for k in sorted(raw) if k != "reason"
    ]
    reason = raw.get("reason")
    why = reason_problem(reason)
    if why is not None:
        problems.append(FieldProblem("reason", why))
    if problems:
        raise invalid(problems, "the request")
    assert isinstance(reason, str)
    return reason.strip()


def _id(request: Request) -> tuple[str, int]:
    store, raw = request.path_params["store"], request.path_params["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise not_found(f"no dead letter {raw!r} in store {store!r} (ids are integers)")
    return store, int(raw)


async def settle(
    ctx: ApiContext, who: Principal, action: str, store: str, id: int, reason: str
) -> StoredDeadLetter:
    """Replay or discard one dead letter, audited whatever the outcome."""
    desk = ctx.engine.dead_letters
    outcome = "error"
    detail: dict[str, Any] = {"store": store}
    saga_id: str | None = None
    try:
        found = await desk.get(store, id)
        env = _envelope(found.letter.body)
        saga_id = None if env is None else env.saga_id
        detail["message_id"] = found.letter.message_id
        run = desk.replay if action == "replay" else desk.discard
        settled = await run(store, id, actor=who.name, reason=reason, role=who.role.value)
        outcome = "applied"
        return settled
    except DeadLetterNotFound as exc:
        outcome, detail["message"] = "not_found", str(exc)
        raise ApiError(404, str(exc), code="not_found") from None
    except DeadLetterRefused as exc:
        outcome, detail["message"] = "refused", str(exc)
        raise ApiError(409, str(exc), code="refused") from None
    finally:
        audit_log.info(
            "%s of dead letter %s:%s by %s (%s): %s",
            action,
            store,
            id,
            who.name,
            outcome,
            reason,
            extra={
                "saga_id": saga_id,
                "actor": who.name,
                "action": f"dead_letter.{action}",
                "reason": reason,
                "outcome": outcome,
                "store": store,
                "dead_letter_id": id,
            },
        )
        if outcome != "applied":  # a settlement is audited by its own transaction
            await ctx.records.audit(
                who,
                f"dead_letter.{action}",
                saga_id=saga_id,
                reason=reason,
                outcome=outcome,
                detail=detail,
                dead_letter_id=id,
            )


def endpoints(ctx: ApiContext) -> list[Endpoint]:
    """The dead-letter routes."""
    desk = ctx.engine.dead_letters

    async def list_letters(request: Request) -> Response:
        query = query_lists(request)
        limit, offset, problems = parse_paging(query)
        store, endpoint = one(query, "store"), one(query, "endpoint")
        status = one(query, "status") or "open"
        if status not in STATUSES:
            problems.append(FieldProblem("status", f"must be one of {', '.join(STATUSES)}"))
        for name, value in (("store", store), ("endpoint", endpoint)):
            if value is not None and len(value) > 200:
                problems.append(FieldProblem(name, "must be at most 200 characters"))
        if store is not None and store not in desk.stores:
            problems.append(FieldProblem("store", f"must be one of {', '.join(desk.stores)}"))
        if problems:
            raise invalid(problems, "the query")
        page = await desk.find(
            store=store, endpoint=endpoint, settled=STATUSES[status], limit=limit, offset=offset
        )
        broker: list[dict[str, Any]] = []
        broker_error = None
        if offset == 0 and store is None and status != "settled":
            try:  # the broker's own dead letters, shown with the first page
                broker = [
                    broker_letter(d)
                    for d in await desk.broker_dead_letters()
                    if endpoint is None or d.endpoint == endpoint
                ]
            except Exception as exc:  # a broker that is down must not hide the stores' list
                broker_error = f"could not read the broker's dead letters: {exc!r}"
        return json_reply(
            {
                "total": page.total,
                "limit": limit,
                "offset": offset,
                "status": status,
                "stores": list(desk.stores),
                "items": [letter_summary(i) for i in page.items],
                "broker": broker,
                "broker_error": broker_error,
            }
        )

    async def get_letter(request: Request) -> Response:
        store, id = _id(request)
        try:
            return json_reply(letter_detail(await desk.get(store, id)))
        except DeadLetterNotFound as exc:
            raise not_found(str(exc)) from None

    def acting(action: str) -> Any:
        async def act(request: Request) -> Response:
            who = principal(request)
            store, id = _id(request)
            reason = parse_reason(await read_json(request, ctx.max_body))
            settled = await settle(ctx, who, action, store, id, reason)
            return json_reply({"action": action, "dead_letter": letter_detail(settled)})

        return act

    settle_errors = (404, 409)
    return [
        Endpoint(
            "GET",
            "/dead-letters",
            Role.VIEWER,
            list_letters,
            "listDeadLetters",
            "Dead letters of every store, oldest first, and the broker's own",
            "dead-letters",
            {200: Reply("A page of dead letters.", "DeadLetterPage")},
            params=LIST_PARAMS,
            errors=(422,),
            description="`status=open` (the default) lists what is still parked; settled "
            "ones keep who replayed or discarded them, when and why. `broker` lists what "
            "the broker parked on its own side (NATS `<stream>_dlq`), on the first page.",
        ),
        Endpoint(
            "GET",
            "/dead-letters/{store}/{id}",
            Role.VIEWER,
            get_letter,
            "getDeadLetter",
            "One dead letter with its raw body and parsed envelope",
            "dead-letters",
            {200: Reply("The dead letter.", "DeadLetterDetail")},
            params=(STORE, ID),
            errors=(404,),
        ),
        Endpoint(
            "POST",
            "/dead-letters/{store}/{id}/replay",
            Role.OPERATOR,
            acting("replay"),
            "replayDeadLetter",
            "Send the parked message again, same id and body (audited)",
            "dead-letters",
            {200: Reply("The message is back in the outbox.", "DeadLetterActionResult")},
            params=(STORE, ID),
            body="DeadLetterActionRequest",
            errors=settle_errors,
            description="409 when it was settled already, its body is not an envelope, "
            "its saga is terminal, or its consumer already handled it (then discard it).",
        ),
        Endpoint(
            "POST",
            "/dead-letters/{store}/{id}/discard",
            Role.OPERATOR,
            acting("discard"),
            "discardDeadLetter",
            "Settle a dead letter without sending anything (audited)",
            "dead-letters",
            {200: Reply("The dead letter is settled.", "DeadLetterActionResult")},
            params=(STORE, ID),
            body="DeadLetterActionRequest",
            errors=settle_errors,
            description="409 when it was settled already.",
        ),
    ]
