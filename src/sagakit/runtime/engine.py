"""The engine: what one process runs of the orchestrator, participants, relays, timers.

Embedded (the default), one engine runs everything: it opens the stores, wires the
embedded transport's routes, and runs one loop per relay, one timer loop and one
consumer per endpoint. In production the same class runs a share of the work per
process, chosen with ``roles``: ``sagakit worker`` runs the orchestrator and timers,
``sagakit relay`` the relays, ``sagakit service NAME`` a participant, any number of
each against the same databases and broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sagakit.core.definition import SagaDefinition
from sagakit.core.instance import SagaInstance
from sagakit.core.machine import ManualAction
from sagakit.core.personal import refuse_personal_text
from sagakit.errors import ConfigurationError, SagaNotFound
from sagakit.runtime import engine_loops
from sagakit.runtime.alerts import AlertSettings, AlertWriter
from sagakit.runtime.consumer import FaultHook
from sagakit.runtime.dead_letters import DeadLetterDesk
from sagakit.runtime.lockfile import LockFile
from sagakit.runtime.notifier import Notifier
from sagakit.runtime.orchestrator import Orchestrator
from sagakit.runtime.own_tx import start_with
from sagakit.runtime.participant import Participant
from sagakit.runtime.relay import Relay
from sagakit.runtime.tracker import Tracker
from sagakit.runtime.tracker_manual import no_driver, resolve_tracked, resolve_view
from sagakit.runtime.wakeup import Wakeups
from sagakit.stores.base import Store
from sagakit.transports.base import Transport
from sagakit.transports.embedded import EmbeddedTransport

log = logging.getLogger(__name__)


ALL_ROLES = frozenset({"orchestrator", "timers", "participants", "relays", "housekeeping"})


class Engine:
    """Runs sagas; use as ``async with Engine(...) as engine:``.

    ``store`` is the orchestrator's store (the saga instances). ``roles`` picks what
    this process runs: ``orchestrator`` (consume replies, run local steps),
    ``timers``, ``participants`` (consume their commands), ``relays`` (publish the
    outboxes of every store this engine holds) and ``housekeeping``.

    Local steps run side by side, so that a slow one never delays other sagas: up to
    ``local_concurrency`` callables at once, ``async def`` ones on the event loop and
    blocking ones in a pool of ``local_threads`` threads (default ``min(32, CPUs + 4)``)
    that the engine owns; a transport hands the local-step endpoint up to
    ``local_batches`` batches at once. ``lock_file``: a file this engine holds an
    exclusive lock on while open (see :func:`embedded`).

    ``canary``: definition name -> share (0..1, exclusive) of its new sagas started on
    its latest version, the rest on the version before (by a stable hash of the business
    key). Inputs of sagas whose definition version this engine lacks are set aside;
    with ``orchestrator`` or ``timers`` among its roles it applies those set aside for
    its own versions, at start, when notified, and every ``set_aside_poll`` seconds
    (see :mod:`sagakit.runtime.set_aside`).

    ``alerts``: webhooks to tell when a saga enters FAILED_NEEDS_MANUAL or TIMED_OUT or
    a dead letter is parked (see :mod:`sagakit.runtime.alerts`). Each transition that
    raises one writes it in its own transaction; an engine with the ``relays`` role
    also runs the notifier that posts them (:mod:`sagakit.runtime.notifier`).
    """

    def __init__(
        self,
        store: Store,
        definitions: Sequence[SagaDefinition],
        *,
        participants: Sequence[Participant] = (),
        roles: frozenset[str] | set[str] = ALL_ROLES,
        extra_stores: Sequence[Store] = (),
        transport: Transport | None = None,
        wakeups: Wakeups | None = None,
        clock: Callable[[], float] = time.time,
        faults: FaultHook | None = None,
        event_routes: Mapping[str, Sequence[str]] | None = None,
        relay_lease: float = 1.0,
        idle_poll: float = 0.5,
        batch_size: int = 256,
        inbox_retention: float = 7 * 86400.0,
        outbox_retention: float = 7 * 86400.0,
        housekeeping_every: float = 600.0,
        local_concurrency: int = 256,
        local_threads: int | None = None,
        local_batches: int = 8,
        lock_file: str | Path | LockFile | None = None,
        canary: Mapping[str, float] | None = None,
        set_aside_poll: float = 2.0,
        alerts: AlertSettings | None = None,
    ) -> None:
        unknown = set(roles) - ALL_ROLES
        if unknown:
            raise ConfigurationError(
                f"unknown roles {sorted(unknown)}; choose from {sorted(ALL_ROLES)}"
            )
        if local_threads is None:
            local_threads = min(32, (os.cpu_count() or 1) + 4)
        for name, value in (
            ("local_concurrency", local_concurrency),
            ("local_threads", local_threads),
            ("local_batches", local_batches),
        ):
            if value < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {value}")
        self.local_concurrency = local_concurrency
        self.local_threads = local_threads
        self.local_batches = local_batches
        self._local_pool: ThreadPoolExecutor | None = None
        self.lock = (
            lock_file
            if lock_file is None or isinstance(lock_file, LockFile)
            else LockFile(lock_file)
        )
        """Held while the engine is open (one process per embedded database)."""
        self.roles = frozenset(roles)
        self.wakeups = wakeups or Wakeups()
        self.clock = clock
        self.store = store
        self.faults = faults or FaultHook()
        self.orchestrator = Orchestrator(
            store,
            definitions,
            wakeups=self.wakeups,
            clock=clock,
            faults=self.faults,
            canary=canary,
        )
        self.participants = list(participants)
        # Choreographies' saga views in this engine's store: nobody drives them, so the
        # manual actions on them are records of what a person did (tracker_manual).
        self.trackers: dict[str, Tracker] = {
            p.flow.definition: p
            for p in self.participants
            if isinstance(p, Tracker) and p.store is store
        }
        for p in self.participants:
            p.wakeups = self.wakeups
            p.faults = self.faults
            p.clock = clock
        if transport is None:
            routes: dict[str, Store] = {
                self.orchestrator.endpoint: store,
                self.orchestrator.local_endpoint: store,
            }
            for p in self.participants:
                if p.name in routes:
                    raise ConfigurationError(f"two endpoints are named {p.name!r}")
                routes[p.name] = p.store
            transport = EmbeddedTransport(
                routes, wakeups=self.wakeups, clock=clock, idle_poll=idle_poll
            )
        # Kept unwrapped: whether local steps may skip the relay depends on what it is.
        self._delivery = transport
        self.transport = self.faults.wrap_transport(transport)
        self.stores: list[Store] = [store]
        for extra in [*(p.store for p in self.participants), *extra_stores]:
            if all(extra is not s for s in self.stores):
                self.stores.append(extra)
        if event_routes is None:
            # Embedded: every subscriber runs here. Across processes, pass the whole
            # topology, since a relay must know subscribers it does not host.
            derived: dict[str, list[str]] = {}
            for p in self.participants:
                for event_type in sorted(p.subscriptions):
                    derived.setdefault(event_type, []).append(p.name)
            event_routes = derived
        self.event_routes = {k: list(v) for k, v in event_routes.items()}
        self.relays = [
            Relay(
                s,
                self.transport,
                clock=clock,
                lease=relay_lease,
                faults=self.faults,
                event_routes=self.event_routes,
            )
            for s in self.stores
        ]
        consumers: dict[str, Store] = {p.name: p.store for p in self.participants}
        consumers[self.orchestrator.endpoint] = store
        consumers[self.orchestrator.local_endpoint] = store
        self.dead_letters = DeadLetterDesk(
            self.stores,
            saga_store=store,
            consumers=consumers,
            clock=clock,
            transport=self.transport,
            on_replay=lambda s: self.wakeups.notify(f"outbox:{s.name}"),
        )
        """List, inspect, replay and discard the dead letters of this engine's stores."""
        self._wrap = self.faults.wrap_consumer
        self.idle_poll = idle_poll
        self.wait_poll = 0.05
        """How often :meth:`wait` reads a saga that another process may finish (seconds)."""
        self.batch_size = batch_size
        # Inbox rows only need to outlive the longest possible redelivery of a message
        # (a mailbox lease, a broker's replay window); a week is far beyond both.
        self.inbox_retention = inbox_retention
        # Published outbox rows are only kept for audits (a saga's messages in the API);
        # without a purge the outbox would grow forever. Unpublished rows are never purged.
        self.outbox_retention = outbox_retention
        self.housekeeping_every = housekeeping_every
        if not set_aside_poll > 0:
            raise ConfigurationError(f"set_aside_poll must be > 0 seconds, got {set_aside_poll}")
        self.set_aside_poll = set_aside_poll
        """How often the engine looks for inputs set aside for its definition versions
        when no notification woke it (see :mod:`sagakit.runtime.set_aside`)."""
        self.alerts = alerts
        self.notifier: Notifier | None = None
        """Posts the alerts of this engine's stores (with ``alerts`` and ``relays``)."""
        if alerts is not None:
            self.orchestrator.alerts = AlertWriter(store)
            for p in self.participants:
                if isinstance(p, Tracker):
                    p.alerts = AlertWriter(p.store)
            if "relays" in self.roles:
                self.notifier = Notifier(self.stores, alerts, wakeups=self.wakeups, clock=clock)
        self._tasks: list[asyncio.Task[None]] = []
        self._periodic: list[tuple[str, float, Callable[[], Awaitable[object]]]] = []
        self._setup: list[Callable[[], Awaitable[object]]] = []
        self._running = False

    def before_start(self, step: Callable[[], Awaitable[object]]) -> None:
        """Run ``step`` after the stores opened and before any consumer starts.

        For migrations of business tables: no message is handled before they exist.
        """
        self._setup.append(step)

    def every(self, seconds: float, name: str, job: Callable[[], Awaitable[object]]) -> None:
        """Run ``job`` every ``seconds`` while the engine runs (sweepers, reports).

        A failing run is logged and the job runs again at the next interval.
        """
        if not seconds > 0:
            raise ConfigurationError(f"job {name!r}: interval must be > 0 seconds")
        self._periodic.append((name, seconds, job))
        if self._running:
            self._spawn(engine_loops.periodic_loop(self, name, seconds, job), name)

    # -- lifecycle --------------------------------------------------------------------
    async def __aenter__(self) -> Engine:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the stores and start every loop."""
        if self.lock is not None:
            self.lock.acquire()  # first: a refused second process touches nothing
        try:
            await self._open()
        except BaseException:
            self._release()
            raise

    async def _open(self) -> None:
        for s in self.stores:
            await s.open()
        for step in self._setup:
            await step()
        await self.transport.open()
        o, size = self.orchestrator, self.batch_size
        if "orchestrator" in self.roles:
            self._local_pool = ThreadPoolExecutor(
                self.local_threads, thread_name_prefix="sagakit-local"
            )
            o.local.configure(
                concurrency=self.local_concurrency,
                pool=self._local_pool,
                pool_size=self.local_threads,
            )
            self.transport.subscribe(o.endpoint, self._wrap(o.endpoint, o), batch_size=size)
            # Several batches at once: one waiting for a slow step holds up no other.
            self.transport.subscribe(
                o.local_endpoint,
                self._wrap(o.local_endpoint, o.local),
                batch_size=size,
                concurrency=self.local_batches,
            )
        if "participants" in self.roles:
            for p in self.participants:
                self.transport.subscribe(p.name, self._wrap(p.name, p), batch_size=size)
        await self.transport.start()
        self._running = True
        # The embedded transport would move local commands from this store's outbox into
        # this store's own mailbox: write them there directly (see the orchestrator).
        # Only where this process runs the local steps: an engine without the orchestrator
        # role (an API beside a broker deployment, whose transport here is embedded only
        # for want of a broker) would strand them in a mailbox no worker reads; through
        # the outbox, the deployment's relays deliver them.
        delivery = self._delivery
        o.direct_local = (
            "orchestrator" in self.roles
            and isinstance(delivery, EmbeddedTransport)
            and delivery.routes.get(o.local_endpoint) is self.store
        )
        if o.direct_local and "orchestrator" in self.roles:
            assert isinstance(delivery, EmbeddedTransport)
            o.local.start_inline(lease=delivery.lease, batch_size=size)
            self._spawn(o.local.run_inline(), "local-steps")
        if "relays" in self.roles:
            for relay in self.relays:
                self._spawn(engine_loops.relay_loop(self, relay), f"relay:{relay.store.name}")
        if self.notifier is not None:
            self._spawn(self.notifier.run(lambda: self._running), "alerts")
        if "timers" in self.roles:
            self._spawn(engine_loops.timer_loop(self), "timers")
        if self.resumes_set_aside:
            self._spawn(engine_loops.set_aside_loop(self), "set-aside")
        if "housekeeping" in self.roles:
            self._spawn(engine_loops.housekeeping_loop(self), "housekeeping")
        for name, seconds, job in self._periodic:
            self._spawn(engine_loops.periodic_loop(self, name, seconds, job), name)
        for store in self.stores:
            if hasattr(store, "listen"):
                self._spawn(engine_loops.listen_loop(self, store), f"listen:{store.name}")

    async def close(self) -> None:
        """Stop the loops and close the stores (committed work is kept)."""
        self._running = False
        self.orchestrator.local.inline = False  # commands decided from now on: mailbox
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        await self.transport.close()
        for s in self.stores:
            await s.close()
        self._release()

    def _release(self) -> None:
        """Shut the local-step pool and let go of the lock file."""
        self.orchestrator.local.configure()  # nothing runs in the pool from now on
        pool, self._local_pool = self._local_pool, None
        if pool is not None:
            # Not waiting: a blocking step still running finishes in its thread, and
            # its result is dropped (the command is still in the mailbox: it runs again).
            pool.shutdown(wait=False, cancel_futures=True)
        if self.lock is not None:
            self.lock.release()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    # -- API --------------------------------------------------------------------------
    async def start(
        self,
        definition: str,
        business_key: str,
        data: Mapping[str, Any] | None = None,
        *,
        tx: object | None = None,
        **kw: Any,
    ) -> SagaInstance:
        """Start a saga (idempotent by business key); returns the instance.

        The definition's personal-data rules apply first: declared fields are tokenised
        or refused, personal data elsewhere in ``data`` or ``business_key`` is refused
        (:class:`~sagakit.errors.PersonalDataRefused`); see :mod:`sagakit.core.personal`.

        With ``tx`` (your own transaction: a sqlite3 or psycopg connection, a SQLAlchemy
        connection or session, or a sagakit Tx of this engine's store) the saga is
        written in it and starts when you commit it; see :mod:`sagakit.runtime.own_tx`.
        """
        if tx is not None:
            (inst,) = await self.start_many([(definition, business_key, data or {})], tx=tx, **kw)
            return inst
        inst, _ = await self.orchestrator.start(definition, business_key, data, **kw)
        return inst

    async def start_many(
        self,
        requests: Sequence[tuple[str, str, Mapping[str, Any]]],
        *,
        tx: object | None = None,
        **kw: Any,
    ) -> list[SagaInstance]:
        """Start several sagas in one transaction (``tx``: yours, as in :meth:`start`)."""
        if tx is not None:
            return await start_with(self.orchestrator, tx, requests, **kw)
        return [inst for inst, _ in await self.orchestrator.start_many(requests, **kw)]

    async def cancel(
        self, saga_id: str, reason: str, *, expected_version: int | None = None
    ) -> SagaInstance:
        """Ask a saga to cancel (compensates before its pivot, refused after).

        A choreography's view cannot be cancelled (:class:`~sagakit.errors.NoDriver`).
        A ``reason`` holding personal data is refused before anything is read or written
        (:class:`~sagakit.errors.PersonalDataRefused`): it would be kept for good.
        ``expected_version``: the saga version a person decided on; a saga at another
        raises :class:`~sagakit.errors.SagaMoved` and nothing changes.
        """
        refuse_personal_text(reason)
        tracker = await self._tracker_of(saga_id)
        if tracker is not None:
            raise no_driver(tracker.flow, saga_id, "cancel")
        return await self.orchestrator.cancel(saga_id, reason, expected_version=expected_version)

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
        """Apply a person's decision to a saga in the manual queue (audited).

        On a choreography's view only the records of what a person did by hand apply
        (see :mod:`sagakit.runtime.tracker_manual`). A ``reason`` holding personal data
        is refused, as for :meth:`cancel`.

        ``expected_version`` is the saga version the person decided on (every front end
        passes it): checked against the saga read in the deciding transaction, a saga
        that moved since raises :class:`~sagakit.errors.SagaMoved` and nothing changes.
        ``accept_partial`` is refused with :class:`~sagakit.errors.OpenHolds` while a
        compensation or a hold is open (:func:`~sagakit.core.machine.open_holds`),
        unless ``force``; the history records that it was forced and what stayed open.
        """
        refuse_personal_text(reason)
        tracker = await self._tracker_of(saga_id)
        if tracker is not None:
            return await resolve_tracked(
                tracker,
                saga_id,
                action,
                reason=reason,
                actor=actor,
                expected_version=expected_version,
                force=force,
            )
        return await self.orchestrator.resolve(
            saga_id,
            action,
            reason=reason,
            actor=actor,
            rung=rung,
            expected_version=expected_version,
            force=force,
        )

    def preview(
        self,
        inst: SagaInstance,
        action: ManualAction | str,
        *,
        actor: str,
        reason: str = "preview",
        rung: int | None = None,
        force: bool = False,
    ) -> SagaInstance:
        """What a decision would make of ``inst``, computed and not written (a dry run).

        Raises what :meth:`resolve` (or, for ``"cancel"``, :meth:`cancel`) would raise
        for it (:class:`~sagakit.errors.ManualActionRefused` and its subclasses,
        :class:`~sagakit.errors.VersionMissing`); a cancel that would change nothing
        returns ``inst`` itself. The machines are pure, so nothing is read or written.
        """
        now = self.clock()
        tracker = self.trackers.get(inst.definition)
        orchestrated = (inst.definition, inst.definition_version) in self.orchestrator.machines
        if tracker is not None and not orchestrated:
            if action == "cancel":
                raise no_driver(tracker.flow, inst.saga_id, "cancel")
            view, _ = resolve_view(
                tracker.flow, inst, action, reason=reason, actor=actor, now=now, force=force
            )
            return view
        machine = self.orchestrator.machine_for(inst)
        if action == "cancel":
            decision = machine.on_cancel(inst, reason, now)
            return decision.instance if decision.changed else inst
        return machine.on_manual(
            inst, action, reason=reason, actor=actor, now=now, rung=rung, force=force
        ).instance

    async def _tracker_of(self, saga_id: str) -> Tracker | None:
        """The tracker whose view ``saga_id`` is (None: an orchestrated saga, or none)."""
        if not self.trackers:
            return None
        inst = await self.store.get_saga(saga_id)
        if inst is None or (inst.definition, inst.definition_version) in self.orchestrator.machines:
            return None
        return self.trackers.get(inst.definition)

    async def manual_cases(self, *, limit: int = 100, offset: int = 0) -> list[SagaInstance]:
        """The manual queue: FAILED_NEEDS_MANUAL sagas, newest first."""
        return await self.orchestrator.manual_cases(limit=limit, offset=offset)

    async def get(self, saga_id: str) -> SagaInstance:
        """The instance, as committed."""
        inst = await self.store.get_saga(saga_id)
        if inst is None:
            raise SagaNotFound(f"no saga {saga_id!r}")
        return inst

    async def wait(self, saga_id: str, timeout: float = 30.0) -> SagaInstance:
        """Wait until the saga is terminal; ``TimeoutError`` after ``timeout`` seconds.

        This process's orchestrator hands over the instance when it commits it terminal
        (no read per transition, and none at first for a saga this process committed
        last); other processes' commits are seen by reading the saga every
        ``wait_poll`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self.orchestrator.watch(saga_id) as finished:
            # This process committed the saga last, not terminal (it holds its copy):
            # its own commits resolve ``finished`` from now on, so no read is needed
            # yet; another process's commit is seen by the first poll.
            known = self.orchestrator.cache.peek(saga_id)
            while True:
                if known is None:
                    # Read after registering: a commit just before it is seen here.
                    inst = await self.get(saga_id)
                    if inst.terminal:
                        return inst
                else:
                    inst, known = known, None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"saga {saga_id} still {inst.state.value} after {timeout}s")
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(
                        asyncio.shield(finished), min(left, self.wait_poll)
                    )

    async def housekeeping(self) -> int:
        """Purge inbox rows and published outbox rows older than their retentions, and
        move the broker's own dead letters into the stores' dead-letter tables.

        Returns how many rows were purged in all. The outbox is purged in batches, so
        a backlog after a long pause never holds long locks.
        """
        now = self.clock()
        removed = 0
        for s in self.stores:
            removed += await s.inbox_purge(now - self.inbox_retention)
            removed += await s.outbox_purge(now - self.outbox_retention)
        # The broker's own dead letters, into the stores: one place to replay them from.
        await self.dead_letters.adopt_broker_dead_letters()
        # PostgreSQL appends saga count deltas; folding them keeps count_sagas() cheap
        # even when nothing reads the counts for a long while.
        fold = getattr(self.store, "fold_saga_counts", None)
        if fold is not None:
            await fold()
        return removed

    @property
    def running(self) -> bool:
        """Whether the engine is open and its loops run (see :mod:`.engine_loops`)."""
        return self._running

    @property
    def resumes_set_aside(self) -> bool:
        """Whether this engine applies inputs set aside for the versions it has."""
        return bool(self.roles & {"orchestrator", "timers"}) and bool(self.orchestrator.machines)


def embedded(
    path: str | Path,
    definitions: Sequence[SagaDefinition],
    *,
    participants: Sequence[Participant] = (),
    synchronous: str = "FULL",
    **kwargs: Any,
) -> Engine:
    """An engine on one SQLite file (the embedded default): no server, survives ``kill -9``.

    While open it holds an exclusive lock on ``<path>.lock`` (holding this process's
    pid): a second process opening the same file gets a
    :class:`~sagakit.errors.ConfigurationError` naming the first one's pid.
    """
    from sagakit.stores.sqlite import SQLiteStore

    store = SQLiteStore(path, name="orchestrator", synchronous=synchronous)
    if str(path) != ":memory:":
        kwargs.setdefault("lock_file", LockFile(f"{path}.lock", what=f"the database {path}"))
    return Engine(store, definitions, participants=participants, **kwargs)
