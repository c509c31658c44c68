"""The envelope every message travels in, and the reply convention.

Envelopes are immutable and serialise to compact JSON. Parsing validates every field
and raises :class:`~sagakit.errors.MessageError` naming the field that was wrong, so a
malformed message can be parked in a dead-letter place with that reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from sagakit.errors import MessageError
from sagakit.redaction import redact

# Built once: json.dumps with options builds a new encoder on every call, and every
# message is encoded at least once on the hot path.
_encode = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


class MessageKind(StrEnum):
    """What a message is for."""

    COMMAND = "command"
    """Addressed to one owner, in the imperative (AuthorizePayment)."""
    REPLY = "reply"
    """The answer to a command or query, addressed to its ``reply_to``."""
    EVENT = "event"
    """A fact in the past tense, broadcast (PaymentAuthorized)."""
    QUERY = "query"
    """A question with no effect (GetPaymentStatus)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message with everything needed to route, deduplicate, fence and trace it.

    ``fence`` is the saga instance version that emitted the message; ``step`` and
    ``attempt`` say which step and which try it belongs to; ``idempotency_key`` is
    ``saga_id:step:action`` for commands, so a participant that sees the command again
    returns the reply it recorded. ``compensates`` (on a compensation command) names the
    idempotency key of the action it undoes. ``payload`` holds no personal data.
    """

    message_id: str
    type: str
    kind: MessageKind
    source: str
    correlation_id: str
    occurred_at: float
    payload: dict[str, Any] = field(default_factory=dict)
    version: int = 1
    destination: str | None = None
    saga_id: str | None = None
    business_key: str | None = None
    causation_id: str | None = None
    step: str | None = None
    attempt: int = 0
    fence: int = 0
    idempotency_key: str | None = None
    compensates: str | None = None
    reply_to: str | None = None
    traceparent: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``None`` fields and defaults are left out."""
        out: dict[str, Any] = {
            "message_id": self.message_id,
            "type": self.type,
            "version": self.version,
            "kind": self.kind.value,
            "source": self.source,
            "correlation_id": self.correlation_id,
            "occurred_at": self.occurred_at,
            "payload": self.payload,
        }
        for name in _OPTIONAL_STR:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.attempt:
            out["attempt"] = self.attempt
        if self.fence:
            out["fence"] = self.fence
        if self.headers:
            out["headers"] = self.headers
        return out

    def to_json(self) -> str:
        """Compact JSON text."""
        return _encode(self.to_dict())

    @classmethod
    def from_dict(cls, raw: object) -> Envelope:
        """Validate and build an envelope; :class:`MessageError` says which field is wrong."""
        if not isinstance(raw, dict):
            raise MessageError(f"envelope must be a JSON object, got {type(raw).__name__}")
        for name in _REQUIRED_STR:
            value = raw.get(name)
            if not isinstance(value, str) or not value:
                raise MessageError(
                    f"envelope field {name!r} must be a non-empty string, got {value!r}"
                )
        try:
            kind = MessageKind(str(raw.get("kind")))
        except ValueError:
            raise MessageError(
                f"envelope field 'kind' must be one of {[k.value for k in MessageKind]}, "
                f"got {raw.get('kind')!r}"
            ) from None
        occurred = raw.get("occurred_at")
        if not isinstance(occurred, int | float) or isinstance(occurred, bool):
            raise MessageError(f"envelope field 'occurred_at' must be a number, got {occurred!r}")
        payload = raw.get("payload", {})
        if not isinstance(payload, dict):
            raise MessageError(f"envelope field 'payload' must be an object, got {payload!r}")
        for name, minimum in (("version", 1), ("attempt", 0), ("fence", 0)):
            value = raw.get(name, minimum)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise MessageError(
                    f"envelope field {name!r} must be an integer >= {minimum}, got {value!r}"
                )
        for name in _OPTIONAL_STR:
            value = raw.get(name)
            if value is not None and not isinstance(value, str):
                raise MessageError(f"envelope field {name!r} must be a string, got {value!r}")
        headers = raw.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise MessageError(
                f"envelope field 'headers' must map strings to strings, got {headers!r}"
            )
        unknown = set(raw) - _ALL_FIELDS
        if unknown:
            raise MessageError(f"envelope has unknown fields: {sorted(unknown)}")
        return cls(
            message_id=raw["message_id"],
            type=raw["type"],
            kind=kind,
            source=raw["source"],
            correlation_id=raw["correlation_id"],
            occurred_at=float(occurred),
            payload=payload,
            version=raw.get("version", 1),
            attempt=raw.get("attempt", 0),
            fence=raw.get("fence", 0),
            destination=raw.get("destination"),
            saga_id=raw.get("saga_id"),
            business_key=raw.get("business_key"),
            causation_id=raw.get("causation_id"),
            step=raw.get("step"),
            idempotency_key=raw.get("idempotency_key"),
            compensates=raw.get("compensates"),
            reply_to=raw.get("reply_to"),
            traceparent=raw.get("traceparent"),
            headers=headers,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        """Parse JSON text; :class:`MessageError` if it is not a valid envelope."""
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MessageError(f"message is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    def with_changes(self, **changes: Any) -> Envelope:
        """A copy with some fields replaced."""
        return replace(self, **changes)


_REQUIRED_STR = ("message_id", "type", "source", "correlation_id")
_OPTIONAL_STR = (
    "destination",
    "saga_id",
    "business_key",
    "causation_id",
    "step",
    "idempotency_key",
    "compensates",
    "reply_to",
    "traceparent",
)
_ALL_FIELDS = frozenset(
    (
        *_REQUIRED_STR,
        *_OPTIONAL_STR,
        "kind",
        "occurred_at",
        "payload",
        "version",
        "attempt",
        "fence",
        "headers",
    )
)


def traceparent_for(correlation_id: str, span_seed: str) -> str:
    """A W3C ``traceparent``: one trace per correlation id, one span per message.

    Derived deterministically so that a transition recomputed after a crash emits
    byte-identical messages.
    """
    trace = hashlib.blake2b(correlation_id.encode(), digest_size=16).hexdigest()
    span = hashlib.blake2b(span_seed.encode(), digest_size=8).hexdigest()
    return f"00-{trace}-{span}-01"


MANUAL_RETRY = "sagakit-manual-retry"
"""Header on a command a person asked to try again: its value counts those requests.

A participant that recorded a *definite failure* for the key runs the handler again
(recording the new outcome under ``key#m<n>``); a recorded success is still replayed."""


REPLAYED_FROM = "sagakit-replayed-from"
"""Header on a message a person replayed from a dead letter: ``<store>:<dead letter id>``.

The message id stays the same, so the consumer's inbox still recognises a message it
handled; the header makes each replay a distinct copy for brokers that deduplicate on
their own (NATS JetStream's ``Nats-Msg-Id``), which would otherwise drop it."""


# --- replies -------------------------------------------------------------------------
# A reply's payload is {"ok": true, "result": {...}} or
# {"ok": false, "reason": "...", "retryable": bool}.


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a reply says happened."""

    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    retryable: bool = False

    def to_payload(self) -> dict[str, Any]:
        """The reply payload."""
        if self.ok:
            return {"ok": True, "result": self.result}
        return {"ok": False, "reason": self.reason, "retryable": self.retryable}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Outcome:
        """Read a reply payload; :class:`MessageError` if it is not one."""
        ok = payload.get("ok")
        if ok is True:
            result = payload.get("result", {})
            if not isinstance(result, dict):
                raise MessageError(f"reply 'result' must be an object, got {result!r}")
            return cls(ok=True, result=result)
        if ok is False:
            reason = payload.get("reason", "")
            retryable = payload.get("retryable", False)
            if not isinstance(reason, str) or not isinstance(retryable, bool):
                raise MessageError("reply 'reason' must be a string and 'retryable' a boolean")
            return cls(ok=False, reason=reason, retryable=retryable)
        raise MessageError(f"reply payload needs 'ok': true|false, got {payload!r}")


def success(result: dict[str, Any] | None = None) -> Outcome:
    """A successful outcome carrying ``result``."""
    return Outcome(ok=True, result=dict(result or {}))


def failure(reason: str, *, retryable: bool = False) -> Outcome:
    """A failed outcome; ``retryable`` asks for another attempt.

    ``reason`` is kept in the saga's history and shown to operators, and handlers
    write it from whatever failed (an exception's text may quote a row): e-mail
    addresses, card numbers and street addresses in it are masked
    (:func:`~sagakit.redaction.redact`).
    """
    return Outcome(ok=False, reason=redact(reason), retryable=retryable)


def reply_to(command: Envelope, outcome: Outcome, *, source: str, now: float) -> Envelope:
    """The reply envelope for ``command``; its id is derived from the command's id.

    Deriving the id means a participant that handles the same command twice (after a
    crash before its inbox commit) emits the same reply id, which the orchestrator's
    inbox then deduplicates.
    """
    if command.reply_to is None:
        raise MessageError(f"command {command.type} ({command.message_id}) has no reply_to")
    return Envelope(
        message_id=f"{command.message_id}/reply",
        type=f"{command.type}.reply",
        version=command.version,
        kind=MessageKind.REPLY,
        source=source,
        destination=command.reply_to,
        correlation_id=command.correlation_id,
        causation_id=command.message_id,
        saga_id=command.saga_id,
        business_key=command.business_key,
        step=command.step,
        attempt=command.attempt,
        fence=command.fence,
        idempotency_key=command.idempotency_key,
        compensates=command.compensates,
        occurred_at=now,
        payload=outcome.to_payload(),
        traceparent=command.traceparent,
        headers=command.headers,
    )
