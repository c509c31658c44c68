"""HTTP plumbing shared by the routes: endpoint declarations, authentication, bodies.

Each route is declared once as an :class:`Endpoint` (method, path, the least role it
needs, its handler and what it returns); the Starlette routes *and* the OpenAPI
document are built from the same declarations, so neither can forget an endpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_from_bytes

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from sagakit.api.auth import Principal, Role, TokenStore, require
from sagakit.api.console_session import ConsoleSessions
from sagakit.api.problems import PROBLEM_JSON, ApiError, problem_bytes
from sagakit.api.records import CheckoutStores, Records
from sagakit.api.validation import parse_json
from sagakit.runtime.engine import Engine

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
PRINCIPAL = "sagakit.principal"
"""The ASGI scope key under which the authenticated :class:`Principal` travels."""


OrderStarter = Callable[[str, dict[str, Any]], Awaitable[tuple[str, str]]]
"""``(order_id, order data) -> (saga id, status shown)``: starts an order, idempotently
by order id (a choreography places it with its order service instead of a saga)."""


@dataclass(slots=True)
class ApiContext:
    """The shared state of one app (built by :func:`sagakit.api.app.create_app`)."""

    engine: Engine
    records: Records
    tokens: TokenStore
    checkout: CheckoutStores | None
    max_body: int
    order_definition: str = "checkout"
    sse_heartbeat: float = 15.0
    """Seconds between heartbeat comments on an idle event stream."""
    sse_poll: float = 0.25
    """Longest wait between two reads of a saga's history while streaming."""
    sse_max_seconds: float = 600.0
    """An event stream ends after this long; the client reconnects with Last-Event-ID."""
    start_order: OrderStarter | None = None
    """How ``POST /orders`` starts an order (None: start the ``order_definition`` saga)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One documented success response: its description and body schema (a ``$ref`` name)."""

    description: str
    schema: str | None = None
    media_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One route: what it does, who may call it, and what it returns."""

    method: str
    path: str
    role: Role
    handler: Handler
    operation_id: str
    summary: str
    tag: str
    replies: Mapping[int, Reply]
    params: Sequence[dict[str, Any]] = ()
    body: str | None = None
    errors: Sequence[int] = ()
    description: str = ""

    def guarded(self) -> Handler:
        """The handler behind the role check (the token was checked by the middleware)."""
        role, handler = self.role, self.handler

        async def run(request: Request) -> Response:
            require(principal(request), role)
            return await handler(request)

        run.__name__ = self.operation_id
        return run


def principal(request: Request) -> Principal:
    """Who made ``request`` (set by :class:`TokenAuth`)."""
    who = request.scope.get(PRINCIPAL)
    if not isinstance(who, Principal):  # pragma: no cover - the middleware always sets it
        raise ApiError(401, "the request was not authenticated")
    return who


def error_response(err: ApiError, instance: str | None) -> Response:
    """The ``application/problem+json`` response (RFC 9457) of an :class:`ApiError`;
    ``instance`` is the request's path (:func:`request_path`)."""
    body = problem_bytes(err.problem(instance))
    return Response(body, status_code=err.status, media_type=PROBLEM_JSON, headers=err.headers)


def request_path(scope: Scope) -> str:
    """The path of the request in ``scope`` as the client sent it (still percent-encoded,
    so that it is a valid URI reference for a problem's ``instance``), without the query."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        # Escapes the client sent stay as they are; a byte it sent unescaped is escaped.
        return quote_from_bytes(raw.split(b"?", 1)[0], safe=_PATH_SAFE)
    path: str = scope.get("root_path", "") + scope.get("path", "")
    return quote(path, safe=_PATH_SAFE.replace("%", ""))


_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
"""Characters a URI path may hold unescaped (RFC 3986 pchar), and ``%`` of escapes."""


class TokenAuth:
    """ASGI middleware: every HTTP request needs a valid bearer token, or gets 401.

    Console paths (``/console``, ``/console/...``) also accept the console's sign-in
    session cookie (:mod:`sagakit.api.console_session`) when ``sessions`` is given, and
    send a browser without a valid one to the sign-in page instead of answering 401.
    Every other path ignores the cookie: it is no credential for the JSON API.
    """

    def __init__(
        self, app: ASGIApp, tokens: TokenStore, sessions: ConsoleSessions | None = None
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if path == CONSOLE_LOGIN:
            await self.app(scope, receive, send)  # the sign-in page itself
            return
        console = path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")
        header: str | None = None
        cookie: str | None = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
            elif name == b"cookie" and console:
                cookie = console_cookie(value.decode("latin-1"))
        if console and header is None:
            who = None
            if cookie is not None and self.sessions is not None:
                who = self.sessions.principal(cookie)
            if who is None:
                await _to_sign_in(scope, receive, send, clear=cookie is not None)
                return
            scope[PRINCIPAL] = who
            await self.app(scope, receive, send)
            return
        try:
            scope[PRINCIPAL] = self.tokens.principal_for(header)
        except ApiError as err:
            if console:
                await _to_sign_in(scope, receive, send, clear=False)
                return
            await error_response(err, request_path(scope))(scope, receive, send)
            return
        await self.app(scope, receive, send)


CONSOLE_PREFIX = "/console"
"""Where the console is mounted in the API."""
CONSOLE_LOGIN = "/console-login"
"""The console's sign-in page (the only console path open without a session)."""
CONSOLE_COOKIE = "sagakit_console"
"""The cookie holding a console sign-in session (never the token)."""


def console_cookie(raw: str) -> str | None:
    """The console session cookie's value in a ``Cookie`` header, or None."""
    for part in raw.split(";"):
        name, _, value = part.strip().partition("=")
        if name == CONSOLE_COOKIE and value:
            return value.strip('"')
    return None


async def _to_sign_in(scope: Scope, receive: Receive, send: Send, *, clear: bool) -> None:
    """Redirect to the sign-in page; ``clear`` drops a session cookie that is no longer
    valid (expired, tampered with, signed out, its token revoked)."""
    reply = RedirectResponse(CONSOLE_LOGIN, status_code=303)
    if clear:
        reply.delete_cookie(
            CONSOLE_COOKIE,
            path=CONSOLE_PREFIX,
            httponly=True,
            samesite="strict",
            secure=scope.get("scheme") == "https",
        )
    await reply(scope, receive, send)


async def on_api_error(request: Request, exc: Exception) -> Response:
    """Render an :class:`ApiError` raised by a handler."""
    assert isinstance(exc, ApiError)
    return error_response(exc, request_path(request.scope))


async def on_http_error(request: Request, exc: Exception) -> Response:
    """Render Starlette's own errors (unknown path, wrong method) as problem documents."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.url.path!r}; see /openapi.json for the endpoints"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path!r}"
    else:
        message = str(exc.detail)
    err = ApiError(exc.status_code, message, headers=dict(exc.headers or {}))
    return error_response(err, request_path(request.scope))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    """A 500 problem document; the traceback goes to the log, not to the client."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    err = ApiError(500, "the server failed on this request; it is logged")
    return error_response(err, request_path(request.scope))


def query_lists(request: Request) -> dict[str, list[str]]:
    """The query string as ``{name: [values...]}``."""
    out: dict[str, list[str]] = {}
    for k, v in request.query_params.multi_items():
        out.setdefault(k, []).append(v)
    return out


def one(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    """The last value of a query parameter, or None when absent or empty."""
    values = query.get(name)
    return values[-1] if values and values[-1] != "" else None


async def read_json(request: Request, max_body: int) -> object:
    """The request body parsed as JSON: 415, 413 or 400 saying what was wrong."""
    ctype = request.headers.get("content-type")
    if ctype is not None:
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise ApiError(415, f"send the body as application/json, not {media or 'nothing'!r}")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.strip().isascii() and declared.strip().isdigit()):
            raise ApiError(400, "the Content-Length header is not a number")
        if int(declared) > max_body:
            raise _too_large(max_body)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise _too_large(max_body)
        chunks.append(chunk)
    return parse_json(b"".join(chunks))


def _too_large(max_body: int) -> ApiError:
    return ApiError(413, f"the body is larger than {max_body} bytes; send less")


def json_reply(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response (compact, UTF-8)."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return Response(body, status_code=status, media_type="application/json", headers=headers)
