"""Alerts: telling a person, through webhooks, that a saga or a message needs one.

An alert is raised when a saga enters ``FAILED_NEEDS_MANUAL`` or ``TIMED_OUT`` and when
a dead letter is parked. It travels through the store's own mailbox (the ``queue``
table), so it is as durable as the state it reports:

* a saga's alert is written by the transaction that moves the saga into that state
  (:meth:`AlertWriter.saga_changed`, called by the orchestrator and the choreography
  tracker), so a process that dies after the commit loses no alert, and a transaction
  that rolls back raises none;
* a dead letter is its own durable record, whoever parked it (a consumer, a relay, the
  set-aside desk, the broker's dead letters moved in by housekeeping, in any process):
  the notifier moves each open one into the mailbox exactly once
  (:class:`DeadLetterSweep`: the alert row and an idempotency record of the dead
  letter's key commit together).

Every alert has a dedup key (``saga:<id>:<state>:<version>`` or
``dead-letter:<store>:<id>``) that the webhook receives as the ``Idempotency-Key``
header and in the body: delivery is at least once (:mod:`sagakit.runtime.notifier`),
and the key lets a receiver drop a repeat. No business data travels: ids, names,
states, the step and the reason as stored (masked once more with
:func:`sagakit.redaction.redact`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState
from sagakit.errors import ConfigurationError
from sagakit.metrics import ALERTS_RAISED, on_commit
from sagakit.redaction import redact
from sagakit.stores.base import DeadLetter, Store, Tx

log = logging.getLogger(__name__)

__all__ = [
    "ALERTS_ENDPOINT",
    "ALERT_CONSUMER",
    "ALERT_STATES",
    "FORMATS",
    "AlertSettings",
    "AlertWriter",
    "DeadLetterSweep",
    "Webhook",
    "dead_letter_alert",
    "dead_letter_key",
    "load_alert",
    "saga_alerts",
]

ALERTS_ENDPOINT = "sagakit.alerts"
"""The mailbox endpoint new alerts are written to; each webhook has its own beneath it
(``sagakit.alerts.<webhook name>``), where its deliveries are retried."""
ALERT_CONSUMER = "sagakit.alerts"
"""The idempotency-record consumer under which a dead letter's alert is recorded once."""
ALERT_STATES = frozenset({SagaState.FAILED_NEEDS_MANUAL, SagaState.TIMED_OUT})
"""The saga states that raise an alert when a saga enters them."""
FORMATS = ("sagakit", "alertmanager")
"""Payload formats: sagakit's own JSON, or Alertmanager's webhook payload (version 4)."""

# The events that put a saga in a terminal state: "saga.finished" (orchestrated sagas),
# "manual.escalated" alone (a choreography's view, see sagakit.runtime.tracker).
_ENTERING = frozenset({"saga.finished", "manual.escalated"})
_MAX_REASON = 2000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,62}")


@dataclass(frozen=True, slots=True)
class Webhook:
    """Where alerts are posted: an ``http(s)`` URL and the payload ``format``.

    ``name`` identifies the webhook's delivery queue and labels its metrics; it must be
    stable across restarts and the same in every process (by default it derives from
    the URL, whose secrets it does not show). ``headers`` are sent with every post
    (an ``Authorization`` header, say); ``timeout`` bounds each post, in seconds.
    """

    url: str
    format: str = "sagakit"
    name: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 5.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                f"alert webhook {self._shown()!r} must be an http:// or https:// URL with a host"
            )
        if self.format not in FORMATS:
            raise ConfigurationError(
                f"alert webhook {self._shown()!r}: format {self.format!r} is unknown; "
                f"choose one of {', '.join(FORMATS)}"
            )
        if not self.name:
            digest = hashlib.sha256(self.url.encode()).hexdigest()[:10]
            object.__setattr__(self, "name", f"hook-{digest}")
        elif not _NAME.fullmatch(self.name):
            raise ConfigurationError(
                f"alert webhook name {self.name!r}: use 1 to 63 letters, digits, '-' or '_', "
                "starting with a letter or digit"
            )
        if not 0 < self.timeout < 600:  # NaN fails this comparison too
            raise ConfigurationError(
                f"alert webhook {self.name}: timeout must be between 0 and 600 seconds, "
                f"got {self.timeout}"
            )
        for key, value in self.headers.items():
            if not isinstance(key, str) or not isinstance(value, str) or "\n" in key + value:
                raise ConfigurationError(
                    f"alert webhook {self.name}: header {key!r} must be a single-line string"
                )

    @property
    def endpoint(self) -> str:
        """The mailbox endpoint of this webhook's deliveries."""
        return f"{ALERTS_ENDPOINT}.{self.name}"

    def _shown(self) -> str:
        """The URL without its password or query (which may hold a token)."""
        parts = urlsplit(self.url)
        host = parts.netloc.rsplit("@", 1)[-1]
        return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else self.url[:40]

    def __repr__(self) -> str:
        return f"Webhook(name={self.name!r}, url={self._shown()!r}, format={self.format!r})"


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """What an :class:`~sagakit.runtime.engine.Engine` alerts on and where it posts.

    With settings, the engine writes saga alerts in the transactions that raise them,
    and an engine with the ``relays`` role runs the notifier, which sweeps the dead
    letters of its stores and posts to ``webhooks``. Each post is retried with
    exponential backoff (``initial_backoff`` doubling up to ``max_backoff`` seconds,
    with jitter) and parked as a dead letter of the webhook's endpoint after
    ``max_attempts`` tries. ``console_url`` (the API's base URL, for example
    ``https://ops.example.com``) makes each alert link to its page in the console.
    ``poll``: seconds between looks for new alerts when nothing woke the notifier;
    ``batch``: new alerts handed to the webhooks' mailboxes per transaction;
    ``concurrency``: posts in flight at once per webhook.
    """

    webhooks: Sequence[Webhook]
    console_url: str | None = None
    max_attempts: int = 10
    initial_backoff: float = 1.0
    max_backoff: float = 300.0
    poll: float = 2.0
    batch: int = 50
    concurrency: int = 8

    def __post_init__(self) -> None:
        hooks = tuple(self.webhooks)
        object.__setattr__(self, "webhooks", hooks)
        if not hooks:
            raise ConfigurationError("alert settings need at least one webhook")
        names = [w.name for w in hooks]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"two alert webhooks share a name: {sorted(names)}")
        if self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff <= self.max_backoff < float("inf"):
            raise ConfigurationError(
                "alert backoffs must be finite and 0 <= initial_backoff <= max_backoff, got "
                f"{self.initial_backoff} and {self.max_backoff}"
            )
        if not 0 < self.poll < float("inf"):
            raise ConfigurationError(f"poll must be > 0 seconds, got {self.poll}")
        if self.batch < 1 or self.concurrency < 1:
            raise ConfigurationError("batch and concurrency must be >= 1")
        if self.console_url is not None:
            parts = urlsplit(self.console_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigurationError(
                    f"console_url {self.console_url!r} must be an http:// or https:// URL"
                )
            object.__setattr__(self, "console_url", self.console_url.rstrip("/"))


def saga_alerts(inst: SagaInstance, history: Sequence[HistoryEntry], store: str) -> list[str]:
    """The alerts (JSON bodies) of one transition: one if it put ``inst`` in an
    alerting state (:data:`ALERT_STATES`), else none.

    ``history`` is what the transition wrote; ``store`` names the saga's store.
    """
    if inst.state not in ALERT_STATES:
        return []
    entered = [h for h in history if h.event in _ENTERING and h.state is inst.state]
    if not entered:
        return []  # already there (a stale input recorded) or moved through it
    step = next((h.step for h in history if h.event == "manual.escalated" and h.step), None)
    at = entered[-1].at
    body = {
        "key": f"saga:{inst.saga_id}:{inst.state.value}:{inst.version}",
        "kind": "saga",
        "store": store,
        "saga_id": inst.saga_id,
        "definition": inst.definition,
        "definition_version": inst.definition_version,
        "state": inst.state.value,
        "version": inst.version,
        "step": step,
        "reason": None if inst.reason is None else _shown_reason(inst.reason),
        "at": at,
    }
    return [json.dumps(body, separators=(",", ":"))]


def dead_letter_alert(store: str, letter: DeadLetter) -> str:
    """The alert (JSON body) of a parked dead letter; none of its body travels."""
    body = {
        "key": dead_letter_key(store, letter.id),
        "kind": "dead_letter",
        "store": store,
        "dead_letter_id": letter.id,
        "endpoint": letter.endpoint,
        "message_id": letter.message_id,
        "reason": _shown_reason(letter.reason),
        "at": letter.at,
    }
    return json.dumps(body, separators=(",", ":"))


def _shown_reason(reason: str) -> str:
    """A reason as an alert carries it: masked once more, and at most 2,000 characters
    (a last error can quote a long answer; the console shows the whole)."""
    masked = redact(reason)
    return masked if len(masked) <= _MAX_REASON else masked[: _MAX_REASON - 1] + "\u2026"


def dead_letter_key(store: str, id: int) -> str:
    """The dedup key of dead letter ``id`` of ``store``."""
    return f"dead-letter:{store}:{id}"


class AlertWriter:
    """Writes the alerts of saga transitions into the transaction that makes them.

    The orchestrator and the choreography tracker call :meth:`saga_changed` with each
    transition they write (the engine sets it on them when alerts are configured).
    """

    def __init__(self, store: Store) -> None:
        self.store_name = store.name

    async def saga_changed(
        self, tx: Tx, inst: SagaInstance, history: Sequence[HistoryEntry], now: float
    ) -> None:
        """Add the transition's alert, if it raises one, to ``tx``'s mailbox rows."""
        bodies = saga_alerts(inst, history, self.store_name)
        if bodies:
            await tx.queue_add(ALERTS_ENDPOINT, bodies, now)
            ALERTS_RAISED.labels(inst.state.value).inc(len(bodies))  # counted at commit


class DeadLetterSweep:
    """Moves the open dead letters of one store into its alert mailbox, once each.

    In one transaction per batch: the dead letters' idempotency records (consumer
    :data:`ALERT_CONSUMER`, key ``dead-letter:<store>:<id>``) are read, and for each
    one without a record the alert row and the record are written. Two notifiers
    racing on one store cannot both commit a record, so each dead letter is alerted
    once; a crash before the commit leaves it to the next sweep. The alerts' own dead
    letters (a webhook that never answered) raise none: the notifier could not post
    them either; ``sagakit_dead_letters`` counts them.

    Reading every open dead letter at every sweep would cost as much as the backlog, so
    a sweep reads only when the number of dead letters changed (they are never
    deleted by sagakit) and remembers the highest id it handled; a full look every
    ``full_every`` sweeps covers dead letters a person deleted by hand.
    """

    def __init__(
        self, store: Store, clock: Callable[[], float], *, page: int = 500, full_every: int = 300
    ) -> None:
        self.store = store
        self.clock = clock
        self.page = page
        self.full_every = full_every
        self._seen_total: int | None = None
        self._high = 0
        self._sweeps = 0

    async def sweep(self) -> int:
        """Queue the alerts of open dead letters not alerted yet; return how many."""
        self._sweeps += 1
        full = self._sweeps % self.full_every == 0
        total = await self.store.dead_letter_count(settled=None)
        if total == self._seen_total and not full:
            return 0
        raised = 0
        offset = 0
        high = self._high
        while True:
            page = await self.store.dead_letters(settled=False, limit=self.page, offset=offset)
            fresh = [
                d
                for d in page
                if (full or d.id > self._high) and not d.endpoint.startswith(ALERTS_ENDPOINT)
            ]
            if fresh:
                raised += await self._raise(fresh)
            if page:
                high = max(high, max(d.id for d in page))
            if len(page) < self.page:
                break
            offset += self.page
        self._high, self._seen_total = high, total
        return raised

    async def _raise(self, letters: Sequence[DeadLetter]) -> int:
        name = self.store.name
        keys = {dead_letter_key(name, d.id): d for d in letters}
        now = self.clock()
        async with on_commit(self.store.transaction()) as tx:
            done = await tx.idempotency_get_many(ALERT_CONSUMER, list(keys))
            new = [(k, d) for k, d in keys.items() if k not in done]
            for key, _ in new:
                await tx.idempotency_put(ALERT_CONSUMER, key, {"alerted": True}, now)
            if new:
                await tx.queue_add(
                    ALERTS_ENDPOINT, [dead_letter_alert(name, d) for _, d in new], now
                )
                ALERTS_RAISED.labels("dead_letter").inc(len(new))
        for _, d in new:
            log.info(
                "alert raised for dead letter %s of %s",
                d.id,
                name,
                extra={"message_id": d.message_id, "endpoint": d.endpoint, "store": name},
            )
        return len(new)


def load_alert(body: str) -> dict[str, Any]:
    """An alert row's body as a dict (``ValueError`` if it is not one of ours)."""
    alert = json.loads(body)
    if not isinstance(alert, dict) or not isinstance(alert.get("key"), str):
        raise ValueError("not an alert: no key")
    return alert
