"""Local steps: Python callables the worker runs, their results checkpointed as replies.

A local step's command is addressed to ``<orchestrator>.local``. The callable runs
outside any transaction (it may take long, and may call out), at least once, with the
step's idempotency key; then one transaction records the command in the inbox and
applies the result to the saga as a reply (see :mod:`sagakit.runtime.orchestrator`).

Fairness: one slow callable must not delay other sagas. Once :meth:`LocalStepRunner.
configure` gave it a thread pool (the :class:`~sagakit.runtime.engine.Engine` does), the
runner runs up to ``concurrency`` callables at once: coroutine functions on the event
loop, blocking ones in the pool (never on the loop). Results are committed as they
become ready, whatever is ready going into one transaction, so a batch never waits for
its slowest member. Unconfigured, callables run on the loop one after another and a
delivered batch commits once: deterministic, which the simulator relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from sagakit.clock import using
from sagakit.core.definition import LocalAction, StepContext
from sagakit.core.envelope import Envelope, Outcome, failure, reply_to, success
from sagakit.core.machine import parse_key
from sagakit.errors import (
    ConcurrencyError,
    ConfigurationError,
    DefinitionError,
    MessageError,
    StepFailed,
)
from sagakit.runtime.consumer import BatchConsumer
from sagakit.runtime.step_threads import Finished, ThreadLane
from sagakit.stores.base import Tx
from sagakit.transports.base import Delivery, Settle

if TYPE_CHECKING:
    from sagakit.runtime.orchestrator import Orchestrator

log = logging.getLogger(__name__)

# The outcomes computed for the delivered batch being committed, by message id. A
# context variable: several batches may be in flight at once (the transport's
# subscription concurrency), each committing from its own task.
_OUTCOMES: contextvars.ContextVar[dict[str, Outcome] | None] = contextvars.ContextVar(
    "sagakit_local_outcomes", default=None
)


class LocalStepRunner(BatchConsumer):
    """Runs local steps (``sagakit.local`` commands) and checkpoints their results.

    The callable runs before the transaction (it may take long, and may call out); then
    one transaction records the command in the inbox and applies the result to the saga.
    A crash between the two runs the callable again on redelivery: at least once, with
    the same idempotency key, as documented.
    """

    def __init__(self, orchestrator: Orchestrator) -> None:
        super().__init__(
            orchestrator.local_endpoint,
            orchestrator.store,
            clock=orchestrator.clock,
            faults=orchestrator.faults,
            max_deliveries=orchestrator.max_deliveries,
        )
        self.orchestrator = orchestrator
        self.concurrency = 1
        """Callables running at once (see :meth:`configure`)."""
        self.pool: Executor | None = None
        """Where blocking callables run; None: on the loop, one after another."""
        self._lane: ThreadLane[_Call] | None = None
        # id(fn) -> (fn, runs on the loop): inspect's answer, asked once per callable.
        self._on_loop: dict[int, tuple[object, bool]] = {}
        self._free = 1  # callables that may start now
        self._queued: deque[_Call] = deque()  # waiting for one to finish
        self._generation = 0  # bumped by configure(): calls of before release nothing
        self.inline = False
        """True while :meth:`run_inline` runs: local commands are then leased to it."""
        self.inline_lease = 30.0
        """How long the inline runner keeps a command from the mailbox consumer."""
        self.inline_batch = 256
        """Most results the inline runner commits in one transaction."""
        self.inline_concurrency = 4
        """Commits the inline runner keeps in flight: one's commit overlaps the next's work."""
        self._inline_calls: set[_Call] = set()
        self._done: list[tuple[int, Envelope, Outcome]] = []
        self._give_back: list[tuple[int, str]] = []
        self._commits: set[asyncio.Task[None]] = set()
        self._commit_waiting = False  # a commit task created, not yet started

    def configure(
        self, *, concurrency: int = 1, pool: Executor | None = None, pool_size: int = 1
    ) -> None:
        """Run up to ``concurrency`` callables at once, blocking ones in ``pool``.

        Coroutine functions run on the event loop; any other callable runs in ``pool``
        (at most ``pool_size`` at once; an awaitable it returns is awaited on the loop).
        The pool's owner shuts it down, after calling this again without one. Without
        ``pool`` (the default) callables run on the loop one after another and a
        delivered batch commits once, deterministically (the simulator's way).
        """
        if concurrency < 1 or pool_size < 1:
            raise ConfigurationError(
                f"local step concurrency and pool size must be >= 1, got {concurrency} "
                f"and {pool_size}"
            )
        if pool is None and concurrency > 1:
            raise ConfigurationError(
                "running local steps concurrently needs a thread pool for the blocking ones"
            )
        if self._lane is not None:
            self._lane.close()
        self._lane = (
            ThreadLane(pool, pool_size, self._land_finished, asyncio.get_running_loop())
            if pool is not None
            else None
        )
        self.concurrency = concurrency
        self.pool = pool
        self._free = concurrency
        self._generation += 1
        for call in self._queued:
            call.cancel()
        self._queued.clear()

    # -- delivered by the transport ---------------------------------------------------
    async def __call__(self, deliveries: Sequence[Delivery]) -> list[Settle]:
        outcomes: dict[str, Outcome] = {}
        token = _OUTCOMES.set(outcomes)
        try:
            if self.pool is None:
                return await self._in_order(deliveries, outcomes)
            return await self._as_ready(deliveries, outcomes)
        finally:
            _OUTCOMES.reset(token)

    async def _in_order(
        self, deliveries: Sequence[Delivery], outcomes: dict[str, Outcome]
    ) -> list[Settle]:
        """Every callable in turn, then one commit for the batch (the simulator's way)."""
        for d in deliveries:
            env = self._runnable(d)
            if env is not None and env.message_id not in outcomes:
                with contextlib.suppress(MessageError):  # the base class parks it
                    outcomes[env.message_id] = await self._run_callable(env)
        return await super().__call__(deliveries)

    async def _as_ready(
        self, deliveries: Sequence[Delivery], outcomes: dict[str, Outcome]
    ) -> list[Settle]:
        """Every callable at once; what is ready commits while the others still run.

        One commit at a time per batch: while it runs, more results come in and go
        into the next one. Settles come back when the whole batch committed.
        """
        running: dict[_Call, Delivery] = {}
        landed: list[tuple[Delivery, Envelope, Outcome | MessageError]] = []
        woken = asyncio.Event()
        ready: list[Delivery] = []
        settled: dict[int, Settle] = {}

        def done(call: _Call, outcome: Outcome | MessageError) -> None:
            landed.append((running.pop(call), call.env, outcome))
            woken.set()

        try:
            for d in deliveries:
                env = self._runnable(d)
                if env is None:
                    ready.append(d)  # not for a callable: the base class deals with it
                else:
                    running[self._start(env, done)] = d
            while ready or running or landed:
                if not ready and not landed:
                    woken.clear()
                    await woken.wait()
                    continue
                for d, env, outcome in landed:
                    if not isinstance(outcome, MessageError):
                        outcomes[env.message_id] = outcome
                    # else not runnable: process_batch raises it again without running
                    # anything, and the base class parks it.
                    ready.append(d)
                landed.clear()
                group, ready = ready, []
                for d, s in zip(group, await super().__call__(group), strict=True):
                    settled[d.handle] = s
            return [settled[d.handle] for d in deliveries]
        finally:
            for call in running:
                call.cancel()

    def _runnable(self, d: Delivery) -> Envelope | None:
        """The delivery's envelope if its callable should run here (else the base class
        parks it: malformed, or addressed elsewhere; or sets it aside: its definition
        version is missing here)."""
        try:
            env = Envelope.from_json(d.body)
        except MessageError:
            return None
        if self.orchestrator.aside.local_version(env) is not None:
            return None
        return env if env.destination in (None, self.endpoint) else None

    async def process(self, tx: Tx, envelope: Envelope, now: float) -> None:
        if not await tx.inbox_add(self.endpoint, envelope.message_id, now):
            self.duplicates.inc()
            return
        if await self.orchestrator.aside.put_local(tx, envelope, now):
            return  # for a process that has its definition version
        reply = reply_to(envelope, await self._outcome(envelope), source=self.endpoint, now=now)
        await self.orchestrator.apply_reply(tx, reply, now)

    async def process_batch(self, tx: Tx, envelopes: Sequence[Envelope], now: float) -> None:
        """Record the batch in the inbox in one go, then apply the new results in order."""
        fresh, loaded = await self.orchestrator.record_and_load(tx, self.endpoint, envelopes, now)
        replies: list[Envelope] = []
        for env in self.new_ones(envelopes, fresh):
            if await self.orchestrator.aside.put_local(tx, env, now):
                continue  # for a process that has its definition version
            outcome = await self._outcome(env)
            replies.append(reply_to(env, outcome, source=self.endpoint, now=now))
        await self.orchestrator.apply_replies(tx, replies, now, self.endpoint, loaded=loaded)

    async def _outcome(self, env: Envelope) -> Outcome:
        computed = _OUTCOMES.get()
        outcome = computed.get(env.message_id) if computed is not None else None
        if outcome is None:
            # Only a command that is not runnable gets here (its callable never ran):
            # this raises its MessageError at once, not waiting for a slot in a tx.
            self._resolve(env)
            outcome = await self._run_callable(env)
        return outcome

    def after_commit(self) -> None:
        self.orchestrator.after_commit()

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Tx]:
        """The orchestrator's transaction (the next local commands go in with it)."""
        return self.orchestrator.transaction()

    # -- inline: local commands this process wrote, run without a mailbox round trip ----
    def start_inline(self, *, lease: float, batch_size: int, concurrency: int = 4) -> None:
        """Lease new local commands to :meth:`run_inline` from now on (call, then run it).

        ``concurrency``: commits kept in flight (:attr:`inline_concurrency`).
        """
        self.inline_lease = lease
        self.inline_batch = max(batch_size, 1)
        self.inline_concurrency = max(concurrency, 1)
        self.inline = True

    def hand_over(self, items: Sequence[tuple[int, Envelope]]) -> None:
        """Committed local commands (mailbox id, envelope): their callables start now
        (or as soon as :attr:`concurrency` allows), their results commit when ready."""
        for queue_id, env in items:
            self._inline_calls.add(self._start(env, self._inline_landed, tag=queue_id))

    async def run_inline(self) -> None:
        """Keep the inline runner on until cancelled (the engine runs it as a task).

        Handed-over commands run up to :attr:`concurrency` at once; whatever results are
        ready go into one transaction (at most :attr:`inline_batch`), with up to
        :attr:`inline_concurrency` transactions in flight: while one waits for its
        commit (a disk flush), results keep landing for the next. They never deadlock
        (each locks its sagas in saga_id order) and a saga with commands in two is
        applied by one, then the other (its row lock orders them).

        Stops leasing new commands when cancelled; commands still pending then stay
        leased in the mailbox, and the transport hands them out again on its next start.
        """
        self.inline = True
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self.inline = False
            for call in self._inline_calls:
                call.cancel()
            self._inline_calls.clear()
            self._done.clear()
            self._give_back.clear()
            commits = list(self._commits)
            for task in commits:
                task.cancel()
            await asyncio.gather(*commits, return_exceptions=True)
            self._commit_waiting = False  # its task may have been cancelled unstarted

    def _inline_landed(self, call: _Call, outcome: Outcome | MessageError) -> None:
        self._inline_calls.discard(call)
        if isinstance(outcome, MessageError):
            self._give_back.append((call.tag, f"{type(outcome).__name__}: {outcome}"))
        else:
            self._done.append((call.tag, call.env, outcome))
        self._commit_soon()

    def _commit_soon(self) -> None:
        """Have a commit task take what is ready, unless one is about to start anyway.

        The task takes the results when it starts, not now: whatever lands before then
        (the rest of a burst of thread results) goes into the same transaction.
        """
        if self._commit_waiting or len(self._commits) >= self.inline_concurrency:
            return
        self._commit_waiting = True
        task = asyncio.create_task(self._commit_ready())
        self._commits.add(task)
        task.add_done_callback(self._commit_finished)

    async def _commit_ready(self) -> None:
        self._commit_waiting = False
        batch = self._done[: self.inline_batch]
        del self._done[: self.inline_batch]
        back, self._give_back = self._give_back, []
        if self._done:
            self._commit_soon()  # more than one batch is ready
        await self._guarded_batch(batch, back)

    def _commit_finished(self, task: asyncio.Task[None]) -> None:
        self._commits.discard(task)
        if (self._done or self._give_back) and not task.cancelled():
            self._commit_soon()  # landed while every commit slot was taken

    async def _guarded_batch(
        self, done: Sequence[tuple[int, Envelope, Outcome]], give_back: Sequence[tuple[int, str]]
    ) -> None:
        try:
            await self._inline_batch(done, give_back)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The store failed even to hand the commands back: their leases end and
            # the mailbox consumer takes them then.
            log.exception("inline local steps failed; the mailbox consumer takes over")

    async def _inline_batch(
        self, done: Sequence[tuple[int, Envelope, Outcome]], give_back: Sequence[tuple[int, str]]
    ) -> None:
        back = list(give_back)
        if done:
            try:
                await self._apply_inline(done)
            except Exception as exc:
                # Anything unusual (a poison message, a conflict, a crash point) is for
                # the mailbox consumer, which retries one by one and parks what must be.
                log.debug("inline batch of %d failed (%r); handing it back", len(done), exc)
                back += [(queue_id, f"{type(exc).__name__}: {exc}") for queue_id, *_ in done]
        if back:
            now = self.clock()
            for queue_id, error in back:
                await self.store.queue_retry(queue_id, now, error)
            self.orchestrator.wakeups.notify(f"queue:{self.endpoint}")

    async def _apply_inline(self, done: Sequence[tuple[int, Envelope, Outcome]]) -> None:
        try:
            await self._apply_inline_once(done, copies=True)
        except ConcurrencyError:
            # A copy of a saga was stale (another process moved it) or a command had
            # been handled (its lease ran out): load, and see.
            await self._apply_inline_once(done, copies=False)

    async def _apply_inline_once(
        self, done: Sequence[tuple[int, Envelope, Outcome]], *, copies: bool
    ) -> None:
        now = self.clock()
        async with self.transaction() as tx:
            # Already recorded: the mailbox consumer handled it (a lease ran out).
            envelopes = [env for _, env, _ in done]
            fresh, loaded = await self.orchestrator.record_and_load(
                tx, self.endpoint, envelopes, now, copies=copies
            )
            outcomes = {env.message_id: outcome for _, env, outcome in done}
            replies = [
                reply_to(env, outcomes[env.message_id], source=self.endpoint, now=now)
                for env in self.new_ones(envelopes, fresh)
            ]
            await self.orchestrator.apply_replies(tx, replies, now, self.endpoint, loaded=loaded)
            await tx.queue_remove([queue_id for queue_id, _, _ in done])
            self.faults.point("before_commit", self.endpoint)
        self.after_commit()

    # -- running callables ------------------------------------------------------------
    def _start(
        self,
        env: Envelope,
        done: Callable[[_Call, Outcome | MessageError], None],
        *,
        tag: int = 0,
    ) -> _Call:
        """Start the command's callable now, or once a running one finished.

        ``done`` gets its outcome, or the :class:`MessageError` that makes the command
        not runnable, always from the event loop and never from within this call; not
        at all once the call was cancelled.
        """
        call = _Call(env, done, tag, self._generation)
        if self._free > 0:
            self._free -= 1
            self._launch(call)
        else:
            self._queued.append(call)
        return call

    def _launch(self, call: _Call) -> None:
        loop = asyncio.get_running_loop()
        try:
            action, ctx = self._resolve(call.env)
        except MessageError as exc:
            loop.call_soon(self._land, call, exc)
            return
        fn = action.fn
        # The task and the pool's job copy the context here: sagakit.now() in the step
        # reads the orchestrator's clock.
        with using(self.clock):
            if self._lane is None or self._runs_on_loop(fn):
                call.task = asyncio.create_task(self._call(action, ctx, call.env))
                call.task.add_done_callback(functools.partial(self._land_task, call))
                return
            # A blocking callable: in the pool, with the caller's context variables (a
            # trace, a logging context), as asyncio.to_thread does.
            job = functools.partial(contextvars.copy_context().run, fn, ctx)
        try:
            self._lane.submit(call, job)
        except RuntimeError as exc:  # the pool is shut down: the engine is closing
            # Not run: the inline runner hands the command back to the mailbox.
            loop.call_soon(self._land, call, MessageError(f"local step pool closed: {exc}"))

    def _runs_on_loop(self, fn: object) -> bool:
        known = self._on_loop.get(id(fn))
        if known is None or known[0] is not fn:
            known = self._on_loop[id(fn)] = (fn, _is_coroutine_function(fn))
        return known[1]

    def _land_finished(self, finished: list[Finished[_Call]]) -> None:
        """Blocking callables that finished in the pool (a burst of them)."""
        for call, exc, result in finished:
            if exc is not None:
                self._land(call, self._failed(exc, call.env))
            elif inspect.isawaitable(result):
                # A plain function that returned an awaitable: awaited on the loop.
                call.task = asyncio.create_task(self._finish(result, call.env))
                call.task.add_done_callback(functools.partial(self._land_task, call))
            else:
                self._land(call, self._as_outcome(result, call.env))

    def _land_task(self, call: _Call, task: asyncio.Task[Outcome]) -> None:
        if task.cancelled():
            self._land(call, None)
        elif (exc := task.exception()) is not None:
            self._land(call, failure(f"{type(exc).__name__}: {exc}", retryable=True))
        else:
            self._land(call, task.result())

    def _land(self, call: _Call, outcome: Outcome | MessageError | None) -> None:
        """A callable finished: free its slot for the next one, hand on its outcome."""
        if call.generation == self._generation and not call.landed:
            call.landed = True
            while self._queued:
                nxt = self._queued.popleft()
                if not nxt.cancelled:
                    self._launch(nxt)
                    break
            else:
                self._free += 1
        if outcome is not None and not call.cancelled:
            call.done(call, outcome)

    async def _finish(self, result: Any, env: Envelope) -> Outcome:
        try:
            return self._as_outcome(await result, env)
        except Exception as exc:
            return self._failed(exc, env)

    async def _run_callable(self, env: Envelope) -> Outcome:
        """Run the command's callable (within :attr:`concurrency`); its outcome.

        Raises :class:`MessageError`, before running anything, if the command names no
        local step of a registered definition. (Also for the resuming of set-aside
        commands: a blocking callable must go through the lane, whose threads are
        the whole pool.)
        """
        if self._lane is None:
            action, ctx = self._resolve(env)
            return await self._call(action, ctx, env)
        landed: asyncio.Future[Outcome | MessageError] = asyncio.get_running_loop().create_future()

        def done(call: _Call, outcome: Outcome | MessageError) -> None:
            if not landed.done():
                landed.set_result(outcome)

        call = self._start(env, done)
        try:
            outcome = await landed
        finally:
            call.cancel()  # a no-op once it landed; else it never calls done
        if isinstance(outcome, MessageError):
            raise outcome
        return outcome

    def _resolve(self, env: Envelope) -> tuple[LocalAction, StepContext]:
        payload = env.payload
        try:
            name = payload["definition"]
            version = payload["definition_version"]
            phase = payload["phase"]
            machine = self.orchestrator.machines[(name, version)]
            if env.step is None or env.idempotency_key is None:
                raise MessageError("local step command without step or idempotency key")
            step = machine.definition.steps[machine.definition.step_index(env.step)]
            key = parse_key(env.idempotency_key)
        except (KeyError, TypeError, DefinitionError) as exc:
            raise MessageError(
                f"local step command {env.message_id} is not runnable: {exc}"
            ) from exc
        if phase == "action":
            action: object = step.action
        elif phase == "query":
            action = step.status_query
        else:
            try:
                action = step.ladder[key.rung].action
            except IndexError as exc:
                raise MessageError(
                    f"local step command {env.message_id}: step {env.step!r} has no "
                    f"compensation rung {key.rung}"
                ) from exc
        if not isinstance(action, LocalAction):
            raise MessageError(f"step {env.step!r} {phase} is not a local step")
        ctx = StepContext(
            saga_id=env.saga_id or "",
            business_key=env.business_key or "",
            step=env.step,
            attempt=env.attempt,
            idempotency_key=env.idempotency_key,
            data=payload.get("data", {}),
            results=payload.get("results", {}),
        )
        return action, ctx

    async def _call(self, action: LocalAction, ctx: StepContext, env: Envelope) -> Outcome:
        """Run the callable on the loop: a coroutine function, or any callable when
        unconfigured (blocking ones otherwise go to the lane, see :meth:`_launch`)."""
        try:
            result: Any = action.fn(ctx)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            return self._failed(exc, env)
        return self._as_outcome(result, env)

    @staticmethod
    def _failed(exc: BaseException, env: Envelope) -> Outcome:
        if isinstance(exc, StepFailed):
            return failure(exc.reason, retryable=exc.retryable)
        # The step's own error: retry it, as the policy allows.
        log.warning(
            "local step %s raised %r",
            env.step,
            exc,
            extra={"saga_id": env.saga_id, "step": env.step, "attempt": env.attempt},
        )
        return failure(f"{type(exc).__name__}: {exc}", retryable=True)

    @staticmethod
    def _as_outcome(result: object, env: Envelope) -> Outcome:
        if result is None:
            return success()
        if isinstance(result, Mapping):
            return success(dict(result))
        return failure(
            f"local step {env.step!r} returned {type(result).__name__}; return a dict or None"
        )


class _Call:
    """One callable's run: queued for a slot, then running; ``done`` gets its outcome."""

    __slots__ = ("cancelled", "done", "env", "generation", "landed", "tag", "task")

    def __init__(
        self,
        env: Envelope,
        done: Callable[[_Call, Outcome | MessageError], None],
        tag: int,
        generation: int,
    ) -> None:
        self.env = env
        self.done = done
        self.tag = tag  # the inline runner's mailbox id
        self.generation = generation
        self.task: asyncio.Task[Outcome] | None = None
        self.cancelled = False
        self.landed = False

    def cancel(self) -> None:
        """Never call ``done``; stop the callable if it runs on the loop (a thread's
        callable runs to its end, its result dropped)."""
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()


def _is_coroutine_function(fn: object) -> bool:
    """``async def`` functions, and objects whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the method, not callability
    )
