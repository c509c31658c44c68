"""A fake notification provider (an e-mail or SMS gateway), kept as tables in the store
of the service that calls it.

A real provider is an HTTP API in somebody else's data centre. What matters to a saga
is how it behaves, and this fake behaves like the good ones:

* it deduplicates by the key the caller gives it (``Idempotency-Key``): a second
  request with a key it has seen sends nothing and answers with the first message;
* it has weather. Each customer's messages go out on a *route* (a region, a carrier),
  and a route may be **down** for a while (every request refused: nothing sent) or
  **slow** (the message goes out, but the answer comes after the caller stopped
  waiting: the caller cannot tell "sent" from "not sent").

The weather is decided by data, never by chance, so that a seed replays exactly: a
route's windows (:data:`ROUTES`) start when the provider first hears about an order,
and ``setup`` writes them to the ``provider_routes`` table scaled by the app's
``time_scale``. The table ``provider_messages`` is what the provider accepted (one row
per key: its dedup), ``provider_deliveries`` what reached the customer's phone or inbox
(one row per message actually sent: the ledger the invariants read).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sagakit import Envelope, MessageError, StepFailed
from sagakit.stores.base import Tx


@dataclass(frozen=True, slots=True)
class Weather:
    """How a route behaves from the provider's first request for an order on:
    refusing everything for ``down_for`` seconds, then answering too late (after
    sending) until ``slow_for`` seconds, story time (scaled by the app's time scale)."""

    down_for: float = 0.0
    slow_for: float = 0.0


ROUTES: dict[str, Weather] = {
    "ok": Weather(),
    # Answers late for two minutes: each try in that time sends (the first time a key
    # is seen) and then times out at the caller, who tries again.
    "slow": Weather(slow_for=120.0),
    # A four-minute outage: retried with backoff, then it goes through.
    "down": Weather(down_for=240.0),
    # A three-hour outage, far past the saga's deadline: a person takes over.
    "outage": Weather(down_for=3 * 3600.0),
}
"""The routes of the fake providers and their weather, in story seconds."""

MIGRATIONS = [
    """
    CREATE TABLE provider_routes (
        route    TEXT NOT NULL PRIMARY KEY,
        down_for DOUBLE PRECISION NOT NULL,
        slow_for DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE provider_contacts (
        order_id TEXT NOT NULL PRIMARY KEY,
        first_at DOUBLE PRECISION NOT NULL,
        requests BIGINT NOT NULL
    );
    CREATE TABLE provider_messages (
        provider_key TEXT NOT NULL PRIMARY KEY,
        message_id   TEXT NOT NULL UNIQUE,
        order_id     TEXT NOT NULL,
        accepted_at  DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE provider_deliveries (
        message_id   TEXT NOT NULL PRIMARY KEY,
        order_id     TEXT NOT NULL,
        customer     TEXT NOT NULL,
        delivered_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX provider_deliveries_order ON provider_deliveries (order_id);
    """,
]
"""The fake provider's tables (the same in the e-mail and the SMS service's store)."""


class Answer(StrEnum):
    """What the caller got back from one request."""

    SENT = "sent"
    """The provider accepted the message (now, or earlier under the same key)."""
    REFUSED = "refused"
    """The provider is down: nothing was sent."""
    LATE = "late"
    """No answer in time: the provider may well have sent it (this fake always did)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """The provider's answer to one request, and the message id when it was sent."""

    answer: Answer
    message_id: str | None = None
    duplicate: bool = False
    """True when the key was seen before: nothing new went out."""


async def seed_routes(tx: Tx, scale: float) -> None:
    """Write the routes' weather, scaled to the app's time scale (idempotent)."""
    await tx.execute("DELETE FROM provider_routes")
    for route, weather in sorted(ROUTES.items()):
        await tx.execute(
            "INSERT INTO provider_routes (route, down_for, slow_for) VALUES (?, ?, ?)",
            (route, weather.down_for * scale, weather.slow_for * scale),
        )


async def request(
    tx: Tx,
    *,
    channel: str,
    provider_key: str,
    order_id: str,
    customer: str,
    route: str,
    now: float,
) -> Reply:
    """One request to the provider: send a message about ``order_id`` to ``customer``
    on ``route``, deduplicated by ``provider_key``. Runs in the caller's transaction
    (a fake: a real provider's effects would not roll back with it)."""
    contact = await tx.fetchone(
        "SELECT first_at FROM provider_contacts WHERE order_id = ?", (order_id,)
    )
    if contact is None:
        first_at = now
        await tx.execute(
            "INSERT INTO provider_contacts (order_id, first_at, requests) VALUES (?, ?, 1)",
            (order_id, now),
        )
    else:
        first_at = float(contact[0])
        await tx.execute(
            "UPDATE provider_contacts SET requests = requests + 1 WHERE order_id = ?",
            (order_id,),
        )
    weather = await tx.fetchone(
        "SELECT down_for, slow_for FROM provider_routes WHERE route = ?", (route,)
    )
    down_for, slow_for = (0.0, 0.0) if weather is None else (float(weather[0]), float(weather[1]))
    if now < first_at + down_for:
        return Reply(Answer.REFUSED)
    seen = await tx.fetchone(
        "SELECT message_id FROM provider_messages WHERE provider_key = ?", (provider_key,)
    )
    if seen is not None:
        message_id, duplicate = str(seen[0]), True
    else:
        count = await tx.fetchone(
            "SELECT COUNT(*) FROM provider_messages WHERE order_id = ?", (order_id,)
        )
        message_id = f"{channel}-{order_id}-{int(count[0]) + 1 if count else 1}"
        duplicate = False
        await tx.execute(
            "INSERT INTO provider_messages (provider_key, message_id, order_id, accepted_at) "
            "VALUES (?, ?, ?, ?)",
            (provider_key, message_id, order_id, now),
        )
        await tx.execute(
            "INSERT INTO provider_deliveries (message_id, order_id, customer, delivered_at) "
            "VALUES (?, ?, ?, ?)",
            (message_id, order_id, customer, now),
        )
    if now < first_at + slow_for:
        return Reply(Answer.LATE)
    return Reply(Answer.SENT, message_id, duplicate)


async def send(
    tx: Tx,
    *,
    channel: str,
    provider_key: str,
    order_id: str,
    customer: str,
    route: str,
    now: float,
) -> dict[str, str | bool]:
    """A service's call to its provider, as a step's result: the message id when the
    provider took the message; :class:`~sagakit.StepFailed` with ``retryable=True``
    when it is down or did not answer in time (after the pivot the saga tries again,
    with backoff, until its deadline)."""
    reply = await request(
        tx,
        channel=channel,
        provider_key=provider_key,
        order_id=order_id,
        customer=customer,
        route=route,
        now=now,
    )
    if reply.answer is Answer.REFUSED:
        raise StepFailed(f"the {channel} provider is down on route {route!r}", retryable=True)
    if reply.answer is Answer.LATE:
        # The provider may have sent it: only its dedup on the same key makes the next
        # try safe.
        raise StepFailed(
            f"no answer from the {channel} provider in time on route {route!r}", retryable=True
        )
    assert reply.message_id is not None
    return {"message": reply.message_id, "duplicate": reply.duplicate}


def key_of(command: Envelope) -> str:
    """The key to give the provider: the command's idempotency key, the same for every
    try of the step (a saga's commands always carry one)."""
    if not command.idempotency_key:
        raise MessageError(
            f"{command.type} {command.message_id} has no idempotency key: the provider "
            "could not deduplicate its retries"
        )
    return command.idempotency_key
