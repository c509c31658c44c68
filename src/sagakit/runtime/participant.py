"""Participants: services that own their data and handle commands.

Every command is handled in ONE local transaction with its inbox record, the business
writes of the handler, the idempotency record and the reply in the outbox. On top of
that, the runtime gives every participant the same safety, so handlers stay plain
business code:

* a repeated command (same idempotency key, e.g. a retry after a lost reply) gets the
  outcome recorded the first time, and the handler is not called again;
* a compensation whose action has no recorded outcome records a *tombstone* for the
  action's key, so a late action is refused, never applied after its undo; the
  compensation handler still runs, because an action that failed with a retryable
  error may have had an effect (compensation handlers must accept "nothing to undo");
* a compensation whose action failed definitely has nothing to undo: the handler is
  not called.

Handlers return an :class:`~sagakit.core.envelope.Outcome` or a result dict, or raise
:class:`~sagakit.errors.StepFailed`; any other exception rolls the transaction back
and the message is delivered again (then parked, after too many tries).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeAlias

from sagakit.core.envelope import (
    MANUAL_RETRY,
    Envelope,
    MessageKind,
    Outcome,
    failure,
    reply_to,
    success,
    traceparent_for,
)
from sagakit.errors import ConfigurationError, MessageError, StepFailed, UnknownMessageType
from sagakit.runtime.consumer import BatchConsumer
from sagakit.runtime.wakeup import Wakeups
from sagakit.stores.base import IdempotencyRecord, Store, Tx

log = logging.getLogger(__name__)

HandlerResult: TypeAlias = "Outcome | Mapping[str, Any] | None"
Handler: TypeAlias = Callable[[Tx, Envelope], "Awaitable[HandlerResult] | HandlerResult"]

REFUSED_AFTER_COMPENSATION = "refused: this action was already compensated"


class Participant(BatchConsumer):
    """A service endpoint with command handlers, run with inbox, outbox and idempotency."""

    def __init__(self, name: str, store: Store, *, wakeups: Wakeups | None = None, **kwargs: Any):
        super().__init__(name, store, **kwargs)
        self.name = name
        self.wakeups = wakeups or Wakeups()
        self._handlers: dict[str, Handler] = {}
        self.subscriptions: set[str] = set()
        """Event types this participant reacts to (the relay fans events out by them)."""

    def handles(self, message_type: str) -> Callable[[Handler], Handler]:
        """Decorator registering the handler of a command (or compensation, or query) type."""

        def register(fn: Handler) -> Handler:
            self.add_handler(message_type, fn)
            return fn

        return register

    def on_event(self, event_type: str) -> Callable[[Handler], Handler]:
        """Decorator: react to the event ``event_type`` (choreography).

        The handler runs in one transaction with the inbox record; it may write
        business data and :meth:`emit` further events. There is no reply.
        """

        def register(fn: Handler) -> Handler:
            self.add_handler(event_type, fn)
            self.subscriptions.add(event_type)
            return fn

        return register

    async def emit(
        self,
        tx: Tx,
        event_type: str,
        payload: Mapping[str, Any],
        *,
        cause: Envelope | None = None,
        correlation_id: str | None = None,
        business_key: str | None = None,
        version: int = 1,
        now: float,
    ) -> Envelope:
        """Write the event ``event_type`` (a fact, past tense) to the outbox in ``tx``.

        With ``cause`` (the message being handled) the event continues its trace: same
        correlation id, business key and saga id, causation = the cause, and a message
        id derived from the cause's, so handling the cause twice emits one event id.
        Without it, ``correlation_id`` starts a new flow (e.g. a placed order).
        """
        if cause is not None:
            message_id = f"{cause.message_id}/{event_type}"
            correlation = cause.correlation_id
            key = business_key or cause.business_key
            saga_id = cause.saga_id
            traceparent = cause.traceparent
        else:
            if not correlation_id:
                raise ConfigurationError(f"emit {event_type}: give a cause or a correlation_id")
            message_id = f"{correlation_id}/{event_type}"
            correlation = correlation_id
            key = business_key
            saga_id = correlation_id
            traceparent = traceparent_for(correlation_id, message_id)
        event = Envelope(
            message_id=message_id,
            type=event_type,
            version=version,
            kind=MessageKind.EVENT,
            source=self.name,
            correlation_id=correlation,
            causation_id=None if cause is None else cause.message_id,
            saga_id=saga_id,
            business_key=key,
            occurred_at=now,
            payload=dict(payload),
            traceparent=traceparent,
        )
        await tx.outbox_add([event], now)
        return event

    def add_handler(self, message_type: str, fn: Handler) -> None:
        """Register ``fn`` for ``message_type``; one handler per type."""
        if message_type in self._handlers:
            raise ConfigurationError(f"{self.name}: {message_type!r} already has a handler")
        self._handlers[message_type] = fn

    @property
    def message_types(self) -> list[str]:
        """The types this participant handles."""
        return sorted(self._handlers)

    def after_commit(self) -> None:
        self.wakeups.notify(f"outbox:{self.store.name}")

    async def process(self, tx: Tx, envelope: Envelope, now: float) -> None:
        if not await tx.inbox_add(self.name, envelope.message_id, now):
            return  # a duplicate delivery: handled before, reply already in the outbox
        handler = self._handlers.get(envelope.type)
        if handler is None:
            raise UnknownMessageType(
                f"{self.name} has no handler for {envelope.type!r}; it handles {self.message_types}"
            )
        if envelope.kind in (MessageKind.QUERY, MessageKind.EVENT) or not envelope.idempotency_key:
            outcome = await self._call(handler, tx, envelope)
        else:
            outcome = await self._handle_keyed(handler, tx, envelope, now)
        if envelope.reply_to is not None:
            await tx.outbox_add([reply_to(envelope, outcome, source=self.name, now=now)], now)

    async def _handle_keyed(self, handler: Handler, tx: Tx, env: Envelope, now: float) -> Outcome:
        key = env.idempotency_key
        assert key is not None
        generation = _generation(env)
        recorded = await self._latest(tx, key, generation)
        record_key = key
        if recorded is not None:
            if recorded.tombstone:
                return failure(REFUSED_AFTER_COMPENSATION)
            this_generation = f"{key}#m{generation}"
            if recorded.outcome.get("ok") or not generation or recorded.key == this_generation:
                return Outcome.from_payload(recorded.outcome)
            # A definite failure, and a person asked to try again after fixing its cause:
            # run the handler once more and keep the new answer beside the old one.
            record_key = this_generation
        if env.compensates is not None:
            action = await self._latest(tx, env.compensates, generation)
            if action is None:
                # The compensation overtook its action, or the action never arrived, or it
                # ended in a retryable failure that may still have had an effect (a card
                # provider that timed out after authorising). Tombstone the action's key so
                # a late action is refused, and let the handler undo whatever it finds.
                await tx.idempotency_put(
                    self.name,
                    env.compensates,
                    failure(REFUSED_AFTER_COMPENSATION).to_payload(),
                    now,
                    tombstone=True,
                )
            elif not action.tombstone and not action.outcome.get("ok"):
                # A definite failure had no effect: nothing to undo.
                outcome = success({"compensated": False, "why": "the action had no effect"})
                await tx.idempotency_put(self.name, record_key, outcome.to_payload(), now)
                return outcome
        outcome = await self._call(handler, tx, env)
        # A retryable failure is not an answer: the next attempt must run the handler again.
        if outcome.ok or not outcome.retryable:
            await tx.idempotency_put(self.name, record_key, outcome.to_payload(), now)
        return outcome

    async def _latest(self, tx: Tx, key: str, generation: int) -> IdempotencyRecord | None:
        """The newest record for ``key``: a person's latest retry first, then the original."""
        for n in range(generation, 0, -1):
            record = await tx.idempotency_get(self.name, f"{key}#m{n}")
            if record is not None:
                return record
        return await tx.idempotency_get(self.name, key)

    async def _call(self, handler: Handler, tx: Tx, env: Envelope) -> Outcome:
        try:
            result = handler(tx, env)
            if inspect.isawaitable(result):
                result = await result
        except StepFailed as exc:
            return failure(exc.reason, retryable=exc.retryable)
        if isinstance(result, Outcome):
            return result
        if result is None:
            return success()
        if isinstance(result, Mapping):
            return success(dict(result))
        raise TypeError(
            f"{self.name} handler for {env.type} returned {type(result).__name__}; "
            "return an Outcome, a dict or None, or raise StepFailed"
        )


def _generation(env: Envelope) -> int:
    raw = env.headers.get(MANUAL_RETRY, "0")
    if not raw.isdigit():
        raise MessageError(f"header {MANUAL_RETRY} must be a count, got {raw!r}")
    return int(raw)
