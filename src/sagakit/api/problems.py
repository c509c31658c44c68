"""The API's errors: one exception that carries its HTTP status and a JSON body.

Every error the API returns has the same shape, so a client needs one parser::

    {"error": "invalid_fields", "message": "the order has 2 invalid fields",
     "fields": [{"field": "qty", "problem": "must be an integer >= 1"}]}

``error`` is a stable machine-readable code, ``message`` says what was wrong and what
to do, ``fields`` (only for 422) names every field that was refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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


class ApiError(Exception):
    """An HTTP error with a JSON body; raised by handlers, rendered by the app."""

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
        """The JSON body of the response."""
        out: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.fields:
            out["fields"] = [f.to_json() for f in self.fields]
        return out


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
