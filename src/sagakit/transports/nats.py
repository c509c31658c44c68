"""The NATS JetStream transport.

Topology (declared by :meth:`NatsTransport.open`, idempotently, by every process):

* one stream ``<stream>`` (file storage, work-queue retention: an acknowledged message
  is removed) whose subjects are ``<stream>.<endpoint>`` for every endpoint any process
  declared (a process adds its endpoints and never removes another's);
* one durable pull consumer per endpoint, named after it, filtered on its subject, with
  explicit acks, ``ack_wait`` and ``max_deliver``; every process consuming an endpoint
  pulls from the same consumer, so they share its messages;
* ``<stream>_dlq``: dead letters the broker gave up on (see below), one subject per
  endpoint, kept until an operator removes them;
* ``<stream>_adv``: the broker's max-deliveries advisories for ``<stream>``, captured
  durably so that none is missed while no sagakit process runs.

Publishing
    Every envelope is published to ``<stream>.<destination>`` with the header
    ``Nats-Msg-Id: <message_id>@<destination>`` (see :func:`copy_id`; a replayed dead
    letter gets a new one) and its ``traceparent``; :meth:`publish` returns only
    when the stream acknowledged every one (a PubAck; a duplicate's PubAck counts), so
    the relay keeps its outbox rows until then. Within ``duplicate_window`` (two
    minutes by default) the broker drops a re-published message id; beyond it only the
    consumer's inbox deduplicates, so inbox retention must cover more than the window.

Consuming
    One task per subscription pulls batches (a lingering pull for the first message,
    then a no-wait pull for the rest of the batch) and hands them to the handler; with
    a subscription's ``concurrency`` above 1 it keeps pulling while up to that many
    batches are being handled, each settled when its own handler returned. While
    the handler runs, every message of the batch gets an in-progress ack each
    ``ack_wait / 3`` seconds: an ack sent after ``ack_wait`` could otherwise land after
    the broker already handed the message to another process. ``ACK`` settles are
    acknowledged and confirmed (``ack_sync``). A retry of ``delay <= ack_wait`` is a
    ``nak`` with that delay; a longer one is held by this process (still sending
    in-progress acks) and nak'ed when due, or at once by :meth:`close` -- so, as with the
    embedded transport, a restarted consumer sees every unfinished message again at
    once, and after a crash within ``ack_wait``. A handler that raises gets its batch
    nak'ed with a short delay.

Dead letters
    Poison messages are parked by sagakit's own consumers
    (:class:`~sagakit.runtime.consumer.BatchConsumer` parks after its ``max_deliveries``,
    20 by default), long before the broker's ``max_deliver`` (50). ``max_deliver`` is
    the broker's last resort for consumers that never settle a message. When it is
    reached, JetStream stops delivering the message and publishes the advisory
    ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>``; it is captured
    in ``<stream>_adv`` and a consuming process copies the message, with the reason,
    into ``<stream>_dlq`` and removes it from ``<stream>``. Nothing is lost silently.

Limits
    Held retries and buffered messages count against the consumer's
    ``max_ack_pending`` (1000); when it is reached the broker stops handing out that
    endpoint's messages until some are settled. Consumer settings (``ack_wait``,
    ``max_deliver``, ``max_ack_pending``) are per endpoint on the broker: the process
    that opened last wins, so run every process with the same values. Work-queue
    retention allows one consumer per subject: tap a copy with a mirror stream.

Connection
    nats-py reconnects by itself (forever); meanwhile :meth:`publish` fails with
    :class:`~sagakit.errors.TransportError` after ``request_timeout`` and the pull loops
    log, back off and resume once the connection is back.

Modules
    This one holds the connection, the topology, publishing and consuming; the names
    (subject tokens, copy ids, headers) are in :mod:`~sagakit.transports.nats_names`,
    the pull subscription in :mod:`~sagakit.transports.nats_pull`, the dead letters in
    :mod:`~sagakit.transports.nats_dead_letters` and the backlog in
    :mod:`~sagakit.transports.nats_backlog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sagakit.core.envelope import Envelope
from sagakit.errors import ConfigurationError, TransportError, UnroutableMessage
from sagakit.transports.base import BatchHandler, Delivery, InFlight, Settle
from sagakit.transports.nats_backlog import NatsBacklog
from sagakit.transports.nats_dead_letters import NatsDeadLetters
from sagakit.transports.nats_names import (
    HEADER_MESSAGE_ID,
    HEADER_REASON,
    DeadLetter,
    copy_id,
    token,
    untoken,
)
from sagakit.transports.nats_pull import Puller

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import StreamConfig

__all__ = [
    "HEADER_MESSAGE_ID",
    "HEADER_REASON",
    "DeadLetter",
    "NatsTransport",
    "copy_id",
    "token",
    "untoken",
]

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
_MOVER = "dead-letter-mover"
_FAILED_BATCH_DELAY = 1.0  # redelivery delay after a handler raised
_MAX_BACKOFF = 5.0


def _require_nats() -> None:
    try:
        import nats  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            "the NATS transport needs nats-py: pip install 'sagakit[nats]'"
        ) from exc


@dataclass
class _Subscription:
    endpoint: str
    handler: BatchHandler
    batch_size: int
    concurrency: int = 1
    puller: Puller | None = None


class NatsTransport(NatsDeadLetters, NatsBacklog):
    """JetStream streams and durable pull consumers behind the Transport protocol."""

    publishes_to_broker = True
    """Publishing writes to no store: a relay may publish inside its store transaction."""

    def __init__(
        self,
        url: str,
        *,
        stream: str = "sagakit",
        endpoints: Sequence[str],
        ack_wait: float = 30.0,
        max_deliver: int = 50,
        duplicate_window: float = 120.0,
        connect_timeout: float = 5.0,
        request_timeout: float = 5.0,
        max_ack_pending: int = 1000,
    ) -> None:
        _require_nats()
        if not _TOKEN.match(stream):
            raise ConfigurationError(
                f"NATS stream names may use letters, digits, '_' and '-' only, got {stream!r}"
            )
        if not endpoints:
            raise ConfigurationError("a NATS transport needs at least one endpoint")
        if ack_wait <= 0 or max_deliver < 1 or duplicate_window <= 0:
            raise ConfigurationError("ack_wait, max_deliver and duplicate_window must be > 0")
        self.url = url
        self.stream = stream
        self.endpoints = tuple(dict.fromkeys(endpoints))
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.duplicate_window = duplicate_window
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_ack_pending = max_ack_pending
        self.dlq_stream = f"{stream}_dlq"
        self.advisory_stream = f"{stream}_adv"
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._subs: list[_Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._held: dict[asyncio.Task[None], Msg] = {}
        self._pullers: list[Puller] = []
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._issue_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self._handles = itertools.count(1)
        self._beat = max(ack_wait / 3.0, 0.05)

    # --- connection and topology ------------------------------------------------------

    def subject(self, endpoint: str) -> str:
        """The subject that carries ``endpoint``'s messages."""
        return f"{self.stream}.{token(endpoint)}"

    async def _connect(self) -> Client:
        import nats
        from nats.aio.client import Client as NatsClient

        async def on_error(exc: Exception) -> None:
            log.debug("NATS connection error: %r", exc)

        async def on_disconnect() -> None:
            if not nc.is_closed:  # closed on purpose: nothing to report
                log.warning("disconnected from NATS at %s; reconnecting", self.url)

        async def on_reconnect() -> None:
            log.warning("reconnected to NATS at %s", self.url)
            for puller in self._pullers:
                puller.interrupt()

        nc = NatsClient()
        try:
            await asyncio.wait_for(
                nc.connect(
                    self.url,
                    connect_timeout=max(1, round(self.connect_timeout)),
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # float is fine
                    max_reconnect_attempts=-1,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                ),
                self.connect_timeout,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise TransportError(
                f"cannot connect to NATS at {self.url} within {self.connect_timeout}s: {exc!r}"
            ) from exc
        return nc

    async def open(self) -> None:
        """Connect and declare the streams and consumers; safe to run from many processes."""
        async with self._open_lock:
            if self._nc is not None:
                return
            nc = await self._connect()
            try:
                js = nc.jetstream(timeout=self.request_timeout)
                await self._declare(js)
            except BaseException:
                with contextlib.suppress(Exception):
                    await nc.close()
                raise
            self._nc, self._js = nc, js

    async def _declare(self, js: JetStreamContext) -> None:
        import nats
        from nats.js import api

        try:
            await self._ensure_stream(
                js,
                api.StreamConfig(
                    name=self.stream,
                    subjects=[self.subject(e) for e in self.endpoints],
                    retention=api.RetentionPolicy.WORK_QUEUE,
                    storage=api.StorageType.FILE,
                    duplicate_window=self.duplicate_window,
                ),
            )
            await self._ensure_stream(
                js,
                api.StreamConfig(
                    name=self.dlq_stream,
                    subjects=[f"{self.dlq_stream}.>"],
                    retention=api.RetentionPolicy.LIMITS,
                    storage=api.StorageType.FILE,
                    duplicate_window=self.duplicate_window,
                ),
            )
            await self._ensure_stream(
                js,
                api.StreamConfig(
                    name=self.advisory_stream,
                    subjects=[f"{_ADVISORY}.{self.stream}.*"],
                    retention=api.RetentionPolicy.WORK_QUEUE,
                    storage=api.StorageType.FILE,
                ),
            )
            for endpoint in self.endpoints:
                await js.add_consumer(
                    self.stream,
                    api.ConsumerConfig(
                        name=token(endpoint),
                        durable_name=token(endpoint),
                        filter_subject=self.subject(endpoint),
                        ack_policy=api.AckPolicy.EXPLICIT,
                        ack_wait=self.ack_wait,
                        max_deliver=self.max_deliver,
                        max_ack_pending=self.max_ack_pending,
                        deliver_policy=api.DeliverPolicy.ALL,
                    ),
                )
            await js.add_consumer(
                self.advisory_stream,
                api.ConsumerConfig(
                    name=_MOVER,
                    durable_name=_MOVER,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=30.0,
                    max_deliver=-1,
                ),
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise TransportError(
                f"cannot declare JetStream stream {self.stream!r} and its consumers: {exc}"
            ) from exc

    async def _ensure_stream(self, js: JetStreamContext, config: StreamConfig) -> None:
        from nats.js.errors import BadRequestError, NotFoundError

        name = config.name or ""
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            try:
                await js.add_stream(config)
                return
            except BadRequestError as exc:  # another process created it just now
                if exc.err_code != 10058:
                    raise
                info = await js.stream_info(name)
        current = info.config
        subjects = list(dict.fromkeys([*(current.subjects or []), *(config.subjects or [])]))
        if subjects == (current.subjects or []) and (
            current.duplicate_window == config.duplicate_window or not config.duplicate_window
        ):
            return
        current.subjects = subjects
        if config.duplicate_window:
            current.duplicate_window = config.duplicate_window
        await js.update_stream(current)

    async def delete_topology(self) -> None:
        """Delete the streams (and with them their consumers); for tests and teardown."""
        import nats
        from nats.js.errors import NotFoundError

        nc = self._nc
        own = nc is None
        if nc is None:
            nc = await self._connect()
        try:
            js = nc.jetstream(timeout=self.request_timeout)
            for name in (self.stream, self.dlq_stream, self.advisory_stream):
                with contextlib.suppress(NotFoundError):
                    await js.delete_stream(name)
        except (nats.errors.Error, TimeoutError) as exc:
            raise TransportError(f"cannot delete stream {self.stream!r}: {exc}") from exc
        finally:
            if own:
                await nc.close()

    # --- publishing ---------------------------------------------------------------------

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish every envelope and wait for all PubAcks (duplicates count as accepted)."""
        if not envelopes:
            return
        if self._js is None:
            await self.open()
        js = self._js
        assert js is not None
        routable: list[Envelope] = []
        unroutable: list[tuple[str, str | None]] = []
        unknown: set[str] = set()
        for env in envelopes:
            if env.destination is None or env.destination not in self.endpoints:
                unroutable.append((env.message_id, env.destination))
                unknown.add(repr(env.destination))
            else:
                routable.append(env)
        if routable:
            await self._publish(js, routable)
        if unroutable:
            raise UnroutableMessage(
                f"no route to {', '.join(sorted(unknown))} for {len(unroutable)} message(s); "
                f"known endpoints: {sorted(self.endpoints)}",
                unroutable,
            )

    async def _publish(self, js: JetStreamContext, envelopes: Sequence[Envelope]) -> None:
        import nats

        futures: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(self.request_timeout):
                # One batch issued at a time keeps batches contiguous and makes the
                # first call's lazy reply-subscription setup race-free.
                async with self._issue_lock:
                    for env in envelopes:
                        headers = {
                            "Nats-Msg-Id": copy_id(env),
                            HEADER_MESSAGE_ID: env.message_id,
                        }
                        if env.traceparent:
                            headers["traceparent"] = env.traceparent
                        futures.append(
                            await js.publish_async(
                                self.subject(env.destination or ""),
                                env.to_json().encode(),
                                headers=headers,
                                stream=self.stream,
                            )
                        )
                results = await asyncio.gather(*futures, return_exceptions=True)
        except TimeoutError as exc:
            for fut in futures:
                fut.cancel()
            raise TransportError(
                f"NATS did not acknowledge {len(envelopes)} message(s) within "
                f"{self.request_timeout}s (connected: {bool(self._nc and self._nc.is_connected)})"
            ) from exc
        except nats.errors.Error as exc:
            for fut in futures:
                fut.cancel()
            raise TransportError(f"publishing to NATS failed: {exc!r}") from exc
        failed = [
            (env.message_id, res)
            for env, res in zip(envelopes, results, strict=True)
            if isinstance(res, BaseException)
        ]
        if failed:
            raise TransportError(
                f"{len(failed)} of {len(envelopes)} message(s) not acknowledged by JetStream, "
                f"e.g. {failed[0][0]}: {failed[0][1]!r}"
            )

    # --- consuming ----------------------------------------------------------------------

    def subscribe(
        self, endpoint: str, handler: BatchHandler, *, batch_size: int = 256, concurrency: int = 1
    ) -> None:
        """Pull ``endpoint``'s messages into ``handler`` once :meth:`start` ran,
        ``concurrency`` batches at once (see :class:`~sagakit.transports.base.Transport`)."""
        if endpoint not in self.endpoints:
            raise UnroutableMessage(
                f"cannot subscribe: {endpoint!r} is not one of {sorted(self.endpoints)}", []
            )
        if batch_size < 1 or concurrency < 1:
            raise ConfigurationError(
                f"batch_size and concurrency must be >= 1, got {batch_size} and {concurrency}"
            )
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
        if not any(p.consumer == _MOVER for p in self._pullers):
            mover = Puller(nc, self.advisory_stream, _MOVER, self.request_timeout)
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
                    backoff = min(backoff * 2, _MAX_BACKOFF)
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
            await self._settle_quietly(msgs, nak=_FAILED_BATCH_DELAY)

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
                _FAILED_BATCH_DELAY,
            )
            await self._settle_quietly([m for _, m in batch], nak=_FAILED_BATCH_DELAY)
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
