"""Per-token limits of the HTTP API: a request rate, and event streams held open.

:class:`RequestLimits` is ASGI middleware that runs after :class:`~sagakit.api.http.TokenAuth`
(so it knows the token's name):

* **rate**: a token bucket per token name: ``burst`` requests at once, refilled at
  ``rate`` requests per second; a ``GET`` of a page of ``?limit=N`` rows counts as
  ``1 + N // 100`` requests (:func:`request_cost`). Beyond it the answer is 429 with
  ``Retry-After`` (whole seconds until the request fits again) and the usual problem
  document (``type: /problems/rate_limited``, ``error: rate_limited``). The probes
  (``/healthz``, ``/readyz``, ``/metrics``) are exempt: a load balancer or Prometheus
  must never be told to go away.
* **streams**: at most ``streams`` server-sent event streams (``GET .../events``) open at
  once per token; one more is refused with 429 until one ends.

Both count per token *name*, so a token's rotated secret shares its budget. A request
without a principal (the console's sign-in page) is not limited here.

:func:`on_client_disconnect` turns a client that hung up in the middle of its request
body into one INFO line instead of an error with a traceback.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from sagakit.api.auth import Principal
from sagakit.api.http import PRINCIPAL, error_response, request_path
from sagakit.api.problems import ApiError
from sagakit.errors import ConfigurationError

log = logging.getLogger("sagakit.api")

PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
"""Paths no limit applies to: liveness, readiness and metrics scrapes."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-token limits; ``rate=0`` turns the rate limit off, ``streams=0`` the stream cap."""

    rate: float = 20.0
    """Requests per second a token may make, sustained."""
    burst: int = 40
    """Requests a token may make at once after a quiet spell (the bucket's size)."""
    streams: int = 8
    """Event streams a token may hold open at once."""
    exempt: frozenset[str] = PROBES
    """Paths that are never limited."""

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)):
            raise ConfigurationError(f"rate limit must be a number, got {self.rate!r}")
        if not math.isfinite(self.rate) or self.rate < 0:
            raise ConfigurationError(
                f"rate limit must be >= 0 requests per second (0: off), got {self.rate}"
            )
        for name in ("burst", "streams"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"{name} must be an integer >= 0, got {value!r}")
        if self.rate and self.burst < 1:
            raise ConfigurationError("burst must be at least 1 when a rate limit is set")


OFF = Limits(rate=0, burst=0, streams=0)
"""No limits (the default of :func:`~sagakit.api.app.create_app`; ``serve`` sets them)."""


ROWS_PER_REQUEST = 100
"""A page of this many rows counts as one more request (see :func:`request_cost`)."""


def request_cost(scope: Scope) -> float:
    """How many requests ``scope`` counts as: 1, plus 1 per :data:`ROWS_PER_REQUEST`
    rows a ``GET`` asks for with ``?limit=`` (a page of 500 counts as 6). Reading and
    rendering rows is what a request costs the server, so a client asking for large
    pages gets fewer of them."""
    if scope.get("method") != "GET":
        return 1.0
    query: bytes = scope.get("query_string", b"")
    if b"limit=" not in query:
        return 1.0
    values = parse_qs(query.decode("latin-1")).get("limit", [])
    rows = values[-1] if values else ""
    if not (rows.isascii() and rows.isdigit() and len(rows) < 7):
        return 1.0  # the route refuses it with 422; counting it as one is enough
    return 1.0 + int(rows) // ROWS_PER_REQUEST


def is_event_stream(scope: Scope) -> bool:
    """Whether the request asks for a server-sent event stream (``GET .../events``): the
    console's live updates and ``/orders/{id}/events``."""
    path: str = scope.get("path", "")
    return scope.get("method") == "GET" and path.endswith("/events")


class RequestLimits:
    """ASGI middleware applying :class:`Limits` per token name (inside ``TokenAuth``)."""

    def __init__(
        self, app: ASGIApp, limits: Limits, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.app = app
        self.limits = limits
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        """Token name -> (requests left, when last refilled)."""
        self._streams: dict[str, int] = {}
        """Token name -> event streams open now."""

    def take(self, name: str, cost: float = 1.0) -> float:
        """Take ``cost`` requests from ``name``'s bucket: 0 if they fit, else the seconds
        to wait until they would."""
        rate, burst = self.limits.rate, self.limits.burst
        cost = min(cost, float(burst))  # a request must fit in a full bucket
        now = self.clock()
        left, then = self._buckets.get(name, (float(burst), now))
        left = min(float(burst), left + (now - then) * rate)
        if left >= cost:
            self._buckets[name] = (left - cost, now)
            return 0.0
        self._buckets[name] = (left, now)
        return (cost - left) / rate

    def streams_open(self, name: str) -> int:
        """How many event streams ``name`` holds open now."""
        return self._streams.get(name, 0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        who = scope.get(PRINCIPAL)
        if (
            scope["type"] != "http"
            or not isinstance(who, Principal)
            or scope.get("path", "") in self.limits.exempt
        ):
            await self.app(scope, receive, send)
            return
        name = who.name
        if self.limits.rate:
            wait = self.take(name, request_cost(scope))
            if wait:
                seconds = max(1, math.ceil(wait))
                err = ApiError(
                    429,
                    f"token {name!r} is over its rate limit of {self.limits.rate:g} requests "
                    f"per second (bursts of {self.limits.burst}; a page of N rows counts as "
                    f"1 + N/{ROWS_PER_REQUEST}); retry in {seconds} s",
                    code="rate_limited",
                    headers={"Retry-After": str(seconds)},
                )
                await error_response(err, request_path(scope))(scope, receive, send)
                return
        cap = self.limits.streams
        if not cap or not is_event_stream(scope):
            await self.app(scope, receive, send)
            return
        if self._streams.get(name, 0) >= cap:
            err = ApiError(
                429,
                f"token {name!r} already holds {cap} event streams open; close one first",
                code="too_many_streams",
                headers={"Retry-After": "5"},
            )
            await error_response(err, request_path(scope))(scope, receive, send)
            return
        self._streams[name] = self._streams.get(name, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            left = self._streams[name] - 1
            if left:
                self._streams[name] = left
            else:
                del self._streams[name]


async def on_client_disconnect(request: Request, exc: Exception) -> Response:
    """A client hung up before its request body arrived: one INFO line, no traceback.

    Nobody reads the response (the server drops it); it exists because an exception
    handler must return one.
    """
    log.info(
        "client disconnected before sending its whole request body: %s %s",
        request.method,
        request.url.path,
    )
    # Still the API's error shape: a proxy that kept the connection could log it.
    err = ApiError(400, "the client disconnected before sending its whole request body")
    return error_response(err, request_path(request.scope))


__all__ = [
    "OFF",
    "PROBES",
    "Limits",
    "RequestLimits",
    "is_event_stream",
    "on_client_disconnect",
    "request_cost",
]
