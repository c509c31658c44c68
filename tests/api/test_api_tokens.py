"""``sagakit tokens add|list|rotate|revoke``, token expiry, and a server that notices
changes to its tokens file without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import served

from sagakit.api.auth import (
    Role,
    TokenEntry,
    TokenStore,
    WatchedTokenStore,
    hash_token,
    tokens_path,
    write_tokens_file,
)
from sagakit.api.problems import ApiError
from sagakit.cli import main
from sagakit.errors import ConfigurationError


def cli(*argv: str) -> tuple[int, str, str]:
    """``sagakit ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def new_token(out: str) -> str:
    """The token printed by ``add``/``rotate`` (the indented line)."""
    lines = [line.strip() for line in out.splitlines() if line.startswith("  sk_")]
    assert len(lines) == 1, out
    return lines[0]


def stored(path: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(path.read_text())["tokens"]
    return entries


def test_add_list_rotate_revoke_round_trip(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = data / "tokens.json"
    code, out, _ = cli("tokens", "add", "ops-alice", "--role", "operator", "--data-dir", str(data))
    assert code == 0, out
    alice = new_token(out)
    assert out.count(alice) == 1 and "will not be shown again" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    code, out, _ = cli("tokens", "add", "grafana", "--role", "viewer", "--data-dir", str(data))
    grafana = new_token(out)
    text = path.read_text()
    assert alice not in text and grafana not in text  # hashes only
    assert stored(path) == [
        {"name": "ops-alice", "role": "operator", "sha256": hash_token(alice)},
        {"name": "grafana", "role": "viewer", "sha256": hash_token(grafana)},
    ]

    code, out, _ = cli("tokens", "list", "--data-dir", str(data))
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows == [
        ["NAME", "ROLE", "ID", "EXPIRES"],
        ["ops-alice", "operator", hash_token(alice)[:8], "never"],
        ["grafana", "viewer", hash_token(grafana)[:8], "never"],
    ]
    assert hash_token(alice) not in out and alice not in out

    code, out, _ = cli("tokens", "rotate", "ops-alice", "--data-dir", str(data))
    assert code == 0 and "will not be shown again" in out
    rotated = new_token(out)
    assert rotated != alice
    assert stored(path)[0] == {
        "name": "ops-alice",
        "role": "operator",
        "sha256": hash_token(rotated),
    }
    store = TokenStore.from_file(path)
    assert store.authenticate(alice) is None and store.authenticate(rotated) is not None

    code, out, _ = cli("tokens", "revoke", "grafana", "--data-dir", str(data))
    assert code == 0 and "revoked token 'grafana'" in out
    assert [e["name"] for e in stored(path)] == ["ops-alice"]
    assert TokenStore.from_file(path).authenticate(grafana) is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    code, out, _ = cli("tokens", "list", "--json", "--data-dir", str(data))
    listed = json.loads(out)["tokens"]
    assert listed == [
        {
            "name": "ops-alice",
            "role": "operator",
            "id": hash_token(rotated)[:8],
            "expires_at": None,
            "expired": False,
        }
    ]


def test_tokens_file_resolution_is_the_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = tmp_path / "elsewhere.json"
    code, out, _ = cli(
        "tokens", "add", "me", "--role", "admin", "--json", "--tokens-file", str(explicit)
    )
    assert code == 0
    shown = json.loads(out)
    assert shown["tokens_file"] == str(explicit) and shown["role"] == "admin"
    assert stored(explicit) == [
        {"name": "me", "role": "admin", "sha256": hash_token(shown["token"])}
    ]
    monkeypatch.setenv("SAGAKIT_TOKENS_FILE", str(explicit))
    assert tokens_path(tmp_path / "data") == explicit
    code, out, _ = cli("tokens", "list", "--data-dir", str(tmp_path / "data"))
    assert code == 0 and "me" in out
    monkeypatch.delenv("SAGAKIT_TOKENS_FILE")
    assert tokens_path(tmp_path / "data") == tmp_path / "data" / "tokens.json"
    assert tokens_path(tmp_path / "data", explicit) == explicit


def test_expiry_is_stored_and_listed(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    before = time.time()
    code, out, _ = cli(
        "tokens", "add", "ci", "--role", "viewer", "--expires-in", "2", "--tokens-file", str(path)
    )
    after = time.time()
    assert code == 0 and "expires 20" in out
    (entry,) = stored(path)
    assert isinstance(entry["expires_at"], int)
    assert before + 2 * 86400 - 1 <= entry["expires_at"] <= after + 2 * 86400 + 1
    # rotate keeps the expiry unless told otherwise
    cli("tokens", "rotate", "ci", "--tokens-file", str(path))
    assert stored(path)[0]["expires_at"] == entry["expires_at"]
    cli("tokens", "rotate", "ci", "--expires-in", "10", "--tokens-file", str(path))
    assert stored(path)[0]["expires_at"] > entry["expires_at"] + 7 * 86400
    # an expired token is listed as such, and rotating it needs a new lifetime
    write_tokens_file(path, TokenStore([TokenEntry("old", Role.VIEWER, "a" * 64, 1000.0)]))
    code, out, _ = cli("tokens", "list", "--tokens-file", str(path))
    assert "1970-01-01T00:16:40Z (expired)" in out
    code, _, err = cli("tokens", "rotate", "old", "--tokens-file", str(path))
    assert code == 2 and "expired" in err and "--expires-in" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["revoke", "nobody"], "no token named 'nobody'"),
        (["rotate", "nobody"], "no token named 'nobody'"),
        (["add", "ops", "--role", "viewer"], "a token named 'ops' exists"),
        (["add", "new", "--role", "root"], "invalid choice: 'root'"),
        (["add", "bad name", "--role", "viewer"], "token name 'bad name'"),
        (["add", "new", "--role", "viewer", "--expires-in", "0"], "positive number of days"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, argv: list[str], message: str) -> None:
    path = tmp_path / "tokens.json"
    assert cli("tokens", "add", "ops", "--role", "admin", "--tokens-file", str(path))[0] == 0
    before = path.read_bytes()
    code, out, err = cli("tokens", *argv, "--tokens-file", str(path))
    assert code == 2 and message in err, err
    assert "sk_" not in out
    assert path.read_bytes() == before


def test_a_missing_file_or_directory_exits_2(tmp_path: Path) -> None:
    for argv in (["list"], ["revoke", "x"], ["rotate", "x"]):
        code, _, err = cli("tokens", *argv, "--data-dir", str(tmp_path))
        assert code == 2 and "does not exist" in err
    code, _, err = cli("tokens", "add", "x", "--role", "viewer", "--data-dir", str(tmp_path / "no"))
    assert code == 2 and "directory" in err and "does not exist" in err
    assert not (tmp_path / "no").exists()
    (tmp_path / "tokens.json").write_text("{not json")
    code, _, err = cli("tokens", "list", "--data-dir", str(tmp_path))
    assert code == 2 and "cannot be read as JSON" in err


def test_concurrent_adds_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    names = [f"n{i}" for i in range(12)]

    def add(name: str) -> int:
        with contextlib.redirect_stdout(io.StringIO()):
            return main(["tokens", "add", name, "--role", "viewer", "--tokens-file", str(path)])

    with ThreadPoolExecutor(len(names)) as pool:
        assert list(pool.map(add, names)) == [0] * len(names)
    assert sorted(e["name"] for e in stored(path)) == sorted(names)


def test_expiry_in_the_tokens_file() -> None:
    past = TokenEntry("late", Role.ADMIN, hash_token("tok-late"), time.time() - 5)
    future = TokenEntry("soon", Role.VIEWER, hash_token("tok-soon"), time.time() + 3600)
    store = TokenStore([past, future])
    with pytest.raises(ApiError) as caught:
        store.principal_for("Bearer tok-late")
    assert caught.value.status == 401 and "expired" in str(caught.value.body())
    assert store.authenticate("tok-late") is None  # the console's sign-in refuses it too
    assert store.principal_for("Bearer tok-soon").name == "soon"
    # files without expires_at stay valid; a bad expires_at is refused
    entry = {"name": "a", "role": "admin", "sha256": "0" * 64}
    assert TokenStore.from_json([entry]).entries[0].expires_at is None
    for bad in ("tomorrow", True, float("nan")):
        with pytest.raises(ConfigurationError, match="expires_at"):
            TokenStore.from_json([{**entry, "expires_at": bad}])
    assert TokenStore.from_json([{**entry, "expires_at": 17e8}]).to_json() == {
        "tokens": [{**entry, "expires_at": 1700000000}]
    }


def test_watched_store_reloads_on_change_at_most_once_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.json"
    write_tokens_file(path, TokenStore.from_plain({"a": ("admin", "tok-a")}))
    now = [0.0]
    store = WatchedTokenStore(path, interval=1.0, clock=lambda: now[0])
    assert store.authenticate("tok-a") is not None
    write_tokens_file(path, TokenStore.from_plain({"b": ("viewer", "tok-b")}))
    now[0] = 0.5  # within the interval: the file is not looked at
    assert store.authenticate("tok-a") is not None and store.authenticate("tok-b") is None
    now[0] = 1.5
    assert store.authenticate("tok-a") is None and store.authenticate("tok-b") is not None
    # same size, same second: a rotated hash is still noticed (bytes compared)
    write_tokens_file(path, TokenStore.from_plain({"b": ("viewer", "tok-c")}))
    now[0] = 3.0
    assert store.authenticate("tok-c") is not None and store.authenticate("tok-b") is None
    # a broken file keeps the previous tokens and logs an error
    path.write_text('{"tokens": [')
    now[0] = 4.5
    with caplog.at_level(logging.ERROR, logger="sagakit.api.auth"):
        assert store.authenticate("tok-c") is not None
    assert "not reloaded" in caplog.text and "cannot be read as JSON" in caplog.text
    path.unlink()
    now[0] = 6.0
    assert store.authenticate("tok-c") is not None
    write_tokens_file(path, TokenStore.from_plain({"d": ("operator", "tok-d")}))
    now[0] = 7.5
    assert store.principal_for("Bearer tok-d").role is Role.OPERATOR
    assert [e.name for e in store.entries] == ["d"] and len(store) == 1


async def _poll(
    client: httpx.AsyncClient, token: str, done: Callable[[httpx.Response], bool]
) -> httpx.Response:
    """GET /sagas with ``token`` until ``done(response)`` (the server looks at its file
    about once a second; gives up after 15 s); the last response."""
    deadline = time.monotonic() + 15
    while True:
        r = await client.get("/sagas", headers={"Authorization": f"Bearer {token}"})
        if done(r) or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.1)


async def test_a_running_server_follows_the_tokens_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with served(data) as (url, info), httpx.AsyncClient(base_url=url) as client:
        admin = info["token"]
        assert (await client.get("/sagas", headers={"Authorization": f"Bearer {admin}"})).is_success
        code, out, _ = await asyncio.to_thread(
            cli, "tokens", "add", "ops", "--role", "operator", "--data-dir", str(data)
        )
        assert code == 0
        ops = new_token(out)
        r = await _poll(client, ops, lambda r: r.status_code != 401)
        assert r.status_code == 200, r.text

        code, _, _ = await asyncio.to_thread(
            cli, "tokens", "revoke", "ops", "--data-dir", str(data)
        )
        assert code == 0
        r = await _poll(client, ops, lambda r: r.status_code == 401)
        assert r.status_code == 401 and "not valid" in r.json()["message"]
        assert (await client.get("/sagas", headers={"Authorization": f"Bearer {admin}"})).is_success

        # an entry that expired: 401 saying so
        path = data / "tokens.json"
        entries = list(TokenStore.from_file(path).entries)
        late = TokenEntry("late", Role.VIEWER, hash_token("tok-late"), time.time() - 1)
        await asyncio.to_thread(write_tokens_file, path, TokenStore([*entries, late]))
        r = await _poll(client, "tok-late", lambda r: "expired" in r.text)
        assert r.status_code == 401 and "'late' expired at" in r.json()["message"]
