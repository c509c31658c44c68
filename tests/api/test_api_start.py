"""``POST /sagas`` and ``sagakit sagas start``: start a saga of the served app."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import TOKENS, auth, order_body, running_api, served

from sagakit import App, Deployment, SagaDefinition, Step, StepContext, command, local
from sagakit.api import create_app
from sagakit.api.auth import write_tokens_file
from sagakit.api.cli import register
from sagakit.api.problems import ApiError
from sagakit.api.start import MAX_PROBLEMS, data_problems, parse_start
from sagakit.core.definition import SagaView
from sagakit.core.envelope import Envelope
from sagakit.stores.base import Tx

SERVED = {"trip": [1, 2]}


def trip_app() -> App:
    """Two versions of a trip: v1 books a flight (a local step); v2 books a hotel first
    (a command whose payload is built from the data's ``nights``)."""

    async def flight(ctx: StepContext) -> dict[str, Any]:
        return {"flight": f"fl-{ctx.business_key}"}

    def nights(v: SagaView) -> dict[str, Any]:
        return {"nights": v.data["nights"]}

    v1 = SagaDefinition("trip", [Step("flight", local(flight))], version=1)
    v2 = SagaDefinition(
        "trip",
        [Step("hotel", command("hotel", "BookHotel", nights)), Step("flight", local(flight))],
        version=2,
    )
    app = App("starttest", [v1, v2])
    hotel = app.service("hotel")

    @hotel.handles("BookHotel")
    async def book(tx: Tx, env: Envelope) -> Mapping[str, Any]:
        return {"nights": env.payload["nights"]}

    return app


@contextlib.asynccontextmanager
async def trip_api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The trip app embedded on SQLite files, the API over it; (client, engine)."""
    dep = Deployment(trip_app(), f"sqlite:///{tmp_path}?synchronous=NORMAL")
    engine = dep.everything(idle_poll=0.05)
    async with engine:
        app = create_app(engine, tokens=TOKENS)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client, engine


def start_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"definition": "trip", "business_key": "trip-1", "data": {"nights": 2}}
    body.update(changes)
    return body


async def test_start_is_idempotent_by_key_and_audited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with trip_api(tmp_path) as (client, engine):
        with caplog.at_level(logging.INFO, logger="sagakit.api.audit"):
            first = await client.post("/sagas", json=start_body(), headers=auth("operator"))
        assert first.status_code == 201, first.text
        saga = first.json()
        assert first.headers["location"] == f"/sagas/{saga['saga_id']}"
        assert saga["definition"] == "trip" and saga["definition_version"] == 2  # the latest
        assert saga["business_key"] == "trip-1" and saga["state"] == "RUNNING"
        done = await engine.wait(saga["saga_id"], timeout=30)
        assert done.state.value == "SUCCEEDED" and done.data == {"nights": 2}
        assert done.steps[0].result == {"nights": 2}  # the hotel got the data's nights

        # The same key again (other data, another version): the saga it started, 200.
        again = await client.post(
            "/sagas", json=start_body(data={"nights": 9}, version=1), headers=auth("admin")
        )
        assert again.status_code == 200, again.text
        assert again.json()["saga_id"] == saga["saga_id"]
        assert again.json()["state"] == "SUCCEEDED"
        assert again.headers["location"] == f"/sagas/{saga['saga_id']}"

        # An explicit version, on another key.
        old = await client.post(
            "/sagas", json=start_body(business_key="trip-2", version=1), headers=auth("operator")
        )
        assert old.status_code == 201 and old.json()["definition_version"] == 1
        assert (await engine.wait(old.json()["saga_id"], timeout=30)).state.value == "SUCCEEDED"
        # A null version is the default one; data is optional (v1 needs none).
        r = await client.post(
            "/sagas", json=start_body(business_key="trip-3", version=None), headers=auth("operator")
        )
        assert r.status_code == 201 and r.json()["definition_version"] == 2, r.text
        bare = {"definition": "trip", "business_key": "trip-4", "version": 1}
        r = await client.post("/sagas", json=bare, headers=auth("operator"))
        assert r.status_code == 201 and r.json()["definition_version"] == 1, r.text

        listed = (await client.get("/sagas", headers=auth("viewer"))).json()
        assert listed["total"] == 4
        trail = (await client.get("/audit?actor=operator", headers=auth("admin"))).json()
        rows = [(r["action"], r["outcome"], r["saga_id"]) for r in trail["items"]]
        assert ("start_saga", "created", saga["saga_id"]) in rows
        trail = (await client.get("/audit?actor=admin", headers=auth("admin"))).json()
        (row,) = [r for r in trail["items"] if r["action"] == "start_saga"]
        assert row["outcome"] == "existing" and row["saga_id"] == saga["saga_id"]
        assert row["detail"]["definition"] == "trip@1" and row["detail"]["business_key"] == "trip-1"
    record = next(r for r in caplog.records if r.name == "sagakit.api.audit")
    assert record.__dict__["action"] == "start_saga"
    assert record.__dict__["outcome"] == "created"
    assert record.__dict__["saga_id"] == saga["saga_id"]
    assert record.__dict__["actor"] == "operator"


async def test_start_needs_an_operator_and_shares_the_path_with_the_list(tmp_path: Path) -> None:
    async with trip_api(tmp_path) as (client, _):
        assert (await client.post("/sagas", json=start_body())).status_code == 401
        r = await client.post("/sagas", json=start_body(), headers=auth("viewer"))
        assert r.status_code == 403, r.text
        assert (await client.get("/sagas", headers=auth("viewer"))).json()["total"] == 0
        r = await client.delete("/sagas", headers=auth("admin"))
        assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
        assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "POST"}
        r = await client.post("/sagas", content=b"[", headers=auth("operator"))
        assert r.status_code == 400 and r.json()["error"] == "malformed_json"
        r = await client.post(
            "/sagas", content=b"{}", headers={**auth("operator"), "Content-Type": "text/plain"}
        )
        assert r.status_code == 415


@pytest.mark.parametrize(
    ("changes", "field", "text"),
    [
        ({"definition": "cruise"}, "definition", "no saga definition 'cruise'; served: trip"),
        ({"definition": ""}, "definition", "is required: one of trip"),
        ({"definition": 7}, "definition", "must be a name, one of trip"),
        ({"definition": "", "version": 1}, "definition", "is required"),
        ({"definition": "cruise", "version": 1}, "definition", "served: trip"),
        ({"version": 3}, "version", "trip has no version 3; served versions: 1, 2"),
        ({"version": 0}, "version", "integer >= 1"),
        ({"version": True}, "version", "integer >= 1"),
        ({"version": "2"}, "version", "integer >= 1"),
        ({"business_key": ""}, "business_key", "is required"),
        ({"business_key": "   "}, "business_key", "is required"),
        ({"business_key": None}, "business_key", "is required"),
        ({"business_key": "k" * 201}, "business_key", "1 to 200 printable"),
        ({"business_key": "trip\x00"}, "business_key", "printable"),
        ({"business_key": "ada@example.org"}, "business_key", "e-mail"),
        ({"business_key": "Ada Lovelace"}, "business_key", "name"),
        ({"data": [1, 2]}, "data", "must be a JSON object"),
        ({"data": "nights=2"}, "data", "must be a JSON object"),
        ({"data": None}, "data", "must be a JSON object"),
        ({"data": {"guest": "ada@example.org"}}, "data.guest", "e-mail"),
        ({"data": {"pay": {"cards": ["4111 1111 1111 1111"]}}}, "data.pay.cards[0]", "card"),
        ({"data": {"rooms": [{"guest": "Ada Lovelace"}]}}, "data.rooms[0].guest", "name"),
        ({"data": {"to": "12 Rue de la Paix, Paris"}}, "data.to", "postal address"),
        ({"data": {"note": "a\x00b"}}, "data.note", "NUL"),
        ({"data": {"a\x00": 1}}, "data (a key)", "NUL"),
        ({"extra": 1}, "extra", "unknown field"),
    ],
)
def test_refused_starts_name_the_field(changes: dict[str, Any], field: str, text: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_start(start_body(**changes), SERVED)
    err = caught.value
    assert err.status == 422 and err.code == "invalid_fields"
    problems = {f.field: f.problem for f in err.fields}
    assert field in problems, problems
    assert text in problems[field], problems
    assert err.message.startswith("the start has ")


def test_every_problem_is_named_at_once_and_values_are_checked_at_any_depth() -> None:
    with pytest.raises(ApiError) as caught:
        parse_start({"data": 1}, {})
    fields = {f.field: f.problem for f in caught.value.fields}
    assert set(fields) == {"definition", "business_key", "data"}
    assert "none (this API starts no orchestrated saga)" in fields["definition"]
    with pytest.raises(ApiError):
        parse_start([], SERVED)
    # Tokens, numbers, booleans and lower-case codes pass, however deep.
    deep: Any = "cust-000123"
    for _ in range(5000):
        deep = [deep]
    fine = {
        "traveller": "cust-000123",
        "nights": 2,
        "vip": True,
        "legs": [{"to": "lis"}],
        "d": deep,
    }
    req = parse_start(start_body(data=fine), SERVED)
    assert req.data is fine and req.version is None
    # Personal data at a depth a recursive walk would not reach: found.
    deep = "ada@example.org"
    for _ in range(5000):
        deep = {"x": deep}
    problems = data_problems({"d": deep})
    (problem,) = problems
    assert problem.field.startswith("data.d.x.x.x") and "e-mail" in problem.problem
    # Many refused values: a bounded answer that says it stopped.
    many = data_problems({"guests": ["Ada Lovelace"] * 100})
    assert len(many) == MAX_PROBLEMS + 1
    assert many[-1].field == "data" and "not checked" in many[-1].problem


async def test_data_the_first_command_cannot_be_built_from_is_a_422(tmp_path: Path) -> None:
    async with trip_api(tmp_path) as (client, _):
        r = await client.post("/sagas", json=start_body(data={}), headers=auth("operator"))
        assert r.status_code == 422, r.text
        (problem,) = r.json()["fields"]
        assert problem["field"] == "data"
        assert "cannot be built from this data (KeyError: 'nights')" in problem["problem"]
        assert (await client.get("/sagas", headers=auth("viewer"))).json()["total"] == 0
        trail = (await client.get("/audit", headers=auth("admin"))).json()["items"]
        assert [(r["action"], r["outcome"]) for r in trail] == [("start_saga", "refused")]
        # The same key with the data the definition needs: started.
        r = await client.post("/sagas", json=start_body(), headers=auth("operator"))
        assert r.status_code == 201, r.text


async def test_an_api_only_start_leaves_its_first_local_step_to_the_relays(tmp_path: Path) -> None:
    # An API beside workers (no roles here): the first command, a local step, must go
    # to the outbox the deployment's relays publish, not into a mailbox no worker reads.
    engine = Deployment(trip_app(), f"sqlite:///{tmp_path}").api()
    async with engine:
        app = create_app(engine, tokens=TOKENS)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            body = start_body(version=1)
            r = await client.post("/sagas", json=body, headers=auth("operator"))
            assert r.status_code == 201, r.text
            detail = (await client.get(r.headers["location"], headers=auth("viewer"))).json()
    assert detail["state"] == "RUNNING" and detail["current_step"] == "flight"
    (sent,) = detail["messages"]["sent"]
    assert sent["destination"] == "orchestrator.local" and sent["published_at"] is None


async def test_start_a_checkout_saga_next_to_post_orders(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        h = auth("operator")
        body = {"definition": "checkout", "business_key": "ord-start-1", "data": order_body()}
        r = await env.client.post("/sagas", json=body, headers=h)
        assert r.status_code == 201, r.text
        assert (await env.engine.wait(r.json()["saga_id"], timeout=30)).state.value == "SUCCEEDED"
        r = await env.client.post("/sagas", json={**body, "definition": "trip"}, headers=h)
        assert r.status_code == 422
        assert "served: checkout" in r.json()["fields"][0]["problem"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run one command registered by ``register``; (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="sagakit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code: int = args.func(args)
    return code, out.getvalue(), err.getvalue()


async def test_sagas_start_command_against_a_served_app(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_tokens_file(data / "tokens.json", TOKENS)
    async with served(data, app=trip_app()) as (url, _):
        base = ["--url", url, "--token", "tok-operator"]

        def cli(*argv: str) -> tuple[int, str, str]:
            return run_cli(["sagas", "start", *argv, *base])

        code, out, err = await asyncio.to_thread(cli, "trip", "trip-7", "--data", '{"nights": 3}')
        assert code == 0, err
        assert out.startswith("started saga ") and "trip@2" in out and "key trip-7" in out
        saga_id = out.split()[2]
        code, out, err = await asyncio.to_thread(
            cli, "trip", "trip-7", "--data", '{"nights": 1}', "--json"
        )
        assert code == 0, err
        assert json.loads(out)["saga_id"] == saga_id
        code, out, _ = await asyncio.to_thread(cli, "trip", "trip-7")
        assert code == 0 and out.startswith(f"already started for this key: saga {saga_id}")
        code, out, err = await asyncio.to_thread(cli, "trip", "trip-8", "--version", "1", "--json")
        assert code == 0 and json.loads(out)["definition_version"] == 1, err
        code, _, err = await asyncio.to_thread(cli, "cruise", "c-1")
        assert code == 1 and "422: the start has 1 invalid field: definition" in err
        assert "served: trip" in err
        code, _, err = await asyncio.to_thread(cli, "trip", "t-9", "--data", "nights=2")
        assert code == 2 and "--data is not JSON" in err
        code, _, err = await asyncio.to_thread(cli, "trip", "t-9", "--data", "[2]")
        assert code == 2 and "--data must be a JSON object" in err
        code, _, err = await asyncio.to_thread(
            run_cli, ["sagas", "start", "trip", "t-9", "--url", url, "--token", "tok-viewer"]
        )
        assert code == 1 and err.startswith("sagakit: 403")
