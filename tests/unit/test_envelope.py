"""Envelopes: JSON round trip, validation of every field, outcomes and replies."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sagakit.core.envelope import (
    Envelope,
    MessageKind,
    Outcome,
    failure,
    reply_to,
    success,
    traceparent_for,
)
from sagakit.errors import MessageError


def full_envelope() -> Envelope:
    return Envelope(
        message_id="s1:3:0",
        type="AuthorizePayment",
        version=2,
        kind=MessageKind.COMMAND,
        source="orchestrator",
        destination="payment",
        correlation_id="corr-1",
        causation_id="s1:2:0/reply",
        saga_id="s1",
        business_key="order-7",
        step="pay",
        attempt=2,
        fence=3,
        idempotency_key="s1:pay:action",
        compensates="s1:pay:action",
        reply_to="orchestrator",
        occurred_at=1234.5,
        payload={"amount": 1000, "currency": "EUR", "items": [1, 2], "nested": {"a": None}},
        traceparent=traceparent_for("corr-1", "s1:3:0"),
    )


def minimal_raw(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "message_id": "m1",
        "type": "T",
        "kind": "event",
        "source": "svc",
        "correlation_id": "c1",
        "occurred_at": 1.0,
    }
    raw.update(extra)
    return raw


# --- round trip -------------------------------------------------------------------------


def test_full_round_trip_through_json() -> None:
    env = full_envelope()
    text = env.to_json()
    assert Envelope.from_json(text) == env
    assert Envelope.from_json(text.encode()) == env
    assert Envelope.from_dict(env.to_dict()) == env


def test_to_json_is_compact_and_sorted() -> None:
    text = full_envelope().to_json()
    assert " " not in text.replace("EUR", "")
    keys = list(json.loads(text))
    assert keys == sorted(keys)
    assert full_envelope().to_json() == text  # byte-identical when recomputed


@pytest.mark.parametrize("kind", list(MessageKind))
def test_every_kind_round_trips(kind: MessageKind) -> None:
    env = Envelope("m", "T", kind, "svc", "c", 0.0)
    back = Envelope.from_json(env.to_json())
    assert back == env
    assert back.kind is kind


def test_minimal_envelope_defaults_and_omissions() -> None:
    env = Envelope.from_dict(minimal_raw())
    assert env.payload == {}
    assert env.version == 1
    assert env.attempt == 0
    assert env.fence == 0
    assert env.saga_id is None
    out = env.to_dict()
    assert set(out) == {
        "message_id",
        "type",
        "version",
        "kind",
        "source",
        "correlation_id",
        "occurred_at",
        "payload",
    }
    assert Envelope.from_dict(out) == env


def test_integer_occurred_at_becomes_float() -> None:
    env = Envelope.from_dict(minimal_raw(occurred_at=5))
    assert env.occurred_at == 5.0
    assert isinstance(env.occurred_at, float)


def test_with_changes_copies() -> None:
    env = full_envelope()
    changed = env.with_changes(attempt=3, fence=9)
    assert (changed.attempt, changed.fence) == (3, 9)
    assert env.attempt == 2
    assert changed.message_id == env.message_id


def test_envelope_is_immutable() -> None:
    env = full_envelope()
    with pytest.raises(AttributeError):
        env.fence = 4  # type: ignore[misc]


def test_traceparent_is_w3c_and_deterministic() -> None:
    tp = traceparent_for("corr", "span-1")
    version, trace, span, flags = tp.split("-")
    assert (version, flags) == ("00", "01")
    assert len(trace) == 32 and len(span) == 16
    assert set(trace + span) <= set("0123456789abcdef")
    assert tp == traceparent_for("corr", "span-1")
    other = traceparent_for("corr", "span-2")
    assert other.split("-")[1] == trace  # same trace per correlation id
    assert other.split("-")[2] != span  # a span per message
    assert traceparent_for("corr-2", "span-1").split("-")[1] != trace


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [[], "x", 1, None, True, 2.5])
def test_non_object_is_rejected(raw: object) -> None:
    with pytest.raises(MessageError, match="must be a JSON object"):
        Envelope.from_dict(raw)


@pytest.mark.parametrize("text", ["[]", '"x"', "1", "null"])
def test_non_object_json_is_rejected(text: str) -> None:
    with pytest.raises(MessageError, match="must be a JSON object"):
        Envelope.from_json(text)


@pytest.mark.parametrize("field", ["message_id", "type", "source", "correlation_id"])
@pytest.mark.parametrize("value", [None, "", 1, ["x"], {"a": 1}, "__missing__"])
def test_required_strings(field: str, value: object) -> None:
    raw = minimal_raw()
    if value == "__missing__":
        del raw[field]
    else:
        raw[field] = value
    with pytest.raises(MessageError, match=f"'{field}' must be a non-empty string"):
        Envelope.from_dict(raw)


@pytest.mark.parametrize("kind", ["commands", "", "COMMAND", 1, None, ["command"]])
def test_bad_kind_is_rejected(kind: object) -> None:
    with pytest.raises(MessageError, match="'kind' must be one of"):
        Envelope.from_dict(minimal_raw(kind=kind))


def test_missing_kind_is_a_message_error() -> None:
    raw = minimal_raw()
    del raw["kind"]
    with pytest.raises(MessageError, match="kind"):
        Envelope.from_dict(raw)


@pytest.mark.parametrize("value", [None, "1.0", True, False, [1], {}, "__missing__"])
def test_bad_occurred_at_is_rejected(value: object) -> None:
    raw = minimal_raw()
    if value == "__missing__":
        del raw["occurred_at"]
    else:
        raw["occurred_at"] = value
    with pytest.raises(MessageError, match="'occurred_at' must be a number"):
        Envelope.from_dict(raw)


@pytest.mark.parametrize("payload", [None, [], "x", 1, True])
def test_non_object_payload_is_rejected(payload: object) -> None:
    with pytest.raises(MessageError, match="'payload' must be an object"):
        Envelope.from_dict(minimal_raw(payload=payload))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", 0),
        ("version", -1),
        ("version", 1.0),
        ("version", "1"),
        ("version", True),
        ("version", None),
        ("attempt", -1),
        ("attempt", 1.5),
        ("attempt", "2"),
        ("attempt", False),
        ("attempt", None),
        ("fence", -1),
        ("fence", 2.0),
        ("fence", "3"),
        ("fence", True),
        ("fence", None),
    ],
)
def test_bad_ints_are_rejected(field: str, value: object) -> None:
    minimum = 1 if field == "version" else 0
    with pytest.raises(MessageError, match=f"'{field}' must be an integer >= {minimum}"):
        Envelope.from_dict(minimal_raw(**{field: value}))


@pytest.mark.parametrize(
    "field",
    [
        "destination",
        "saga_id",
        "business_key",
        "causation_id",
        "step",
        "idempotency_key",
        "compensates",
        "reply_to",
        "traceparent",
    ],
)
@pytest.mark.parametrize("value", [1, True, ["x"], {"a": 1}])
def test_optional_strings_must_be_strings(field: str, value: object) -> None:
    with pytest.raises(MessageError, match=f"'{field}' must be a string"):
        Envelope.from_dict(minimal_raw(**{field: value}))


def test_optional_strings_may_be_null() -> None:
    env = Envelope.from_dict(minimal_raw(saga_id=None, step=None))
    assert env.saga_id is None and env.step is None


def test_unknown_fields_are_rejected_and_listed() -> None:
    with pytest.raises(MessageError, match=r"unknown fields: \['extra', 'zzz'\]"):
        Envelope.from_dict(minimal_raw(zzz=1, extra="x"))


@pytest.mark.parametrize("text", ["", "{", "{'a': 1}", "nope", b"\xff\xfe\x00", b"{\xff}"])
def test_invalid_json_is_rejected(text: str | bytes) -> None:
    with pytest.raises(MessageError, match="not valid JSON"):
        Envelope.from_json(text)


def test_invalid_json_keeps_cause() -> None:
    with pytest.raises(MessageError) as exc:
        Envelope.from_json("{")
    assert isinstance(exc.value.__cause__, ValueError)


# --- outcomes ---------------------------------------------------------------------------


def test_success_payload_round_trip() -> None:
    out = success({"auth": "A1"})
    assert out.to_payload() == {"ok": True, "result": {"auth": "A1"}}
    assert Outcome.from_payload(out.to_payload()) == out
    assert success().result == {}


def test_success_copies_result() -> None:
    result = {"a": 1}
    out = success(result)
    result["a"] = 2
    assert out.result == {"a": 1}


@pytest.mark.parametrize("retryable", [True, False])
def test_failure_payload_round_trip(retryable: bool) -> None:
    out = failure("card declined", retryable=retryable)
    assert out.to_payload() == {"ok": False, "reason": "card declined", "retryable": retryable}
    assert Outcome.from_payload(out.to_payload()) == out
    assert not failure("x").retryable


def test_payload_defaults() -> None:
    assert Outcome.from_payload({"ok": True}) == Outcome(ok=True, result={})
    assert Outcome.from_payload({"ok": False}) == Outcome(ok=False, reason="", retryable=False)


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"ok": 1},
        {"ok": "true"},
        {"ok": None},
        {"result": {}},
        {"ok": True, "result": []},
        {"ok": True, "result": "x"},
        {"ok": True, "result": None},
        {"ok": False, "reason": 1},
        {"ok": False, "reason": None},
        {"ok": False, "retryable": "yes"},
        {"ok": False, "retryable": 1},
    ],
)
def test_malformed_reply_payloads(payload: dict[str, Any]) -> None:
    with pytest.raises(MessageError):
        Outcome.from_payload(payload)


# --- replies ----------------------------------------------------------------------------


def test_reply_to_copies_routing_and_fencing() -> None:
    cmd = full_envelope()
    rep = reply_to(cmd, success({"auth": "A1"}), source="payment", now=99.0)
    assert rep.message_id == f"{cmd.message_id}/reply"
    assert rep.type == "AuthorizePayment.reply"
    assert rep.version == cmd.version
    assert rep.kind is MessageKind.REPLY
    assert rep.source == "payment"
    assert rep.destination == cmd.reply_to
    assert rep.correlation_id == cmd.correlation_id
    assert rep.causation_id == cmd.message_id
    assert rep.saga_id == cmd.saga_id
    assert rep.business_key == cmd.business_key
    assert rep.step == cmd.step
    assert rep.attempt == cmd.attempt
    assert rep.fence == cmd.fence
    assert rep.idempotency_key == cmd.idempotency_key
    assert rep.compensates == cmd.compensates
    assert rep.traceparent == cmd.traceparent
    assert rep.occurred_at == 99.0
    assert rep.reply_to is None
    assert rep.payload == {"ok": True, "result": {"auth": "A1"}}
    assert Envelope.from_json(rep.to_json()) == rep


def test_reply_to_is_deterministic() -> None:
    cmd = full_envelope()
    a = reply_to(cmd, failure("no", retryable=True), source="payment", now=5)
    b = reply_to(cmd, failure("no", retryable=True), source="payment", now=5)
    assert a == b
    assert a.payload == {"ok": False, "reason": "no", "retryable": True}


def test_reply_to_needs_reply_address() -> None:
    cmd = full_envelope().with_changes(reply_to=None)
    with pytest.raises(MessageError, match="has no reply_to"):
        reply_to(cmd, success(), source="payment", now=1)
