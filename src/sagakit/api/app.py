"""The app factory: :func:`create_app` builds the Starlette app over a running engine.

The engine is opened and closed by the caller (``sagakit serve`` does it around
uvicorn); the app only reads through it and asks it to act. Every request needs a
bearer token (:mod:`sagakit.api.auth`); every error is a JSON body
(:mod:`sagakit.api.problems`); the OpenAPI document at ``/openapi.json`` is generated
from the same endpoint declarations as the routes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from sagakit.api import dead_letters, health, orders, sagas, start
from sagakit.api.auth import Role, TokenStore
from sagakit.api.console_mount import console_mount
from sagakit.api.console_session import SESSION_LIFETIME, ConsoleSessions
from sagakit.api.http import (
    ApiContext,
    Endpoint,
    Handler,
    OrderStarter,
    Reply,
    TokenAuth,
    json_reply,
    on_api_error,
    on_http_error,
    on_unexpected,
)
from sagakit.api.limits import OFF, Limits, RequestLimits, on_client_disconnect
from sagakit.api.openapi import build_document
from sagakit.api.problems import ApiError
from sagakit.api.records import CheckoutStores, Records
from sagakit.errors import ConfigurationError
from sagakit.runtime.engine import Engine

DEFAULT_MAX_BODY = 64 * 1024
"""Bytes a request body may have (larger ones get 413)."""


def create_app(
    engine: Engine,
    *,
    checkout: CheckoutStores | None = None,
    tokens: TokenStore,
    max_body: int = DEFAULT_MAX_BODY,
    order_definition: str = "checkout",
    sse_heartbeat: float = 15.0,
    sse_poll: float = 0.25,
    sse_max_seconds: float = 600.0,
    console_secret: bytes | None = None,
    start_order: OrderStarter | None = None,
    console_session_seconds: float = SESSION_LIFETIME,
    limits: Limits = OFF,
) -> Starlette:
    """The HTTP API of ``engine`` (which the caller opens and closes).

    ``checkout`` (the reference checkout's stores) enables ``POST /orders``, the order
    status routes and the ledgers; without it the app serves the operator routes only.
    ``tokens`` are the bearer tokens allowed in; there is no unauthenticated mode.
    ``max_body`` caps request bodies (413 beyond). ``sse_*`` tune the event streams:
    heartbeat interval, longest wait between reads, and how long one stream lasts.
    The API's own tables are created in the orchestrator store on first use (and at
    startup when the server runs the ASGI lifespan). ``start_order`` replaces how
    ``POST /orders`` starts an order (default: the ``order_definition`` saga).
    ``console_secret`` (32 bytes or more; :func:`~sagakit.api.console_session.load_console_key`)
    signs the console's sign-in sessions and forms (default: random per process, so a
    restart signs everyone out); a console sign-in lasts ``console_session_seconds``.
    ``limits`` are the per-token request rate and event streams (:mod:`sagakit.api.limits`;
    none by default, ``sagakit serve`` sets them).
    """
    if not isinstance(tokens, TokenStore):
        raise ConfigurationError(
            "create_app needs tokens=TokenStore(...): there is no auth-off mode"
        )
    if max_body < 1:
        raise ConfigurationError(f"max_body must be at least 1 byte, got {max_body}")
    if min(sse_heartbeat, sse_poll, sse_max_seconds) <= 0:
        raise ConfigurationError("sse_heartbeat, sse_poll and sse_max_seconds must be > 0")
    ctx = ApiContext(
        engine=engine,
        records=Records(engine, order_definition=order_definition),
        tokens=tokens,
        checkout=checkout,
        max_body=max_body,
        order_definition=order_definition,
        sse_heartbeat=sse_heartbeat,
        sse_poll=sse_poll,
        sse_max_seconds=sse_max_seconds,
        start_order=start_order,
    )
    endpoints = [
        *orders.endpoints(ctx),
        *sagas.endpoints(ctx),
        *start.endpoints(ctx),
        *dead_letters.endpoints(ctx),
        *health.endpoints(ctx),
    ]
    document: dict[str, object] = {}

    async def openapi(request: Request) -> Response:
        return json_reply(document)

    endpoints.append(
        Endpoint(
            "GET",
            "/openapi.json",
            Role.VIEWER,
            openapi,
            "openapi",
            "This OpenAPI document",
            "meta",
            {200: Reply("The OpenAPI 3.0 document.", "OpenApiDocument")},
        )
    )
    document.update(build_document(endpoints))
    sessions = ConsoleSessions(tokens, console_secret, lifetime=console_session_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await ctx.records.ensure()
        yield

    app = Starlette(
        routes=[*_routes(endpoints), *console_mount(engine, sessions)],
        middleware=[
            Middleware(TokenAuth, tokens=tokens, sessions=sessions),
            # After TokenAuth: the limits count per token name.
            Middleware(RequestLimits, limits=limits),
        ],
        exception_handlers={
            ApiError: on_api_error,
            HTTPException: on_http_error,
            ClientDisconnect: on_client_disconnect,
            Exception: on_unexpected,
        },
        lifespan=lifespan,
    )
    app.state.sagakit = ctx
    return app


def _routes(endpoints: list[Endpoint]) -> list[Route]:
    by_path: dict[str, dict[str, Endpoint]] = {}
    for ep in endpoints:
        methods = by_path.setdefault(ep.path, {})
        if ep.method in methods:
            raise ConfigurationError(f"two endpoints are {ep.method} {ep.path}")
        methods[ep.method] = ep
    routes = []
    for path, methods in by_path.items():
        # One route per path, so that Starlette's 405 names every allowed method; each
        # method keeps its own role check.
        if len(methods) == 1:
            (ep,) = methods.values()
            routes.append(Route(path, ep.guarded(), methods=[ep.method], name=ep.operation_id))
            continue
        name = "|".join(ep.operation_id for ep in methods.values())
        routes.append(Route(path, _by_method(methods), methods=list(methods), name=name))
    return routes


def _by_method(methods: dict[str, Endpoint]) -> Handler:
    """One handler for several methods of a path: each method's guarded handler."""
    handlers = {method: ep.guarded() for method, ep in methods.items()}

    async def dispatch(request: Request) -> Response:
        # Starlette lets HEAD through wherever GET is allowed.
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return dispatch
