"""The API's errors: one exception that carries its HTTP status, rendered as RFC 9457.

Every error the API returns is a problem document (RFC 9457), media type
``application/problem+json``, so a client needs one parser::

    {"type": "/problems/invalid_fields", "title": "Invalid fields", "status": 422,
     "detail": "the order has 1 invalid field: qty: must be an integer from 1 to 10000",
     "instance": "/orders",
     "error": "invalid_fields", "message": "the order has 1 invalid field: ...",
     "fields": [{"field": "qty", "problem": "must be an integer from 1 to 10000"}]}

``type`` is ``/problems/<code>``, a URI reference relative to the API (an identifier:
the server does not serve it; docs/operations.md lists the codes); ``title`` is the
same for every problem of a type; ``status`` repeats the HTTP status; ``detail`` says
what was wrong with this request and what to do; ``instance`` is the request's path.
The members of the API's first error shape stay as extension members, so clients
written for it keep working: ``error`` (the same stable code as in ``type``),
``message`` (the same text as ``detail``) and ``fields`` (only for 422: every refused
field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

PROBLEM_JSON = "application/problem+json"
"""The media type of every error body (RFC 9457)."""

PROBLEM_TYPES = "/problems/"
"""Where the problem type URIs live: ``/problems/<code>``."""


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One refused field of a request: where it is and what is wrong with it."""

    field: str
    problem: str

    def to_json(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"field": self.field, "problem": self.problem}


ERROR_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_fields",
    429: "rate_limited",
    500: "internal_error",
    503: "not_ready",
}
"""The default ``error`` code of each status the API returns."""

TITLES: dict[str, str] = {
    "bad_request": "Bad request",
    "malformed_json": "The body is not JSON",
    "idempotency_key_required": "Idempotency-Key header missing or malformed",
    "unauthorized": "Not authenticated",
    "forbidden": "Role too low for this route",
    "not_found": "Not found",
    "method_not_allowed": "Method not allowed",
    "conflict": "Conflict with the current state",
    "refused": "Refused in the current state",
    "no_driver": "Nothing drives this saga",
    "version_missing": "Definition version not served here",
    "saga_moved": "The saga moved since the decision was made",
    "open_holds": "A compensation or a hold is still open",
    "confirmation_required": "An irreversible action needs confirm: true",
    "idempotency_key_reused": "Idempotency-Key used with another body",
    "payload_too_large": "Body too large",
    "unsupported_media_type": "Body is not application/json",
    "invalid_fields": "Invalid fields",
    "rate_limited": "Rate limit exceeded",
    "too_many_streams": "Too many event streams open",
    "internal_error": "Internal server error",
    "not_ready": "Not ready",
}
"""The ``title`` of each problem type; a code not listed takes its status's phrase."""


def problem_type(code: str) -> str:
    """The ``type`` URI (relative to the API) of the problems with ``code``."""
    return PROBLEM_TYPES + code


def problem_title(code: str, status: int) -> str:
    """The ``title`` of the problems with ``code``: the same for every occurrence."""
    if code in TITLES:
        return TITLES[code]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_document(
    status: int,
    code: str,
    message: str,
    instance: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An RFC 9457 problem document with the API's extension members.

    ``instance`` is the request's path (None only where no request was read, such as
    a connection turned away before it sent one); ``extra`` adds extension members.
    """
    out: dict[str, Any] = {
        "type": problem_type(code),
        "title": problem_title(code, status),
        "status": status,
        "detail": message,
    }
    if instance is not None:
        out["instance"] = instance
    out.update(error=code, message=message)
    if extra:
        out.update(extra)
    return out


def problem_bytes(document: dict[str, Any]) -> bytes:
    """``document`` encoded as the body of an ``application/problem+json`` response."""
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


class ApiError(Exception):
    """An HTTP error; raised by handlers, rendered by the app as a problem document."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        fields: list[FieldProblem] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or ERROR_CODES.get(status, "error")
        self.message = message
        self.fields = fields or []
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The API's own members: ``error``, ``message`` and ``fields`` (when any)."""
        out: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.fields:
            out["fields"] = [f.to_json() for f in self.fields]
        return out

    def problem(self, instance: str | None) -> dict[str, Any]:
        """The RFC 9457 problem document of this error, for the request at ``instance``."""
        fields = {"fields": [f.to_json() for f in self.fields]} if self.fields else None
        return problem_document(self.status, self.code, self.message, instance, fields)


def invalid(fields: list[FieldProblem], what: str = "the request") -> ApiError:
    """A 422 naming every refused field."""
    noun = "field" if len(fields) == 1 else "fields"
    detail = "; ".join(f"{f.field}: {f.problem}" for f in fields[:5])
    return ApiError(422, f"{what} has {len(fields)} invalid {noun}: {detail}", fields=fields)


def not_found(message: str) -> ApiError:
    """A 404 with ``message``."""
    return ApiError(404, message)


def conflict(message: str, code: str = "conflict") -> ApiError:
    """A 409 with ``message``."""
    return ApiError(409, message, code=code)
