"""Local steps: Python callables the worker runs, their results checkpointed as replies.

A local step's command is addressed to ``<orchestrator>.local``. The callable runs
outside any transaction (it may take long, and may call out), at least once, with the
step's idempotency key; then one transaction records the command in the inbox and
applies the result to the saga as a reply (see :mod:`sagakit.runtime.orchestrator`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from sagakit.core.definition import LocalAction, StepContext
from sagakit.core.envelope import Envelope, Outcome, failure, reply_to, success
from sagakit.core.machine import parse_key
from sagakit.errors import DefinitionError, MessageError, StepFailed
from sagakit.runtime.consumer import BatchConsumer
from sagakit.stores.base import Tx
from sagakit.transports.base import Delivery, Settle

if TYPE_CHECKING:
    from sagakit.runtime.orchestrator import Orchestrator

log = logging.getLogger(__name__)


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
        self._results: dict[str, Outcome] = {}
        self.inline = False
        """True while :meth:`run_inline` runs: local commands are then leased to it."""
        self.inline_lease = 30.0
        """How long the inline runner keeps a command from the mailbox consumer."""
        self.inline_batch = 256
        self.inline_concurrency = 4
        """Batches the inline runner applies at once: one's commit overlaps the next's work."""
        self._pending: list[tuple[int, Envelope]] = []
        self._ready = asyncio.Event()

    async def __call__(self, deliveries: Sequence[Delivery]) -> list[Settle]:
        # Run the callables first, outside any transaction; BatchConsumer then commits.
        for d in deliveries:
            try:
                env = Envelope.from_json(d.body)
                if env.message_id not in self._results:
                    self._results[env.message_id] = await self._run_callable(env)
            except MessageError:
                continue  # not runnable: the base class parks it with the reason
        try:
            return await super().__call__(deliveries)
        finally:
            self._results.clear()

    async def process(self, tx: Tx, envelope: Envelope, now: float) -> None:
        if not await tx.inbox_add(self.endpoint, envelope.message_id, now):
            self.duplicates.inc()
            return
        outcome = self._results.get(envelope.message_id)
        if outcome is None:
            outcome = await self._run_callable(envelope)
        reply = reply_to(envelope, outcome, source=self.endpoint, now=now)
        await self.orchestrator.apply_reply(tx, reply, now)

    async def process_batch(self, tx: Tx, envelopes: Sequence[Envelope], now: float) -> None:
        """Record the batch in the inbox in one go, then apply the new results in order."""
        fresh, loaded = await self.orchestrator.record_and_load(tx, self.endpoint, envelopes, now)
        replies: list[Envelope] = []
        for env in self.new_ones(envelopes, fresh):
            outcome = self._results.get(env.message_id)
            if outcome is None:
                outcome = await self._run_callable(env)
            replies.append(reply_to(env, outcome, source=self.endpoint, now=now))
        await self.orchestrator.apply_replies(tx, replies, now, self.endpoint, loaded=loaded)

    def after_commit(self) -> None:
        self.orchestrator.after_commit()

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Tx]:
        """The orchestrator's transaction (the next local commands go in with it)."""
        return self.orchestrator.transaction()

    # -- inline: local commands this process wrote, run without a mailbox round trip ----
    def start_inline(self, *, lease: float, batch_size: int, concurrency: int = 4) -> None:
        """Lease new local commands to :meth:`run_inline` from now on (call, then run it)."""
        self.inline_lease = lease
        self.inline_batch = max(batch_size, 1)
        self.inline_concurrency = max(concurrency, 1)
        self.inline = True

    def hand_over(self, items: Sequence[tuple[int, Envelope]]) -> None:
        """Committed local commands (mailbox id, envelope) for the inline runner."""
        self._pending.extend(items)
        self._ready.set()

    async def run_inline(self) -> None:
        """Run handed-over local commands and apply their results, batch by batch.

        Up to :attr:`inline_concurrency` batches at once, each in its own transaction:
        while one waits for its commit (a disk flush), the next one's steps run. They
        never deadlock (each locks its sagas in saga_id order) and a saga with commands
        in both is applied by one, then the other (its row lock orders them).

        Stops leasing new commands when cancelled; commands still pending then stay
        leased in the mailbox, and the transport hands them out again on its next start.
        """
        self.inline = True
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            self._ready.set()

        try:
            while True:
                if not self._pending or len(running) >= self.inline_concurrency:
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                batch = self._pending[: self.inline_batch]
                del self._pending[: self.inline_batch]
                task = asyncio.create_task(self._guarded_batch(batch))
                running.add(task)
                task.add_done_callback(finished)
        finally:
            self.inline = False
            self._pending.clear()
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _guarded_batch(self, batch: Sequence[tuple[int, Envelope]]) -> None:
        try:
            await self._inline_batch(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The store failed even to hand the commands back: their leases end and
            # the mailbox consumer takes them then.
            log.exception("inline local steps failed; the mailbox consumer takes over")

    async def _inline_batch(self, batch: Sequence[tuple[int, Envelope]]) -> None:
        done: list[tuple[int, Envelope, Outcome]] = []
        give_back: list[tuple[int, str]] = []
        for queue_id, env in batch:
            try:
                done.append((queue_id, env, await self._run_callable(env)))
            except MessageError as exc:
                give_back.append((queue_id, f"{type(exc).__name__}: {exc}"))
        if done:
            try:
                await self._apply_inline(done)
            except Exception as exc:
                # Anything unusual (a poison message, a conflict, a crash point) is for
                # the mailbox consumer, which retries one by one and parks what must be.
                log.debug("inline batch of %d failed (%r); handing it back", len(done), exc)
                give_back += [(queue_id, f"{type(exc).__name__}: {exc}") for queue_id, *_ in done]
        if give_back:
            now = self.clock()
            for queue_id, error in give_back:
                await self.store.queue_retry(queue_id, now, error)
            self.orchestrator.wakeups.notify(f"queue:{self.endpoint}")

    async def _apply_inline(self, done: Sequence[tuple[int, Envelope, Outcome]]) -> None:
        now = self.clock()
        async with self.transaction() as tx:
            # Already recorded: the mailbox consumer handled it (a lease ran out).
            envelopes = [env for _, env, _ in done]
            fresh, loaded = await self.orchestrator.record_and_load(
                tx, self.endpoint, envelopes, now
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

    async def _run_callable(self, env: Envelope) -> Outcome:
        payload = env.payload
        try:
            name = payload["definition"]
            version = payload["definition_version"]
            phase = payload["phase"]
            machine = self.orchestrator.machines[(name, version)]
            if env.step is None or env.idempotency_key is None:
                raise MessageError("local step command without step or idempotency key")
            step = machine.definition.steps[machine.definition.step_index(env.step)]
        except (KeyError, TypeError, DefinitionError) as exc:
            raise MessageError(
                f"local step command {env.message_id} is not runnable: {exc}"
            ) from exc
        key = parse_key(env.idempotency_key)
        if phase == "action":
            action: object = step.action
        elif phase == "query":
            action = step.status_query
        else:
            action = step.ladder[key.rung].action
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
        try:
            result = action.fn(ctx)
            if inspect.isawaitable(result):
                result = await result
        except StepFailed as exc:
            return failure(exc.reason, retryable=exc.retryable)
        except Exception as exc:  # the step's own error: retry it, as the policy allows
            log.warning(
                "local step %s raised %r",
                env.step,
                exc,
                extra={"saga_id": env.saga_id, "step": env.step, "attempt": env.attempt},
            )
            return failure(f"{type(exc).__name__}: {exc}", retryable=True)
        if result is None:
            return success()
        if isinstance(result, Mapping):
            return success(dict(result))
        return failure(
            f"local step {env.step!r} returned {type(result).__name__}; return a dict or None"
        )
