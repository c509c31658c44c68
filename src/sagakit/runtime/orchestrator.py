"""The orchestrator: applies the pure state machine durably.

Each input (a reply, a fired timer, a start or cancel request) is applied in a local
transaction that loads the instance, computes the decision, and writes the new
instance (version-checked), its history, its timers and its outgoing commands to the
outbox. A reply to a saga this process committed last skips the load: its copy is kept
(:mod:`~sagakit.runtime.saga_cache`) and the version check finds out if it is stale.
A start writes without looking up its business key first; only if the key (or an
id) is taken does it look and start again. Many inputs share one transaction when they
arrive together. A crash at any point leaves either the old state with the input still
to be processed, or the new state with the outbox still to be relayed; the version
check means two workers can never both apply a transition.

Local steps (Python callables) are commands to ``<endpoint>.local``: the worker runs
the callable outside any transaction (at least once, with the step's idempotency key)
and then checkpoints its result by applying it as a reply, in the same transaction
that records the command as handled.

When the transport delivers ``<endpoint>.local`` into this very store (the embedded
transport; see :attr:`Orchestrator.direct_local`), a local command skips the outbox
and the relay: the transition's own transaction writes it into the store's mailbox.
While the engine runs the inline runner (:meth:`LocalStepRunner.run_inline`) that
mailbox row is written already leased to this process: right after the commit the
callable runs from memory, and the next transaction applies its result, records the
command in the inbox and deletes the row, so one commit per local step. The row is the
crash-recovery record: after a crash (or if the inline run fails) the mailbox
consumer hands it out again, and the inbox makes the transition apply once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from sagakit.core.definition import SagaDefinition
from sagakit.core.envelope import Envelope, MessageKind
from sagakit.core.instance import MANUAL_STATES, SagaInstance, Timer
from sagakit.core.machine import Decision, Machine, ManualAction, check_version
from sagakit.core.personal import refuse_personal_text
from sagakit.errors import (
    DefinitionError,
    MessageError,
    SagaNotFound,
    VersionMissing,
)
from sagakit.metrics import on_commit, record_history
from sagakit.observability import handler_span, record_transition
from sagakit.runtime.alerts import AlertWriter
from sagakit.runtime.canary import admit, checked_canary, machines_for_starts
from sagakit.runtime.consumer import FIRST_DELIVERIES, BatchConsumer, FaultHook
from sagakit.runtime.local_steps import LocalStepRunner
from sagakit.runtime.saga_cache import SagaCache, check_copies
from sagakit.runtime.set_aside import REPLY, TIMER, SetAsideDesk, timer_to_json
from sagakit.runtime.wakeup import Wakeups
from sagakit.stores.base import Store, Tx

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _TxNotes:
    """What the current Orchestrator.transaction() wrote, for after its commit."""

    staged: list[Envelope] = field(default_factory=list)  # local commands, not yet written
    outbox: bool = False  # rows for the relay: wake it
    timers: bool = False  # timers set: wake the timer loop
    timers_due: float | None = None  # the earliest of them (the timer loop may not look)
    written: dict[str, SagaInstance] = field(default_factory=dict)  # sagas inserted/changed
    copies: dict[str, SagaInstance] = field(default_factory=dict)  # used from the cache
    checked: set[str] = field(default_factory=set)  # copies the commit checks unwritten


# A context variable because several tasks may hold transactions at once (PostgreSQL
# runs them concurrently).
_NOTES: ContextVar[_TxNotes | None] = ContextVar("sagakit_tx_notes", default=None)


class Orchestrator(BatchConsumer):
    """Drives saga instances of the registered definitions."""

    def __init__(
        self,
        store: Store,
        definitions: Sequence[SagaDefinition],
        *,
        endpoint: str = "orchestrator",
        wakeups: Wakeups | None = None,
        clock: Callable[[], float] = time.time,
        faults: FaultHook | None = None,
        max_deliveries: int = 20,
        id_factory: Callable[[], str] | None = None,
        canary: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(endpoint, store, clock=clock, faults=faults, max_deliveries=max_deliveries)
        # Saga ids are random by default; the simulator passes a seeded factory so that
        # a seed replays the very same run.
        self.id_factory = id_factory or (lambda: uuid.uuid4().hex)
        self.wakeups = wakeups or Wakeups()
        self.local_endpoint = f"{endpoint}.local"
        self.direct_local = False
        """Write local commands straight into this store's mailbox (not the outbox).

        Only correct when the transport delivers ``local_endpoint`` into ``store``'s
        mailbox anyway (the embedded transport); the :class:`Engine` sets it then.
        """
        self.machines: dict[tuple[str, int], Machine] = {}
        self.latest: dict[str, SagaDefinition] = {}
        for d in definitions:
            self.register(d)
        self.canary = checked_canary(canary or {}, self.latest, self.machines)
        """Definition name -> share of its new sagas started on its latest version."""
        self.aside = SetAsideDesk(self)
        """Inputs of sagas whose definition version this process lacks (set aside)."""
        self.local = LocalStepRunner(self)
        self.cache = SagaCache()
        """Copies of the sagas this process committed last (:mod:`~sagakit.runtime.saga_cache`)."""
        self.alerts: AlertWriter | None = None
        """Writes the alert of a transition into FAILED_NEEDS_MANUAL or TIMED_OUT in its
        own transaction (:mod:`~sagakit.runtime.alerts`); set by the Engine."""
        # saga id -> futures of Engine.wait() callers in this process, resolved with the
        # instance when a transaction of this orchestrator commits it terminal.
        self._watchers: dict[str, list[asyncio.Future[SagaInstance]]] = {}

    @contextlib.contextmanager
    def watch(self, saga_id: str) -> Iterator[asyncio.Future[SagaInstance]]:
        """A future resolved with the instance once this process commits it terminal.

        Only this orchestrator's own commits resolve it: a waiter must still look at
        the store now and then for other processes' (and must look once after
        registering, for a commit just before).
        """
        fut: asyncio.Future[SagaInstance] = asyncio.get_running_loop().create_future()
        waiting = self._watchers.setdefault(saga_id, [])
        waiting.append(fut)
        try:
            yield fut
        finally:
            waiting.remove(fut)
            if not waiting:
                self._watchers.pop(saga_id, None)

    # -- definitions ------------------------------------------------------------------
    def register(self, definition: SagaDefinition) -> None:
        """Add a definition (several versions of one name may run side by side)."""
        key = (definition.name, definition.version)
        if key in self.machines:
            raise DefinitionError(f"saga {definition.key} is registered twice")
        self.machines[key] = Machine(definition, self.endpoint)
        current = self.latest.get(definition.name)
        if current is None or current.version < definition.version:
            self.latest[definition.name] = definition
        # Inputs set aside for this version can be applied now.
        self.wakeups.notify(f"aside:{self.store.name}")

    def machine_for(self, inst: SagaInstance) -> Machine:
        """The machine of the definition version the instance was started with."""
        try:
            return self.machines[(inst.definition, inst.definition_version)]
        except KeyError:
            key = f"{inst.definition}@{inst.definition_version}"
            raise VersionMissing(
                f"saga {inst.saga_id} needs definition {key}, which this process does not "
                f"have (it has {', '.join(sorted(f'{n}@{v}' for n, v in self.machines)) or 'none'}"
                f"); act on it from a process that has {key}",
                waiting_for=key,
            ) from None

    # -- commands from callers ---------------------------------------------------------
    async def start(
        self,
        definition: str,
        business_key: str,
        data: Mapping[str, Any] | None = None,
        *,
        version: int | None = None,
        correlation_id: str | None = None,
    ) -> tuple[SagaInstance, bool]:
        """Start a saga, idempotently by business key.

        Returns ``(instance, created)``; if a saga of this definition already exists
        for ``business_key``, that one is returned with ``created=False``.
        """
        out = await self.start_many(
            [(definition, business_key, data or {})], version=version, correlation_id=correlation_id
        )
        return out[0]

    async def start_many(
        self,
        requests: Sequence[tuple[str, str, Mapping[str, Any]]],
        *,
        version: int | None = None,
        correlation_id: str | None = None,
    ) -> list[tuple[SagaInstance, bool]]:
        """Start several sagas in one transaction (see :meth:`start`)."""
        machines = machines_for_starts(self.machines, self.latest, self.canary, requests, version)
        requests = await admit(machines, requests)
        try:
            # Most starts are new: insert without looking the keys up (a round trip on
            # PostgreSQL); a key started before fails the insert, and then we look.
            async with self.transaction() as tx:
                results = await self._write_starts(
                    tx, machines, requests, correlation_id, look_up=False
                )
        except Exception:
            # A key started before refused the insert (ConcurrencyError), or a request
            # for it was not even startable (its saga, started with other data, is what
            # to return). Look the keys up: that answers, or raises what a new key would.
            async with self.transaction() as tx:
                results = await self._write_starts(tx, machines, requests, correlation_id)
        self.after_commit()
        return results

    async def start_in(
        self,
        tx: Tx,
        requests: Sequence[tuple[str, str, Mapping[str, Any]]],
        *,
        version: int | None = None,
        correlation_id: str | None = None,
    ) -> list[tuple[SagaInstance, bool]]:
        """Write the starts of several sagas into ``tx``, a transaction its owner commits.

        As :meth:`start_many` (idempotent by business key), but nothing is committed
        here, and every command, local steps' included, goes to the outbox: the relay
        publishes them once the owner commits (see :mod:`sagakit.runtime.own_tx`).
        """
        machines = machines_for_starts(self.machines, self.latest, self.canary, requests, version)
        requests = await admit(machines, requests)
        return await self._write_starts(tx, machines, requests, correlation_id, outbox_only=True)

    async def _write_starts(
        self,
        tx: Tx,
        machines: Sequence[Machine],
        requests: Sequence[tuple[str, str, Mapping[str, Any]]],
        correlation_id: str | None,
        *,
        outbox_only: bool = False,
        look_up: bool = True,
    ) -> list[tuple[SagaInstance, bool]]:
        results: list[tuple[SagaInstance, bool]] = []
        now = self.clock()
        # Started before: one lookup per definition for the whole batch.
        fresh: dict[tuple[str, str], SagaInstance] = {}
        keys: dict[str, list[str]] = {}
        for name, key, _ in requests:
            keys.setdefault(name, []).append(key)
        for name, names_keys in keys.items() if look_up else ():
            found = await tx.saga_get_by_keys(name, sorted(set(names_keys)))
            fresh.update(((name, k), inst) for k, inst in found.items())
        for machine, (name, key, data) in zip(machines, requests, strict=True):
            existing = fresh.get((name, key))
            if existing is not None:
                results.append((existing, False))
                continue
            decision = machine.start(
                self.id_factory(), key, dict(data), now, correlation_id=correlation_id
            )
            await self._write(tx, decision, None, now, outbox_only=outbox_only)
            fresh[(name, key)] = decision.instance
            results.append((decision.instance, True))
        return results

    async def cancel(
        self, saga_id: str, reason: str, *, expected_version: int | None = None
    ) -> SagaInstance:
        """Ask a saga to cancel: compensates before the pivot, refused after it.

        ``expected_version``: the saga version a person decided on; another one raises
        :class:`~sagakit.errors.SagaMoved` (checked in the transaction, nothing written).
        """
        if not reason or not reason.strip():
            raise ValueError("a cancel needs a reason")
        refuse_personal_text(reason)

        def decide(inst: SagaInstance, now: float) -> Decision:
            check_version(inst, expected_version)
            return self.machine_for(inst).on_cancel(inst, reason, now)

        return (await self._decide_on(saga_id, decide)).instance

    async def resolve(
        self,
        saga_id: str,
        action: ManualAction | str,
        *,
        reason: str,
        actor: str,
        rung: int | None = None,
        expected_version: int | None = None,
        force: bool = False,
    ) -> SagaInstance:
        """Apply a person's decision to a saga in the manual queue (audited in history).

        ``expected_version`` (the saga version the person decided on) is compared with
        the saga read in this transaction, which locks it: a saga that moved raises
        :class:`~sagakit.errors.SagaMoved` and nothing is written; the write itself is
        version-checked too, so a move between the read and the commit cannot slip
        through. ``force`` lets an ``accept_partial`` leave holds open (see
        :meth:`Machine.on_manual <sagakit.core.machine.Machine.on_manual>`).
        """
        refuse_personal_text(reason)

        def decide(inst: SagaInstance, now: float) -> Decision:
            return self.machine_for(inst).on_manual(
                inst,
                action,
                reason=reason,
                actor=actor,
                now=now,
                rung=rung,
                expected_version=expected_version,
                force=force,
            )

        decision = await self._decide_on(saga_id, decide)
        log.info(
            "manual action %s by %s: %s",
            action,
            actor,
            reason,
            extra={"saga_id": saga_id, "step": decision.history[0].step, "actor": actor},
        )
        return decision.instance

    async def _decide_on(
        self, saga_id: str, decide: Callable[[SagaInstance, float], Decision]
    ) -> Decision:
        """Load ``saga_id`` (locked), apply ``decide`` to it and write the decision."""
        now = self.clock()
        async with self.transaction() as tx:
            inst = await tx.saga_get(saga_id)
            if inst is None:
                raise SagaNotFound(f"no saga {saga_id!r}")
            decision = decide(inst, now)
            await self._write(tx, decision, inst.version, now)
        self.after_commit()
        return decision

    async def manual_cases(self, *, limit: int = 100, offset: int = 0) -> list[SagaInstance]:
        """Sagas waiting for a person (:data:`~sagakit.core.instance.MANUAL_STATES`)."""
        return await self.store.list_sagas(states=list(MANUAL_STATES), limit=limit, offset=offset)

    # -- replies ----------------------------------------------------------------------
    async def process(self, tx: Tx, envelope: Envelope, now: float) -> None:
        if envelope.kind is not MessageKind.REPLY:
            raise MessageError(
                f"{self.endpoint} takes replies; got a {envelope.kind.value} {envelope.type!r}"
            )
        if not await tx.inbox_add(self.endpoint, envelope.message_id, now):
            self.duplicates.inc()
            return
        await self.apply_reply(tx, envelope, now)

    async def process_batch(self, tx: Tx, envelopes: Sequence[Envelope], now: float) -> None:
        """Record the batch in the inbox in one go, then apply the new replies in order."""
        for env in envelopes:
            if env.kind is not MessageKind.REPLY:
                raise MessageError(
                    f"{self.endpoint} takes replies; got a {env.kind.value} {env.type!r}"
                )
        fresh, loaded = await self.record_and_load(tx, self.endpoint, envelopes, now)
        await self.apply_replies(
            tx, self.new_ones(envelopes, fresh), now, self.endpoint, loaded=loaded
        )

    async def apply_reply(self, tx: Tx, reply: Envelope, now: float) -> None:
        """Apply one reply inside ``tx`` (the caller recorded it in the inbox)."""
        if reply.saga_id is None:
            raise MessageError(f"reply {reply.message_id} has no saga_id")
        inst = await tx.saga_get(reply.saga_id)
        if inst is None:
            raise SagaNotFound(f"reply {reply.message_id} is for unknown saga {reply.saga_id!r}")
        machine = self.machines.get((inst.definition, inst.definition_version))
        if machine is None:  # wait for a process that has the version
            await self.aside.put_saga(tx, inst, REPLY, reply.to_json(), now)
            return
        decision = machine.on_reply(inst, reply, now)
        await self._write(tx, decision, inst.version, now)

    async def record_and_load(
        self,
        tx: Tx,
        consumer: str,
        envelopes: Sequence[Envelope],
        now: float,
        *,
        copies: bool = True,
    ) -> tuple[set[str], dict[str, SagaInstance]]:
        """Record a batch in ``consumer``'s inbox and load (lock) the sagas it is for.

        One round trip on PostgreSQL. The sagas of messages handled before are loaded
        too (the batch is rarely all duplicates); :meth:`apply_replies` ignores them.

        If this process holds a copy of every one of the sagas (and ``copies``, and the
        batch is of first deliveries: see :data:`~sagakit.runtime.consumer.FIRST_DELIVERIES`),
        none: the ids are recorded as new (:meth:`Tx.inbox_add_new`) and the copies
        returned. The transaction then fails with ConcurrencyError, at its commit at the
        latest, if a copy was stale or a message had been handled; load and retry then.
        """
        saga_ids = sorted({e.saga_id for e in envelopes if e.saga_id})
        ids = [e.message_id for e in envelopes]
        notes = _NOTES.get()
        if copies and notes is not None and saga_ids and ids and FIRST_DELIVERIES.get():
            found = self.cache.take(saga_ids)
            if found is not None:
                notes.copies.update(found)  # first: if the next line fails, they go
                await tx.inbox_add_new(consumer, ids, now)
                return set(ids), found
        return await tx.inbox_add_and_load(consumer, ids, now, saga_ids)

    async def apply_replies(
        self,
        tx: Tx,
        replies: Sequence[Envelope],
        now: float,
        endpoint: str,
        *,
        loaded: dict[str, SagaInstance] | None = None,
    ) -> None:
        """Apply replies in order inside ``tx``, loading all their sagas in one go.

        The caller recorded them in the inbox; ``endpoint`` names the handler in traces.
        ``loaded``: the sagas, if the caller loaded them (:meth:`record_and_load`).
        A saga with several replies in the batch sees each one's transition in turn.
        """
        for reply in replies:
            if reply.saga_id is None:
                raise MessageError(f"reply {reply.message_id} has no saga_id")
        if loaded is None:
            loaded = await tx.saga_get_many(sorted({r.saga_id for r in replies if r.saga_id}))
        for reply in replies:
            with handler_span(endpoint, reply):
                inst = loaded.get(reply.saga_id or "")
                if inst is None:
                    raise SagaNotFound(
                        f"reply {reply.message_id} is for unknown saga {reply.saga_id!r}"
                    )
                machine = self.machines.get((inst.definition, inst.definition_version))
                if machine is None:  # wait for a process that has the version
                    await self.aside.put_saga(tx, inst, REPLY, reply.to_json(), now)
                    continue
                decision = machine.on_reply(inst, reply, now)
                await self._write(tx, decision, inst.version, now)
                loaded[inst.saga_id] = decision.instance
        notes = _NOTES.get()
        if notes is not None and notes.copies:
            await check_copies(tx, notes.copies, notes.written, notes.checked)

    # -- timers -----------------------------------------------------------------------
    async def fire_due_timers(self, limit: int = 512) -> int:
        """Apply every timer due now (up to ``limit``) in one transaction; return how many."""
        now = self.clock()
        async with self.transaction() as tx:
            timers = await tx.timers_take_due(now, limit)
            # One load (PostgreSQL: lock in saga_id order, like reply batches) for all.
            loaded = await tx.saga_get_many(sorted({t.saga_id for t in timers}))
            for timer in timers:
                await self._apply_timer(tx, timer, now, loaded)
            if timers:
                self.faults.point("before_commit", f"{self.endpoint}.timers")
        if timers:
            self.after_commit()
        return len(timers)

    async def _apply_timer(
        self, tx: Tx, timer: Timer, now: float, loaded: dict[str, SagaInstance]
    ) -> None:
        inst = loaded.get(timer.saga_id)
        if inst is None:
            log.warning("timer %s of unknown saga %s dropped", timer.name, timer.saga_id)
            return
        machine = self.machines.get((inst.definition, inst.definition_version))
        if machine is None:  # wait for a process that has the version; never fire it again
            await self.aside.put_saga(tx, inst, TIMER, timer_to_json(timer), now)
            return
        decision = machine.on_timer(inst, timer, now)
        await self._write(tx, decision, inst.version, now)
        loaded[inst.saga_id] = decision.instance

    # -- writing a decision -------------------------------------------------------------
    async def _write(
        self, tx: Tx, d: Decision, expected: int | None, now: float, *, outbox_only: bool = False
    ) -> None:
        inst = d.instance
        notes = _NOTES.get() or _TxNotes(outbox=True, timers=True)
        if expected is None:
            # The many-form: PostgreSQL pipelines it, so start_many pays no round trip
            # per saga; a refusal still raises before the commit.
            await tx.saga_insert_many([inst])
            notes.written[inst.saga_id] = inst
        elif d.changed:
            await tx.saga_update(inst, expected)
            notes.written[inst.saga_id] = inst
        if d.history:
            await tx.history_add(d.history)
        if self.alerts is not None and d.changed and inst.terminal:  # alerts hook
            await self.alerts.saga_changed(tx, inst, d.history, now)
        if d.cancel_timers:
            setting = {t.name for t in d.set_timers}
            names = [n for n in d.cancel_timers if n not in setting]
            if names:
                await tx.timers_cancel(inst.saga_id, names)
        if d.set_timers:
            await tx.timers_set(d.set_timers)
            due = min(t.due_at for t in d.set_timers)
            notes.timers_due = due if notes.timers_due is None else min(due, notes.timers_due)
            notes.timers = True
        if d.outgoing:
            outgoing = d.outgoing
            # outbox_only: a transaction someone else commits, after which no one here
            # would hand the local commands over (the relay delivers them instead).
            if self.direct_local and not outbox_only:
                local = [e for e in outgoing if e.destination == self.local_endpoint]
                if local:
                    outgoing = [e for e in outgoing if e.destination != self.local_endpoint]
                    if _NOTES.get() is not None:
                        notes.staged.extend(local)
                    else:  # outside Orchestrator.transaction(): no one to hand them to
                        await tx.queue_add(self.local_endpoint, [e.to_json() for e in local], now)
            if outgoing:
                await tx.outbox_add(outgoing, now)
                notes.outbox = True
        if d.history:
            machine = self.machines.get((inst.definition, inst.definition_version))
            if machine is not None:
                record_transition(inst, machine.step_names, d.history)
                record_history(inst, machine.step_names, d.history)
        for h in d.history:
            log.debug(
                "%s %s",
                h.event,
                h.detail,
                extra={
                    "saga_id": h.saga_id,
                    "step": h.step,
                    "version": h.version,
                    "state": h.state.value,
                },
            )

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """A store transaction that also writes the local commands decided in it.

        With :attr:`direct_local` they go into the mailbox just before the commit: leased
        to the inline runner when it runs (it gets them after the commit), else visible
        to the mailbox consumer, which is woken. After the commit it wakes the relay
        and the timer loop only if the transaction gave them work: a woken relay claims
        (a write) even when there is nothing to claim.
        """
        notes = _TxNotes()
        token = _NOTES.set(notes)
        handed: list[tuple[int, Envelope]] = []
        try:
            async with on_commit(self.store.transaction()) as tx:
                yield tx
                if notes.staged:
                    handed = await self._write_local(tx, notes.staged)
        except BaseException:
            # Rolled back, or its outcome unknown: a copy used may be stale, and a saga
            # written may or may not be what the store holds now.
            self.cache.forget([*notes.copies, *notes.written])
            raise
        finally:
            _NOTES.reset(token)
        # Before the local commands are handed over: their results find the copies.
        self.cache.committed(notes.written.values())
        if handed:
            self.local.hand_over(handed)
        elif notes.staged:
            self.wakeups.notify(f"queue:{self.local_endpoint}")
        if notes.outbox:
            self.wakeups.notify(f"outbox:{self.store.name}")
        if notes.timers:
            self.wakeups.notify(f"timers:{self.store.name}", notes.timers_due)
        if self._watchers:
            # The watchers as they are now, after the commit: one registered while the
            # commit was on its way (its saga then still unfinished in a read, and in
            # the copies) is resolved too.
            for inst in notes.written.values():
                if inst.terminal:
                    for fut in self._watchers.get(inst.saga_id, ()):
                        if not fut.done():
                            fut.set_result(inst)

    async def _write_local(self, tx: Tx, staged: list[Envelope]) -> list[tuple[int, Envelope]]:
        now = self.clock()
        bodies = [e.to_json() for e in staged]
        runner = self.local
        if not runner.inline:
            await tx.queue_add(self.local_endpoint, bodies, now)
            return []
        ids = await tx.queue_add(
            self.local_endpoint, bodies, now, leased_until=now + runner.inline_lease
        )
        return list(zip(ids, staged, strict=True))

    def after_commit(self) -> None:
        # The relay and the timer loop were woken by transaction() if there was work.
        self.wakeups.notify(f"sagas:{self.store.name}")
