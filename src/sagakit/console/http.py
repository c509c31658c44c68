"""HTTP plumbing of the console: CSRF tokens, the origin check, form parsing, security
headers, static files and the server-sent event stream.

CSRF, in short: a browser gets a random *nonce* in an ``HttpOnly; SameSite=Strict``
cookie scoped to the console's path; each form carries ``HMAC(secret, nonce, actor)``.
A post must bring both, matching, for the same actor, and -- when the browser names
where the form came from (``Origin``, else ``Referer``) -- from the console's own host.
Another site can neither read the token nor make the browser send the cookie, and a
token lifted from one browser or person is useless in another.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse

COOKIE = "sagakit_console_csrf"
"""The cookie holding the browser's CSRF nonce."""
MAX_FORM = 65536
"""Largest form body accepted, in bytes."""
HEADERS = {
    # Everything the pages use is served by the console itself, and inline SVG needs no
    # script or style: nothing inline is allowed.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_NONCE = re.compile(r"[A-Za-z0-9_\-]{32,64}")
_STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript"}


class Csrf:
    """Issues and checks the forms' tokens under one secret."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def token(self, nonce: str, actor: str) -> str:
        """The token of ``nonce`` (from the cookie) for ``actor``."""
        msg = f"{nonce}\x00{actor}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    def issue(self, request: Request, actor: str) -> tuple[str, str | None]:
        """(token for the page's forms, new nonce to set as the cookie, or None)."""
        nonce = request.cookies.get(COOKIE, "")
        fresh = None
        if not _NONCE.fullmatch(nonce):
            nonce = fresh = secrets.token_urlsafe(32)
        return self.token(nonce, actor), fresh

    def check(self, request: Request, token: str, actor: str) -> bool:
        """True when a post's token matches its cookie and actor and its origin is ours."""
        nonce = request.cookies.get(COOKIE, "")
        if not _NONCE.fullmatch(nonce) or not same_origin(request):
            return False
        return hmac.compare_digest(token, self.token(nonce, actor))


def same_origin(request: Request) -> bool:
    """False when the browser says the request came from another host.

    Hosts are compared (not schemes), so a TLS-terminating proxy in front of a plain
    HTTP server does not refuse every form."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if source is None:
        return True  # not a browser, or one that hides both: the token still guards
    return urlsplit(source).netloc == request.url.netloc


async def read_form_values(
    request: Request, *, max_bytes: int = MAX_FORM, max_fields: int = 50
) -> dict[str, list[str]] | None:
    """The posted urlencoded form, every value of each field, or None when the body is
    something else or too large. Parsed here so the console needs no multipart library."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            return None
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=max_fields)
    except (UnicodeDecodeError, ValueError):
        return None


async def read_form(request: Request) -> dict[str, str] | None:
    """The posted urlencoded form (first value of each field), or None when the body is
    something else or too large (see :func:`read_form_values`)."""
    fields = await read_form_values(request)
    return None if fields is None else {k: v[0] for k, v in fields.items()}


def html_response(
    request: Request, body: str, *, base: str, status: int = 200, nonce: str | None = None
) -> HTMLResponse:
    """A page with the security headers; sets the CSRF cookie when ``nonce`` is new."""
    resp = HTMLResponse(body, status_code=status, headers=HEADERS)
    if nonce is not None:
        resp.set_cookie(
            COOKIE,
            nonce,
            path=base or "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
    return resp


@cache
def _static_bytes(name: str) -> bytes:
    return resources.files("sagakit.console").joinpath("static", name).read_bytes()


def static_file(name: str) -> Response:
    """``console.css`` or ``console.js`` from the package; 404 for anything else."""
    if name not in _STATIC:
        return Response("not found", status_code=404, media_type="text/plain")
    headers = {"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"}
    return Response(_static_bytes(name), media_type=_STATIC[name], headers=headers)


def event_stream(
    tag: Callable[[], Awaitable[tuple[str, bool]]], *, poll: float, lifetime: float
) -> StreamingResponse:
    """Server-sent events: ``change`` with the new tag whenever ``tag()`` returns a new
    one, ``end`` once it says the view is final; ``tag()`` is polled every ``poll`` s.

    The stream closes after ``lifetime`` seconds and the browser reconnects, so that no
    request outlives a deployment by hours."""

    async def events() -> AsyncIterator[str]:
        yield "retry: 3000\n\n"
        last, started = "", time.monotonic()
        quiet = started
        while time.monotonic() - started < lifetime:
            value, final = await tag()
            if value != last:
                last, quiet = value, time.monotonic()
                yield f"event: change\ndata: {json.dumps({'tag': value})}\n\n"
            elif time.monotonic() - quiet > 10:
                # A write now and then is how a server notices a client that left.
                quiet = time.monotonic()
                yield ": keep-alive\n\n"
            if final:
                yield "event: end\ndata: {}\n\n"
                return
            await asyncio.sleep(poll)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
