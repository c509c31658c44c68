"""``sagakit serve --store --broker [--api-only]``: the API on a deployment's stores.

Marked ``postgres`` and ``nats``: a database of its own on the shared PostgreSQL
(dropped afterwards) and a JetStream stream of its own on the shared NATS (deleted
afterwards). The API-only server runs in this process; the workers, relay and
services are ``sagakit worker|relay|service`` processes, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import TOKENS, auth, order_body, served

from sagakit.api.auth import write_tokens_file
from sagakit.api.serve import serve

pytestmark = [pytest.mark.postgres, pytest.mark.nats]

PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("SAGAKIT_TEST_NATS_URL", "nats://127.0.0.1:4222")


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database on the shared server; dropped afterwards."""
    psycopg = pytest.importorskip("psycopg", reason="needs the sagakit[postgres] extra")
    name = f"sagakit_serve_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_DSN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def fresh_stream() -> AsyncIterator[str]:
    """A broker URL on a stream name of its own; the stream is deleted afterwards."""
    from sagakit_checkout.deploy import ENDPOINTS

    from sagakit.errors import TransportError
    from sagakit.transports.nats import NatsTransport

    stream = f"sagakit_serve_{uuid.uuid4().hex[:10]}"
    try:
        yield f"{NATS_URL}?stream={stream}"
    finally:
        with contextlib.suppress(TransportError):
            await NatsTransport(
                NATS_URL, stream=stream, endpoints=ENDPOINTS, connect_timeout=2.0
            ).delete_topology()


@contextlib.contextmanager
def processes(store: str, broker: str, provider: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """One worker, one relay and the four services; SIGTERM (then SIGKILL) at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    env["PYTHONUNBUFFERED"] = "1"
    urls = ["--app", "sagakit_checkout:app", "--store", store, "--broker", broker]
    commands = [
        ["worker", *urls, "--command-timeout", "5"],
        ["relay", *urls],
        ["service", "order", *urls],
        ["service", "payment", *urls, "--provider", str(provider)],
        ["service", "inventory", *urls],
        ["service", "shipping", *urls],
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sagakit.cli_processes", *c],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for c in commands
    ]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextlib.asynccontextmanager
async def api_on_deployment(
    tmp_path: Path, **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, str, str]]:
    """``serve --store [--broker]`` on a fresh database and stream, with the test tokens.

    Yields a client bound to it, the store URL and the broker URL.
    """
    data = tmp_path / "data"
    data.mkdir()
    write_tokens_file(data / "tokens.json", TOKENS)
    with fresh_database() as store:
        async with fresh_stream() as broker:
            urls = {"store_url": store, **({"broker_url": broker} if options.pop("broker") else {})}
            async with (
                served(data, **urls, **options) as (url, info),
                httpx.AsyncClient(base_url=url, timeout=10) as client,
            ):
                assert info["token"] is None  # the tokens file of the data directory is used
                assert ("API only" in info["data"]) is bool(options.get("api_only"))
                yield client, store, broker


async def _until_terminal(
    client: httpx.AsyncClient, order_id: str, waiting: str | None = None
) -> dict[str, Any]:
    """The order once final, or once it shows ``waiting`` (an order waiting for a
    person, NEEDS_ATTENTION, is not final: a decision moves it on)."""
    for _ in range(600):
        view: dict[str, Any] = (
            await client.get(f"/orders/{order_id}", headers=auth("viewer"))
        ).json()
        if view["terminal"] or view["status"] == waiting:
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"order {order_id} not final after 60s: {view}")


async def test_api_only_serve_next_to_the_production_processes(tmp_path: Path) -> None:
    # The API first: it works (and takes orders) before any worker runs.
    async with api_on_deployment(tmp_path, broker=False, api_only=True) as (client, store, broker):
        await _exercise(client, store, broker, tmp_path / "provider.db")


async def _exercise(client: httpx.AsyncClient, store: str, broker: str, provider: Path) -> None:
    h = {**auth("operator"), "Idempotency-Key": "deployed-ok"}
    ok = await client.post("/orders", json=order_body(sku="sku-00"), headers=h)
    assert ok.status_code == 202, ok.text
    bad = order_body(sku="sku-01", card="card-novoid-norefund-7", ship_to="addr-bad-7")
    h = {**auth("operator"), "Idempotency-Key": "deployed-manual"}
    manual = await client.post("/orders", json=bad, headers=h)
    assert manual.status_code == 202, manual.text
    # Nothing drives the saga yet: its first command waits in the outbox.
    first = (await client.get(f"/sagas/{ok.json()['saga_id']}", headers=auth("viewer"))).json()
    assert first["state"] == "RUNNING"
    assert [m["published_at"] for m in first["messages"]["sent"]] == [None]

    with processes(store, broker, provider) as procs:
        done = await _until_terminal(client, ok.json()["order_id"])
        assert done["status"] == "COMPLETED", done
        stuck = await _until_terminal(client, manual.json()["order_id"], "NEEDS_ATTENTION")
        assert stuck["status"] == "NEEDS_ATTENTION" and stuck["terminal"] is False, stuck
        assert all(p.poll() is None for p in procs)

        saga_id = manual.json()["saga_id"]
        cases = (await client.get("/manual-cases", headers=auth("viewer"))).json()
        assert [c["saga_id"] for c in cases["items"]] == [saga_id]
        act = f"/sagas/{saga_id}/actions"
        decision = {"action": "mark_compensated", "reason": "refunded by hand", "confirm": True}
        assert (await client.post(act, json=decision)).status_code == 401
        refused = await client.post(act, json=decision, headers=auth("viewer"))
        assert refused.status_code == 403, refused.text
        applied = await client.post(act, json=decision, headers=auth("operator"))
        assert applied.status_code == 200, applied.text
        assert applied.json()["actor"] == "operator"
        again = await client.post(act, json=decision, headers=auth("operator"))
        assert again.status_code == 409, again.text
        # The decision's commands are relayed and handled by the processes.
        final = await _until_terminal(client, manual.json()["order_id"])
        assert final["status"] == "CANCELLED", final
        history = (await client.get(f"/sagas/{saga_id}", headers=auth("viewer"))).json()["history"]
        resolved = [r for r in history if r["event"] == "manual.resolved"]
        assert resolved[0]["detail"]["actor"] == "operator"
        trail = await client.get(f"/audit?saga_id={saga_id}", headers=auth("admin"))
        assert [r["outcome"] for r in trail.json()["items"]][:2] == [
            "refused",
            "applied",
        ]
        ledger = await client.get(
            f"/payments?order_id={ok.json()['order_id']}", headers=auth("viewer")
        )
        assert ledger.status_code == 200 and ledger.json()["items"]
    for p in procs:
        assert p.returncode == 0, p.stderr.read() if p.stderr else ""


async def test_serve_runs_every_role_on_the_deployment(tmp_path: Path) -> None:
    async with api_on_deployment(tmp_path, broker=True) as (client, _, _):
        h = {**auth("operator"), "Idempotency-Key": "all-in-one"}
        placed = await client.post("/orders", json=order_body(sku="sku-02"), headers=h)
        assert placed.status_code == 202, placed.text
        done = await _until_terminal(client, placed.json()["order_id"])
        assert done["status"] == "COMPLETED", done


def test_serve_command_line_on_a_deployment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from sagakit.api.cli import register

    monkeypatch.setenv("SAGAKIT_STORE_URL", "postgresql://postgres@127.0.0.1:1/none")
    parser = argparse.ArgumentParser(prog="sagakit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--data-dir", str(tmp_path), "--mode", "hybrid"])
    assert args.store.endswith("/none") and args.broker is None and not args.api_only
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert args.func(args) == 2
    assert "--mode hybrid is embedded only" in err.getvalue()


def test_serve_options_are_checked(tmp_path: Path) -> None:
    from sagakit.api.serve_setup import shown_url
    from sagakit.errors import ConfigurationError

    assert shown_url("postgresql://app:s3cret@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert shown_url("nats://127.0.0.1:4222?stream=s") == "nats://127.0.0.1:4222?stream=s"

    for options, text in (
        ({"api_only": True}, "need --store"),
        ({"broker_url": "nats://x"}, "need --store"),
        ({"store_url": "postgresql://x/y", "mode": "choreography"}, "orchestrated checkout only"),
        ({"store_url": "postgresql://x/y"}, "needs --broker"),
    ):
        with pytest.raises(ConfigurationError, match=text):
            asyncio.run(serve("127.0.0.1", 0, tmp_path / "d", **options))  # type: ignore[arg-type]
