"""The operator console inside the API: same tokens, signed in once per browser.

Browsers do not send ``Authorization`` headers when following links, so the console
takes the bearer token once on ``/console-login`` and keeps it in an ``HttpOnly``,
``SameSite=Strict`` cookie scoped to ``/console``; :class:`~sagakit.api.http.TokenAuth`
accepts that cookie on console paths only (the JSON API still needs the header, so a
cookie can never be used to call it cross-site). Viewers see the console; operators
and admins may decide (the console's own CSRF tokens protect its forms).
"""

from __future__ import annotations

import html
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from sagakit.api.auth import Role, TokenStore
from sagakit.api.http import PRINCIPAL
from sagakit.runtime.engine import Engine

COOKIE = "sagakit_console"
PREFIX = "/console"
LOGIN = "/console-login"

_FORM = """<!doctype html><html><head><meta charset="utf-8"><title>sagakit console</title>
</head><body style="font-family:sans-serif;max-width:28rem;margin:4rem auto">
<h1>sagakit console</h1><p>{message}</p>
<form method="post" action="{login}"><label>Token
<input name="token" type="password" autocomplete="off" required style="width:100%"></label>
<p><button type="submit">Sign in</button></p></form></body></html>"""


def console_mount(
    engine: Engine, tokens: TokenStore, *, secret: bytes | None = None
) -> list[BaseRoute]:
    """The console under ``/console`` plus its sign-in page."""
    from sagakit.console import console_routes

    def actor(request: Request) -> str | None:
        who = request.scope.get(PRINCIPAL)
        return None if who is None else str(who.name)

    def can_act(request: Request) -> bool:
        who = request.scope.get(PRINCIPAL)
        return who is not None and bool(who.role.allows(Role.OPERATOR))

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return HTMLResponse(_FORM.format(message="Sign in with your API token.", login=LOGIN))
        body = (await request.body())[:4096].decode("utf-8", "replace")
        token = (parse_qs(body).get("token") or [""])[0].strip()
        if not token or tokens.authenticate(token) is None:
            page = _FORM.format(message=html.escape("That token is not valid."), login=LOGIN)
            return HTMLResponse(page, status_code=401)
        reply = RedirectResponse(f"{PREFIX}/", status_code=303)
        reply.set_cookie(COOKIE, token, httponly=True, samesite="strict", path=PREFIX)
        return reply

    return [
        Route(LOGIN, login, methods=["GET", "POST"], name="console_login"),
        Mount(
            PREFIX,
            routes=console_routes(engine, actor=actor, can_act=can_act, secret=secret),
            name="console",
        ),
    ]
