"""Operator routes: list and inspect sagas, act on them one by one or in batches.

Actions are a person's decisions: ``cancel`` goes to :meth:`Engine.cancel`, the
others (retry, mark_done, compensate, mark_compensated, use_rung, accept_partial) to
:meth:`Engine.resolve`, which records the actor and reason in the saga's history in
the same transaction as the decision, and with it a row of the audit trail
(:mod:`sagakit.runtime.audit`). The API also writes a structured log line for every
action, and an audit row for a cancel and for every attempt that did not apply.

A choreography's view (``driven: false``) has no driver: the engine applies only the
records of what a person did by hand (:mod:`sagakit.runtime.tracker_manual`) and
refuses the rest with 409 ``no_driver``.

Safe decisions: ``GET /sagas/{id}`` sends the saga's version as a weak ``ETag``
(``W/"7"``); an action sent with ``If-Match`` (that ETag, or ``"7"``) is applied only
if the saga is still at that version, else refused with 409 ``saga_moved`` (the
answer's ``ETag`` is the version now). ``If-Match`` is optional, so that clients
written before it keep working; the console and the CLI always send it. The
irreversible actions (mark_done, mark_compensated, accept_partial) need
``"confirm": true`` (else 422 ``confirmation_required``, which says what the action
does), and ``accept_partial`` with a compensation or a hold still open needs
``"force": true`` (else 409 ``open_holds``). A batch's dry run says what the action
does, and for each saga its version and whether it would be applied or refused; the
batch that follows may send those versions back (``expected_versions``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from sagakit.api.audit import PARAMS as AUDIT_PARAMS
from sagakit.api.audit import audit_reply
from sagakit.api.auth import Principal, Role
from sagakit.api.http import (
    ApiContext,
    Endpoint,
    Reply,
    json_reply,
    principal,
    query_lists,
    read_json,
)
from sagakit.api.problems import ApiError, invalid, not_found
from sagakit.api.validation import (
    CANCEL,
    ActionRequest,
    parse_action,
    parse_batch,
    parse_paging,
    parse_query_filter,
)
from sagakit.api.views import manual_case, saga_detail, saga_summary
from sagakit.core.instance import MANUAL_STATES, SagaInstance, SagaState
from sagakit.core.machine_manual import describe, irreversible
from sagakit.errors import (
    ConcurrencyError,
    DefinitionError,
    ManualActionRefused,
    NoDriver,
    OpenHolds,
    SagaMoved,
    SagaNotFound,
    VersionMissing,
)
from sagakit.runtime.set_aside import waiting_for

audit_log = logging.getLogger("sagakit.api.audit")

Summary = Callable[[SagaInstance, float], dict[str, Any]]
"""How one saga of a page is shown: ``(saga, now) -> JSON object``."""

SAGA_ID = {
    "name": "saga_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}
PAGING = (
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
)
FILTERS = (
    {
        "name": "state",
        "in": "query",
        "style": "form",
        "explode": True,
        "description": "Repeat (or comma-separate) for several states.",
        "schema": {"type": "array", "items": {"$ref": "#/components/schemas/SagaState"}},
    },
    {"name": "definition", "in": "query", "schema": {"type": "string", "maxLength": 200}},
    {"name": "version", "in": "query", "schema": {"type": "integer", "minimum": 1}},
    {
        "name": "step",
        "in": "query",
        "description": "The step at the saga's cursor.",
        "schema": {"type": "string", "maxLength": 200},
    },
    {
        "name": "min_age",
        "in": "query",
        "description": "Seconds since the saga started, at least.",
        "schema": {"type": "number", "minimum": 0},
    },
    {
        "name": "max_age",
        "in": "query",
        "description": "Seconds since the saga started, at most.",
        "schema": {"type": "number", "minimum": 0},
    },
)


IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "description": "The saga version the decision was made on: the ETag of GET "
    '/sagas/{saga_id} (W/"7", or "7"). A saga at another version answers 409 saga_moved.',
    "schema": {"type": "string", "pattern": '^(W/)?"[0-9]{1,18}"$|^[0-9]{1,18}$|^\\*$'},
}

PAGE_SLICE = 50
"""Sagas summarised between two turns of the event loop when a page is rendered."""


async def page_reply(page: list[SagaInstance], head: dict[str, Any], item: Summary) -> Response:
    """``head`` plus ``items``: ``item(saga, now)`` of every saga of ``page``, as JSON.

    The items are summarised and encoded :data:`PAGE_SLICE` at a time, with a turn for
    other tasks after each slice: a page of 500 sagas must not hold the event loop (and
    ``/healthz``) in one go. The body is the same as ``json_reply({**head, "items":
    [...]})``.
    """
    now = time.time()
    parts: list[str] = []
    for start in range(0, len(page), PAGE_SLICE):
        if start:
            await asyncio.sleep(0)
        chunk = [item(i, now) for i in page[start : start + PAGE_SLICE]]
        parts.append(_compact(chunk)[1:-1])  # the list's items without its brackets
    # head's JSON with "items":[] last; its closing "[]}" replaced by the items.
    body = _compact({**head, "items": []})[:-3] + "[" + ",".join(parts) + "]}"
    return Response(body, media_type="application/json")


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


CANCELLING = (SagaState.COMPENSATING, SagaState.COMPENSATED)
"""States that show a cancel was accepted (the saga is being, or was, undone)."""


class ActionOutcome(Exception):
    """An action that did not apply: its HTTP status, code and message (and, for
    ``saga_moved``, the saga's version now)."""

    def __init__(self, status: int, code: str, message: str, version: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.version = version

    def error(self) -> ApiError:
        """This outcome as the API's error (a ``saga_moved`` carries the ETag of now)."""
        headers = {} if self.version is None else {"ETag": etag(self.version)}
        return ApiError(self.status, self.message, code=self.code, headers=headers)


_IF_MATCH = re.compile(r'(?:W/)?"([0-9]{1,18})"|([0-9]{1,18})')


def etag(version: int) -> str:
    """The ETag of a saga at ``version``: weak, since it names the saga's version, not
    the bytes of one representation."""
    return f'W/"{version}"'


def if_match(request: Request) -> int | None:
    """The saga version an action was decided on: its ``If-Match`` header (``W/"7"``,
    ``"7"`` or ``7``; None when absent or ``*``); 400 for anything else."""
    raw = request.headers.get("if-match")
    if raw is None or raw.strip() == "*":
        return None
    found = _IF_MATCH.fullmatch(raw.strip())
    if found is None:
        raise ApiError(
            400,
            f"If-Match must be one saga version as GET /sagas/{{id}} sends it in its ETag "
            f'(W/"7" or "7"), got {raw[:60]!r}',
            code="bad_request",
        )
    return int(found.group(1) or found.group(2))


async def _decide(
    ctx: ApiContext, who: Principal, saga_id: str, req: ActionRequest
) -> SagaInstance:
    """Hand the decision to the engine; :class:`ActionOutcome` when it does not apply."""
    engine = ctx.engine
    try:
        if req.action != CANCEL:
            return await engine.resolve(
                saga_id,
                req.action,
                reason=req.reason,
                actor=who.name,
                rung=req.rung,
                expected_version=req.expected_version,
                force=req.force,
            )
        before = await engine.get(saga_id)
        # A finished view is asked too: its refusal says that nothing drives it.
        ask = not before.terminal or before.definition in engine.trackers
        if not ask and req.expected_version not in (None, before.version):
            raise SagaMoved(
                f"saga {saga_id} moved since this decision was made on its version "
                f"{req.expected_version}: it is at version {before.version} now "
                f"({before.state.value}); look at it again, then decide",
                expected=req.expected_version or 0,
                current=before.version,
            )
        inst = (
            await engine.cancel(saga_id, req.reason, expected_version=req.expected_version)
            if ask
            else before
        )
    except SagaNotFound:
        raise ActionOutcome(404, "not_found", f"no saga {saga_id!r}") from None
    except SagaMoved as exc:
        raise ActionOutcome(409, "saga_moved", str(exc), exc.current) from None
    except OpenHolds as exc:
        raise ActionOutcome(409, "open_holds", str(exc)) from None
    except NoDriver as exc:
        raise ActionOutcome(409, "no_driver", str(exc)) from None
    except VersionMissing as exc:
        # Deciding needs the saga's definition version: another process may have it.
        raise ActionOutcome(409, "version_missing", str(exc)) from None
    except ConcurrencyError:
        # Another decision or a reply moved the saga between our read and our write.
        # Applying this decision to a state its author did not see would be a guess.
        raise ActionOutcome(
            409,
            "conflict",
            f"saga {saga_id} changed while this decision was applied; reload it and decide again",
        ) from None
    except (ManualActionRefused, DefinitionError) as exc:
        raise ActionOutcome(409, "refused", str(exc)) from None
    # engine.cancel records a refused cancel in history and returns the saga unchanged.
    if inst.terminal and (before.terminal or inst.state is not SagaState.COMPENSATED):
        why = f"saga {saga_id} is already {inst.state.value}"
        raise ActionOutcome(409, "refused", f"cancel refused: {why}")
    if not (inst.cancel_requested or inst.state in CANCELLING):
        why = f"saga {saga_id} is past its point of no return; only a manual decision can change it"
        raise ActionOutcome(409, "refused", f"cancel refused: {why}")
    return inst


async def apply_action(
    ctx: ApiContext, who: Principal, saga_id: str, req: ActionRequest
) -> SagaInstance:
    """Apply one action; raise :class:`ActionOutcome` when it does not apply.

    Every attempt is audited (structured log line and audit trail row) with its
    outcome: ``applied``, ``error`` or the refusal's code (``refused``, ``not_found``,
    ``saga_moved``, ``open_holds``, ``no_driver``, ...), and the version it was decided
    on (``expected_version``) and ``forced`` when given.
    """
    outcome, detail = "error", {}
    try:
        inst = await _decide(ctx, who, saga_id, req)
        outcome, detail = "applied", {"state": inst.state.value, "version": inst.version}
        return inst
    except ActionOutcome as exc:
        outcome, detail = exc.code, {"message": exc.message}
        raise
    finally:
        audit_log.info(
            "%s on saga %s by %s (%s): %s",
            req.action,
            saga_id,
            who.name,
            outcome,
            req.reason,
            extra={
                "saga_id": saga_id,
                "actor": who.name,
                "action": req.action,
                "reason": req.reason,
                "outcome": outcome,
                "rung": req.rung,
                "expected_version": req.expected_version,
                "forced": req.force,
            },
        )
        if req.rung is not None:
            detail["rung"] = req.rung
        if req.expected_version is not None:
            detail["expected_version"] = req.expected_version
        if req.force:
            detail["forced"] = True
        # An applied manual action is in the trail already, written by its own
        # transaction; a cancel (the engine records no actor) and a refusal are not.
        if outcome != "applied" or req.action == CANCEL:
            await ctx.records.audit(
                who, req.action, saga_id=saga_id, reason=req.reason, outcome=outcome, detail=detail
            )


def endpoints(ctx: ApiContext) -> list[Endpoint]:
    """The operator routes."""
    engine = ctx.engine

    async def list_sagas(request: Request) -> Response:
        query = query_lists(request)
        flt, problems = parse_query_filter(query)
        limit, offset, more = parse_paging(query)
        if problems or more:
            raise invalid(problems + more, "the query")
        total, page = await ctx.records.select(flt, limit=limit, offset=offset)
        counts = await engine.store.count_sagas()
        head = {
            "total": total,
            "limit": limit,
            "offset": offset,
            "filter": flt.to_json(),
            "counts": {s.value: counts.get(s, 0) for s in SagaState},
        }
        return await page_reply(page, head, lambda i, now: saga_summary(engine, i, now))

    async def get_saga(request: Request) -> Response:
        saga_id = request.path_params["saga_id"]
        inst = await engine.store.get_saga(saga_id)
        if inst is None:
            raise not_found(f"no saga {saga_id!r}")
        history = await engine.store.history(saga_id)
        outbox = await engine.store.outbox_of_saga(saga_id)
        waiting = await waiting_for(engine.store, saga_id)
        detail = saga_detail(engine, inst, history, outbox, time.time(), waiting_for=waiting)
        return json_reply(detail, headers={"ETag": etag(inst.version)})

    async def act(request: Request) -> Response:
        who = principal(request)
        saga_id = request.path_params["saga_id"]
        expected = if_match(request)
        req = parse_action(await read_json(request, ctx.max_body))
        req = dataclasses.replace(req, expected_version=expected)
        try:
            inst = await apply_action(ctx, who, saga_id, req)
        except ActionOutcome as exc:
            raise exc.error() from None
        return json_reply(
            {
                "action": req.action,
                "actor": who.name,
                "reason": req.reason,
                "description": describe(req.action),
                "saga": saga_summary(engine, inst, time.time()),
            },
            headers={"ETag": etag(inst.version)},
        )

    def preview(who: Principal, inst: SagaInstance, req: ActionRequest) -> dict[str, Any]:
        """What the batch's action would do to ``inst`` (computed, nothing written)."""
        out: dict[str, Any] = {"saga_id": inst.saga_id, "version": inst.version}
        try:
            after = engine.preview(
                inst,
                req.action,
                actor=who.name,
                reason=req.reason,
                rung=req.rung,
                force=req.force,
            )
        except OpenHolds as exc:
            return {**out, "ok": False, "error": "open_holds", "message": str(exc)}
        except NoDriver as exc:
            return {**out, "ok": False, "error": "no_driver", "message": str(exc)}
        except VersionMissing as exc:
            return {**out, "ok": False, "error": "version_missing", "message": str(exc)}
        except (ManualActionRefused, DefinitionError) as exc:
            return {**out, "ok": False, "error": "refused", "message": str(exc)}
        if req.action == CANCEL and not (after.cancel_requested or after.state in CANCELLING):
            why = f"cancel refused: saga {inst.saga_id} is {inst.state.value}"
            if not inst.terminal:
                why += " and past its point of no return"
            return {**out, "ok": False, "error": "refused", "message": why}
        return {**out, "ok": True, "state": after.state.value, "status": after.status}

    async def batch(request: Request) -> Response:
        who = principal(request)
        req = parse_batch(await read_json(request, ctx.max_body))
        total, page = await ctx.records.select(req.filter, limit=req.limit, offset=0)
        ids = [i.saga_id for i in page]
        out: dict[str, Any] = {
            "dry_run": req.dry_run,
            "action": req.action.action,
            "description": describe(req.action.action),
            "irreversible": irreversible(req.action.action),
            "filter": req.filter.to_json(),
            "matched": total,
            "saga_ids": ids,
        }
        if req.dry_run:
            previews = []
            for i, inst in enumerate(page):
                if i and not i % PAGE_SLICE:
                    await asyncio.sleep(0)  # a dry run of a thousand never holds the loop
                previews.append(preview(who, inst, req.action))
            out.update(
                versions={i.saga_id: i.version for i in page},
                would_apply=sum(1 for p in previews if p["ok"]),
                would_refuse=sum(1 for p in previews if not p["ok"]),
                previews=previews,
            )
            return json_reply(out)
        batch_id = uuid.uuid4().hex
        results = []
        for saga_id in ids:
            one_req = dataclasses.replace(
                req.action, expected_version=req.expected_versions.get(saga_id)
            )
            try:
                inst = await apply_action(ctx, who, saga_id, one_req)
                results.append(
                    {
                        "saga_id": saga_id,
                        "ok": True,
                        "state": inst.state.value,
                        "status": inst.status,
                    }
                )
            except ActionOutcome as exc:
                results.append(
                    {"saga_id": saga_id, "ok": False, "error": exc.code, "message": exc.message}
                )
            # An action may complete without suspending (SQLite on the loop): give the
            # loop a turn between sagas, so a batch of a thousand never holds it whole.
            await asyncio.sleep(0)
        done = sum(1 for r in results if r["ok"])
        audit_log.info(
            "batch %s of %s by %s: %d of %d applied",
            batch_id,
            req.action.action,
            who.name,
            done,
            len(ids),
            extra={
                "actor": who.name,
                "action": req.action.action,
                "reason": req.action.reason,
                "batch_id": batch_id,
            },
        )
        out.update(
            batch_id=batch_id,
            applied=done,
            failed=len(results) - done,
            remaining=max(total - len(ids), 0),
            results=results,
        )
        return json_reply(out)

    async def manual_cases(request: Request) -> Response:
        limit, offset, problems = parse_paging(query_lists(request))
        if problems:
            raise invalid(problems, "the query")
        page = await engine.manual_cases(limit=limit, offset=offset)
        counts = await engine.store.count_sagas()
        head = {
            "total": sum(counts.get(s, 0) for s in MANUAL_STATES),
            "limit": limit,
            "offset": offset,
        }
        return await page_reply(page, head, lambda i, now: manual_case(engine, i, now))

    async def audit(request: Request) -> Response:
        return await audit_reply(ctx, request)

    return [
        Endpoint(
            "GET",
            "/sagas",
            Role.VIEWER,
            list_sagas,
            "listSagas",
            "Sagas, newest first, filtered and paginated, with counts per state",
            "sagas",
            {200: Reply("A page of sagas.", "SagaPage")},
            params=(*FILTERS, *PAGING),
            errors=(422,),
        ),
        Endpoint(
            "POST",
            "/sagas/actions/batch",
            Role.OPERATOR,
            batch,
            "batchAction",
            "Apply one action to every saga a filter matches (dry run first)",
            "sagas",
            {200: Reply("The matching sagas (dry run) or the result per saga.", "BatchResult")},
            body="BatchRequest",
            description='The dry run (`"dry_run": true`) writes nothing: it says what the '
            "action does, and for each matching saga its version and whether the action "
            "would be applied (the state after) or refused (and why). The real batch may "
            "send the versions back as `expected_versions`: a saga that moved since is "
            "refused with `saga_moved` in its result. An irreversible action (mark_done, "
            'mark_compensated, accept_partial) needs `"confirm": true` to act (422 '
            "`confirmation_required` without it).",
        ),
        Endpoint(
            "GET",
            "/sagas/{saga_id}",
            Role.VIEWER,
            get_saga,
            "getSaga",
            "One saga: steps, attempts, errors, retries, history and messages",
            "sagas",
            {200: Reply("The saga.", "SagaDetail")},
            params=(SAGA_ID,),
            errors=(404,),
        ),
        Endpoint(
            "POST",
            "/sagas/{saga_id}/actions",
            Role.OPERATOR,
            act,
            "sagaAction",
            "A person's decision on one saga (audited)",
            "sagas",
            {200: Reply("The decision was applied.", "ActionResult")},
            params=(SAGA_ID, IF_MATCH),
            body="ActionRequest",
            errors=(404, 409),
            description='With `If-Match` (the `ETag` of `GET /sagas/{saga_id}`: `W/"7"` '
            'or `"7"`), the decision applies only to the saga at that version; a saga '
            "that moved since answers 409 `saga_moved` (its `ETag` is the version now) "
            "and nothing changes. Without `If-Match` the decision applies to the saga as "
            "it is when it arrives (kept for older clients; the console and the CLI "
            "always send it). mark_done, mark_compensated and accept_partial cannot be "
            'taken back: they need `"confirm": true` (422 `confirmation_required` '
            "without it, saying what the action does). accept_partial is refused with "
            "409 `open_holds` while a compensation or a hold is still open, unless "
            '`"force": true` (say why in the reason). `cancel` compensates a saga before '
            "its point of no return; the "
            "other actions apply to sagas in FAILED_NEEDS_MANUAL. A choreography's view "
            "(`driven: false`) has no driver: it takes only `mark_done`, `mark_compensated` "
            "and `accept_partial`, records of what a person did by hand; the others answer "
            "409 with the code `no_driver`. A saga whose definition version this process "
            "does not have (its detail says `waiting_for: name@N`) answers 409 with the "
            "code `version_missing`: act from a process that has it. 409 says why an "
            "action does not apply.",
        ),
        Endpoint(
            "GET",
            "/manual-cases",
            Role.VIEWER,
            manual_cases,
            "listManualCases",
            "The manual queue: FAILED_NEEDS_MANUAL sagas",
            "sagas",
            {200: Reply("Sagas waiting for a person, newest first.", "ManualCasePage")},
            params=PAGING,
            errors=(422,),
        ),
        Endpoint(
            "GET",
            "/audit",
            Role.ADMIN,
            audit,
            "listAudit",
            "The audit trail: every decision, who took it, when and why",
            "admin",
            {200: Reply("Audit rows, newest first.", "AuditPage")},
            params=(*AUDIT_PARAMS, *PAGING),
            errors=(422,),
            description="Every decision a person took, from the console, the API or the "
            "command line (a saga's manual action, a dead letter's replay or discard), "
            "written in the decision's own transaction, and every attempt the API refused; "
            "`actor` is the name of the token used. Filters: `saga_id`, `actor`, `action`, "
            "`since`/`until`. With `Accept: application/x-ndjson` or `format=jsonl` the "
            "answer is JSON lines, one row (an `AuditRow`) per line.",
        ),
    ]
