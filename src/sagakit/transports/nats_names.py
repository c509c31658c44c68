"""How the NATS transport names things: endpoints as subject tokens, the id of each
published copy, the headers it adds, and a dead letter as ``<stream>_dlq`` keeps it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sagakit.core.envelope import REPLAYED_FROM, Envelope

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")

HEADER_REASON = "Sagakit-Dead-Letter-Reason"
HEADER_MESSAGE_ID = "Sagakit-Message-Id"


def token(endpoint: str) -> str:
    """``endpoint`` as one subject token and consumer name (NATS allows no '.' there).

    Letters, digits and '_' stay; any other character becomes ``-xx`` (its hex code),
    so the mapping is reversible and two endpoints never share a token.
    """
    return _UNSAFE.sub(lambda m: "".join(f"-{b:02x}" for b in m.group().encode()), endpoint)


def untoken(name: str) -> str:
    """Inverse of :func:`token`."""
    return re.sub(
        r"(?:-[0-9a-f]{2})+",
        lambda m: bytes.fromhex(m.group().replace("-", "")).decode("utf-8", "replace"),
        name,
    )


def copy_id(env: Envelope) -> str:
    """The ``Nats-Msg-Id`` of one published copy of ``env``.

    One id per copy: an event fanned out to several endpoints shares its message id,
    and JetStream dedups per stream. A replayed dead letter (``REPLAYED_FROM``) is a new
    copy, or JetStream would drop it within the duplicate window; a relay's ordinary
    re-publish of the same outbox row keeps the same id and is still deduplicated.
    """
    base = f"{env.message_id}@{env.destination}"
    replay = env.headers.get(REPLAYED_FROM)
    return base if replay is None else f"{base}#replay:{replay}"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message the broker gave up on, as copied into ``<stream>_dlq``."""

    endpoint: str
    body: str
    reason: str
    message_id: str | None
    headers: dict[str, str] = field(default_factory=dict)
