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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagakit.core.envelope import REPLAYED_FROM, Envelope
from sagakit.errors import ConfigurationError, TransportError, UnroutableMessage
from sagakit.transports.base import (
    Backlog,
    BatchHandler,
    Delivery,
    EndpointBacklog,
    InFlight,
    ParkedByBroker,
    ParkSink,
    Settle,
)
from sagakit.transports.nats_pull import Puller

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import StreamConfig

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def token(endpoint: str) -> str:
    """``endpoint`` as one subject token and consumer name (NATS allows no '.' there).

    Letters, digits and '_' stay; any other character becomes ``-xx`` (its hex code),
    so the mapping is reversible and two endpoints never share a token.
    """
    return _UNSAFE.sub(lambda m: "".join(f"-{b:02x}" for b in m.group().encode()), endpoint)


def untoken(name: str) -> str:
    """Inverse of :func:`token`."""
    return re.sub(
        r"(?:-[0-9a-f]{2})+",
        lambda m: bytes.fromhex(m.group().replace("-", "")).decode("utf-8", "replace"),
        name,
    )


_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
_MOVER = "dead-letter-mover"
_FAILED_BATCH_DELAY = 1.0  # redelivery delay after a handler raised
_MAX_BACKOFF = 5.0
HEADER_REASON = "Sagakit-Dead-Letter-Reason"
HEADER_MESSAGE_ID = "Sagakit-Message-Id"


def copy_id(env: Envelope) -> str:
    """The ``Nats-Msg-Id`` of one published copy of ``env``.

    One id per copy: an event fanned out to several endpoints shares its message id,
    and JetStream dedups per stream. A replayed dead letter (``REPLAYED_FROM``) is a new
    copy, or JetStream would drop it within the duplicate window; a relay's ordinary
    re-publish of the same outbox row keeps the same id and is still deduplicated.
    """
    base = f"{env.message_id}@{env.destination}"
    replay = env.headers.get(REPLAYED_FROM)
    return base if replay is None else f"{base}#replay:{replay}"


def _require_nats() -> None:
    try:
        import nats  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            "the NATS transport needs nats-py: pip install 'sagakit[nats]'"
        ) from exc


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message the broker gave up on, as copied into ``<stream>_dlq``."""

    endpoint: str
    body: str
    reason: str
    message_id: str | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Subscription:
    endpoint: str
    handler: BatchHandler
    batch_size: int
    concurrency: int = 1
    puller: Puller | None = None


class NatsTransport:
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

    # --- dead letters -------------------------------------------------------------------

    async def _move_dead_letters(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                await self._move_one(msg)
            except Exception as exc:
                log.warning("could not dead-letter from advisory (retrying later): %r", exc)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1.0)

    async def _move_one(self, advisory: Msg) -> None:
        from nats.js.errors import NotFoundError

        js = self._js
        assert js is not None
        try:
            event = json.loads(advisory.data)
            seq = int(event["stream_seq"])
            consumer = str(event["consumer"])
            deliveries = int(event.get("deliveries", 0))
        except (ValueError, KeyError, TypeError):
            log.error("ignoring a malformed max-deliveries advisory: %r", advisory.data[:200])
            await advisory.ack_sync(timeout=self.request_timeout)
            return
        try:
            original = await js.get_msg(self.stream, seq)
        except NotFoundError:  # acknowledged late after all, or already moved
            await advisory.ack_sync(timeout=self.request_timeout)
            return
        old = dict(original.headers or {})
        message_id = old.get(HEADER_MESSAGE_ID) or old.get("Nats-Msg-Id")
        reason = (
            f"JetStream gave up after {deliveries} deliveries (max_deliver={deliveries} "
            f"reached) on consumer {consumer!r} of stream {self.stream!r}: never acknowledged"
        )
        headers = {k: v for k, v in old.items() if not k.lower().startswith("nats-")}
        headers[HEADER_REASON] = reason
        headers["Sagakit-Stream-Seq"] = str(seq)
        if message_id:
            headers[HEADER_MESSAGE_ID] = message_id
        headers["Nats-Msg-Id"] = f"{self.stream}:{seq}"
        await js.publish(
            f"{self.dlq_stream}.{consumer}",
            original.data or b"",
            headers=headers,
            stream=self.dlq_stream,
        )
        with contextlib.suppress(NotFoundError):
            await js.delete_msg(self.stream, seq)
        log.error(
            "dead-lettered %s into %s: %s",
            message_id,
            self.dlq_stream,
            reason,
            extra={"message_id": message_id, "endpoint": consumer},
        )
        await advisory.ack_sync(timeout=self.request_timeout)

    async def _read_dead_letters(self, limit: int) -> list[tuple[int, DeadLetter]]:
        """Up to ``limit`` messages of ``<stream>_dlq``, oldest first, with their sequence."""
        from nats.js.errors import NotFoundError

        if self._js is None:
            await self.open()
        js = self._js
        assert js is not None
        info = await js.stream_info(self.dlq_stream)
        out: list[tuple[int, DeadLetter]] = []
        seq = info.state.first_seq
        while seq and seq <= info.state.last_seq and len(out) < limit:
            try:
                raw = await js.get_msg(self.dlq_stream, seq)
            except NotFoundError:
                seq += 1
                continue
            headers = dict(raw.headers or {})
            letter = DeadLetter(
                endpoint=untoken((raw.subject or "").rsplit(".", 1)[-1]),
                body=(raw.data or b"").decode("utf-8", errors="replace"),
                reason=headers.get(HEADER_REASON, ""),
                message_id=headers.get(HEADER_MESSAGE_ID),
                headers=headers,
            )
            out.append((seq, letter))
            seq += 1
        return out

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Read up to ``limit`` messages from ``<stream>_dlq`` (oldest first)."""
        return [letter for _, letter in await self._read_dead_letters(limit)]

    async def drain_dead_letters(self, park: ParkSink, limit: int = 100) -> int:
        """Hand up to ``limit`` messages of ``<stream>_dlq`` to ``park``, then delete
        them from it; return how many (see :class:`~sagakit.transports.base.DrainsDeadLetters`)."""
        from nats.js.errors import NotFoundError

        found = await self._read_dead_letters(limit)
        if not found:
            return 0
        await park([ParkedByBroker(d.endpoint, d.message_id, d.body, d.reason) for _, d in found])
        js = self._js
        assert js is not None
        for seq, _ in found:
            with contextlib.suppress(NotFoundError):  # another process drained it first
                await js.delete_msg(self.dlq_stream, seq)
        return len(found)

    async def backlog(self, *, names: bool = True, name_limit: int = 10_000) -> Backlog:
        """What ``<stream>`` still holds for this transport's endpoints.

        Per endpoint, from its durable consumer: ``waiting`` (``num_pending``, not yet
        delivered) and ``unsettled`` (``num_ack_pending``: being handled, held for a
        retry, or nak'ed with a delay still running, by any process). The stream is
        a work queue, so every message it still has is one of those; up to
        ``name_limit`` of them are read back for their message ids (with ``names``).
        """
        from nats.js.errors import NotFoundError

        if self._js is None:
            await self.open()
        js = self._js
        assert js is not None
        counts: list[EndpointBacklog] = []
        try:
            for endpoint in self.endpoints:
                try:
                    info = await js.consumer_info(self.stream, token(endpoint))
                except NotFoundError:  # declared by no process yet: nothing for it
                    counts.append(EndpointBacklog(endpoint))
                    continue
                counts.append(
                    EndpointBacklog(
                        endpoint,
                        waiting=info.num_pending or 0,
                        unsettled=info.num_ack_pending or 0,
                    )
                )
            named = names and any(c.total for c in counts)
            ids = await self._held_ids(js, name_limit) if named else []
        except (TimeoutError, OSError) as exc:
            raise TransportError(
                f"cannot read the backlog of stream {self.stream!r}: {exc}"
            ) from exc
        return Backlog(tuple(counts), tuple(ids))

    async def _held_ids(self, js: JetStreamContext, limit: int) -> list[tuple[str, str]]:
        """(message id, endpoint) of the messages ``<stream>`` still holds, oldest first."""
        import nats
        from nats.js.errors import NotFoundError

        endpoints = {self.subject(e): e for e in self.endpoints}
        out: list[tuple[str, str]] = []
        seq = 1
        while len(out) < limit:
            try:
                raw = await js.get_msg(self.stream, seq=seq, subject=f"{self.stream}.>", next=True)
            except NotFoundError:
                break  # no message at or after seq
            except nats.errors.Error as exc:  # a server without next_by_subj: counts only
                log.debug("cannot list stream %s by sequence: %r", self.stream, exc)
                break
            headers = raw.headers or {}
            message_id = headers.get(HEADER_MESSAGE_ID) or headers.get("Nats-Msg-Id") or ""
            subject = raw.subject or ""
            out.append((message_id, endpoints.get(subject, untoken(subject.split(".", 1)[-1]))))
            if raw.seq is None:
                break
            seq = raw.seq + 1
        return out
