"""Personal data stays in the service that owns it: messages, history and logs see tokens.

Canary personal data (a name, an e-mail, a postal address, a card number) is planted
in orders placed through each of the three modes; afterwards every table of every
database (outboxes, inboxes, mailboxes, idempotency records, sagas, history, dead
letters, business tables), every byte of the other services' files (write-ahead logs
included) and every log line is searched. Only the owners' tables (``customers`` in the
order service, ``card_vault`` in payment) may hold it. The engine itself refuses the
canary in an operator's reason (cancel, manual actions, dead letters) and in the
checkout's declared personal fields; a field declared ``tokenise`` is stored as a token
only. (The API's routes, the audit trail included: tests/api/test_api_personal_data.py.)
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from choreo_support import quiet, wait_terminal
from sagakit_checkout.modes import build_system
from sagakit_checkout.personal import OWNED_TABLES, Customer, register_customer, vault_card

from sagakit import (
    HmacTokeniser,
    PersonalDataRefused,
    PersonalField,
    SagaDefinition,
    Step,
    embedded,
)
from sagakit.cli import _configure_logging
from sagakit.redaction import RedactPersonalData, redact
from sagakit.testing.faults import Faults

CANARIES = (
    "Zebulon Canaryfield",
    "zebulon.canary@example.org",
    "42 Canary Lane",
    "4111111111111111",
    "4111 1111 1111 1111",
)
CARD = "4111 1111 1111 1111"
REASON = "Zebulon Canaryfield (zebulon.canary@example.org) asked to refund 4111 1111 1111 1111"
DEFINITIONS = {
    "orchestration": "checkout",
    "choreography": "checkout-choreography",
    "hybrid": "checkout-hybrid",
}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def scan(data_dir: Path) -> list[str]:
    """Every place outside the owners' tables where a canary appears."""
    hits: list[str] = []
    for db in sorted(data_dir.glob("*.db")):
        conn = sqlite3.connect(db)
        try:
            owned = OWNED_TABLES.get(db.stem, ())
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            for table in tables:
                for row in conn.execute(f'SELECT * FROM "{table}"'):
                    text = " ".join(str(v) for v in row)
                    for canary in CANARIES:
                        if canary in text and table not in owned:
                            hits.append(f"{db.name}:{table}: {canary}")
        finally:
            conn.close()
    return hits


def in_files(data_dir: Path, owners: tuple[str, ...] = ()) -> list[str]:
    """Every file (databases, write-ahead logs, logs) but the owners' holding a canary."""
    return [
        f"{f.name}: {canary}"
        for f in sorted(data_dir.iterdir())
        if f.is_file() and not f.name.startswith(owners)
        for canary in CANARIES
        if canary.encode() in f.read_bytes()
    ]


async def refuse_canary_reasons(engine: Any, saga_id: str, definition: str) -> None:
    """Every engine entry point that takes a reason refuses the canary's; the checkout's
    declared personal fields refuse it in clear."""
    attempts: list[Callable[[], Awaitable[object]]] = [
        partial(engine.cancel, saga_id, REASON),
        partial(engine.resolve, saga_id, "mark_done", reason=REASON, actor="ops"),
        partial(engine.dead_letters.replay, "orchestrator", 1, actor="ops", reason=REASON),
        partial(engine.dead_letters.discard, "orchestrator", 1, actor="ops", reason=REASON),
    ]
    if definition in engine.orchestrator.latest:  # orchestrated: the definition's fields
        tokens = {"customer": "cust-1", "card": "card-ok-1", "ship_to": "addr-ok-1"}
        for field, clear in (("customer", "zebulon.canary@example.org"), ("card", CARD)):
            data = {**tokens, field: clear}
            attempts.append(partial(engine.start, definition, "pii-clear", data))
    for attempt in attempts:
        with pytest.raises(PersonalDataRefused) as caught:
            await attempt()
        assert not any(c in str(caught.value) for c in CANARIES)


@pytest.mark.parametrize("mode", ["orchestration", "choreography", "hybrid"])
@pytest.mark.fault("F-PII-CANARY")
async def test_canary_personal_data_never_leaves_its_owner(mode: str, tmp_path: Path) -> None:
    lines = Lines()
    lines.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s %(exc_text)s"))
    loggers = [logging.getLogger("sagakit"), logging.getLogger("sagakit_checkout")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(lines)  # no redaction filter: nothing may be there to redact
        lg.setLevel(logging.DEBUG)
    try:
        system = build_system(mode, tmp_path, Faults.named("default", 3), synchronous="NORMAL")
        engine = system.engine
        async with engine:
            stores = system.invariant_stores
            from sagakit_checkout.demo import OrderSpec
            from sagakit_checkout.inventory import seed_stock

            await seed_stock(stores["inventory_store"], {"sku-01": 5, "sku-none": 0})
            person = Customer(
                "Zebulon Canaryfield", "zebulon.canary@example.org", "42 Canary Lane, Birdtown"
            )
            customer, address = await register_customer(stores["order_store"], person, time.time())
            ok_card = await vault_card(stores["payment_store"], CARD, time.time())
            bad_card = await vault_card(stores["payment_store"], CARD, time.time(), flags="decline")
            base = {
                "customer": customer,
                "qty": 1,
                "amount": 2500,
                "currency": "EUR",
                "ship_to": address,
            }
            specs = [
                OrderSpec("pii-ok", "success", {**base, "sku": "sku-01", "card": ok_card}),
                OrderSpec("pii-declined", "card", {**base, "sku": "sku-01", "card": bad_card}),
                OrderSpec("pii-sold-out", "stock", {**base, "sku": "sku-none", "card": ok_card}),
            ]
            assert await system.place(specs) == 3
            done = await wait_terminal(
                engine.store, [s.order_id for s in specs], DEFINITIONS[mode], timeout=60
            )
            await quiet(engine.stores)
            await refuse_canary_reasons(engine, done["pii-ok"].saga_id, DEFINITIONS[mode])
            assert await engine.store.get_saga_by_key(DEFINITIONS[mode], "pii-clear") is None
        assert {k: v.state.value for k, v in done.items()}["pii-ok"] == "SUCCEEDED"
    finally:
        for lg, level in saved:
            lg.removeHandler(lines)
            lg.setLevel(level)
    assert lines.lines, "the run logged nothing at DEBUG: the log search would prove nothing"
    assert scan(tmp_path) == []
    assert in_files(tmp_path, owners=("order.db", "payment.db")) == []
    assert [ln for ln in lines.lines if any(c in ln for c in CANARIES)] == []
    # The owners do hold it (else the search above would be vacuous).
    owner = sqlite3.connect(tmp_path / "order.db")
    try:
        assert owner.execute("SELECT name FROM customers").fetchall() == [("Zebulon Canaryfield",)]
    finally:
        owner.close()


def test_the_log_filter_masks_emails_and_card_numbers() -> None:
    record = logging.LogRecord(
        "sagakit",
        logging.WARNING,
        __file__,
        1,
        "refund for %s with card %s failed (order %s, at %s)",
        ("jane.doe@example.com", "4111-1111-1111-1111", "order-0-000123", 1764259200123),
        None,
    )
    assert RedactPersonalData().filter(record)
    text = record.getMessage()
    assert "jane.doe" not in text and "4111-1111" not in text
    assert "[email]" in text and "[card ****1111]" in text
    # Ids and timestamps that are not card numbers (no Luhn check) stay readable.
    assert "order-0-000123" in text and "1764259200123" in text
    assert redact("no personal data here") == "no personal data here"


def test_the_log_filter_masks_the_canary_in_addresses_and_extra_fields() -> None:
    reason = "called Zebulon at 42 Canary Lane, zebulon.canary@example.org, 4111 1111 1111 1111"
    record = logging.LogRecord(
        "sagakit.api.audit", logging.INFO, __file__, 1, "cancel: %s", (reason,), None
    )
    record.__dict__.update(reason=reason, actor="ops", rung=2)
    assert RedactPersonalData().filter(record)
    for text in (record.getMessage(), record.__dict__["reason"]):
        assert [c for c in CANARIES[1:] if c in text] == []
        assert "[address]" in text and "[email]" in text and "[card ****1111]" in text
    assert (record.__dict__["actor"], record.__dict__["rung"]) == ("ops", 2)


def test_the_cli_installs_the_filter(tmp_path: Path, sagakit_logger: logging.Logger) -> None:
    root = sagakit_logger
    before = list(root.handlers)
    _configure_logging(tmp_path, "INFO")
    added = [h for h in root.handlers if h not in before]
    assert added and any(isinstance(f, RedactPersonalData) for f in added[0].filters)
    root.warning("customer %s paid with %s", "a.b@example.com", "4111111111111111")
    added[0].flush()
    logged = (tmp_path / "sagakit.log").read_text()
    assert "a.b@example.com" not in logged and "4111111111111111" not in logged


async def test_a_declared_personal_field_is_stored_as_a_token_only(tmp_path: Path) -> None:
    """The canary in fields declared ``tokenise``: after the start and the run, no file
    of the data directory and no log line holds it; the tokens are where it was."""
    seen: list[dict[str, Any]] = []

    def notify(ctx: Any) -> dict[str, Any]:
        seen.append(dict(ctx.data))
        return {"sent": True}

    signup = SagaDefinition(
        "signup",
        [Step("notify", notify)],
        personal={
            "email": PersonalField("tokenise", kind="email"),
            "card": PersonalField("tokenise", kind="card"),
            "customer": PersonalField("refuse", kind="cust"),
        },
        tokeniser=HmacTokeniser("canary-test-key-0123456789"),
    )
    lines = Lines()
    lines.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s %(exc_text)s"))
    logger = logging.getLogger("sagakit")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.DEBUG)
    try:
        async with embedded(tmp_path / "orchestrator.db", [signup]) as engine:
            data = {"email": "zebulon.canary@example.org", "card": CARD, "customer": "cust-42"}
            inst = await engine.start("signup", "signup-1", data)
            done = await engine.wait(inst.saga_id, timeout=10)
            assert done.state.value == "SUCCEEDED"
            with pytest.raises(PersonalDataRefused):
                await engine.start("signup", "signup-2", {"customer": "Zebulon Canaryfield"})
            with pytest.raises(PersonalDataRefused):
                await engine.cancel(inst.saga_id, REASON)
            history = await engine.store.history(inst.saga_id)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    assert seen == [{**data, "email": done.data["email"], "card": done.data["card"]}]
    assert done.data["email"].startswith("email-") and done.data["card"].startswith("card-")
    assert history and not any(c in repr(h) for h in history for c in CANARIES)
    assert lines.lines and [ln for ln in lines.lines if any(c in ln for c in CANARIES)] == []
    assert scan(tmp_path) == [] and in_files(tmp_path) == []
