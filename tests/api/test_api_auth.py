"""Authentication: the full matrix of tokens and roles against every route; tokens files."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from api_support import PLAIN, auth, order_body, running_api

from sagakit.api.auth import (
    Principal,
    Role,
    TokenEntry,
    TokenStore,
    generate_token,
    hash_token,
    require,
    write_tokens_file,
)
from sagakit.api.problems import ApiError
from sagakit.errors import ConfigurationError

ROLES = ("viewer", "operator", "admin")
# The policy, written out: the least role each route needs.
POLICY = {
    ("POST", "/orders"): "operator",
    ("GET", "/orders/{order_id}"): "viewer",
    ("GET", "/orders/{order_id}/events"): "viewer",
    ("GET", "/payments"): "viewer",
    ("GET", "/inventory/{sku}"): "viewer",
    ("GET", "/shipments"): "viewer",
    ("GET", "/sagas"): "viewer",
    ("POST", "/sagas"): "operator",
    ("POST", "/sagas/actions/batch"): "operator",
    ("GET", "/sagas/{saga_id}"): "viewer",
    ("POST", "/sagas/{saga_id}/actions"): "operator",
    ("GET", "/manual-cases"): "viewer",
    ("GET", "/audit"): "admin",
    ("GET", "/dead-letters"): "viewer",
    ("GET", "/dead-letters/{store}/{id}"): "viewer",
    ("POST", "/dead-letters/{store}/{id}/replay"): "operator",
    ("POST", "/dead-letters/{store}/{id}/discard"): "operator",
    ("GET", "/healthz"): "viewer",
    ("GET", "/readyz"): "viewer",
    ("GET", "/metrics"): "viewer",
    ("GET", "/openapi.json"): "viewer",
}
ALLOWED_STATUS = {
    ("POST", "/orders"): 202,
    ("POST", "/sagas"): 201,  # a new business key each time
    ("POST", "/sagas/{saga_id}/actions"): 409,  # a SUCCEEDED saga takes no manual action
    ("POST", "/dead-letters/{store}/{id}/replay"): 409,  # the matrix's is settled already
    ("POST", "/dead-letters/{store}/{id}/discard"): 409,
}
BAD_HEADERS = [
    None,
    "",
    "Bearer",
    "Bearer ",
    "Bearer wrong-token",
    "Bearer tok-admin2",
    "Bearer tok-admin extra",
    "Basic dG9rLWFkbWlu",
    "tok-admin",
    "Bearer t\u00f6k".encode(),
]


def _request(method: str, path: str, ids: dict[str, str], n: int) -> dict[str, Any]:
    url = path.format(**ids)
    kw: dict[str, Any] = {"method": method, "url": url, "headers": {}}
    if path == "/orders":
        kw["json"] = order_body()
        kw["headers"]["Idempotency-Key"] = f"matrix-{n}"
    elif (method, path) == ("POST", "/sagas"):
        kw["json"] = {"definition": "checkout", "business_key": f"ord-matrix-{n}"}
        kw["json"]["data"] = order_body()
    elif path.endswith(("/replay", "/discard")):
        kw["json"] = {"reason": "matrix"}
    elif path.endswith("/actions"):
        kw["json"] = {"action": "retry", "reason": "matrix"}
    elif path.endswith("/batch"):
        kw["json"] = {
            "filter": {"state": ["RUNNING"]},
            "action": "retry",
            "reason": "m",
            "dry_run": True,
        }
    return kw


@pytest.mark.fault("F-AUTH-MATRIX")
async def test_every_route_needs_a_token_and_the_right_role(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        ok = await env.settled("seed")
        async with env.engine.store.transaction() as tx:
            await tx.dead_letter("orchestrator", "m-matrix", "{}", "test", 1.0)
        [letter] = await env.engine.store.dead_letters()
        await env.engine.dead_letters.discard("orchestrator", letter.id, actor="t", reason="t")
        ids = {"order_id": ok["order_id"], "saga_id": ok["saga_id"], "sku": "sku-1"}
        ids |= {"store": "orchestrator", "id": str(letter.id)}
        doc = (await env.client.get("/openapi.json", headers=auth("viewer"))).json()
        documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
        assert documented == set(POLICY), "the matrix must cover every documented route"
        n = 0
        for (method, path), least in POLICY.items():
            for header in BAD_HEADERS:
                kw = _request(method, path, ids, n)
                if header is not None:
                    kw["headers"]["Authorization"] = header
                r = await env.client.request(**kw)
                assert r.status_code == 401, (method, path, header, r.text)
                assert r.json()["error"] == "unauthorized"
                assert r.headers["www-authenticate"].startswith("Bearer")
            for role in ROLES:
                n += 1
                kw = _request(method, path, ids, n)
                kw["headers"].update(auth(role))
                r = await env.client.request(**kw)
                if Role(role).allows(Role(least)):
                    want = ALLOWED_STATUS.get((method, path), 200)
                    assert r.status_code == want, (method, path, role, r.text)
                else:
                    assert r.status_code == 403, (method, path, role, r.text)
                    body = r.json()
                    assert body["error"] == "forbidden" and least in body["message"]


@pytest.mark.fault("F-AUTH-MATRIX")
async def test_unknown_routes_need_a_token_too(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        assert (await env.client.get("/admin/secret")).status_code == 401
        r = await env.client.get("/admin/secret", headers=auth("viewer"))
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        r = await env.client.put("/sagas", headers=auth("admin"))
        assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


async def test_the_scheme_is_case_insensitive(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        r = await env.client.get("/healthz", headers={"Authorization": "bearer tok-viewer"})
        assert r.status_code == 200


def test_tokens_file_round_trip_keeps_hashes_only(tmp_path: Path) -> None:
    token = generate_token()
    store = TokenStore([TokenEntry("ops", Role.OPERATOR, hash_token(token))])
    path = tmp_path / "conf" / "tokens.json"
    write_tokens_file(path, store)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert token not in text and hash_token(token) in text
    loaded = TokenStore.from_file(path)
    assert loaded.authenticate(token) == Principal("ops", Role.OPERATOR)
    assert loaded.authenticate(token + "x") is None
    # A bare list of entries is accepted too.
    path.write_text(json.dumps([e.to_json() for e in store.entries]))
    assert len(TokenStore.from_file(path)) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "cannot be read as JSON"),
        ('{"tokens": {}}', "expected a list"),
        ('[{"name": "a", "role": "root", "sha256": "' + "0" * 64 + '"}]', "role 'root'"),
        ('[{"name": "a", "role": "admin", "sha256": "secret"}]', "sha256 must be"),
        ('[{"name": "a", "role": "admin", "token": "secret"}]', "with role and sha256"),
        ('[{"name": "bad name", "role": "admin", "sha256": "' + "0" * 64 + '"}]', "token name"),
        (
            '[{"name": "a", "role": "admin", "sha256": "' + "0" * 64 + '"},'
            ' {"name": "a", "role": "viewer", "sha256": "' + "1" * 64 + '"}]',
            "unique",
        ),
    ],
)
def test_bad_tokens_files_say_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=message):
        TokenStore.from_file(path)


def test_missing_tokens_file() -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        TokenStore.from_file("/nonexistent/tokens.json")


def test_roles_are_ordered() -> None:
    assert Role.ADMIN.allows(Role.OPERATOR) and Role.OPERATOR.allows(Role.VIEWER)
    assert not Role.VIEWER.allows(Role.OPERATOR) and not Role.OPERATOR.allows(Role.ADMIN)
    require(Principal("a", Role.ADMIN), Role.ADMIN)
    with pytest.raises(ApiError) as err:
        require(Principal("v", Role.VIEWER), Role.OPERATOR)
    assert err.value.status == 403


@pytest.mark.fault("F-AUTH-MATRIX")
async def test_there_is_no_auth_off_mode(tmp_path: Path) -> None:
    from sagakit.api import create_app

    async with running_api(tmp_path) as env:
        with pytest.raises(ConfigurationError, match="no auth-off mode"):
            create_app(env.engine, tokens=None)  # type: ignore[arg-type]
        empty = create_app(env.engine, tokens=TokenStore([]))
        import httpx

        transport = httpx.ASGITransport(app=empty)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            for token in PLAIN.values():
                r = await client.get("/healthz", headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 401
