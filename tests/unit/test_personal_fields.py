"""Personal data in saga data and reasons: the engine itself tokenises or refuses it.

A definition declares its personal fields (``personal=``): a ``refuse`` field takes only
a token, a ``tokenise`` field is replaced by a stable token before anything is stored,
a ``public`` one is never scanned; any other string of the data, and the business key,
holding an e-mail address, a card number or a street address refuses the start. A
reason with personal data is refused by ``Engine.cancel``/``resolve`` and the dead-letter
desk, not only by the API. Errors name the place and the kind, never the value.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from sagakit import (
    HmacTokeniser,
    PersonalDataRefused,
    PersonalField,
    SagaDefinition,
    SagaState,
    Step,
    StepFailed,
    embedded,
    start_in_sync,
)
from sagakit.core.personal import PersonalPolicy
from sagakit.errors import ConfigurationError, DefinitionError
from sagakit.runtime.lockfile import private_dir

KEY = "k" * 32
EMAIL = "jane.roe@example.com"
CARD = "4111 1111 1111 1111"


def slow(ctx: Any) -> None:
    time.sleep(0.05)


def signup(**kw: Any) -> SagaDefinition:
    kw.setdefault(
        "personal",
        {
            "email": PersonalField("tokenise", kind="email"),
            "customer": PersonalField("refuse", kind="cust"),
            "contact.phone": "tokenise",
            "order_no": "public",
        },
    )
    kw.setdefault("tokeniser", HmacTokeniser(KEY))
    return SagaDefinition("signup", [Step("a", slow), Step("b", slow)], **kw)


def every_byte(directory: Path) -> bytes:
    """The contents of every file in ``directory`` (databases, write-ahead logs, locks)."""
    return b"".join(f.read_bytes() for f in directory.iterdir() if f.is_file())


async def admit(d: SagaDefinition, data: dict[str, Any], key: str = "s-1") -> dict[str, Any]:
    return await d.personal.admit(key, data)


async def test_a_tokenised_field_gets_a_stable_token_of_its_kind() -> None:
    d = signup()
    data = {"email": EMAIL, "customer": "cust-000123", "contact": {"phone": 33612345678}}
    out = await admit(d, data)
    assert out["email"] == HmacTokeniser(KEY)("email", EMAIL)
    assert out["email"].startswith("email-") and len(out["email"]) == len("email-") + 24
    assert out["contact"]["phone"].startswith("tok-")
    assert out["customer"] == "cust-000123"
    assert data["email"] == EMAIL and data["contact"]["phone"] == 33612345678  # not changed
    # Stable: the same value, the same token; a token of the kind is kept as it is.
    assert await admit(d, data) == out
    assert await admit(d, out) == out
    # Another key, another token.
    other = await signup(tokeniser=HmacTokeniser("x" * 32)).personal.admit("s-1", data)
    assert other["email"] != out["email"]


@pytest.mark.parametrize(
    ("value", "found"),
    [(EMAIL, "an e-mail address"), ("Jane Roe", "a value in clear"), ("tok-1", "a value in clear")],
)
async def test_a_refused_field_takes_only_a_token_of_its_kind(value: str, found: str) -> None:
    with pytest.raises(PersonalDataRefused) as caught:
        await admit(signup(), {"customer": value})
    assert (caught.value.where, caught.value.found) == ("data.customer", found)
    assert "'customer'" in str(caught.value) and "cust-... token" in str(caught.value)
    assert value not in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("data", "where", "found"),
    [
        ({"note": f"call {EMAIL}"}, "data.note", "an e-mail address"),
        ({"legs": [{"pay": CARD}]}, "data.legs.pay", "a card number"),
        ({"to": "12 Fake Street"}, "data.to", "a postal address"),
        ({"guests": {EMAIL: 1}}, "data.guests", "an e-mail address"),
    ],
)
async def test_personal_data_in_an_undeclared_field_is_refused(
    data: dict[str, Any], where: str, found: str
) -> None:
    with pytest.raises(PersonalDataRefused) as caught:
        await admit(signup(), data)
    assert (caught.value.where, caught.value.found) == (where, found)
    assert EMAIL not in str(caught.value) and CARD not in str(caught.value)
    assert "personal=" in str(caught.value)


async def test_ids_timestamps_and_public_fields_pass_the_scan() -> None:
    d = signup()
    ordinary = {
        "sku": "sku-01",
        "at": "1764259200123",  # a timestamp in ms: starts with 1, no card does
        "snowflake": "1234567890123456789",
        "ean": "4006381333931",  # a product barcode: 13 digits, no card has so few today
        "luhn_but_9": "9111111111111110",  # Luhn passes, but no card starts with 9
        "uuid": "550e8400-e29b-41d4-a716-446655440000",
        "order_no": "4111111111111111",  # declared public: not scanned
        "qty": 4111111111111111,  # numbers are not scanned, only strings
        "deep": [[["cust-7"]]],
    }
    assert await admit(d, ordinary) == ordinary
    off = SagaDefinition("loose", [Step("a", slow)], scan_personal=False)
    assert await off.personal.admit(EMAIL, {"note": EMAIL}) == {"note": EMAIL}


async def test_the_scan_walks_data_deeper_than_python_recurses() -> None:
    deep: Any = EMAIL
    for _ in range(5000):
        deep = {"x": deep}
    with pytest.raises(PersonalDataRefused, match="an e-mail address"):
        await admit(signup(), {"d": deep})


async def test_a_business_key_with_personal_data_is_refused() -> None:
    with pytest.raises(PersonalDataRefused) as caught:
        await admit(signup(), {}, key=EMAIL)
    assert caught.value.where == "business_key" and EMAIL not in str(caught.value)


async def test_tokenisers_a_vault_and_a_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vault: dict[str, str] = {}

    async def to_vault(kind: str, value: str) -> str:
        vault[f"{kind}-{len(vault) + 1}"] = value
        return f"{kind}-{len(vault)}"

    d = signup(personal={"email": PersonalField("tokenise", kind="em", tokeniser=to_vault)})
    assert (await admit(d, {"email": EMAIL}))["email"] == "em-1" and vault == {"em-1": EMAIL}

    from_env = signup(tokeniser=HmacTokeniser(lambda: os.environ["SIGNUP_KEY"]))
    monkeypatch.delenv("SIGNUP_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="tokenising key is not set"):
        await admit(from_env, {"email": EMAIL})
    monkeypatch.setenv("SIGNUP_KEY", KEY)
    assert (await admit(from_env, {"email": EMAIL})) == await admit(signup(), {"email": EMAIL})

    def leaky(kind: str, value: str) -> str:
        return f"{kind}-{value}"

    bad = signup(tokeniser=leaky)
    with pytest.raises(ConfigurationError, match=r"returned no email-\.\.\. token") as caught:
        await admit(bad, {"email": EMAIL})
    assert EMAIL not in str(caught.value)
    assert "k" * 32 not in repr(HmacTokeniser(KEY))


@pytest.mark.parametrize(
    ("personal", "tokeniser", "message"),
    [
        ({"email": "hide"}, None, "'hide' is not one of refuse, tokenise, public"),
        ({"email": "tokenise"}, None, "has no tokeniser"),
        ({"a..b": "refuse"}, None, "must be a field name"),
        (["email"], None, "personal= maps field names"),
        ({"email": "tokenise"}, "not callable", "is not callable"),
    ],
)
def test_a_wrong_declaration_is_a_definition_error(
    personal: Any, tokeniser: Any, message: str
) -> None:
    with pytest.raises(DefinitionError, match=message):
        PersonalPolicy("signup", personal, tokeniser=tokeniser)


def test_short_keys_and_odd_kinds_are_refused() -> None:
    with pytest.raises(DefinitionError, match="token kind 'Cust'"):
        PersonalField("refuse", kind="Cust")
    with pytest.raises(DefinitionError, match="only a 'tokenise' field takes a tokeniser"):
        PersonalField("refuse", tokeniser=HmacTokeniser(KEY))
    with pytest.raises(ConfigurationError, match="at least 16"):
        HmacTokeniser("short")


async def test_the_engine_stores_tokens_only_and_refuses_whole_batches(tmp_path: Path) -> None:
    d = signup()
    async with embedded(tmp_path / "o.db", [d]) as engine:
        inst = await engine.start("signup", "s-1", {"email": EMAIL, "customer": "cust-1"})
        assert inst.data["email"].startswith("email-")
        with pytest.raises(PersonalDataRefused):
            await engine.start_many(
                [
                    ("signup", "s-2", {"customer": "cust-2"}),
                    ("signup", "s-3", {"customer": EMAIL}),
                ]
            )
        with pytest.raises(PersonalDataRefused):
            await engine.start("signup", "s-4", {"note": CARD})
        done = await engine.wait(inst.saga_id, timeout=10)
        assert done.state is SagaState.SUCCEEDED
        assert [s.business_key for s in await engine.store.list_sagas()] == ["s-1"]
        history = await engine.store.history(inst.saga_id)
        assert history and all(EMAIL not in repr(h) for h in history)
    raw = every_byte(tmp_path)
    assert EMAIL.encode() not in raw and b"cust-2" not in raw


def test_a_start_in_your_own_transaction_is_tokenised_too(tmp_path: Path) -> None:
    import asyncio
    import sqlite3

    d = signup()

    async def create() -> None:
        async with embedded(tmp_path / "o.db", [d]):
            pass

    asyncio.run(create())
    conn = sqlite3.connect(tmp_path / "o.db")
    inst = start_in_sync(conn, [d], [("signup", "s-9", {"email": EMAIL})])[0]
    with pytest.raises(PersonalDataRefused):
        start_in_sync(conn, [d], [("signup", "s-10", {"customer": EMAIL})])
    conn.commit()
    conn.close()
    assert inst.data["email"].startswith("email-")
    assert EMAIL.encode() not in (tmp_path / "o.db").read_bytes()


async def test_reasons_with_personal_data_are_refused_by_the_engine(tmp_path: Path) -> None:
    reason = f"customer {EMAIL} asked, card {CARD}"
    async with embedded(tmp_path / "o.db", [signup()]) as engine:
        inst = await engine.start("signup", "s-1", {"customer": "cust-1"})
        with pytest.raises(PersonalDataRefused) as caught:
            await engine.cancel(inst.saga_id, reason)
        assert caught.value.where == "reason"
        assert caught.value.found == "an e-mail address and a card number"
        assert EMAIL not in str(caught.value) and CARD not in str(caught.value)
        # Checked before anything is read: even for a saga that does not exist.
        with pytest.raises(PersonalDataRefused):
            await engine.resolve("no-such-saga", "mark_done", reason=reason, actor="ops")
        for settle in (engine.dead_letters.replay, engine.dead_letters.discard):
            with pytest.raises(PersonalDataRefused):
                await settle("orchestrator", 1, actor="ops", reason=reason)
        assert (await engine.get(inst.saga_id)).reason is None
        await engine.cancel(inst.saga_id, "customer cust-1 asked on the phone")
    raw = every_byte(tmp_path)
    assert EMAIL.encode() not in raw and b"4111" not in raw


def test_data_dirs_are_created_private_and_existing_ones_only_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    new = private_dir(tmp_path / "a" / "data")
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    open_dir = tmp_path / "shared"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="sagakit.runtime.lockfile"):
        private_dir(open_dir)
    assert stat.S_IMODE(open_dir.stat().st_mode) == 0o755  # not changed behind its back
    assert "open to other users (mode 755)" in caplog.text
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigurationError, match="not a directory"):
        private_dir(tmp_path / "file")


async def test_a_handlers_failure_reason_is_masked_before_the_history_keeps_it(
    tmp_path: Path,
) -> None:
    def refuse(ctx: Any) -> None:
        raise StepFailed(f"no account for {EMAIL}, card {CARD} blocked")

    d = SagaDefinition("strict", [Step("check", refuse)])
    async with embedded(tmp_path / "o.db", [d]) as engine:
        inst = await engine.start("strict", "s-1", {})
        done = await engine.wait(inst.saga_id, timeout=10)
        history = await engine.store.history(inst.saga_id)
    assert done.state is SagaState.COMPENSATED
    assert "no account for [email], card [card ****1111] blocked" in (done.reason or "")
    assert not any(EMAIL in repr(h) or CARD in repr(h) for h in history)
    raw = every_byte(tmp_path)
    assert EMAIL.encode() not in raw and CARD.encode() not in raw
