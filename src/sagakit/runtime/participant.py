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
and the message is delivered again (then parked, after too many tries). A command
handler whose answer depends on later messages (a choreography inside the service)
returns :data:`DEFER` and answers later with :meth:`Participant.answer`.

With ``schemas`` (e.g. a :class:`sagakit.schemas.SchemaRegistry`), every message is
validated (and upcast to its current version) before its handler sees it, and every
emitted event before it is written; an invalid payload is a
:class:`~sagakit.errors.MessageError`, so the message is parked with the reason.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Protocol, TypeAlias

from sagakit.clock import using
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
from sagakit.metrics import on_commit
from sagakit.observability import handler_span
from sagakit.runtime.consumer import BatchConsumer
from sagakit.runtime.own_tx import OwnTransactions, adopt, is_tx, refuse_async, run_sync
from sagakit.runtime.wakeup import Wakeups
from sagakit.stores.base import IdempotencyRecord, Store, Tx

log = logging.getLogger(__name__)


class _Deferred:
    """The type of :data:`DEFER`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFER"


DEFER: Final = _Deferred()
"""Returned by a command handler: "no answer yet". Nothing is recorded under the
command's idempotency key and no reply is sent; a repeat of the command runs the
handler again (it should find its own pending record and defer again). The answer
goes out later, in another handler's transaction, with :meth:`Participant.answer`."""

HandlerResult: TypeAlias = "Outcome | Mapping[str, Any] | _Deferred | None"
Handler: TypeAlias = Callable[[Tx, Envelope], "Awaitable[HandlerResult] | HandlerResult"]

REFUSED_AFTER_COMPENSATION = "refused: this action was already compensated"


class MessageSchemas(Protocol):
    """Payload validation a participant applies (see :mod:`sagakit.schemas`)."""

    def incoming(self, envelope: Envelope) -> Envelope:
        """The message as its handler should see it (upcast); ``MessageError`` if invalid."""
        ...

    def outgoing(
        self, message_type: str, version: int | None, payload: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """The version and validated payload to emit; ``MessageError`` if invalid."""
        ...


class Participant(BatchConsumer):
    """A service endpoint with command handlers, run with inbox, outbox and idempotency."""

    def __init__(
        self,
        name: str,
        store: Store,
        *,
        wakeups: Wakeups | None = None,
        schemas: MessageSchemas | None = None,
        transaction: object | None = None,
        **kwargs: Any,
    ):
        super().__init__(name, store, **kwargs)
        self.name = name
        self.wakeups = wakeups or Wakeups()
        self.schemas = schemas
        self.own_transactions = None if transaction is None else OwnTransactions(transaction, store)
        """With ``transaction=`` (your transaction factory: a SQLAlchemy sessionmaker, a
        psycopg pool, a connect callable...), every batch runs in a transaction of yours:
        handlers get an :class:`~sagakit.runtime.own_tx.OwnTx` (``tx.session``,
        ``tx.connection``). See :mod:`sagakit.runtime.own_tx`."""
        self._handlers: dict[str, Handler] = {}
        self._batches: dict[int, _Records] = {}  # id(tx) -> its records, while a batch runs
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
        version: int | None = None,
        now: float,
    ) -> Envelope:
        """Write the event ``event_type`` (a fact, past tense) to the outbox in ``tx``.

        With ``cause`` (the message being handled) the event continues its trace: same
        correlation id, business key and saga id, causation = the cause, and a message
        id derived from the cause's, so handling the cause twice emits one event id.
        Without it, ``correlation_id`` starts a new flow (e.g. a placed order).
        ``version`` defaults to the schema's current version (1 without ``schemas``).
        """
        if self.schemas is not None:
            version, payload = self.schemas.outgoing(event_type, version, payload)
        version = version or 1
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

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """A store transaction, or one of yours with ``transaction=`` (see ``__init__``)."""
        if self.own_transactions is None:
            return super().transaction()
        return on_commit(self.own_transactions())

    async def process(self, tx: Tx, envelope: Envelope, now: float) -> None:
        if not await tx.inbox_add(self.name, envelope.message_id, now):
            self.duplicates.inc()
            return  # a duplicate delivery: handled before, reply already in the outbox
        await self._process_new(tx, envelope, now)

    async def process_batch(self, tx: Tx, envelopes: Sequence[Envelope], now: float) -> None:
        """Handle a batch in ``tx``: one inbox insert for all, then each new message in order.

        A message the inbox already holds, or a second copy within the batch, is a
        duplicate delivery: counted and skipped, as in :meth:`process`. The idempotency
        records of the batch's commands are read with one statement; what a message
        records (an outcome, a tombstone) is seen by the messages after it in the batch.
        """
        # The records of every message's keys, duplicates' too (rare; the cost of
        # not waiting for the inbox's answer before asking).
        keys = list(dict.fromkeys(k for e in envelopes for k in _keys_read(e)))
        fresh, found = await tx.inbox_add_and_read(
            self.name, [e.message_id for e in envelopes], now, keys
        )
        records = self._batches[id(tx)] = _Records(tx, self.name)
        try:
            records.know(keys, found)
            for env in envelopes:
                with handler_span(self.endpoint, env):
                    if env.message_id not in fresh:
                        self.duplicates.inc()
                        continue
                    fresh.discard(env.message_id)  # a later copy in this batch is a duplicate
                    await self._process_new(tx, env, now)
        finally:
            del self._batches[id(tx)]

    async def _process_new(self, tx: Tx, envelope: Envelope, now: float) -> None:
        """Handle a message the inbox has just recorded (in ``tx``)."""
        handler = self._handlers.get(envelope.type)
        if handler is None:
            raise UnknownMessageType(
                f"{self.name} has no handler for {envelope.type!r}; it handles {self.message_types}"
            )
        if self.schemas is not None:
            envelope = self.schemas.incoming(envelope)
        if envelope.kind in (MessageKind.QUERY, MessageKind.EVENT) or not envelope.idempotency_key:
            outcome = await self._call(handler, tx, envelope)
        else:
            outcome = await self._handle_keyed(handler, tx, envelope, now)
        if envelope.reply_to is not None and isinstance(outcome, Outcome):
            await tx.outbox_add([reply_to(envelope, outcome, source=self.name, now=now)], now)

    async def answer(
        self, tx: Tx | object, command: Envelope, result: Outcome | Mapping[str, Any], now: float
    ) -> bool:
        """Answer a command whose handler returned :data:`DEFER`, inside ``tx``.

        Records the outcome under the command's idempotency key (so a repeat gets it)
        and writes the reply. Returns False, writing nothing, when the key already has
        an answer or a tombstone (a compensation came first): a command is answered once.

        ``tx`` is a sagakit Tx, or your own open transaction on the store's database (a
        connection or session, see :mod:`sagakit.runtime.own_tx`): the record and the
        reply are then written in it, with your rows, and you commit it.
        """
        if not is_tx(tx):
            async with adopt(tx, self.store) as adopted:
                return await self.answer(adopted, command, result, now)
        outcome = result if isinstance(result, Outcome) else success(dict(result))
        key = command.idempotency_key
        if key is not None:
            records = self._records(tx)
            generation = _generation(command)
            recorded = await records.latest(key, generation)
            record_key = key
            if recorded is not None:
                this_generation = f"{key}#m{generation}"
                if (
                    recorded.tombstone
                    or recorded.outcome.get("ok")
                    or not generation
                    or recorded.key == this_generation
                ):
                    return False
                record_key = this_generation
                await _supersede(records, key, recorded.key, generation, now)
            if outcome.ok or not outcome.retryable:
                await records.put(record_key, outcome.to_payload(), now)
        if command.reply_to is not None:
            await tx.outbox_add([reply_to(command, outcome, source=self.name, now=now)], now)
        return True

    def answer_sync(
        self, conn: object, command: Envelope, result: Outcome | Mapping[str, Any], now: float
    ) -> bool:
        """:meth:`answer` in your sync connection's or session's transaction, without an
        event loop (a Flask or Django request); you commit it."""
        refuse_async(conn, "answer_sync", "await participant.answer(...)")
        return run_sync(self.answer(conn, command, result, now), "answer_sync")

    async def _handle_keyed(
        self, handler: Handler, tx: Tx, env: Envelope, now: float
    ) -> Outcome | _Deferred:
        key = env.idempotency_key
        assert key is not None
        records = self._records(tx)
        generation = _generation(env)
        recorded = await records.latest(key, generation)
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
            await _supersede(records, key, recorded.key, generation, now)
        if env.compensates is not None:
            action = await records.latest(env.compensates, generation)
            if action is None:
                # The compensation overtook its action, or the action never arrived, or it
                # ended in a retryable failure that may still have had an effect (a card
                # provider that timed out after authorising). Tombstone the action's key so
                # a late action is refused, and let the handler undo whatever it finds.
                await records.put(
                    env.compensates,
                    failure(REFUSED_AFTER_COMPENSATION).to_payload(),
                    now,
                    tombstone=True,
                )
            elif not action.tombstone and not action.outcome.get("ok"):
                # A definite failure had no effect: nothing to undo.
                outcome = success({"compensated": False, "why": "the action had no effect"})
                await records.put(record_key, outcome.to_payload(), now)
                return outcome
        result = await self._call(handler, tx, env)
        if isinstance(result, _Deferred):
            return result  # answered later, by answer()
        # A retryable failure is not an answer: the next attempt must run the handler again.
        if result.ok or not result.retryable:
            await records.put(record_key, result.to_payload(), now)
        return result

    def _records(self, tx: Tx) -> _Records:
        """The records of the batch running in ``tx``, or uncached ones outside a batch."""
        return self._batches.get(id(tx)) or _Records(tx, self.name)

    async def _call(self, handler: Handler, tx: Tx, env: Envelope) -> Outcome | _Deferred:
        try:
            with using(self.clock):  # sagakit.now() in the handler reads this clock
                result = handler(tx, env)
                if inspect.isawaitable(result):
                    result = await result
        except StepFailed as exc:
            return failure(exc.reason, retryable=exc.retryable)
        if isinstance(result, Outcome | _Deferred):
            return result
        if result is None:
            return success()
        if isinstance(result, Mapping):
            return success(dict(result))
        raise TypeError(
            f"{self.name} handler for {env.type} returned {type(result).__name__}; "
            "return an Outcome, a dict or None, or raise StepFailed"
        )


class _Records:
    """The idempotency records of one consumer as one transaction sees them.

    A record is written once and never changes, so one read stays true for the whole
    transaction. A key read as missing stays missing until the transaction writes it,
    and the participant writes through :meth:`put`, which remembers what it wrote. (A
    concurrent transaction writing the same key makes the later write fail, and the
    batch is retried: the cache never hides another writer.)
    """

    __slots__ = ("_consumer", "_known", "_tx", "_written")

    def __init__(self, tx: Tx, consumer: str) -> None:
        self._tx = tx
        self._consumer = consumer
        self._known: dict[str, IdempotencyRecord | None] = {}
        self._written: set[str] = set()

    def know(self, keys: Sequence[str], found: Mapping[str, IdempotencyRecord]) -> None:
        """Take the records of ``keys`` read by the caller (missing ones: none)."""
        for key in keys:
            self._known.setdefault(key, found.get(key))

    async def get(self, key: str) -> IdempotencyRecord | None:
        if key not in self._known:
            self._known[key] = await self._tx.idempotency_get(self._consumer, key)
        record = self._known[key]
        if record is not None and key in self._written:
            # As the store would give it back: a copy through JSON, not the writer's dict.
            outcome = json.loads(json.dumps(record.outcome))
            return IdempotencyRecord(key, outcome, record.tombstone, record.at)
        return record

    async def latest(self, key: str, generation: int) -> IdempotencyRecord | None:
        """The newest record for ``key``: a person's latest retry first, then the original."""
        for name in _generations(key, generation):
            record = await self.get(name)
            if record is not None:
                return record
        return None

    async def put(
        self, key: str, outcome: dict[str, Any], now: float, *, tombstone: bool = False
    ) -> None:
        self._known.pop(key, None)  # if the write fails, the next read asks the store
        await self._tx.idempotency_put(self._consumer, key, outcome, now, tombstone=tombstone)
        self._known[key] = IdempotencyRecord(key, outcome, tombstone, now)
        self._written.add(key)


async def _supersede(records: _Records, key: str, found: str, generation: int, now: float) -> None:
    """Retry number ``generation`` of a person runs the handler again: record the retries
    between the record found (``found``) and this one as superseded.

    A command reads the records of its own retry and older ones only, so without this a
    command of an earlier retry still in flight (the person retried twice) would find
    none and run the handler a second time after this retry's effect. Every name between
    ``found`` and this retry was just read as missing, so each is written once.
    """
    start = 0 if found == key else int(found[len(key) + 2 :])
    for n in range(start + 1, generation):
        outcome = failure(f"superseded: a person retried this command again (retry {generation})")
        await records.put(f"{key}#m{n}", outcome.to_payload(), now)


def _generations(key: str, generation: int) -> list[str]:
    """The record names of ``key``, newest first: ``key#mN`` ... ``key#m1``, ``key``."""
    if not generation:
        return [key]
    return [f"{key}#m{n}" for n in range(generation, 0, -1)] + [key]


def _keys_read(env: Envelope) -> list[str]:
    """The record names handling ``env`` may read (none for events and queries)."""
    if env.kind in (MessageKind.QUERY, MessageKind.EVENT) or not env.idempotency_key:
        return []
    try:
        generation = _generation(env)
    except MessageError:
        return []  # reported when the message's turn comes
    keys = _generations(env.idempotency_key, generation)
    if env.compensates is not None:
        keys += _generations(env.compensates, generation)
    return keys


def _generation(env: Envelope) -> int:
    raw = env.headers.get(MANUAL_RETRY, "0")
    if not raw.isdigit():
        raise MessageError(f"header {MANUAL_RETRY} must be a count, got {raw!r}")
    return int(raw)
