"""Reading command payloads: a malformed one is a definite failure, never an exception.

An exception in a handler rolls its transaction back and the message is delivered
again, then parked as a dead letter; a payload that is wrong stays wrong, so the
handlers answer it with :class:`~sagakit.StepFailed` instead.
"""

from __future__ import annotations

from sagakit import Envelope, StepFailed


def text_of(env: Envelope, name: str) -> str:
    """The payload's non-empty string ``name``."""
    value = env.payload.get(name)
    if not isinstance(value, str) or not value:
        raise StepFailed(f"{env.type}: {name!r} must be a non-empty string, got {value!r}")
    return value


def amount_of(env: Envelope) -> int:
    """The payload's ``amount``: a positive integer of cents."""
    value = env.payload.get("amount")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise StepFailed(f"{env.type}: 'amount' must be a positive number of cents, got {value!r}")
    return value
