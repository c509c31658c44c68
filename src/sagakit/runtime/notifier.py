"""The notifier: posts alerts (:mod:`sagakit.runtime.alerts`) to webhooks, at least once.

For each store of its engine, one pass of :meth:`Notifier.run_once`:

1. sweeps the store's open dead letters into its alert mailbox
   (:class:`~sagakit.runtime.alerts.DeadLetterSweep`);
2. routes new alerts (mailbox ``sagakit.alerts``) to one mailbox per webhook
   (``sagakit.alerts.<name>``), in one transaction, so that each webhook is retried
   and parked on its own: a receiver that is down delays no other;
3. delivers each webhook's alerts: a POST with the alert's dedup key as the
   ``Idempotency-Key`` header; a 2xx answer removes the row; anything else (an error
   status, a refused connection, a timeout) makes it visible again after an exponential
   backoff with jitter (at least what a ``Retry-After`` asks, up to ``max_backoff``),
   and after ``max_attempts`` tries it is parked as a dead letter of the webhook's
   endpoint with the last error as the reason, in the transaction that removes it.

A row is leased while it is posted, so two notifiers (two relay processes) never post
it at once; a notifier that dies mid-post leaves it to be posted again after the lease.
A receiver may thus get an alert twice, never zero times: it drops repeats by the key.

Posts use the standard library's HTTP client in a worker thread (sagakit's core has
no dependencies), bounded by the webhook's timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import http.client
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

from sagakit.core.definition import RetryPolicy
from sagakit.metrics import ALERT_DELIVERIES, on_commit
from sagakit.runtime.alerts import (
    ALERTS_ENDPOINT,
    AlertSettings,
    DeadLetterSweep,
    Webhook,
    load_alert,
)
from sagakit.runtime.wakeup import Wakeups
from sagakit.stores.base import QueuedMessage, Store

log = logging.getLogger(__name__)

__all__ = ["Answer", "Notifier", "Post", "alertmanager_payload", "payload", "sagakit_payload"]

_ALERTNAMES = {
    "FAILED_NEEDS_MANUAL": "SagakitSagaNeedsManual",
    "TIMED_OUT": "SagakitSagaTimedOut",
    "dead_letter": "SagakitDeadLetter",
}
_ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "no end": the alert still fires
_MAX_ERROR = 500  # characters of a receiver's answer kept in a retry's or dead letter's reason


@dataclass(frozen=True, slots=True)
class Answer:
    """What a webhook answered: the status and ``Retry-After`` in seconds, if any."""

    status: int
    retry_after: float | None = None
    text: str = ""


Post = Callable[[Webhook, bytes, Mapping[str, str]], Awaitable[Answer]]
"""Posts a body to a webhook with headers (:func:`http_post`; tests may pass another)."""


def link(settings: AlertSettings, alert: Mapping[str, Any]) -> str | None:
    """The console page of the alert's saga or dead letters (None without a console URL)."""
    if settings.console_url is None:
        return None
    if alert.get("kind") == "saga":
        return f"{settings.console_url}/console/sagas/{quote(str(alert['saga_id']), safe='')}"
    return f"{settings.console_url}/console/dead-letters"


def sagakit_payload(alert: Mapping[str, Any], settings: AlertSettings) -> dict[str, Any]:
    """sagakit's own payload: the alert's fields, its console link and ``at`` as RFC 3339."""
    body = dict(alert)
    body["at_iso"] = _rfc3339(float(alert["at"]))
    body["link"] = link(settings, alert)
    body["source"] = "sagakit"
    return body


def alertmanager_payload(
    alert: Mapping[str, Any], settings: AlertSettings, webhook: Webhook
) -> dict[str, Any]:
    """The Alertmanager webhook payload (version 4) of one firing alert.

    A receiver written for Alertmanager (PagerDuty's, Opsgenie's, a chat bridge) reads
    it as it reads Alertmanager's own; ``dedup_key`` is a label, and the fingerprint
    derives from it, so a repeat is recognisable there too.
    """
    kind = "dead_letter" if alert.get("kind") == "dead_letter" else str(alert.get("state"))
    name = _ALERTNAMES.get(kind, "SagakitAlert")
    labels: dict[str, str] = {
        "alertname": name,
        "severity": "warning" if kind == "TIMED_OUT" else "page",
        "source": "sagakit",
        "store": str(alert.get("store")),
        "dedup_key": str(alert["key"]),
    }
    if alert.get("kind") == "saga":
        labels.update(
            saga_id=str(alert["saga_id"]),
            definition=str(alert["definition"]),
            state=str(alert["state"]),
        )
        if alert.get("step"):
            labels["step"] = str(alert["step"])
        summary = f"saga {alert['saga_id']} ({alert['definition']}) is {alert['state']}"
    else:
        labels["endpoint"] = str(alert.get("endpoint"))
        summary = f"a message to {alert.get('endpoint')} was parked as a dead letter"
    reason = alert.get("reason") or ""
    annotations = {"summary": summary, "description": str(reason)}
    url = link(settings, alert)
    fingerprint = _fingerprint(str(alert["key"]))
    group = {"alertname": name}
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{name}"}}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": webhook.name,
        "groupLabels": group,
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": settings.console_url or "",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": annotations,
                "startsAt": _rfc3339(float(alert["at"])),
                "endsAt": _ZERO_TIME,
                "generatorURL": url or "",
                "fingerprint": fingerprint,
            }
        ],
    }


def payload(alert: Mapping[str, Any], settings: AlertSettings, webhook: Webhook) -> bytes:
    """The body posted to ``webhook`` for ``alert``, in the webhook's format."""
    if webhook.format == "alertmanager":
        doc = alertmanager_payload(alert, settings, webhook)
    else:
        doc = sagakit_payload(alert, settings)
    return json.dumps(doc, separators=(",", ":")).encode()


async def http_post(webhook: Webhook, body: bytes, headers: Mapping[str, str]) -> Answer:
    """POST ``body`` to the webhook (the standard library's client, in a thread)."""
    return await asyncio.wait_for(
        asyncio.to_thread(_post_blocking, webhook.url, body, dict(headers), webhook.timeout),
        # The socket timeout bounds each connect and read; this bounds the whole post.
        webhook.timeout * 2 + 1,
    )


def _post_blocking(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Answer:
    parts = urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.username is not None and "Authorization" not in headers:
        user = f"{parts.username}:{parts.password or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(user).decode()
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        text = response.read(_MAX_ERROR).decode("utf-8", "replace")
        return Answer(response.status, _retry_after(response.getheader("Retry-After")), text)
    finally:
        conn.close()


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (a number of seconds or an HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(when.timestamp() - time.time(), 0.0)
    return None


class Notifier:
    """Delivers the alerts of ``stores`` to ``settings.webhooks`` (see the module doc)."""

    def __init__(
        self,
        stores: Sequence[Store],
        settings: AlertSettings,
        *,
        wakeups: Wakeups | None = None,
        clock: Callable[[], float] = time.time,
        post: Post | None = None,
    ) -> None:
        self.stores = list(stores)
        self.settings = settings
        self.wakeups = wakeups or Wakeups()
        self.clock = clock
        self.post = post or http_post
        self.policy = RetryPolicy(
            max_attempts=settings.max_attempts,
            initial_backoff=settings.initial_backoff,
            max_backoff=settings.max_backoff,
            jitter=0.2,
        )
        self.sweeps = {s.name: DeadLetterSweep(s, clock) for s in self.stores}
        # A row is hidden from other notifiers while it is posted: longer than a post
        # (http_post gives up after twice the timeout and a second).
        self.lease = max(max(w.timeout for w in settings.webhooks) * 2 + 5, 10.0)
        self._failing: set[str] = set()

    async def run(self, running: Callable[[], bool]) -> None:
        """Pass after pass while ``running()``; woken early by the alert mailboxes'
        notifications (PostgreSQL), else every ``settings.poll`` seconds."""
        channel = f"queue:{ALERTS_ENDPOINT}"
        while running():
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("alert notifier failed; retrying")
            await self.wakeups.wait(channel, self.settings.poll)

    async def run_once(self) -> int:
        """One pass over every store; returns how many alerts were delivered."""
        delivered = 0
        for store in self.stores:
            try:
                await self.sweeps[store.name].sweep()
                await self._route(store)
                # Side by side: a receiver that times out holds up no other.
                hooks = self.settings.webhooks
                delivered += sum(await asyncio.gather(*(self._deliver(store, w) for w in hooks)))
                self._failing.discard(store.name)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Once per outage of a store, not once per pass.
                if store.name not in self._failing:
                    log.exception("alerts of store %s: pass failed; retrying", store.name)
                self._failing.add(store.name)
        return delivered

    async def _route(self, store: Store) -> None:
        """Copy new alerts to every webhook's mailbox and remove them, in one commit."""
        while True:
            now = self.clock()
            fresh = await store.queue_fetch(ALERTS_ENDPOINT, self.settings.batch, now, self.lease)
            if not fresh:
                return
            bodies = [m.body for m in fresh]
            async with on_commit(store.transaction()) as tx:
                await tx.queue_remove([m.id for m in fresh])
                for webhook in self.settings.webhooks:
                    await tx.queue_add(webhook.endpoint, bodies, now)
            if len(fresh) < self.settings.batch:
                return

    async def _deliver(self, store: Store, webhook: Webhook) -> int:
        # As many rows at a time as are posted at once: every post of a round then ends
        # (answered or timed out) within the lease its rows were fetched with.
        size = self.settings.concurrency
        delivered = 0
        while True:
            now = self.clock()
            rows = await store.queue_fetch(webhook.endpoint, size, now, self.lease)
            if not rows:
                return delivered
            done = await asyncio.gather(*(self._one(store, webhook, m) for m in rows))
            acked = [m.id for m, ok in zip(rows, done, strict=True) if ok]
            if acked:
                await store.queue_ack(acked)
                ALERT_DELIVERIES.labels(webhook.name, "delivered").inc(len(acked))
                delivered += len(acked)
            if len(rows) < size:
                return delivered

    async def _one(self, store: Store, webhook: Webhook, msg: QueuedMessage) -> bool:
        """Post one alert; True if the receiver took it (the caller removes the row)."""
        try:
            alert = load_alert(msg.body)
        except ValueError as exc:
            await self._park(store, webhook, msg, None, f"not an alert: {exc}")
            return False
        key = str(alert["key"])
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            "User-Agent": "sagakit-alerts",
            **webhook.headers,
        }
        retry_after: float | None = None
        try:
            answer = await self.post(webhook, payload(alert, self.settings, webhook), headers)
            if 200 <= answer.status < 300:
                log.info("alert %s delivered to %s", key, webhook.name, extra=_extra(alert))
                return True
            error = f"HTTP {answer.status}: {answer.text.strip()[:_MAX_ERROR]}".rstrip(": ")
            retry_after = answer.retry_after
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, reset, timed out, TLS: all worth a retry
            error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR] if str(exc) else type(exc).__name__
        if msg.deliveries >= self.settings.max_attempts:
            reason = f"webhook {webhook.name} failed {msg.deliveries} attempts; last: {error}"
            await self._park(store, webhook, msg, key, reason)
            return False
        delay = self.policy.backoff(msg.deliveries, key)
        if retry_after is not None:
            delay = min(max(delay, retry_after), self.settings.max_backoff)
        ALERT_DELIVERIES.labels(webhook.name, "failed").inc()
        log.warning(
            "alert %s to %s failed (attempt %d of %d), retrying in %.1fs: %s",
            key,
            webhook.name,
            msg.deliveries,
            self.settings.max_attempts,
            delay,
            error,
            extra=_extra(alert),
        )
        await store.queue_retry(msg.id, self.clock() + delay, error)
        return False

    async def _park(
        self, store: Store, webhook: Webhook, msg: QueuedMessage, key: str | None, reason: str
    ) -> None:
        """The alert, as a dead letter of the webhook's endpoint, out of its mailbox."""
        now = self.clock()
        async with on_commit(store.transaction()) as tx:
            await tx.dead_letter(webhook.endpoint, key, msg.body, reason, now)
            await tx.queue_remove([msg.id])
            ALERT_DELIVERIES.labels(webhook.name, "parked").inc()
        log.error("alert %s parked: %s", key, reason, extra={"endpoint": webhook.endpoint})


def _extra(alert: Mapping[str, Any]) -> dict[str, Any]:
    return {"saga_id": alert.get("saga_id"), "alert_key": alert.get("key")}


def _rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]
