"""``serve`` (in process and as a process stopped by signals) and the API's CLI commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import served

from sagakit.api.cli import register
from sagakit.api.serve import serve


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run one command registered by ``register``; (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="sagakit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code: int = args.func(args)
    return code, out.getvalue(), err.getvalue()


async def test_serve_and_the_cli_against_it(tmp_path: Path) -> None:
    async with served(tmp_path / "data", orders=4) as (url, info):
        token = info["token"]
        assert token and token.startswith("sk_")
        stored = (tmp_path / "data" / "tokens.json").read_text()
        assert token not in stored and json.loads(stored)["tokens"][0]["role"] == "admin"
        h = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=h, timeout=10) as client:
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/healthz", headers={"Authorization": ""})).status_code == 401
            body = {
                "sku": "sku-00",
                "qty": 1,
                "amount": 500,
                "currency": "EUR",
                "customer": "cust-1",
                "card": "card-novoid-norefund-1",
                "ship_to": "addr-bad-1",
            }
            r = await client.post("/orders", json=body, headers={"Idempotency-Key": "cli-1"})
            assert r.status_code == 202, r.text
            saga_id = r.json()["saga_id"]
            for _ in range(200):
                # Waiting for a person: NEEDS_ATTENTION, not final (terminal stays false).
                view = (await client.get(f"/orders/{r.json()['order_id']}")).json()
                if view["status"] == "NEEDS_ATTENTION":
                    assert view["terminal"] is False, view
                    break
                await asyncio.sleep(0.05)
            assert (await client.get("/sagas")).json()["total"] >= 5  # 4 demo orders + 1

        base = ["--url", url, "--token", token]

        def cli(*argv: str) -> tuple[int, str, str]:
            return run_cli(list(argv))

        code, out, _ = await asyncio.to_thread(cli, "manual-cases", *base, "--json")
        assert code == 0
        assert saga_id in [i["saga_id"] for i in json.loads(out)["items"]]
        code, out, _ = await asyncio.to_thread(cli, "manual-cases", *base)
        assert code == 0 and saga_id in out and "waiting" in out
        code, out, _ = await asyncio.to_thread(
            cli, "sagas", "list", *base, "--state", "FAILED_NEEDS_MANUAL", "--json"
        )
        assert code == 0 and json.loads(out)["total"] >= 1
        code, out, _ = await asyncio.to_thread(cli, "sagas", "list", *base, "--limit", "2")
        assert code == 0 and "saga_id" in out.splitlines()[0]
        code, out, _ = await asyncio.to_thread(cli, "sagas", "show", saga_id, *base)
        assert code == 0 and "authorize_payment" in out and "manual.escalated" in out
        code, out, _ = await asyncio.to_thread(cli, "sagas", "show", saga_id, *base, "--json")
        assert json.loads(out)["state"] == "FAILED_NEEDS_MANUAL"
        resolve = ("sagas", "resolve", saga_id, *base, "--action", "mark_compensated")
        # Irreversible: without --yes the command says what it would do, sends nothing.
        code, _, err = await asyncio.to_thread(cli, *resolve, "--reason", "released by hand")
        version = json.loads(out)["version"]
        assert code == 2 and "cannot be taken back; nothing was sent" in err, err
        assert "nothing is sent for it" in err and f"--version {version} --yes" in err
        # A version the saga has left: refused by the API (409), nothing changes.
        code, _, err = await asyncio.to_thread(
            cli, *resolve, "--reason", "released by hand", "--version", str(version - 1), "--yes"
        )
        assert code == 1 and "409" in err and "moved since" in err, err
        code, out, _ = await asyncio.to_thread(
            cli,
            *resolve,
            "--reason",
            "released by hand",
            "--version",
            str(version),
            "--yes",
            "--json",
        )
        assert code == 0, out
        assert json.loads(out)["actor"] == "admin"
        # The decision does not apply twice: the API's 409 message is shown, exit 1.
        code, _, err = await asyncio.to_thread(
            cli, "sagas", "retry", saga_id, *base, "--reason", "again"
        )
        assert code == 1 and "409" in err
        code, _, err = await asyncio.to_thread(
            cli, "sagas", "cancel", "nope", *base, "--reason", "x"
        )
        assert code == 1 and "404" in err
        code, _, err = await asyncio.to_thread(cli, "sagas", "list", "--url", url, "--token", "bad")
        assert code == 1 and "401" in err
    # The same data dir again: the token is kept (as a hash) and not shown again.
    async with served(tmp_path / "data") as (_, again):
        assert again["token"] is None


def test_cli_without_token_or_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGAKIT_TOKEN", raising=False)
    code, _, err = run_cli(["sagas", "list", "--url", "http://127.0.0.1:9"])
    assert code == 2 and "no token" in err
    code, _, err = run_cli(["manual-cases", "--url", "http://127.0.0.1:9", "--token", "t"])
    assert code == 2 and "cannot reach" in err


async def test_serve_refuses_a_second_process_on_one_data_dir(tmp_path: Path) -> None:
    from sagakit.errors import ConfigurationError

    async with served(tmp_path):
        with pytest.raises(ConfigurationError, match="another sagakit process"):
            await serve("127.0.0.1", 0, tmp_path)


def _start(data_dir: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    code = (
        "import asyncio, sys; from sagakit.api.serve import serve; "
        "asyncio.run(serve('127.0.0.1', 0, sys.argv[1], json_output=True, log_level='warning'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "SAGAKIT_TOKENS_FILE"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    return proc, json.loads(line)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_gracefully_on_signals(tmp_path: Path, sig: signal.Signals) -> None:
    proc, info = _start(tmp_path)
    try:
        token = info["token"]
        r = httpx.get(f"{info['url']}/readyz", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["ready"] is True
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        stderr = proc.stderr.read() if proc.stderr else ""
        assert "Traceback" not in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Restarted on the same data: resumes, and the token still works.
    proc, info = _start(tmp_path)
    try:
        assert info["token"] is None
        deadline = time.monotonic() + 10
        r = httpx.get(f"{info['url']}/healthz", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and time.monotonic() < deadline
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_log_lines_are_json_with_the_audit_fields() -> None:
    import logging

    from sagakit.api.serve import JsonLogFormatter

    record = logging.LogRecord(
        "sagakit.api.audit", logging.INFO, __file__, 1, "retry by %s", ("ops",), None
    )
    record.__dict__.update(
        actor="ops", saga_id="s-1", action="retry", reason="why", outcome="applied"
    )
    line = json.loads(JsonLogFormatter().format(record))
    assert line["message"] == "retry by ops" and line["level"] == "INFO"
    assert {k: line[k] for k in ("actor", "saga_id", "action", "reason", "outcome")} == {
        "actor": "ops",
        "saga_id": "s-1",
        "action": "retry",
        "reason": "why",
        "outcome": "applied",
    }
