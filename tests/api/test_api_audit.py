"""The audit trail: decisions from the API and the console and dead-letter settlements,
each under the name of the token used, filtered, paged and exported as JSON lines; and
the named tokens (``sagakit tokens add|list|remove``) whose names are the actors."""

from __future__ import annotations

import contextlib
import html
import io
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from api_support import FAST, STOCK, Env
from sagakit_checkout.sagas import checkout_definition
from sagakit_checkout.services import checkout_engine, migrate, open_checkout

from sagakit import Envelope, MessageKind, SagaState
from sagakit.api import TokenStore, create_app
from sagakit.api.auth import Principal, Role, derived_name, hash_token
from sagakit.api.records import MIGRATIONS, NAMESPACE
from sagakit.cli import main
from sagakit.runtime.audit import AuditQuery, AuditRecord, append, find, iterate
from sagakit.stores.sqlite import SQLiteStore

PEOPLE = {
    "alice": ("operator", "tok-alice"),
    "bob": ("operator", "tok-bob"),
    "carol": ("operator", "tok-carol"),
    "root": ("admin", "tok-root"),
}
FORM = {"content-type": "application/x-www-form-urlencoded"}


def as_(name: str) -> dict[str, str]:
    """The Authorization header of ``name``'s token."""
    return {"Authorization": f"Bearer {PEOPLE[name][1]}"}


@contextlib.asynccontextmanager
async def people_api(tmp_path: Path) -> AsyncIterator[Env]:
    """The checkout and the API over it, with the named tokens of :data:`PEOPLE`."""
    checkout = open_checkout(tmp_path, synchronous="NORMAL")
    definition = checkout_definition(timeout=0.5, retry=FAST, forward=FAST)
    engine = checkout_engine(checkout, definition=definition, idle_poll=0.05)
    async with engine:
        await migrate(checkout, initial_stock=STOCK)
        app = create_app(engine, checkout=checkout, tokens=TokenStore.from_plain(PEOPLE))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield Env(engine, checkout, client, app)


async def manual_case(env: Env, key: str) -> str:
    """A saga in FAILED_NEEDS_MANUAL (its void and refund are refused); its id."""
    body = {
        "sku": "sku-1",
        "qty": 1,
        "amount": 1999,
        "currency": "EUR",
        "customer": "cust-000123",
        "card": f"card-novoid-norefund-{key}-1",
        "ship_to": "addr-bad-9",
    }
    r = await env.client.post(
        "/orders", json=body, headers={**as_("alice"), "Idempotency-Key": key}
    )
    assert r.status_code == 202, r.text
    saga_id: str = r.json()["saga_id"]
    inst = await env.engine.wait(saga_id, timeout=30)
    assert inst.state is SagaState.FAILED_NEEDS_MANUAL, inst
    return saga_id


async def park(env: Env, message_id: str) -> int:
    """A command nobody handles, parked in the payment store; its dead letter's id."""
    envelope = Envelope(
        message_id=message_id,
        type="Frobnicate",
        kind=MessageKind.COMMAND,
        source="ops-test",
        destination="payment",
        correlation_id="c-1",
        occurred_at=time.time(),
        payload={"n": 1},
    )
    store = next(s for s in env.engine.stores if s.name == "payment")
    async with store.transaction() as tx:
        await tx.dead_letter("payment", message_id, envelope.to_json(), "parked", time.time())
    return max(d.id for d in await store.dead_letters("payment"))


def form_on(page: str, target: str) -> tuple[str, dict[str, str]]:
    """The action and hidden fields of the form on ``page`` posting to ``...target``."""
    pattern = rf'<form[^>]*action="([^"]*{re.escape(target)})"[^>]*>(.*?)</form>'
    form = re.search(pattern, page, re.S)
    assert form, f"no form posting to {target}"
    hidden = {
        html.unescape(k): html.unescape(v)
        for k, v in re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', form.group(2))
    }
    return html.unescape(form.group(1)), hidden


async def console_post(env: Env, page: str, target: str, fields: dict[str, str]) -> None:
    """Sign in to the console with bob's token, load ``page`` and post its form whose
    action ends with ``target``, with its hidden fields and ``fields``; an action that
    asks for a confirmation first is confirmed on the page that asks."""
    c = env.client
    r = await c.post("/console-login", content=f"token={PEOPLE['bob'][1]}", headers=FORM)
    assert r.status_code == 303, r.text
    loaded = await c.get(page)
    assert loaded.status_code == 200, loaded.text
    action, hidden = form_on(loaded.text, target)
    r = await c.post(action, data={**hidden, **fields})
    if r.status_code == 200 and 'name="confirm"' in r.text:
        action, hidden = form_on(r.text, target)
        r = await c.post(action, data={**hidden, **fields})
    assert r.status_code == 303, r.text
    c.cookies.clear()


async def audit(env: Env, query: str = "") -> list[dict[str, Any]]:
    r = await env.client.get(f"/audit{query}", headers=as_("root"))
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def test_every_decision_is_in_the_audit_under_its_token_name(tmp_path: Path) -> None:
    async with people_api(tmp_path) as env:
        by_api, by_console = await manual_case(env, "a-1"), await manual_case(env, "a-2")
        before = (await env.engine.get(by_api)).version
        r = await env.client.post(
            f"/sagas/{by_api}/actions",
            json={"action": "retry", "reason": "card provider is back"},
            headers=as_("alice"),
        )
        assert r.status_code == 200, r.text
        fields = {"action": "retry", "reason": "tried again from the console"}
        await console_post(env, f"/console/sagas/{by_console}", "/act", fields)
        replayed, discarded, by_bob = (
            await park(env, "m-r"),
            await park(env, "m-d"),
            await park(env, "m-b"),
        )
        fields = {"settlement": "discard", "reason": "a test message"}
        await console_post(env, "/console/dead-letters", f"/payment/{by_bob}/settle", fields)
        for id, what in ((replayed, "replay"), (discarded, "discard")):
            r = await env.client.post(
                f"/dead-letters/payment/{id}/{what}",
                json={"reason": f"{what} by carol"},
                headers=as_("carol"),
            )
            assert r.status_code == 200, r.text

        rows = await audit(env)
        decided = [(a["actor"], a["action"], a["saga_id"] or a["dead_letter_id"]) for a in rows]
        assert decided[:5] == [
            ("carol", "dead_letter.discard", discarded),
            ("carol", "dead_letter.replay", replayed),
            ("bob", "dead_letter.discard", by_bob),
            ("bob", "retry", by_console),
            ("alice", "retry", by_api),
        ]
        alice = (await audit(env, "?actor=alice&action=retry"))[0]
        assert alice["reason"] == "card provider is back" and alice["outcome"] == "applied"
        assert (alice["version_before"], alice["version_after"]) == (before, before + 1)
        assert alice["saga_id"] == by_api and alice["store"] == "orchestrator"
        carol = await audit(env, "?actor=carol")
        assert [a["store"] for a in carol] == ["payment", "payment"]
        assert carol[0]["detail"]["message_id"] == "m-d"
        # The history says the same as the trail: the decision and its row are one write.
        history = await env.engine.store.history(by_console)
        [resolved] = [h for h in history if h.event == "manual.resolved"]
        assert resolved.detail["actor"] == "bob"


async def test_filters_paging_and_json_lines(tmp_path: Path) -> None:
    async with people_api(tmp_path) as env:
        store = env.engine.store
        rows = [
            AuditRecord(at=1000.0 + i, actor=actor, action=action, saga_id=saga, reason="r")
            for i, (actor, action, saga) in enumerate(
                [
                    ("alice", "retry", "s-1"),
                    ("bob", "mark_done", "s-1"),
                    ("alice", "mark_done", "s-2"),
                    ("carol", "dead_letter.discard", None),
                ]
            )
        ]
        async with store.transaction() as tx:
            for row in rows:
                await append(tx, row)

        def actions(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
            return [(a["actor"], a["action"]) for a in items]

        assert actions(await audit(env, "?saga_id=s-1")) == [
            ("bob", "mark_done"),
            ("alice", "retry"),
        ]
        assert actions(await audit(env, "?actor=alice&action=mark_done")) == [
            ("alice", "mark_done")
        ]
        assert actions(await audit(env, "?since=1001&until=1003")) == [
            ("alice", "mark_done"),
            ("bob", "mark_done"),
        ]
        iso = "?since=1970-01-01T00:16:42Z"  # 1002
        assert actions(await audit(env, iso)) == [
            ("carol", "dead_letter.discard"),
            ("alice", "mark_done"),
        ]
        assert actions(await audit(env, "?limit=2&offset=1")) == [
            ("alice", "mark_done"),
            ("bob", "mark_done"),
        ]
        bad = await env.client.get(
            "/audit?since=yesterday&until=5&limit=0&format=xml", headers=as_("root")
        )
        assert bad.status_code == 422
        assert {f["field"] for f in bad.json()["fields"]} == {"since", "limit", "format"}
        upside_down = await env.client.get("/audit?since=10&until=5", headers=as_("root"))
        assert [f["field"] for f in upside_down.json()["fields"]] == ["until"]
        refused = await env.client.get("/audit", headers=as_("alice"))
        assert refused.status_code == 403

        for how in (
            {"params": {"format": "jsonl"}},
            {"headers": {"Accept": "application/x-ndjson"}},
        ):
            headers = {**as_("root"), **how.get("headers", {})}
            r = await env.client.get("/audit", params=how.get("params"), headers=headers)
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in r.text.splitlines()]
            assert actions(lines) == actions(await audit(env))
            assert len(lines) == 4 and r.text.endswith("\n")
        r = await env.client.get("/audit?format=jsonl&actor=alice&limit=1", headers=as_("root"))
        assert actions([json.loads(line) for line in r.text.splitlines()]) == [
            ("alice", "mark_done")
        ]
        r = await env.client.get("/audit?format=jsonl&offset=1&limit=2", headers=as_("root"))
        paged = actions(await audit(env, "?offset=1&limit=2"))
        assert actions([json.loads(line) for line in r.text.splitlines()]) == paged


async def test_find_merges_stores_newest_first(tmp_path: Path) -> None:
    async with people_api(tmp_path) as env:
        stores = {s.name: s for s in env.engine.stores}
        for name, at in (("payment", 3.0), ("orchestrator", 2.0), ("payment", 1.0)):
            async with stores[name].transaction() as tx:
                await append(tx, AuditRecord(at=at, actor="x", action=f"a{at:g}"))
        everything = [stores["payment"], stores["orchestrator"], stores["payment"]]
        found = await find(everything, AuditQuery(actor="x"), limit=2, offset=1)
        assert [(r.action, r.store) for r in found] == [("a2", "orchestrator"), ("a1", "payment")]
        # Read a row at a time (keyset pages), ties on time included: the same order.
        async with stores["payment"].transaction() as tx:
            await append(tx, AuditRecord(at=2.0, actor="x", action="a2-tie"))
        whole = await find(everything, AuditQuery(actor="x"), limit=10)
        streamed = [r async for r in iterate(everything, AuditQuery(actor="x"), page=1)]
        assert [r.action for r in streamed] == [r.action for r in whole]
        assert [r.action for r in whole] == ["a3", "a2", "a2-tie", "a1"]
        # A decision rolled back leaves no row: the row is written in its transaction.
        try:
            async with stores["payment"].transaction() as tx:
                await append(tx, AuditRecord(at=9.0, actor="x", action="lost"))
                raise RuntimeError("the decision failed")
        except RuntimeError:
            pass
        assert "lost" not in [r.action for r in await find(everything, AuditQuery(), limit=10)]


# -- named tokens --------------------------------------------------------------------


def cli(*argv: str) -> tuple[int, str, str]:
    """``sagakit ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_tokens_add_list_remove_keep_names_never_secrets(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    at = ("--tokens-file", str(path))
    code, out, _ = cli("tokens", "add", "alice", "--role", "operator", *at, "--json")
    assert code == 0
    alice = json.loads(out)["token"]
    assert cli("tokens", "add", "carol", "--role", "viewer", *at)[0] == 0
    code, out, _ = cli("tokens", "list", *at)
    assert code == 0 and alice not in out and hash_token(alice) not in out
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [
        ["alice", "operator"],
        ["carol", "viewer"],
    ]
    assert TokenStore.from_file(path).authenticate(alice) == Principal("alice", Role.OPERATOR)
    code, out, _ = cli("tokens", "remove", "carol", *at)
    assert code == 0 and "removed token 'carol'" in out
    assert [e.name for e in TokenStore.from_file(path).entries] == ["alice"]
    code, _, err = cli("tokens", "remove", "carol", *at)
    assert code == 2 and "no token named 'carol'" in err
    code, _, err = cli("tokens", "add", "bad name", "--role", "operator", *at)
    assert code == 2 and "token name 'bad name'" in err


def test_an_old_file_without_names_loads_with_stable_derived_names(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    old = hash_token("tok-old")
    path.write_text(json.dumps([{"role": "admin", "sha256": old}]))
    store = TokenStore.from_file(path)
    assert store.authenticate("tok-old") == Principal(f"token-{old[:8]}", Role.ADMIN)
    assert derived_name(old) == f"token-{old[:8]}"
    code, out, _ = cli("tokens", "list", "--tokens-file", str(path))
    assert code == 0 and f"token-{old[:8]}" in out
    # The next change writes the derived name into the file: it stays the same name.
    assert cli("tokens", "add", "bob", "--role", "operator", "--tokens-file", str(path))[0] == 0
    entries = json.loads(path.read_text())["tokens"]
    assert [e["name"] for e in entries] == [f"token-{old[:8]}", "bob"]


async def test_the_api_audit_rows_of_an_older_version_move_into_the_trail(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "orchestrator.db", name="orchestrator")
    await store.open()
    try:
        await store.apply_migrations(NAMESPACE, MIGRATIONS[:1])  # what an older API made
        async with store.transaction() as tx:
            await tx.execute(
                "INSERT INTO api_audit (audit_id, at, actor, role, action, saga_id, reason, "
                "outcome, detail) VALUES ('a1', 5.0, 'ops', 'operator', 'retry', 's-9', "
                "'why', 'applied', '{\"version\":3}')"
            )
        await store.apply_migrations(NAMESPACE, MIGRATIONS)
        [row] = await find([store], AuditQuery(saga_id="s-9"), limit=5)
        assert (row.actor, row.role, row.action, row.reason, row.detail) == (
            "ops",
            "operator",
            "retry",
            "why",
            {"version": 3},
        )
        async with store.transaction() as tx:
            gone = await tx.fetchall("SELECT name FROM sqlite_master WHERE name = 'api_audit'")
        assert gone == []
    finally:
        await store.close()
