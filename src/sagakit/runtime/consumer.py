"""Batch consumption shared by the orchestrator and participants.

A batch of deliveries is parsed, then handled in ONE local transaction (one commit
for many messages is where the throughput comes from). If anything in it fails, the
transaction rolls back and the messages are retried one by one, so a single poison
message cannot hold back the others. A message that can never be handled (malformed,
unknown type, unknown saga) is parked in the dead-letter table with its reason; one
that keeps failing for other reasons is parked after ``max_deliveries`` tries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar

from sagakit.core.definition import RetryPolicy
from sagakit.core.envelope import Envelope
from sagakit.errors import DefinitionError, MessageError, SagaNotFound, VersionMissing
from sagakit.metrics import INBOX_DUPLICATES, on_commit
from sagakit.observability import handler_span
from sagakit.stores.base import Store, Tx
from sagakit.transports.base import ACK, BatchHandler, Delivery, Settle, Transport, retry

log = logging.getLogger(__name__)

FIRST_DELIVERIES: ContextVar[bool] = ContextVar("sagakit_first_deliveries", default=True)
"""Whether the batch being handled holds first deliveries only (and is not a retry of a
failed batch). A redelivered message is the likely duplicate: a handler that skips a
read when nothing is a duplicate (the orchestrator's saga copies) reads for it."""

# Errors that will fail the same way on every redelivery: park at once. Not
# VersionMissing (a DefinitionError): a process that has the version can handle it.
PERMANENT = (MessageError, DefinitionError, SagaNotFound)


class FaultHook:
    """Where fault injection plugs into the runtime; this base class injects nothing.

    :class:`sagakit.testing.faults.Faults` overrides it to crash components at named
    points and to wrap the transport and consumers with message faults.
    """

    def point(self, name: str, endpoint: str) -> None:
        """Raise to simulate a crash at ``name``; the default does nothing."""

    def wrap_transport(self, transport: Transport) -> Transport:
        """Return the transport the runtime should use (unchanged by default)."""
        return transport

    def wrap_consumer(self, endpoint: str, handler: BatchHandler) -> BatchHandler:
        """Return the handler the transport should call (unchanged by default)."""
        return handler


class BatchConsumer:
    """Base class: subclasses implement :meth:`process` for one message inside a tx."""

    def __init__(
        self,
        endpoint: str,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        max_deliveries: int = 20,
        redelivery: RetryPolicy | None = None,
        faults: FaultHook | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.store = store
        self.clock = clock
        self.max_deliveries = max_deliveries
        self.redelivery = redelivery or RetryPolicy(
            max_attempts=max_deliveries, initial_backoff=0.05, max_backoff=5.0
        )
        self.faults = faults or FaultHook()
        self.duplicates = INBOX_DUPLICATES.labels(endpoint)
        """Count of deliveries the inbox recognised as already handled."""

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """A store transaction whose metrics are recorded only if it commits.

        A rolled-back batch is retried message by message; counting its sagas, steps
        and duplicates at commit keeps them from being counted twice. (The orchestrator
        wraps it further.)
        """
        return on_commit(self.store.transaction())

    def new_ones(self, envelopes: Sequence[Envelope], fresh: set[str]) -> list[Envelope]:
        """The envelopes whose id is in ``fresh`` (new to the inbox), each id once.

        ``fresh`` is what ``Tx.inbox_add_many`` returned for the batch; the others,
        and later copies of an id within the batch, are counted as inbox duplicates.
        """
        seen: set[str] = set()
        out: list[Envelope] = []
        for env in envelopes:
            if env.message_id in fresh and env.message_id not in seen:
                seen.add(env.message_id)
                out.append(env)
        if len(out) < len(envelopes):
            self.duplicates.inc(len(envelopes) - len(out))
        return out

    async def process(self, tx: Tx, envelope: Envelope, now: float) -> None:
        """Handle one message inside ``tx``."""
        raise NotImplementedError  # protocol

    async def process_batch(self, tx: Tx, envelopes: Sequence[Envelope], now: float) -> None:
        """Handle a batch inside ``tx``: :meth:`process` for each, in order.

        Subclasses that can share round trips across the batch (one inbox insert, one
        load of every saga) override this.
        """
        for env in envelopes:
            with handler_span(self.endpoint, env):
                await self.process(tx, env, now)

    def after_commit(self) -> None:
        """Called after each successful commit (wake the relay and waiters)."""

    async def __call__(self, deliveries: Sequence[Delivery]) -> list[Settle]:
        parsed: list[tuple[Delivery, Envelope]] = []
        poison: list[tuple[Delivery, str | None, str]] = []
        for d in deliveries:
            try:
                env = Envelope.from_json(d.body)
            except MessageError as exc:
                poison.append((d, None, f"malformed message: {exc}"))
                continue
            if env.destination not in (None, self.endpoint):
                poison.append(
                    (d, env.message_id, f"addressed to {env.destination!r}, not {self.endpoint!r}")
                )
                continue
            parsed.append((d, env))
        if poison:
            await self._dead_letter(poison)
        if not parsed:
            return [ACK] * len(deliveries)
        try:
            await self._run(parsed)
        except Exception as exc:
            if len(parsed) == 1:
                settled = await self._settle_failure(parsed[0], exc)
                return [settled if d is parsed[0][0] else ACK for d in deliveries]
            log.debug("batch of %d failed (%r); retrying one by one", len(parsed), exc)
            by_handle: dict[int, Settle] = {}
            for item in parsed:
                try:
                    await self._run([item], first=False)
                    by_handle[item[0].handle] = ACK
                except Exception as one_exc:
                    by_handle[item[0].handle] = await self._settle_failure(item, one_exc)
            return [by_handle.get(d.handle, ACK) for d in deliveries]
        return [ACK] * len(deliveries)

    async def _run(self, items: Sequence[tuple[Delivery, Envelope]], *, first: bool = True) -> None:
        now = self.clock()
        token = FIRST_DELIVERIES.set(first and all(d.deliveries <= 1 for d, _ in items))
        try:
            async with self.transaction() as tx:
                await self.process_batch(tx, [env for _, env in items], now)
                self.faults.point("before_commit", self.endpoint)
        finally:
            FIRST_DELIVERIES.reset(token)
        self.after_commit()

    async def _settle_failure(self, item: tuple[Delivery, Envelope], exc: Exception) -> Settle:
        d, env = item
        extra = {
            "message_id": env.message_id,
            "saga_id": env.saga_id,
            "step": env.step,
            "message_type": env.type,
            "endpoint": self.endpoint,
        }
        if isinstance(exc, VersionMissing):
            # The orchestrator sets such inputs aside rather than raise; should one get
            # here anyway, it waits for a process with the version: never parked for it.
            delay = self.redelivery.max_backoff
            log.debug("retrying %s in %.3fs: %s", env.message_id, delay, exc, extra=extra)
            return retry(delay, f"{type(exc).__name__}: {exc}")
        if isinstance(exc, PERMANENT):
            log.warning("parking %s: %s", env.message_id, exc, extra=extra)
            await self._dead_letter([(d, env.message_id, f"{type(exc).__name__}: {exc}")])
            return ACK
        if d.deliveries >= self.max_deliveries:
            log.error(
                "parking %s after %d deliveries: %r", env.message_id, d.deliveries, exc, extra=extra
            )
            reason = f"failed {d.deliveries} deliveries; last error {type(exc).__name__}: {exc}"
            await self._dead_letter([(d, env.message_id, reason)])
            return ACK
        delay = self.redelivery.backoff(d.deliveries, env.message_id)
        log.info("retrying %s in %.3fs: %r", env.message_id, delay, exc, extra=extra)
        return retry(delay, f"{type(exc).__name__}: {exc}")

    async def _dead_letter(self, items: Sequence[tuple[Delivery, str | None, str]]) -> None:
        now = self.clock()
        async with self.store.transaction() as tx:
            for d, message_id, reason in items:
                await tx.dead_letter(self.endpoint, message_id, d.body, reason, now)
