"""Personal data in an operator's free text: a reason is refused before anything keeps it.

A reason is kept for good (the saga's history, ``audit_trail``, the dead letter's
settlement, the log, the console), so one that holds an e-mail address, a card number
or a postal address is refused with a 422 naming the field and what was found, by every
route, console form and CLI command that takes one; nothing of it is stored, audited or
logged. An ordinary reason still goes through. ``sagakit serve`` masks what reaches
its log anyway. ``POST /sagas`` leaves the fields a definition declares ``tokenise`` to
the engine, which stores their tokens only.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import PLAIN, TOKENS, Env, auth, running_api, served
from test_api_serve_cli import run_cli

from sagakit import (
    App,
    Deployment,
    HmacTokeniser,
    PersonalField,
    SagaDefinition,
    Step,
    StepContext,
)
from sagakit.api import create_app
from sagakit.api.validation import ACTIONS, reason_problem
from sagakit.redaction import personal_data_in

CANARY = "Jane Roe jane.roe@example.com, 12 Fake Street, card 4111 1111 1111 1111"
PIECES = ("Jane Roe", "jane.roe@example.com", "12 Fake Street", "4111 1111 1111 1111")
FOUND = "an e-mail address, a card number and a postal address"
NORMAL = "customer called, refund approved"
ONE_KIND = {
    "refund jane.roe@example.com by hand": "an e-mail address",
    "card 4111111111111111 was charged twice": "a card number",
    "card 4111-1111-1111-1111 was charged twice": "a card number",
    "parcel returned to 12 Fake Street": "a postal address",
}
ORDINARY = (
    NORMAL,
    "mail server fixed",
    "payment 2.1 fixed the parser",
    "order-0-000123 retried at 1764259200123 (not a card: no Luhn)",
    "cust-000123 confirmed on the phone, ticket #4711",
)


def in_databases(data_dir: Path, needles: tuple[str, ...]) -> list[str]:
    """``db:table: needle`` for every row of every table of every database holding one."""
    hits: list[str] = []
    for db in sorted(data_dir.glob("*.db")):
        conn = sqlite3.connect(db)
        try:
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            for table in tables:
                for row in conn.execute(f'SELECT * FROM "{table}"'):
                    text = " ".join(str(v) for v in row)
                    hits += [f"{db.name}:{table}: {n}" for n in needles if n in text]
        finally:
            conn.close()
    return hits


@pytest.mark.parametrize(("text", "kind"), [(CANARY, FOUND), *ONE_KIND.items()])
def test_a_reason_with_personal_data_is_refused_naming_what_was_found(text: str, kind: str) -> None:
    assert personal_data_in(text) == kind
    problem = reason_problem(text)
    assert problem is not None and problem.startswith(f"holds {kind}:")


@pytest.mark.parametrize("text", ORDINARY)
def test_an_ordinary_reason_is_taken(text: str) -> None:
    assert personal_data_in(text) is None
    assert reason_problem(text) is None


async def park(env: Env) -> int:
    store = next(s for s in env.engine.stores if s.name == "payment")
    async with store.transaction() as tx:
        await tx.dead_letter("payment", None, "not json", "parked by the test", time.time())
    return max(d.id for d in await store.dead_letters("payment"))


def refused(r: httpx.Response, kind: str = FOUND) -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_fields"
    assert [f["field"] for f in body["fields"]] == ["reason"]
    assert body["fields"][0]["problem"].startswith(f"holds {kind}:")
    assert not any(p in r.text for p in PIECES), "the answer echoes the personal data"


@pytest.mark.fault("F-PII-CANARY")
async def test_every_route_that_takes_a_reason_refuses_personal_data(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        c, op = env.client, auth("operator")
        saga_id = (await env.manual_case("pii-1"))["saga_id"]
        before = await env.engine.get(saga_id)
        letter = await park(env)
        for action in ACTIONS:
            body: dict[str, Any] = {"action": action, "reason": CANARY}
            if action == "use_rung":
                body["rung"] = 1
            refused(await c.post(f"/sagas/{saga_id}/actions", json=body, headers=op))
        for text, kind in ONE_KIND.items():
            body = {"action": "mark_compensated", "reason": text}
            refused(await c.post(f"/sagas/{saga_id}/actions", json=body, headers=op), kind)
        for dry_run in (True, False):
            batch = {
                "filter": {"saga_ids": [saga_id]},
                "action": "mark_compensated",
                "reason": CANARY,
                "dry_run": dry_run,
            }
            refused(await c.post("/sagas/actions/batch", json=batch, headers=op))
        for settlement in ("replay", "discard"):
            path = f"/dead-letters/payment/{letter}/{settlement}"
            refused(await c.post(path, json={"reason": CANARY}, headers=op))

        # Nothing was decided, settled or audited.
        after = await env.engine.get(saga_id)
        assert (after.state, after.version) == (before.state, before.version)
        assert (await c.get(f"/dead-letters/payment/{letter}", headers=op)).json()[
            "status"
        ] == "open"
        audit = (await c.get("/audit", headers=auth("admin"))).json()["items"]
        assert [a["action"] for a in audit] == ["place_order"]

        # An ordinary reason still goes through, and is kept where the canary was looked for.
        ok = {"action": "mark_compensated", "reason": NORMAL, "confirm": True}
        r = await c.post(f"/sagas/{saga_id}/actions", json=ok, headers=op)
        assert r.status_code == 200, r.text
        r = await c.post(
            f"/dead-letters/payment/{letter}/discard", json={"reason": NORMAL}, headers=op
        )
        assert r.status_code == 200, r.text
        history = await env.engine.store.history(saga_id)
        assert any(NORMAL in json.dumps(h.detail) for h in history)
        assert not any(p in json.dumps(h.detail) for h in history for p in PIECES)
        kept_reason = (await env.engine.get(saga_id)).reason or ""
        assert not any(p in kept_reason for p in PIECES)
        rows = (await c.get("/audit", headers=auth("admin"))).json()["items"]
        assert [(a["action"], a["reason"]) for a in rows] == [
            ("dead_letter.discard", NORMAL),
            ("mark_compensated", NORMAL),
            ("place_order", None),
        ]
    assert in_databases(tmp_path, PIECES) == []
    kept = in_databases(tmp_path, (NORMAL,))
    assert any(":audit_trail:" in h for h in kept) and any(":saga_history:" in h for h in kept)


@pytest.mark.fault("F-PII-CANARY")
async def test_the_console_refuses_a_reason_with_personal_data(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        c = env.client
        saga_id = (await env.manual_case("pii-2"))["saga_id"]
        before = await env.engine.get(saga_id)
        letter = await park(env)
        login = await c.post(
            "/console-login",
            content=f"token={PLAIN['operator']}",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        sign_in = login.headers["set-cookie"].split(";")[0]
        page = await c.get("/console/manual", headers={"cookie": sign_in})
        found = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
        assert found, "no decision form on the manual page"
        csrf = found.group(1)
        # The form's token is bound to the nonce cookie the page set.
        session = {"cookie": f"{sign_in}; {page.headers['set-cookie'].split(';')[0]}"}
        for path, form in (
            (f"/console/sagas/{saga_id}/act", {"action": "mark_compensated"}),
            (f"/console/sagas/{saga_id}/act", {"action": "cancel"}),
            (f"/console/dead-letters/payment/{letter}/settle", {"settlement": "discard"}),
        ):
            r = await c.post(path, data={**form, "reason": CANARY, "csrf": csrf}, headers=session)
            assert r.status_code == 422, r.text
            assert "Personal data in the reason" in r.text and FOUND in r.text
        after = await env.engine.get(saga_id)
        assert (after.state, after.version) == (before.state, before.version)
        ok = {
            "action": "mark_compensated",
            "reason": NORMAL,
            "csrf": csrf,
            "version": str(before.version),
            "confirm": "yes",
        }
        r = await c.post(f"/console/sagas/{saga_id}/act", data=ok, headers=session)
        assert r.status_code == 303, r.text
    assert in_databases(tmp_path, PIECES) == []
    assert any(":saga_history:" in h for h in in_databases(tmp_path, (NORMAL,)))


@pytest.mark.parametrize(
    "argv",
    [
        ["sagas", "cancel", "saga-1"],
        ["sagas", "retry", "saga-1"],
        ["sagas", "resolve", "saga-1", "--action", "mark_done"],
        ["dead-letters", "replay", "payment", "1"],
        ["dead-letters", "discard", "payment", "1"],
    ],
)
@pytest.mark.fault("F-PII-CANARY")
def test_the_cli_refuses_a_reason_with_personal_data_before_sending_it(argv: list[str]) -> None:
    # Port 9 (discard) has no API: a command that sent the request would say so.
    client = ["--url", "http://127.0.0.1:9", "--token", "tok", "--timeout", "2"]
    code, out, err = run_cli([*argv, "--reason", CANARY, *client])
    assert code == 2 and out == ""
    assert f"--reason holds {FOUND}" in err and "cannot reach" not in err
    assert not any(p in err for p in PIECES)


@pytest.mark.fault("F-PII-CANARY")
async def test_serve_refuses_the_canary_and_masks_its_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with served(tmp_path / "data") as (url, info):
        h = {"Authorization": f"Bearer {info['token']}"}
        async with httpx.AsyncClient(base_url=url, headers=h, timeout=10) as client:
            body = {"action": "cancel", "reason": CANARY}
            refused(await client.post("/sagas/saga-1/actions", json=body))
        # What slips through anyway is masked: the message, its arguments and the
        # JSON line's extra fields (sagakit's handler), and uvicorn's own lines.
        logging.getLogger("sagakit.api.audit").warning(
            "cancel by %s: %s", "ops", CANARY, extra={"reason": CANARY, "actor": "ops"}
        )
        logging.getLogger("uvicorn.error").warning("request failed: %s", CANARY)
    err = capsys.readouterr().err
    assert not any(p in err for p in PIECES[1:]), err
    lines = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    [line] = [ln for ln in lines if ln["logger"] == "sagakit.api.audit"]
    assert line["reason"] == "Jane Roe [email], [address], card [card ****1111]"
    assert "[email]" in line["message"] and line["actor"] == "ops"
    assert any("request failed: Jane Roe [email]" in ln for ln in err.splitlines())
    assert in_databases(tmp_path / "data", PIECES) == []


async def test_post_sagas_lets_the_engine_tokenise_declared_fields(tmp_path: Path) -> None:
    """A field declared ``tokenise`` may carry the canary through ``POST /sagas``: the
    engine stores its token; the definition's ``refuse`` fields and undeclared data
    are still refused with 422, naming the field, never echoing the value."""

    def welcome(ctx: StepContext) -> dict[str, Any]:
        return {"sent": True}

    signup = SagaDefinition(
        "signup",
        [Step("welcome", welcome)],
        personal={
            "email": PersonalField("tokenise", kind="email"),
            "customer": PersonalField("refuse", kind="cust"),
        },
        tokeniser=HmacTokeniser("api-canary-key-0123456789"),
    )
    email = "jane.roe@example.com"
    dep = Deployment(App("signups", [signup]), f"sqlite:///{tmp_path}?synchronous=NORMAL")
    async with dep.everything(idle_poll=0.05) as engine:
        api = create_app(engine, tokens=TOKENS)
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            op = auth("operator")
            body = {
                "definition": "signup",
                "business_key": "signup-1",
                "data": {"email": email, "customer": "cust-1"},
            }
            r = await c.post("/sagas", json=body, headers=op)
            assert r.status_code == 201, r.text
            assert email not in r.text
            saga = await engine.wait(r.json()["saga_id"], timeout=10)
            assert saga.data["email"] == HmacTokeniser("api-canary-key-0123456789")("email", email)
            for data, field in (
                ({"email": email, "customer": "tok-1"}, "data.customer"),
                ({"note": email}, "data.note"),
            ):
                body = {"definition": "signup", "business_key": "signup-2", "data": data}
                r = await c.post("/sagas", json=body, headers=op)
                assert r.status_code == 422, r.text
                assert [f["field"] for f in r.json()["fields"]] == [field]
                assert email not in r.text
    assert in_databases(tmp_path, (email,)) == []
    assert any(":audit_trail:" in h for h in in_databases(tmp_path, ("signup-1",)))
