"""The operator console inside the API: same tokens, signed in once per browser.

Browsers do not send ``Authorization`` headers when following links, so a person signs
in once on ``/console-login`` with their API token. The server checks it and answers
with a signed, expiring *session* (:mod:`sagakit.api.console_session`), never the token,
in an ``HttpOnly``, ``SameSite=Strict`` cookie scoped to ``/console`` (``Secure`` when
the request came over HTTPS). :class:`~sagakit.api.http.TokenAuth` accepts that cookie
on console paths only: the JSON API still needs the header, so the cookie can never be
used to call it. Viewers see the console; operators and admins may decide (the
console's own CSRF tokens protect its forms). ``POST /console/logout`` (the header's
*Sign out*) ends the session.

Sign-in and sign-out posts are refused (403) when the browser says they come from
another site: ``Origin``, else ``Referer``, must name this server's host. A post that
names neither (a script, a browser hiding both) is accepted: a browser always sends
``Origin`` on a cross-site post, and without the token a forged sign-in gets nowhere.
"""

from __future__ import annotations

import html
import time

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from sagakit.api.auth import Role
from sagakit.api.console_session import ConsoleSessions
from sagakit.api.http import (
    CONSOLE_COOKIE,
    CONSOLE_LOGIN,
    CONSOLE_PREFIX,
    PRINCIPAL,
    console_cookie,
)
from sagakit.console.http import COOKIE as CSRF_COOKIE
from sagakit.console.http import read_form, same_origin
from sagakit.runtime.engine import Engine

COOKIE = CONSOLE_COOKIE
PREFIX = CONSOLE_PREFIX
LOGIN = CONSOLE_LOGIN
LOGOUT = "/logout"
"""The sign-out route, under :data:`PREFIX` (so the browser sends the session cookie)."""

# The sign-in page cannot use the console's stylesheet (it is behind the sign-in), so
# it keeps its few inline styles; nothing else is allowed, and no framing.
_LOGIN_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_FORM = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>sagakit console</title></head>
<body style="font-family:sans-serif;max-width:28rem;margin:4rem auto">
<h1>sagakit console</h1><p role="status">{message}</p>
<form method="post" action="{login}"><label>Token
<input name="token" type="password" autocomplete="off" required style="width:100%"></label>
<p><button type="submit">Sign in</button></p></form></body></html>"""


def console_mount(engine: Engine, sessions: ConsoleSessions) -> list[BaseRoute]:
    """The console under ``/console``, its sign-in page and its sign-out route.

    ``sessions`` issues and checks the sign-in cookies (give the same object to
    :class:`~sagakit.api.http.TokenAuth`); its key also signs the console's forms."""
    from sagakit.console import console_routes

    def actor(request: Request) -> str | None:
        who = request.scope.get(PRINCIPAL)
        return None if who is None else str(who.name)

    def can_act(request: Request) -> bool:
        who = request.scope.get(PRINCIPAL)
        return who is not None and bool(who.role.allows(Role.OPERATOR))

    async def login(request: Request) -> Response:
        if request.method == "GET":
            signed_out = request.query_params.get("signed_out") == "1"
            message = "You signed out." if signed_out else "Sign in with your API token."
            return _login_page(message)
        if not same_origin(request):
            return _cross_site(request, "sign-in")
        form = await read_form(request)
        if form is None:
            return _login_page(
                "Send the token as an application/x-www-form-urlencoded form.", status=400
            )
        token = form.get("token", "").strip()
        entry = sessions.tokens.lookup(token) if token else None
        if entry is not None and entry.expired():
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(entry.expires_at))
            return _login_page(f"That token expired at {when}; ask for a new one.", status=401)
        session = sessions.issue(token) if entry is not None else None
        if session is None:
            return _login_page("That token is not valid.", status=401)
        reply = RedirectResponse(f"{PREFIX}/", status_code=303, headers=_LOGIN_HEADERS)
        reply.set_cookie(
            COOKIE,
            session.cookie,
            max_age=session.max_age,
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=_https(request),
        )
        return reply

    async def logout(request: Request) -> Response:
        if not same_origin(request):
            return _cross_site(request, "sign-out")
        cookie = console_cookie(request.headers.get("cookie", ""))
        if cookie is not None:
            sessions.sign_out(cookie)
        reply = RedirectResponse(f"{LOGIN}?signed_out=1", status_code=303, headers=_LOGIN_HEADERS)
        for name in (COOKIE, CSRF_COOKIE):
            reply.delete_cookie(
                name, path=PREFIX, httponly=True, samesite="strict", secure=_https(request)
            )
        return reply

    console = console_routes(
        engine, actor=actor, can_act=can_act, secret=sessions.csrf_key, sign_out=LOGOUT
    )
    return [
        Route(LOGIN, login, methods=["GET", "POST"], name="console_login"),
        Mount(
            PREFIX,
            routes=[Route(LOGOUT, logout, methods=["POST"], name="console_logout"), *console],
            name="console",
        ),
    ]


def _https(request: Request) -> bool:
    """Whether the request came over HTTPS: the ASGI scope's scheme, which uvicorn sets
    from ``X-Forwarded-Proto`` only for proxies it trusts (``FORWARDED_ALLOW_IPS``,
    127.0.0.1 by default)."""
    return request.url.scheme == "https"


def _login_page(message: str, status: int = 200) -> HTMLResponse:
    page = _FORM.format(message=html.escape(message), login=LOGIN)
    return HTMLResponse(page, status_code=status, headers=_LOGIN_HEADERS)


def _cross_site(request: Request, what: str) -> HTMLResponse:
    source = request.headers.get("origin") or request.headers.get("referer") or ""
    where = (
        f"open {LOGIN} on this server and sign in there"
        if what == "sign-in"
        else ("use the Sign out button of this console")
    )
    message = (
        f"This {what} was posted from another site ({source[:200]}), not from this "
        f"console, so it is refused: {where}."
    )
    return _login_page(message, status=403)
