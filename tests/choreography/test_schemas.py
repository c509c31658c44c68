"""Versioned schemas: validation, upcasting, the registry and the baseline check."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from choreo_support import deliver, event
from sagakit_checkout.events import REGISTRY

from sagakit import ConfigurationError, MessageError, MessageKind, Participant
from sagakit.schemas import Payload, SchemaRegistry, compare, load_baseline
from sagakit.stores.sqlite import SQLiteStore

BASELINE = Path(__file__).parents[2] / "examples" / "checkout" / "schemas.baseline.json"
ORDER_V1 = {
    "order_id": "o-1",
    "customer": "cust-1",
    "sku": "sku-01",
    "qty": 1,
    "amount": 1500,
    "currency": "EUR",
    "card": "card-ok-1",
    "ship_to": "addr-ok-1",
}


def test_every_checkout_message_has_a_versioned_model() -> None:
    events = REGISTRY.names(MessageKind.EVENT)
    commands = REGISTRY.names(MessageKind.COMMAND)
    assert {"OrderCreated", "PaymentAuthorized", "OrderCancelled", "CarrierBooked"} <= set(events)
    assert {"CreateOrder", "AuthorizePayment", "RequestShipment", "CancelShipment"} <= set(commands)
    assert all(e.endswith("ed") for e in events), "events are facts, in the past tense"
    assert not any(c.endswith("ed") for c in commands), "commands are imperative"
    assert REGISTRY.current("OrderCreated").version == 2


def test_an_old_version_is_upcast_and_a_current_one_passes_through() -> None:
    version, payload = REGISTRY.validate("OrderCreated", 1, ORDER_V1)
    assert version == 2 and payload == {**ORDER_V1, "channel": "web"}
    assert (
        REGISTRY.validate("OrderCreated", None, {**ORDER_V1, "channel": "api"})[1]["channel"]
        == "api"
    )
    env = event("OrderCreated", ORDER_V1, message_id="m-1")
    up = REGISTRY.incoming(env)
    assert up.version == 2 and up.payload["channel"] == "web"
    with pytest.raises(MessageError, match="v3 is unknown"):
        REGISTRY.validate("OrderCreated", 3, ORDER_V1)


def test_invalid_payloads_name_the_field_never_the_value() -> None:
    bad = {**ORDER_V1, "customer": "jane.doe@example.com", "card": "4111111111111111"}
    with pytest.raises(MessageError) as err:
        REGISTRY.validate("OrderCreated", 1, bad)
    text = str(err.value)
    assert "customer" in text and "card" in text
    assert "jane.doe" not in text and "4111" not in text
    with pytest.raises(MessageError, match="email"):
        REGISTRY.validate("OrderCreated", 2, {**ORDER_V1, "channel": "web", "email": "x"})
    with pytest.raises(MessageError, match="current version is v2"):
        REGISTRY.outgoing("OrderCreated", 1, ORDER_V1)
    with pytest.raises(MessageError, match="no schema"):
        REGISTRY.current("NoSuchThing")
    with pytest.raises(MessageError, match="is a command"):
        REGISTRY.incoming(event("CreateOrder", {"order_id": "o-1"}, message_id="m-2"))


def test_registration_refuses_gaps_and_versions_without_upcasters() -> None:
    reg = SchemaRegistry("t")

    class A(Payload):
        x: int

    reg.event("Happened")(A)
    with pytest.raises(ConfigurationError, match="needs upcast"):
        reg.event("Happened", 2)(A)
    with pytest.raises(ConfigurationError, match="register v2 first"):
        reg.event("Happened", 3, upcast=dict)(A)
    with pytest.raises(ConfigurationError, match="registered twice"):
        reg.event("Happened")(A)
    with pytest.raises(ConfigurationError, match="not both"):
        reg.command("Happened", 2, upcast=dict)(A)


def _with(snapshot: dict[str, Any], name: str, change: Any) -> dict[str, Any]:
    changed = copy.deepcopy(snapshot)
    change(changed["messages"][name]["versions"]["1"]["fields"])
    return changed


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda f: f.pop("carrier"), "field 'carrier' removed or renamed"),
        (lambda f: f.update(courier=f.pop("carrier")), "field 'carrier' removed or renamed"),
        (lambda f: f["carrier"].update(type={"type": "integer"}), "changed type"),
        (
            lambda f: f.update(eta={"type": {"type": "number"}, "required": True}),
            "new required field 'eta' without a default",
        ),
    ],
)
def test_breaking_changes_are_refused(change: Any, expected: str) -> None:
    base = REGISTRY.snapshot()
    current = _with(base, "ShipmentCreated", change)
    result = compare(base, current)
    assert not result.ok and any(expected in b for b in result.breaking), result.breaking


def test_additions_are_compatible() -> None:
    base = REGISTRY.snapshot()
    current = _with(
        base,
        "ShipmentCreated",
        lambda f: f.update(eta={"type": {"type": "number"}, "required": False}),
    )
    current["messages"]["ParcelLost"] = {"kind": "event", "versions": {}}
    v2 = copy.deepcopy(current["messages"]["ShipmentCreated"]["versions"]["1"])
    current["messages"]["ShipmentCreated"]["versions"]["2"] = v2
    result = compare(base, current)
    assert result.ok, result.breaking
    assert any("new optional field 'eta'" in c for c in result.compatible)
    assert any("ParcelLost" in c for c in result.compatible)
    removed = copy.deepcopy(base)
    del removed["messages"]["ShipmentCreated"]
    assert not compare(base, removed).ok


def test_the_committed_baseline_matches_the_registry() -> None:
    result = compare(load_baseline(BASELINE), REGISTRY.snapshot())
    assert result.ok and not result.compatible, (result.breaking, result.compatible)


def sagakit(*args: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import argparse, sys\n"
        "from sagakit.cli_schemas import register\n"
        "p = argparse.ArgumentParser(prog='sagakit'); sub = p.add_subparsers(required=True)\n"
        "register(sub); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


def test_cli_check_passes_and_fails_on_a_breaking_baseline(tmp_path: Path) -> None:
    ok = sagakit("schemas", "check")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "no breaking change" in ok.stdout
    dumped = tmp_path / "baseline.json"
    assert sagakit("schemas", "dump", "--baseline", str(dumped)).returncode == 0
    assert json.loads(dumped.read_text()) == json.loads(BASELINE.read_text())
    # The baseline knew a field that the registry no longer has: removed -> breaking.
    data = json.loads(dumped.read_text())
    data["messages"]["OrderCompleted"]["versions"]["1"]["fields"]["note"] = {
        "required": False,
        "type": {"type": "string"},
    }
    dumped.write_text(json.dumps(data))
    bad = sagakit("schemas", "check", "--baseline", str(dumped), "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["breaking"] == ["OrderCompleted v1: field 'note' removed or renamed"]


async def test_a_participant_parks_an_invalid_payload_with_the_validation_error(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "p.db", name="payment", synchronous="NORMAL")
    p = Participant("payment", store, schemas=REGISTRY)
    handled: list[dict[str, Any]] = []

    @p.on_event("OrderCreated")
    async def on_created(tx: Any, ev: Any) -> None:
        handled.append(ev.payload)
        await p.emit(tx, "PaymentFailed", {"order_id": "o-1"}, cause=ev, now=1.0)

    await store.open()
    try:
        bad = {**ORDER_V1, "customer": "Jane Doe <jane@example.com>"}
        await deliver(p, event("OrderCreated", bad, message_id="bad-1"))
        await deliver(p, event("OrderCreated", ORDER_V1, message_id="ok-1"))
        letters = await store.dead_letters()
        assert handled == [{**ORDER_V1, "channel": "web"}], "only the valid one, upcast"
        reasons = {d.message_id: d.reason for d in letters}
        assert "customer: String should match pattern" in reasons["bad-1"]
        assert "jane" not in reasons["bad-1"]
        # The valid one was upcast, handled, and its emit refused (no 'reason'): parked.
        assert "PaymentFailed v1 payload is invalid: reason: Field required" in reasons["ok-1"]
        assert await store.outbox_all() == []
    finally:
        await store.close()
