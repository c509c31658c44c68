"""The console inside the API: signed in with an API token, console paths only."""

from __future__ import annotations

from pathlib import Path

from api_support import PLAIN, auth, running_api


async def test_the_console_needs_a_sign_in_and_keeps_it_to_console_paths(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        c = env.client
        r = await c.get("/console/")
        assert r.status_code == 303 and r.headers["location"] == "/console-login"
        page = await c.get("/console-login")
        assert page.status_code == 200 and 'name="token"' in page.text
        bad = await c.post(
            "/console-login",
            content="token=nope",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert bad.status_code == 401 and "not valid" in bad.text
        good = await c.post(
            "/console-login",
            content=f"token={PLAIN['viewer']}",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert good.status_code == 303 and good.headers["location"] == "/console/"
        cookie = good.headers["set-cookie"]
        assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        assert "Path=/console" in cookie
        session = {"cookie": cookie.split(";")[0]}
        listing = await c.get("/console/", headers=session)
        assert listing.status_code == 200 and "<html" in listing.text.lower()
        # The cookie is not a credential for the JSON API.
        assert (await c.get("/sagas", headers=session)).status_code == 401
        assert (await c.get("/sagas", headers=auth("viewer"))).status_code == 200
