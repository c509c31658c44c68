"""The console's sign-in session: a signed, expiring cookie that never holds the token,
re-checked against the tokens file on every request, ended by signing out; sign-in
posts from another site are refused."""

from __future__ import annotations

import re
import stat
import time
from pathlib import Path

import httpx
import pytest
from api_support import PLAIN, TOKENS, auth, running_api, served

from sagakit.api import create_app
from sagakit.api.auth import (
    Principal,
    Role,
    TokenEntry,
    TokenStore,
    WatchedTokenStore,
    hash_token,
    write_tokens_file,
)
from sagakit.api.console_session import (
    SESSION_LIFETIME,
    ConsoleSessions,
    load_console_key,
)
from sagakit.errors import ConfigurationError

KEY = b"k" * 32
FORM = {"content-type": "application/x-www-form-urlencoded"}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cookie_of(reply: httpx.Response, name: str = "sagakit_console") -> str:
    """The ``Set-Cookie`` header of ``name`` in ``reply`` (whole, with its attributes)."""
    found = [c for c in reply.headers.get_list("set-cookie") if c.startswith(f"{name}=")]
    assert len(found) == 1, reply.headers
    return found[0]


def value_of(set_cookie: str) -> str:
    return set_cookie.split(";")[0].split("=", 1)[1].strip('"')


async def sign_in(client: httpx.AsyncClient, role: str = "operator") -> str:
    """Sign in with ``role``'s token; the session cookie's value."""
    r = await client.post("/console-login", content=f"token={PLAIN[role]}", headers=FORM)
    assert r.status_code == 303, r.text
    return value_of(cookie_of(r))


def with_cookie(session: str) -> dict[str, str]:
    return {"cookie": f"sagakit_console={session}"}


# -- the session itself ------------------------------------------------------------------


def test_a_session_names_the_token_but_never_holds_it() -> None:
    clock = Clock()
    sessions = ConsoleSessions(TOKENS, KEY, clock=clock)
    issued = sessions.issue(PLAIN["admin"])
    assert issued is not None
    assert issued.principal == Principal("admin", Role.ADMIN)
    assert PLAIN["admin"] not in issued.cookie
    assert hash_token(PLAIN["admin"]) not in issued.cookie
    assert re.fullmatch(r"v1\.[A-Za-z0-9_-]+\.\d+\.\d+\.[A-Za-z0-9_-]{43}", issued.cookie)
    assert issued.expires_at == clock.now + SESSION_LIFETIME
    assert issued.max_age == int(SESSION_LIFETIME)
    assert sessions.principal(issued.cookie) == Principal("admin", Role.ADMIN)
    assert sessions.issue("tok-unknown") is None
    # Another deployment's key knows nothing of it.
    assert ConsoleSessions(TOKENS, b"o" * 32, clock=clock).principal(issued.cookie) is None


@pytest.mark.fault("F-AUTH-MATRIX")
def test_tampered_or_malformed_sessions_are_refused() -> None:
    clock = Clock()
    sessions = ConsoleSessions(TOKENS, KEY, clock=clock)
    issued = sessions.issue(PLAIN["viewer"])
    assert issued is not None
    version, name, at, until, mac = issued.cookie.split(".")
    admin = ConsoleSessions(TOKENS, KEY, clock=clock).issue(PLAIN["admin"])
    assert admin is not None
    admin_name = admin.cookie.split(".")[1]
    forged = [
        f"{version}.{admin_name}.{at}.{until}.{mac}",  # promote oneself to admin
        f"{version}.{name}.{at}.{int(until) + 3_600_000}.{mac}",  # stretch it
        f"{version}.{name}.{int(at) + 1}.{until}.{mac}",
        f"{version}.{name}.{at}.{until}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",
        f"v2.{name}.{at}.{until}.{mac}",
        issued.cookie + ".x",
        issued.cookie[:-1],
        "",
        "v1....",
        "v1.!!!!.1.2." + "A" * 43,
        "v1.%%.1.2." + "A" * 43,
        "v1.gA.1.2." + "A" * 43,  # base64 of a byte that is not UTF-8
        "v1." + "A" * 5000,
        "v1.é.1.2." + "A" * 43,
        PLAIN["viewer"],  # the token itself is no session
    ]
    for cookie in forged:
        assert sessions.principal(cookie) is None, cookie
    assert sessions.principal(issued.cookie) == Principal("viewer", Role.VIEWER)


@pytest.mark.fault("F-AUTH-MATRIX", "F-CLOCK-JUMP")
def test_sessions_expire_and_never_outlive_their_token() -> None:
    clock = Clock()
    sessions = ConsoleSessions(TOKENS, KEY, lifetime=3600, clock=clock)
    issued = sessions.issue(PLAIN["viewer"])
    assert issued is not None and issued.expires_at == clock.now + 3600
    clock.now += 3599
    assert sessions.principal(issued.cookie) is not None
    clock.now += 1
    assert sessions.principal(issued.cookie) is None
    # Made under a longer lifetime, a session is cut to the current one.
    clock.now = Clock().now
    long = ConsoleSessions(TOKENS, KEY, lifetime=8 * 3600, clock=clock).issue(PLAIN["viewer"])
    assert long is not None and sessions.principal(long.cookie) is None
    # Issued "in the future" (beyond clock skew): refused.
    ahead = Clock(clock.now + 3600)
    future = ConsoleSessions(TOKENS, KEY, lifetime=3600, clock=ahead).issue(PLAIN["viewer"])
    assert future is not None and sessions.principal(future.cookie) is None
    # A token that expires in 10 minutes gives a 10-minute session.
    expiring = TokenStore([TokenEntry("temp", Role.VIEWER, hash_token("tok-t"), clock.now + 600)])
    short = ConsoleSessions(expiring, KEY, lifetime=3600, clock=clock)
    issued = short.issue("tok-t")
    assert issued is not None and issued.expires_at == clock.now + 600
    assert issued.max_age == 600


def test_revoking_rotating_or_changing_a_token_applies_to_its_sessions(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    entries = [
        TokenEntry("alice", Role.OPERATOR, hash_token("tok-alice")),
        TokenEntry("bob", Role.VIEWER, hash_token("tok-bob")),
    ]
    write_tokens_file(path, TokenStore(entries))
    store = WatchedTokenStore(path, interval=0)
    sessions = ConsoleSessions(store, KEY)
    alice, bob = sessions.issue("tok-alice"), sessions.issue("tok-bob")
    assert alice is not None and bob is not None
    # Bob becomes an admin: his open session has the new role at once.
    write_tokens_file(
        path, TokenStore([entries[0], TokenEntry("bob", Role.ADMIN, entries[1].sha256)])
    )
    store.refresh(force=True)
    assert sessions.principal(bob.cookie) == Principal("bob", Role.ADMIN)
    # Alice's token is rotated (same name, new token): her session ends.
    write_tokens_file(
        path,
        TokenStore(
            [
                TokenEntry("alice", Role.OPERATOR, hash_token("tok-alice-2")),
                TokenEntry("bob", Role.ADMIN, entries[1].sha256),
            ]
        ),
    )
    store.refresh(force=True)
    assert sessions.principal(alice.cookie) is None
    # Bob's token is revoked: so is his session.
    write_tokens_file(path, TokenStore([TokenEntry("alice", Role.OPERATOR, hash_token("a2"))]))
    store.refresh(force=True)
    assert sessions.principal(bob.cookie) is None
    # A token that expired ends its session too.
    write_tokens_file(path, TokenStore([TokenEntry("bob", Role.VIEWER, entries[1].sha256)]))
    store.refresh(force=True)
    again = sessions.issue("tok-bob")
    assert again is not None and sessions.principal(again.cookie) is not None
    gone = TokenEntry("bob", Role.VIEWER, entries[1].sha256, time.time() - 1)
    write_tokens_file(path, TokenStore([gone]))
    store.refresh(force=True)
    assert sessions.principal(again.cookie) is None


def test_signing_out_ends_the_tokens_earlier_sessions_only() -> None:
    clock = Clock()
    sessions = ConsoleSessions(TOKENS, KEY, clock=clock)
    first, other = sessions.issue(PLAIN["operator"]), sessions.issue(PLAIN["operator"])
    viewer = sessions.issue(PLAIN["viewer"])
    assert first is not None and other is not None and viewer is not None
    clock.now += 0.001
    assert sessions.sign_out(first.cookie) == Principal("operator", Role.OPERATOR)
    assert sessions.principal(first.cookie) is None
    assert sessions.principal(other.cookie) is None  # the same token's other browser
    assert sessions.principal(viewer.cookie) is not None  # another token's session stays
    clock.now += 0.001
    later = sessions.issue(PLAIN["operator"])
    assert later is not None and sessions.principal(later.cookie) is not None
    assert sessions.sign_out("garbage") is None


def test_the_console_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    path = tmp_path / "data" / "console.key"
    key = load_console_key(path)
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_console_key(path) == key
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    path.write_text("not hex\n")
    with pytest.raises(ConfigurationError, match="64 to 128 lower-case hex digits"):
        load_console_key(path)
    with pytest.raises(ConfigurationError, match="32 bytes or more"):
        ConsoleSessions(TOKENS, b"short")
    with pytest.raises(ConfigurationError, match="60 s to 31 days"):
        ConsoleSessions(TOKENS, KEY, lifetime=1)


# -- through the API ---------------------------------------------------------------------


async def test_sign_in_sets_a_session_cookie_not_the_token(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        c = env.client
        page = await c.get("/console-login")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        r = await c.post("/console-login", content=f"token={PLAIN['viewer']}", headers=FORM)
        assert r.status_code == 303 and r.headers["location"] == "/console/"
        header = cookie_of(r)
        assert PLAIN["viewer"] not in header and hash_token(PLAIN["viewer"]) not in header
        attrs = {a.strip().split("=")[0].lower() for a in header.split(";")[1:]}
        assert {"httponly", "samesite", "path", "max-age"} <= attrs
        assert "samesite=strict" in header.lower() and "Path=/console" in header
        assert f"Max-Age={int(SESSION_LIFETIME)}" in header
        assert "secure" not in attrs  # plain HTTP (see the test below for HTTPS)
        session = value_of(header)
        listing = await c.get("/console/", headers=with_cookie(session))
        assert listing.status_code == 200 and 'class="account"' in listing.text
        assert "Sign out" in listing.text and ">viewer</span>" in listing.text
        # Neither the session nor the raw token in the cookie opens the JSON API.
        assert (await c.get("/sagas", headers=with_cookie(session))).status_code == 401
        token_cookie = with_cookie(PLAIN["admin"])
        assert (await c.get("/sagas", headers=token_cookie)).status_code == 401
        # Nor does the token in the cookie open the console any more: only a session does.
        r = await c.get("/console/", headers=token_cookie)
        assert r.status_code == 303 and r.headers["location"] == "/console-login"
        # A script with the bearer header still reads the console.
        assert (await c.get("/console/", headers=auth("viewer"))).status_code == 200
        # A wrong or expired token: 401 saying which.
        r = await c.post("/console-login", content="token=nope", headers=FORM)
        assert r.status_code == 401 and "not valid" in r.text and "set-cookie" not in r.headers
        r = await c.post("/console-login", content="nothing", headers={})
        assert r.status_code == 400 and "x-www-form-urlencoded" in r.text


async def test_an_expired_token_cannot_sign_in(tmp_path: Path) -> None:
    tokens = TokenStore([TokenEntry("old", Role.VIEWER, hash_token("tok-old"), time.time() - 5)])
    async with running_api(tmp_path) as env:
        app = create_app(env.engine, tokens=tokens, console_secret=KEY)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            r = await c.post("/console-login", content="token=tok-old", headers=FORM)
            assert r.status_code == 401 and "expired at" in r.text


async def test_the_cookie_is_secure_over_https(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        transport = httpx.ASGITransport(app=env.app)
        async with httpx.AsyncClient(transport=transport, base_url="https://api") as c:
            r = await c.post("/console-login", content=f"token={PLAIN['viewer']}", headers=FORM)
            assert r.status_code == 303
            attrs = [a.strip().lower() for a in cookie_of(r).split(";")[1:]]
            assert "secure" in attrs
        # X-Forwarded-Proto is the server's business (uvicorn trusts it from local proxies
        # only and rewrites the scheme): the app does not trust it on its own.
        r = await env.client.post(
            "/console-login",
            content=f"token={PLAIN['viewer']}",
            headers={**FORM, "x-forwarded-proto": "https"},
        )
        attrs = [a.strip().lower() for a in cookie_of(r).split(";")[1:]]
        assert "secure" not in attrs


@pytest.mark.fault("F-AUTH-MATRIX")
async def test_a_cross_site_sign_in_is_refused(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        c = env.client
        body = f"token={PLAIN['admin']}"
        for headers in (
            {"origin": "https://evil.example"},
            {"origin": "null"},
            {"referer": "https://evil.example/login.html"},
            {"origin": "http://api.evil.example", "referer": "http://api/console-login"},
        ):
            r = await c.post("/console-login", content=body, headers={**FORM, **headers})
            assert r.status_code == 403, headers
            assert "from another site" in r.text and "set-cookie" not in r.headers
        # From the page itself (a browser names it), or from a script (it names nothing).
        for headers in (
            {"origin": "http://api"},
            {"referer": "http://api/console-login"},
            {},
        ):
            r = await c.post("/console-login", content=body, headers={**FORM, **headers})
            assert r.status_code == 303, headers


@pytest.mark.fault("F-AUTH-MATRIX")
async def test_a_tampered_or_expired_session_goes_back_to_sign_in(tmp_path: Path) -> None:
    async with running_api(tmp_path, console_secret=KEY) as env:
        c = env.client
        session = await sign_in(c, "viewer")
        stale = ConsoleSessions(TOKENS, KEY, clock=lambda: time.time() - SESSION_LIFETIME - 1)
        expired = stale.issue(PLAIN["viewer"])
        assert expired is not None
        version, name, at, until, mac = session.split(".")
        for bad in (
            expired.cookie,
            f"{version}.{name}.{at}.{int(until) + 10**9}.{mac}",
            f"{version}.{name}.{at}.{until}.{mac[::-1]}",
            "v1.%%%",
            '"quoted junk"',
        ):
            r = await c.get("/console/manual", headers=with_cookie(bad))
            assert r.status_code == 303 and r.headers["location"] == "/console-login", bad
            # The useless cookie is dropped.
            cleared = cookie_of(r)
            assert "Max-Age=0" in cleared or "expires=" in cleared.lower()
        assert (await c.get("/console/manual", headers=with_cookie(session))).status_code == 200


async def test_revoking_the_token_ends_the_console_session(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    alice = TokenEntry("alice", Role.OPERATOR, hash_token("tok-alice"))
    write_tokens_file(path, TokenStore([alice]))
    store = WatchedTokenStore(path, interval=0)
    async with running_api(tmp_path / "api") as env:
        app = create_app(env.engine, tokens=store, console_secret=KEY)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            r = await c.post("/console-login", content="token=tok-alice", headers=FORM)
            session = with_cookie(value_of(cookie_of(r)))
            assert (await c.get("/console/", headers=session)).status_code == 200
            write_tokens_file(path, TokenStore([TokenEntry("bob", Role.ADMIN, hash_token("b"))]))
            r = await c.get("/console/", headers=session)
            assert r.status_code == 303 and r.headers["location"] == "/console-login"


async def test_signing_out_clears_the_cookie_and_ends_the_session(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        c = env.client
        session = with_cookie(await sign_in(c))
        page = await c.get("/console/manual", headers=session)
        assert 'action="/console/logout"' in page.text
        # Another site cannot sign the person out.
        r = await c.post("/console/logout", headers={**session, "origin": "https://evil.example"})
        assert r.status_code == 403 and "another site" in r.text
        assert (await c.get("/console/", headers=session)).status_code == 200
        r = await c.post("/console/logout", headers={**session, "origin": "http://api"})
        assert r.status_code == 303 and r.headers["location"] == "/console-login?signed_out=1"
        for name in ("sagakit_console", "sagakit_console_csrf"):
            cleared = cookie_of(r, name)
            assert "Max-Age=0" in cleared and "Path=/console" in cleared
        # The cookie is gone from the browser, and a copy of it no longer works.
        r = await c.get("/console/", headers=session)
        assert r.status_code == 303 and r.headers["location"] == "/console-login"
        page = await c.get("/console-login?signed_out=1")
        assert "You signed out." in page.text
        # Signing in again works.
        again = with_cookie(await sign_in(c))
        assert (await c.get("/console/", headers=again)).status_code == 200
        # A signed-out browser posting again is just sent to the sign-in page.
        r = await c.post("/console/logout", headers=session)
        assert r.status_code == 303 and r.headers["location"] == "/console-login"


async def test_a_session_survives_a_restart_of_serve(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sessions: list[str] = []
    for _ in range(2):
        async with (
            served(data) as (url, info),
            httpx.AsyncClient(base_url=url, follow_redirects=False) as c,
        ):
            if not sessions:  # the first start made an admin token
                r = await c.post("/console-login", data={"token": info["token"]})
                assert r.status_code == 303, r.text
                sessions.append(value_of(cookie_of(r)))
            r = await c.get("/console/", headers=with_cookie(sessions[0]))
            assert r.status_code == 200, r.headers
    assert stat.S_IMODE((data / "console.key").stat().st_mode) == 0o600
