"""What operators do with dead letters: list, inspect, replay, discard.

A dead letter lives in the store of the process that parked it: a consumer parks a
poison message in its own store, a relay parks an unroutable outbox row in the
producer's store. Each is addressed as ``(store name, id)``.

Replaying puts the parked message back in *that store's outbox* with its message id
and body unchanged, in the same transaction that settles the dead letter, so the relay
delivers it over whichever transport is configured, and the consumer's inbox still
deduplicates it. Only the header :data:`~sagakit.core.envelope.REPLAYED_FROM` is
added, which makes the replay a new copy for brokers that deduplicate by id.

An alert a webhook never took (endpoint ``sagakit.alerts.<webhook>``, see
:mod:`sagakit.runtime.notifier`) is replayed into that webhook's mailbox instead, to be
posted again with all its attempts.

A replay that could not change anything is refused with the reason, and the dead
letter stays open (discard it instead):

* its body is not a valid envelope (there is nothing to put back);
* its saga is terminal (the orchestrator would only record it as stale);
* its consumer, if this engine holds its store, already handled that message id.

Discarding settles the dead letter without sending anything. Both keep the row with
who, when and why (see :class:`~sagakit.stores.base.DeadLetter`), and write a row of
the audit trail (:mod:`sagakit.runtime.audit`) in the same transaction.

What the broker parked on its own side (NATS ``<stream>_dlq``, RabbitMQ's dead queue)
is moved into the stores by :meth:`DeadLetterDesk.adopt_broker_dead_letters` (the
engine's housekeeping), and from there handled like the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sagakit.core.envelope import REPLAYED_FROM, Envelope
from sagakit.core.personal import refuse_personal_text
from sagakit.errors import DeadLetterNotFound, DeadLetterRefused, MessageError
from sagakit.runtime.alerts import ALERTS_ENDPOINT, load_alert
from sagakit.runtime.audit import AuditRecord, append
from sagakit.stores.base import DISCARDED, REPLAYED, DeadLetter, Store, Tx
from sagakit.transports.base import ParkedByBroker

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """A dead letter and the name of the store that holds it."""

    store: str
    letter: DeadLetter


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    """One page of dead letters across stores, with how many match in all."""

    total: int
    items: list[StoredDeadLetter]


@dataclass(frozen=True, slots=True)
class BrokerDeadLetter:
    """A message the broker itself gave up on (e.g. NATS ``<stream>_dlq``): list only."""

    transport: str
    endpoint: str
    message_id: str | None
    reason: str
    body: str


class DeadLetterDesk:
    """The operators' dead-letter actions over the stores of one engine.

    ``stores`` are the engine's stores (looked up by name; the first of a name wins).
    ``consumers`` maps an endpoint to the store that keeps its inbox, for the "already
    handled" check; ``saga_store`` holds the saga instances, for the "terminal" check.
    ``transport``, if it can list them (``dead_letters(limit)``), gives the broker's own.
    """

    def __init__(
        self,
        stores: Sequence[Store],
        *,
        saga_store: Store,
        consumers: Mapping[str, Store],
        clock: Callable[[], float],
        transport: object = None,
        on_replay: Callable[[Store], None] | None = None,
    ) -> None:
        self.stores: dict[str, Store] = {}
        for s in stores:
            self.stores.setdefault(s.name, s)
        self.saga_store = saga_store
        self.consumers = dict(consumers)
        self.clock = clock
        self.transport = transport
        self.on_replay = on_replay
        """Called after a replay committed (the engine wakes that store's relay)."""

    def _store(self, name: str) -> Store:
        try:
            return self.stores[name]
        except KeyError:
            raise DeadLetterNotFound(
                f"no store named {name!r}; this engine holds {sorted(self.stores)}"
            ) from None

    async def find(
        self,
        *,
        store: str | None = None,
        endpoint: str | None = None,
        settled: bool | None = False,
        limit: int = 50,
        offset: int = 0,
    ) -> DeadLetterPage:
        """Dead letters of one store (or all, in store order), oldest first, one page.

        ``settled``: ``False`` for open ones (the default), ``True`` for settled ones,
        ``None`` for both.
        """
        stores = [(store, self._store(store))] if store is not None else self.stores.items()
        total, items = 0, list[StoredDeadLetter]()
        for name, s in stores:
            count = await s.dead_letter_count(endpoint, settled=settled)
            skip = max(offset - total, 0)
            want = limit - len(items)
            total += count
            if want > 0 and skip < count:
                page = await s.dead_letters(endpoint, settled=settled, limit=want, offset=skip)
                items += [StoredDeadLetter(name, d) for d in page]
        return DeadLetterPage(total, items)

    async def get(self, store: str, id: int) -> StoredDeadLetter:
        """One dead letter; :class:`DeadLetterNotFound` if there is none."""
        letter = await self._store(store).get_dead_letter(id)
        if letter is None:
            raise DeadLetterNotFound(f"no dead letter {id} in store {store!r}")
        return StoredDeadLetter(store, letter)

    async def broker_dead_letters(self, limit: int = 100) -> list[BrokerDeadLetter]:
        """What the transport parked on its own side, if it can list it (NATS can)."""
        read = getattr(self.transport, "dead_letters", None)
        if read is None:
            return []
        kind = type(self.transport).__name__
        return [
            BrokerDeadLetter(kind, d.endpoint, d.message_id, d.reason, d.body)
            for d in await read(limit)
        ]

    async def adopt_broker_dead_letters(self, limit: int = 100) -> int:
        """Move up to ``limit`` of the broker's own dead letters into the stores' tables,
        where they can be replayed and discarded like any other; return how many.

        Each goes to the store of its consumer if this engine holds it, else to the
        store named like its endpoint, else to the first store. The broker removes them
        only after they were committed (see ``drain_dead_letters``). The engine's
        housekeeping calls this.
        """
        drain = getattr(self.transport, "drain_dead_letters", None)
        if drain is None or not self.stores:
            return 0

        async def park(items: Sequence[ParkedByBroker]) -> None:
            now = self.clock()
            groups: dict[str, list[ParkedByBroker]] = {}
            for item in items:
                groups.setdefault(self._home(item.endpoint).name, []).append(item)
            for name, group in groups.items():
                async with self.stores[name].transaction() as tx:
                    for item in group:
                        reason = f"parked by the broker: {item.reason}"
                        await tx.dead_letter(item.endpoint, item.message_id, item.body, reason, now)

        moved: int = await drain(park, limit)
        if moved:
            log.warning("moved %d dead letters from the broker into the stores", moved)
        return moved

    def _home(self, endpoint: str) -> Store:
        found = self.consumers.get(endpoint) or self.stores.get(endpoint)
        if found is not None and found.name in self.stores:
            return self.stores[found.name]
        return next(iter(self.stores.values()))

    async def replay(
        self, store: str, id: int, *, actor: str, reason: str, role: str | None = None
    ) -> StoredDeadLetter:
        """Put the parked message back on its way; return the settled dead letter.

        :class:`DeadLetterRefused` says why a replay does not apply (the dead letter
        then stays open). A ``reason`` holding personal data is refused
        (:class:`~sagakit.errors.PersonalDataRefused`): it would be kept for good.
        ``actor`` (and its ``role``, when known) goes into the audit trail.
        """
        refuse_personal_text(reason)
        found = await self.get(store, id)
        letter = found.letter
        _check_open(store, letter)
        if letter.endpoint.startswith(f"{ALERTS_ENDPOINT}."):
            return await self._replay_alert(store, letter, actor=actor, reason=reason, role=role)
        envelope = await self._replayable(store, letter)
        s = self._store(store)
        async with s.transaction() as tx:
            locked = await tx.dead_letter_get(id)
            if locked is None:
                raise DeadLetterNotFound(f"no dead letter {id} in store {store!r}")
            _check_open(store, locked)
            await tx.outbox_add([envelope], self.clock())
            await tx.dead_letter_settle(id, REPLAYED, actor, reason, self.clock())
            await self._audit(tx, store, letter, envelope.saga_id, "replay", actor, role, reason)
        if self.on_replay is not None:
            self.on_replay(s)
        log.info(
            "replayed dead letter %s:%s (%s) by %s: %s",
            store,
            id,
            letter.message_id,
            actor,
            reason,
            extra=_extra(store, letter, envelope, actor, "replay"),
        )
        return await self.get(store, id)

    async def _replay_alert(
        self, store: str, letter: DeadLetter, *, actor: str, reason: str, role: str | None
    ) -> StoredDeadLetter:
        """An alert a webhook never took, back in that webhook's mailbox (with all its
        attempts again), in the transaction that settles the dead letter."""
        try:
            load_alert(letter.body)
        except ValueError as exc:
            raise DeadLetterRefused(
                f"cannot replay dead letter {letter.id}: its body is not an alert ({exc}); "
                "discard it"
            ) from None
        async with self._store(store).transaction() as tx:
            locked = await tx.dead_letter_get(letter.id)
            if locked is None:
                raise DeadLetterNotFound(f"no dead letter {letter.id} in store {store!r}")
            _check_open(store, locked)
            await tx.queue_add(letter.endpoint, [letter.body], self.clock())
            await tx.dead_letter_settle(letter.id, REPLAYED, actor, reason, self.clock())
            await self._audit(tx, store, letter, None, "replay", actor, role, reason)
        log.info(
            "replayed alert %s:%s (%s) by %s: %s",
            store,
            letter.id,
            letter.message_id,
            actor,
            reason,
            extra=_extra(store, letter, None, actor, "replay"),
        )
        return await self.get(store, letter.id)

    async def discard(
        self, store: str, id: int, *, actor: str, reason: str, role: str | None = None
    ) -> StoredDeadLetter:
        """Settle the dead letter without sending anything; return it settled (a
        ``reason`` holding personal data is refused, as for :meth:`replay`; audited as
        :meth:`replay` is)."""
        refuse_personal_text(reason)
        found = await self.get(store, id)
        _check_open(store, found.letter)
        async with self._store(store).transaction() as tx:
            if not await tx.dead_letter_settle(id, DISCARDED, actor, reason, self.clock()):
                latest = await tx.dead_letter_get(id)
                assert latest is not None  # dead letters are never deleted
                _check_open(store, latest)
            saga_id = _saga_of(found.letter)
            await self._audit(tx, store, found.letter, saga_id, "discard", actor, role, reason)
        log.info(
            "discarded dead letter %s:%s (%s) by %s: %s",
            store,
            id,
            found.letter.message_id,
            actor,
            reason,
            extra=_extra(store, found.letter, None, actor, "discard"),
        )
        return await self.get(store, id)

    async def _audit(
        self,
        tx: Tx,
        store: str,
        letter: DeadLetter,
        saga_id: str | None,
        action: str,
        actor: str,
        role: str | None,
        reason: str,
    ) -> None:
        """The audit row of a settlement, in the transaction that settles it."""
        record = AuditRecord(
            at=self.clock(),
            actor=actor,
            role=role,
            action=f"dead_letter.{action}",
            saga_id=saga_id,
            dead_letter_id=letter.id,
            reason=reason,
            detail={"store": store, "endpoint": letter.endpoint, "message_id": letter.message_id},
        )
        await append(tx, record)

    async def _replayable(self, store: str, letter: DeadLetter) -> Envelope:
        """The envelope to put back in the outbox, or why there is none."""
        try:
            env = Envelope.from_json(letter.body)
        except MessageError as exc:
            raise DeadLetterRefused(
                f"cannot replay dead letter {letter.id}: its body is not a valid envelope "
                f"({exc}); there is nothing to send, discard it"
            ) from None
        if env.saga_id is not None:
            inst = await self.saga_store.get_saga(env.saga_id)
            if inst is not None and inst.terminal:
                raise DeadLetterRefused(
                    f"cannot replay dead letter {letter.id}: saga {env.saga_id} is already "
                    f"{inst.state.value}, so the message would change nothing; discard it"
                )
        if env.destination is None and letter.endpoint:
            # Parked by a consumer that got it unaddressed: send it back to that consumer.
            env = env.with_changes(destination=letter.endpoint)
        consumer = env.destination
        inbox = self.consumers.get(consumer) if consumer is not None else None
        if inbox is not None and await inbox.inbox_has(consumer or "", env.message_id):
            raise DeadLetterRefused(
                f"cannot replay dead letter {letter.id}: {consumer!r} already handled message "
                f"{env.message_id} (it is in its inbox); discard it"
            )
        return env.with_changes(headers={**env.headers, REPLAYED_FROM: f"{store}:{letter.id}"})


def _saga_of(letter: DeadLetter) -> str | None:
    """The saga a parked message belongs to, when its body is an envelope that says."""
    try:
        return Envelope.from_json(letter.body).saga_id
    except MessageError:
        return None  # a malformed body: the dead letter is audited without a saga


def _check_open(store: str, letter: DeadLetter) -> None:
    if not letter.open:
        raise DeadLetterRefused(
            f"dead letter {letter.id} in store {store!r} was already {letter.settlement} "
            f"by {letter.settled_by}: {letter.settle_reason}"
        )


def _extra(
    store: str, letter: DeadLetter, env: Envelope | None, actor: str, action: str
) -> dict[str, Any]:
    return {
        "store": store,
        "dead_letter_id": letter.id,
        "message_id": letter.message_id,
        "endpoint": letter.endpoint,
        "saga_id": None if env is None else env.saga_id,
        "actor": actor,
        "action": action,
    }
