"""The OpenAPI 3.0 document, generated from the endpoint declarations.

Paths, parameters, request bodies and success responses come from each
:class:`~sagakit.api.http.Endpoint`; the error responses every route can give are
added by rule (401 and 403 everywhere; 400, 413, 415 and 422 wherever a body is read;
422 wherever query parameters are validated), each an ``application/problem+json``
body (RFC 9457, :mod:`sagakit.api.problems`); the schemas are written out below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagakit.api.http import Endpoint
from sagakit.api.problems import ERROR_CODES, PROBLEM_JSON
from sagakit.api.start import MAX_KEY
from sagakit.api.validation import (
    ACTIONS,
    CURRENCY_PATTERN,
    MAX_AMOUNT,
    MAX_BATCH,
    MAX_QTY,
    MAX_REASON,
    SKU_PATTERN,
    TOKEN_PATTERN,
)
from sagakit.core.instance import SagaState

ERROR_TEXT = {
    400: "Malformed request: the body is not JSON, or a required header is missing.",
    401: "No bearer token, or not a valid one.",
    403: "The token's role is too low for this route.",
    404: "Not found.",
    409: "Conflict: the request does not apply to the current state (the message says why).",
    413: "The body is larger than the server accepts.",
    415: "The body is not application/json.",
    422: "Invalid fields: every refused field is listed with its problem.",
    503: "Not ready.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _null(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _obj(
    props: dict[str, Any], required: Sequence[str] = (), *, closed: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    if closed:
        out["additionalProperties"] = False
    return out


def _page(item: str) -> dict[str, Any]:
    return _obj(
        {
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "items": {"type": "array", "items": _ref(item)},
        },
        ["limit", "offset", "items"],
    )


STR, INT, NUM, BOOL = (
    {"type": "string"},
    {"type": "integer"},
    {"type": "number"},
    {"type": "boolean"},
)
ANY_OBJ = {"type": "object", "additionalProperties": True}
TOKEN = {"type": "string", "maxLength": 128, "pattern": TOKEN_PATTERN}
_TYPES: dict[str, dict[str, Any]] = {
    "str": STR,
    "int": INT,
    "num": NUM,
    "bool": BOOL,
    "obj": ANY_OBJ,
}


def _fields(spec: str) -> dict[str, Any]:
    """Properties from ``"name:type name:type?"`` (``?``: nullable; types str int num bool obj)."""
    out: dict[str, Any] = {}
    for item in spec.split():
        name, _, kind = item.partition(":")
        nullable = kind.endswith("?")
        schema = _TYPES[kind.rstrip("?")]
        out[name] = _null(schema) if nullable else schema
    return out


SAGA_SUMMARY = {
    **_fields("saga_id:str definition:str definition_version:int business_key:str"),
    "state": _ref("SagaState"),
    **_fields("status:str current_step:str? version:int created_at:num updated_at:num"),
    **_fields("age_s:num reason:str? driven:bool"),
}
STEP = {
    **_fields("index:int name:str"),
    "kind": _null({"type": "string", "enum": ["compensatable", "pivot", "retriable"]}),
    **_fields("status:str attempt:int rung:int rung_attempt:int result:obj? error:str?"),
    **_fields("next_retry_at:num? started_at:num? finished_at:num? queries:int retry_base:int"),
    **_fields("fence_floor:int manual_retries:int"),
}
FILTER = {
    "state": {"type": "array", "items": _ref("SagaState")},
    "definition": {"type": "string", "minLength": 1, "maxLength": 200},
    "version": {"type": "integer", "minimum": 1},
    "step": {"type": "string", "minLength": 1, "maxLength": 200},
    "min_age": {"type": "number", "minimum": 0},
    "max_age": {"type": "number", "minimum": 0},
    "saga_ids": {
        "type": "array",
        "maxItems": MAX_BATCH,
        "items": {"type": "string", "minLength": 1, "maxLength": 200},
    },
}
ACTION = {
    "action": {"type": "string", "enum": list(ACTIONS)},
    "reason": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_REASON,
        "description": "Why (mandatory; recorded in the saga's history and the audit). "
        "Text holding an e-mail address, a card number or a postal address is refused (422).",
    },
    "rung": _null(
        {
            "type": "integer",
            "minimum": 0,
            "maximum": 100,
            "description": "Only for use_rung: the ladder rung to run.",
        }
    ),
    "confirm": {
        "type": "boolean",
        "default": False,
        "description": "Required (true) for the irreversible actions, mark_done, "
        "mark_compensated and accept_partial: without it they are refused with 422 "
        "`confirmation_required`, whose message says what the action does.",
    },
    "force": {
        "type": "boolean",
        "default": False,
        "description": "Only for accept_partial: accept the saga although a compensation "
        "or a hold is still open (refused with 409 `open_holds` without it). Recorded in "
        "the saga's history with what stayed open; say why in the reason.",
    },
}

PROBLEM: dict[str, Any] = {
    "type": {
        "type": "string",
        "format": "uri-reference",
        "description": "The problem type: /problems/<error>, relative to the API.",
    },
    "title": {"type": "string", "description": "The problem type's summary (the same each time)."},
    "status": {"type": "integer", "description": "The HTTP status code of the response."},
    "detail": {"type": "string", "description": "What was wrong with this request, what to do."},
    "instance": {
        "type": "string",
        "format": "uri-reference",
        "description": "The path of the request that was refused.",
    },
    "error": {"type": "string", "description": "The stable code (also the end of `type`)."},
    "message": {"type": "string", "description": "The same text as `detail`."},
    "fields": {
        "type": "array",
        "description": "Only for 422: every refused field and what is wrong with it.",
        "items": _obj({"field": STR, "problem": STR}, ["field", "problem"]),
    },
}
"""An RFC 9457 problem document with the API's extension members (``error``,
``message``, ``fields``)."""
PROBLEM_REQUIRED = ("type", "title", "status", "detail", "error", "message")

ORDER_TERMINAL = {
    "type": "boolean",
    "description": "true once the order is final: nobody can move it on. false while it "
    "waits for a person (NEEDS_ATTENTION): their decision moves it on.",
}

SCHEMAS: dict[str, Any] = {
    "Problem": _obj(PROBLEM, list(PROBLEM_REQUIRED)),
    "NotReady": _obj(
        {**PROBLEM, "ready": BOOL, "stores": {"type": "object", "additionalProperties": STR}},
        [*PROBLEM_REQUIRED, "ready", "stores"],
    ),
    "SagaState": {"type": "string", "enum": [s.value for s in SagaState]},
    "OrderRequest": _obj(
        {
            "sku": {"type": "string", "pattern": SKU_PATTERN},
            "qty": {"type": "integer", "minimum": 1, "maximum": MAX_QTY},
            "amount": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_AMOUNT,
                "description": "Minor units (cents).",
            },
            "currency": {"type": "string", "pattern": CURRENCY_PATTERN},
            "customer": {**TOKEN, "description": "A customer token, never a name or e-mail."},
            "card": {**TOKEN, "description": "A card token, never a card number."},
            "ship_to": {**TOKEN, "description": "An address token, never an address."},
        },
        ["sku", "qty", "amount", "currency", "customer", "card", "ship_to"],
        closed=True,
    ),
    "OrderAccepted": _obj(
        {"order_id": STR, "saga_id": STR, "status": STR}, ["order_id", "saga_id", "status"]
    ),
    "OrderStatus": _obj(
        {
            **_fields("order_id:str saga_id:str updated_at:num?"),
            "terminal": ORDER_TERMINAL,
            "status": _null(
                {
                    "type": "string",
                    "description": "The saga definition's label: for the checkout "
                    "PENDING_PAYMENT, PENDING_INVENTORY, PENDING_SHIPMENT, COMPLETING, "
                    "COMPLETED; CANCELLING then CANCELLED; NEEDS_ATTENTION (a person "
                    "decides); PARTIALLY_COMPLETED (a person accepted it as it stands).",
                }
            ),
            "history": {"type": "array", "items": _obj(_fields("status:str at:num"))},
        },
        ["order_id", "saga_id", "status", "terminal", "history"],
    ),
    "OrderStatusEvent": _obj(
        {
            **_fields("order_id:str saga_id:str status:str at:num seq:int"),
            "terminal": {
                **ORDER_TERMINAL,
                "description": "true on the last status event, when the order is final "
                "(an `end` event follows).",
            },
        }
    ),
    "SagaSummary": _obj(SAGA_SUMMARY, list(SAGA_SUMMARY)),
    "SagaPage": _obj(
        {
            "total": INT,
            "limit": INT,
            "offset": INT,
            "filter": ANY_OBJ,
            "counts": {"type": "object", "additionalProperties": INT},
            "items": {"type": "array", "items": _ref("SagaSummary")},
        },
        ["total", "limit", "offset", "counts", "items"],
    ),
    "Step": _obj(STEP, ["index", "name", "status", "attempt"]),
    "HistoryRow": _obj(
        {
            **_fields("version:int at:num event:str"),
            "state": _ref("SagaState"),
            **_fields("status:str step:str? detail:obj message_id:str?"),
        },
        ["version", "at", "event", "state", "status"],
    ),
    "SagaDetail": _obj(
        {
            **SAGA_SUMMARY,
            **_fields("correlation_id:str deadline_at:num? cancel_requested:bool timed_out:bool"),
            **_fields("terminal:bool last_error:str? next_retry_at:num? data:obj"),
            "waiting_for": _null(
                {
                    "type": "string",
                    "description": "name@version: the saga's inputs are set aside until a "
                    "process that has this definition version applies them (null: none).",
                }
            ),
            "steps": {"type": "array", "items": _ref("Step")},
            "history": {"type": "array", "items": _ref("HistoryRow")},
            "messages": _obj(
                {
                    "sent": {"type": "array", "items": ANY_OBJ},
                    "received": {"type": "array", "items": ANY_OBJ},
                },
                ["sent", "received"],
            ),
        },
        ["saga_id", "state", "steps", "history", "messages"],
    ),
    "StartSagaRequest": _obj(
        {
            "definition": {
                "type": "string",
                "minLength": 1,
                "maxLength": 100,
                "description": "One of the served app's saga definitions.",
            },
            "business_key": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_KEY,
                "description": "The saga's key (a token such as trip-42, never personal "
                "data): one saga per definition and key.",
            },
            "data": {
                **ANY_OBJ,
                "description": "The saga's data (default {}): tokens, never personal data.",
            },
            "version": _null(
                {
                    "type": "integer",
                    "minimum": 1,
                    "description": "The definition version (default: the latest, or the "
                    "app's canary choice).",
                }
            ),
        },
        ["definition", "business_key"],
        closed=True,
    ),
    "ActionRequest": _obj(ACTION, ["action", "reason"], closed=True),
    "ActionResult": _obj(
        {
            "action": STR,
            "actor": STR,
            "reason": STR,
            "description": {**STR, "description": "What the action did."},
            "saga": _ref("SagaSummary"),
        },
        ["action", "actor", "reason", "saga"],
    ),
    "BatchFilter": {**_obj(FILTER, closed=True), "minProperties": 1},
    "BatchRequest": _obj(
        {
            "filter": _ref("BatchFilter"),
            **ACTION,
            "dry_run": {
                "type": "boolean",
                "description": "true: only count and list the matching sagas; false: act on them.",
            },
            "limit": {"type": "integer", "minimum": 1, "maximum": MAX_BATCH, "default": 100},
            "expected_versions": {
                "type": "object",
                "additionalProperties": {"type": "integer", "minimum": 1},
                "description": "saga id -> the version the decision was made on (the dry "
                "run's `versions`): a saga listed here that moved since is refused with "
                "`saga_moved` in its result; the others act on the saga as it is.",
            },
        },
        ["filter", "action", "reason", "dry_run"],
        closed=True,
    ),
    "BatchResult": _obj(
        {
            **_fields("dry_run:bool action:str filter:obj matched:int"),
            "description": {**STR, "description": "What the action does to each saga."},
            "irreversible": {**BOOL, "description": "Whether acting needs `confirm: true`."},
            "saga_ids": {"type": "array", "items": STR},
            "versions": {
                "type": "object",
                "additionalProperties": INT,
                "description": "Dry run: each saga's version now (send them back as "
                "`expected_versions`).",
            },
            **_fields("would_apply:int would_refuse:int"),
            "previews": {
                "type": "array",
                "description": "Dry run: what the action would do to each saga (computed, "
                "nothing written): its state after, or why it would be refused.",
                "items": _obj(
                    _fields(
                        "saga_id:str version:int ok:bool state:str status:str error:str message:str"
                    ),
                    ["saga_id", "version", "ok"],
                ),
            },
            **_fields("batch_id:str applied:int failed:int remaining:int"),
            "results": {
                "type": "array",
                "items": _obj(
                    _fields("saga_id:str ok:bool state:str status:str error:str message:str"),
                    ["saga_id", "ok"],
                ),
            },
        },
        ["dry_run", "action", "matched", "saga_ids"],
    ),
    "ManualCase": _obj({**SAGA_SUMMARY, "waiting_s": NUM}, [*SAGA_SUMMARY, "waiting_s"]),
    "ManualCasePage": {
        **_page("ManualCase"),
        "properties": {**_page("ManualCase")["properties"], "total": INT},
    },
    "AuditRow": _obj(
        _fields(
            "audit_id:str at:num actor:str role:str? action:str outcome:str saga_id:str? "
            "dead_letter_id:int? reason:str? version_before:int? version_after:int? "
            "store:str? detail:obj"
        ),
        ["audit_id", "at", "actor", "action", "outcome", "detail"],
    ),
    "AuditPage": {
        **_page("AuditRow"),
        "properties": {**_page("AuditRow")["properties"], "filter": {"type": "object"}},
    },
    "DeadLetter": _obj(
        {
            **_fields("store:str id:int endpoint:str message_id:str? type:str? saga_id:str?"),
            **_fields("reason:str at:num"),
            "status": {"type": "string", "enum": ["open", "replayed", "discarded"]},
            **_fields("settled_by:str? settled_at:num? settle_reason:str?"),
        },
        ["store", "id", "endpoint", "reason", "at", "status"],
    ),
    "DeadLetterDetail": {
        "allOf": [
            _ref("DeadLetter"),
            _obj(_fields("body:str envelope:obj? parse_error:str?"), ["body"]),
        ]
    },
    "BrokerDeadLetter": _obj(
        _fields("transport:str endpoint:str message_id:str? reason:str body:str"),
        ["transport", "endpoint", "reason", "body"],
    ),
    "DeadLetterPage": {
        **_page("DeadLetter"),
        "properties": {
            **_page("DeadLetter")["properties"],
            **_fields("total:int status:str broker_error:str?"),
            "stores": {"type": "array", "items": STR},
            "broker": {"type": "array", "items": _ref("BrokerDeadLetter")},
        },
    },
    "DeadLetterActionRequest": _obj(
        {
            "reason": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_REASON,
                "pattern": "\\S",
                "description": "Why (mandatory; kept with the dead letter and audited). Text "
                "holding an e-mail address, a card number or a postal address is refused (422).",
            }
        },
        ["reason"],
        closed=True,
    ),
    "DeadLetterActionResult": _obj(
        {"action": STR, "dead_letter": _ref("DeadLetterDetail")}, ["action", "dead_letter"]
    ),
    "PaymentRow": _obj(_fields("order_id:str op:str amount:int provider_ref:str at:num")),
    "PaymentPage": _page("PaymentRow"),
    "Stock": _obj(
        {
            **_fields("sku:str initial:int available:int reserved:int shipped:int"),
            "reservations": {"type": "object", "additionalProperties": INT},
        },
        ["sku", "initial", "available", "reserved", "shipped"],
    ),
    "ShipmentRow": _obj(
        _fields(
            "order_id:str status:str carrier:str address_token:str sku:str qty:int "
            "created_at:num updated_at:num"
        )
    ),
    "ShipmentPage": _page("ShipmentRow"),
    "OpenApiDocument": {"type": "object", "description": "An OpenAPI 3.0 document."},
    "Health": _obj({"status": STR}, ["status"]),
    "Ready": _obj(
        {"ready": BOOL, "stores": {"type": "object", "additionalProperties": STR}},
        ["ready", "stores"],
    ),
}


ALTERNATIVES: dict[str, dict[str, Any]] = {
    "listAudit": {
        "application/x-ndjson": {
            "schema": {
                "type": "string",
                "description": "JSON lines: one AuditRow object per line, newest first.",
            }
        }
    },
}
"""Other media types a 200 answer may take, by operation (chosen by ``Accept``)."""


ETAG = {
    "ETag": {
        "description": 'The saga\'s version as a weak ETag (W/"7"): send it back in '
        "`If-Match` with a decision on the saga.",
        "schema": {"type": "string"},
    }
}
HEADERS: dict[str, dict[int, dict[str, Any]]] = {
    "getSaga": {200: ETAG},
    "sagaAction": {200: ETAG, 409: ETAG},
}
"""Response headers by operation and status (a 409 ``saga_moved`` names the version now)."""


def _error(status: int) -> dict[str, Any]:
    return {
        "description": ERROR_TEXT.get(status, ERROR_CODES.get(status, "Error")),
        "content": {PROBLEM_JSON: {"schema": _ref("Problem")}},
    }


def _operation(ep: Endpoint) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, reply in sorted(ep.replies.items()):
        body: dict[str, Any] = {"description": reply.description}
        schema = _ref(reply.schema) if reply.schema else {"type": "string"}
        body["content"] = {reply.media_type: {"schema": schema}}
        if status == 200:
            body["content"].update(ALTERNATIVES.get(ep.operation_id, {}))
        responses[str(status)] = body
    errors = {401, 403, *ep.errors}
    if ep.body is not None:
        errors |= {400, 413, 415, 422}
    if any(p.get("in") == "query" for p in ep.params):
        errors.add(422)
    if any(p.get("in") == "header" and p.get("required") for p in ep.params):
        errors.add(400)
    if any(p.get("in") == "path" for p in ep.params):
        errors.add(404)
    for status in sorted(errors):
        responses.setdefault(str(status), _error(status))
    for status, headers in HEADERS.get(ep.operation_id, {}).items():
        responses[str(status)] = {**responses[str(status)], "headers": headers}
    op: dict[str, Any] = {
        "operationId": ep.operation_id,
        "summary": ep.summary,
        "tags": [ep.tag],
        "security": [{"bearer": []}],
        "description": (ep.description + "\n\n" if ep.description else "")
        + f"Needs a token with role **{ep.role.value}** or above.",
        "responses": responses,
    }
    if ep.params:
        op["parameters"] = list(ep.params)
    if ep.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(ep.body)}},
        }
    return op


def build_document(endpoints: Sequence[Endpoint], *, title: str = "sagakit API") -> dict[str, Any]:
    """The OpenAPI 3.0.3 document of ``endpoints``."""
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        paths.setdefault(ep.path, {})[ep.method.lower()] = _operation(ep)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "version": "1",
            "description": "Place and follow orders, inspect and operate sagas. Every request "
            "needs `Authorization: Bearer <token>`; roles are viewer < operator < admin.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
        },
        "security": [{"bearer": []}],
    }
