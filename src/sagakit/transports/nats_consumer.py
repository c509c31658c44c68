"""Consuming on the NATS transport: one pull loop per subscription (and one for the
dead-letter mover), in-progress acks while a batch is handled, settling (ack, nak with
a delay, or a long retry held in this process) and closing (see
:mod:`sagakit.transports.nats`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sagakit.errors import TransportError
from sagakit.transports.base import BatchHandler, Delivery, InFlight, Settle
from sagakit.transports.nats_connection import MOVER
from sagakit.transports.nats_dead_letters import NatsDeadLetters
from sagakit.transports.nats_names import token
from sagakit.transports.nats_pull import Puller
from sagakit.transports.shared import check_subscription

if TYPE_CHECKING:
    from nats.aio.msg import Msg

log = logging.getLogger("sagakit.transports.nats")

FAILED_BATCH_DELAY = 1.0
"""Redelivery delay after a handler raised."""
MAX_BACKOFF = 5.0
"""The longest pause between failed pulls."""


@dataclass
class _Subscription:
    endpoint: str
    handler: BatchHandler
    batch_size: int
    concurrency: int = 1
    puller: Puller | None = None


class NatsConsumer(NatsDeadLetters):
    """The consuming part of :class:`~sagakit.transports.nats.NatsTransport` (its
    dead-letter mover is one of the pull loops)."""

    _subs: list[_Subscription]
    _tasks: list[asyncio.Task[None]]
    _held: dict[asyncio.Task[None], Msg]
    """Retries longer than ``ack_wait``, held in this process until due."""
    _stopping: bool
    _stop_event: asyncio.Event
    _handles: itertools.count[int]
    _beat: float
    """Seconds between in-progress acks."""

    def subscribe(
        self, endpoint: str, handler: BatchHandler, *, batch_size: int = 256, concurrency: int = 1
    ) -> None:
        """Pull ``endpoint``'s messages into ``handler`` once :meth:`start` ran,
        ``concurrency`` batches at once (see :class:`~sagakit.transports.base.Transport`)."""
        check_subscription(endpoint, sorted(self.endpoints), batch_size, concurrency)
        self._subs.append(_Subscription(endpoint, handler, batch_size, concurrency))

    async def start(self) -> None:
        """Start one pull loop per subscription, and the dead-letter mover."""
        if self._nc is None:
            await self.open()
        nc = self._nc
        assert nc is not None
        self._stopping = False
        self._stop_event.clear()
        for sub in self._subs:
            if sub.puller is not None:
                continue
            sub.puller = Puller(nc, self.stream, token(sub.endpoint), self.request_timeout)
            self._pullers.append(sub.puller)
            self._tasks.append(
                asyncio.create_task(
                    self._consume(
                        sub.puller, sub.batch_size, self._handler_for(sub), sub.concurrency
                    ),
                    name=f"nats-consume:{sub.endpoint}",
                )
            )
        if not any(p.consumer == MOVER for p in self._pullers):
            mover = Puller(nc, self.advisory_stream, MOVER, self.request_timeout)
            self._pullers.append(mover)
            self._tasks.append(
                asyncio.create_task(
                    self._consume(mover, 32, self._move_dead_letters), name="nats-dead-letters"
                )
            )

    async def close(self) -> None:
        """Stop pulling, let in-flight batches finish, release held messages, disconnect."""
        self._stopping = True
        self._stop_event.set()
        for puller in self._pullers:
            puller.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._pullers.clear()
        for sub in self._subs:
            sub.puller = None
        held = list(self._held.items())
        self._held.clear()
        for task, _ in held:
            task.cancel()
        await asyncio.gather(*(t for t, _ in held), return_exceptions=True)
        await self._settle_quietly([m for _, m in held], nak=0.0)
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            try:
                await asyncio.wait_for(nc.drain(), self.request_timeout)
            except Exception:  # a dead connection: just close it
                with contextlib.suppress(Exception):
                    await nc.close()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

    async def _consume(
        self,
        puller: Puller,
        batch_size: int,
        process: Callable[[list[Msg]], Awaitable[None]],
        concurrency: int = 1,
    ) -> None:
        backoff = 0.1
        running = InFlight(concurrency)
        try:
            while not self._stopping:
                await running.slot()
                try:
                    await puller.subscribe()
                    msgs = await puller.next_batch(batch_size)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning(
                        "pulling from %s/%s failed (%s); retrying in %.1fs",
                        self.stream,
                        puller.consumer,
                        exc,
                        backoff,
                    )
                    await self._pause(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
                backoff = 0.1
                if not msgs:
                    continue
                if concurrency == 1:
                    await self._process_guarded(puller, msgs, process)
                else:
                    running.spawn(self._process_guarded(puller, msgs, process))
        finally:
            await running.finish()  # in-flight batches settle first (close() waits for it)
            left = await puller.close()
            if left:
                await self._settle_quietly(left, nak=0.0)

    async def _process_guarded(
        self, puller: Puller, msgs: list[Msg], process: Callable[[list[Msg]], Awaitable[None]]
    ) -> None:
        try:
            await process(msgs)
        except Exception:  # a bug here must not end consumption
            log.exception("settling a batch from %s failed", puller.consumer)
            await self._settle_quietly(msgs, nak=FAILED_BATCH_DELAY)

    def _handler_for(self, sub: _Subscription) -> Callable[[list[Msg]], Awaitable[None]]:
        async def process(msgs: list[Msg]) -> None:
            await self._process(sub, msgs)

        return process

    async def _process(self, sub: _Subscription, msgs: list[Msg]) -> None:
        endpoint, handler = sub.endpoint, sub.handler
        batch: list[tuple[Delivery, Msg]] = []
        for msg in msgs:
            try:
                delivered = msg.metadata.num_delivered
            except Exception:  # not a JetStream delivery; nothing to settle
                log.error("ignoring a non-JetStream message on %s: %r", endpoint, msg.subject)
                continue
            body = msg.data.decode("utf-8", errors="replace")
            batch.append((Delivery(next(self._handles), body, delivered), msg))
        if not batch:
            return
        try:
            async with self._in_progress([m for _, m in batch], sub.puller):
                settles = list(await handler([d for d, _ in batch]))
            if len(settles) != len(batch):
                raise TransportError(
                    f"handler returned {len(settles)} settles for {len(batch)} deliveries"
                )
        except Exception:
            log.exception(
                "consumer of %s failed; its batch of %d comes back in %.1fs",
                endpoint,
                len(batch),
                FAILED_BATCH_DELAY,
            )
            await self._settle_quietly([m for _, m in batch], nak=FAILED_BATCH_DELAY)
            return
        await self._apply(endpoint, batch, settles)

    async def _apply(
        self, endpoint: str, batch: list[tuple[Delivery, Msg]], settles: list[Settle]
    ) -> None:
        acks: list[Msg] = []
        naks: list[Awaitable[None]] = []
        for (_, msg), settle in zip(batch, settles, strict=True):
            if settle.ack:
                acks.append(msg)
            elif settle.delay <= self.ack_wait:
                naks.append(msg.nak(delay=settle.delay or None))
            elif self._stopping:  # closing releases what it would have held
                naks.append(msg.nak())
            else:
                task = asyncio.create_task(self._hold(msg, settle.delay))
                self._held[task] = msg
                task.add_done_callback(lambda t: self._held.pop(t, None))
        results = await asyncio.gather(
            *(m.ack_sync(timeout=self.request_timeout) for m in acks),
            *naks,
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            log.warning(
                "%d of %d settlements on %s failed (%r); those messages will be redelivered",
                len(errors),
                len(results),
                endpoint,
                errors[0],
            )

    @contextlib.asynccontextmanager
    async def _in_progress(self, msgs: Sequence[Msg], puller: Puller | None) -> AsyncIterator[None]:
        """While the body runs, tell the broker the batch is being handled (no redelivery).

        Messages that arrived meanwhile for the next batch are kept alive as well.
        """
        beat = asyncio.create_task(self._keep_alive(msgs, puller))
        try:
            yield
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _keep_alive(self, msgs: Sequence[Msg], puller: Puller | None) -> None:
        while True:
            await asyncio.sleep(self._beat)
            try:
                for msg in [*msgs, *(puller.buffer if puller else ())]:
                    await msg.in_progress()
            except Exception as exc:
                log.debug("in-progress ack failed: %r", exc)

    async def _hold(self, msg: Msg, delay: float) -> None:
        """A retry longer than ack_wait: keep the message, nak it when it is due."""
        due = time.monotonic() + delay
        while (left := due - time.monotonic()) > 0:
            await asyncio.sleep(min(self._beat, left))
            if due - time.monotonic() > 0:
                with contextlib.suppress(Exception):
                    await msg.in_progress()
        await self._settle_quietly([msg], nak=0.0)

    async def _settle_quietly(self, msgs: Sequence[Msg], *, nak: float) -> None:
        for msg in msgs:
            if msg.is_acked:
                continue
            try:
                await msg.nak(delay=nak or None)
            except Exception as exc:
                log.debug("nak failed (the message comes back after ack_wait): %r", exc)
