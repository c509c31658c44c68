"""The NATS transport's connection and topology: the optional driver's guard, the
settings every part reads, connecting (reconnects wake the pull loops), and declaring
and deleting ``<stream>``, ``<stream>_dlq``, ``<stream>_adv`` and their consumers
(see :mod:`sagakit.transports.nats`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from sagakit.errors import ConfigurationError, TransportError
from sagakit.transports.nats_names import token
from sagakit.transports.nats_pull import Puller

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext
    from nats.js.api import StreamConfig

log = logging.getLogger("sagakit.transports.nats")

ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
"""The subject prefix of JetStream's max-deliveries advisories."""
MOVER = "dead-letter-mover"
"""The durable consumer of ``<stream>_adv`` that moves dead letters into ``<stream>_dlq``."""


def require_nats() -> None:
    """Fail early, with the install hint, when the optional driver nats-py is missing."""
    try:
        import nats  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            "the NATS transport needs nats-py: pip install 'sagakit[nats]'"
        ) from exc


class NatsConnection:
    """The connection and topology part of :class:`~sagakit.transports.nats.NatsTransport`
    (which sets these attributes), and the base its other parts share."""

    url: str
    stream: str
    endpoints: tuple[str, ...]
    ack_wait: float
    max_deliver: int
    duplicate_window: float
    connect_timeout: float
    request_timeout: float
    max_ack_pending: int
    dlq_stream: str
    advisory_stream: str
    _nc: Client | None
    _js: JetStreamContext | None
    _open_lock: asyncio.Lock
    _pullers: list[Puller]
    """Every running pull subscription: a reconnect interrupts their waits."""

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

    async def _jetstream(self) -> JetStreamContext:
        """The JetStream context, connecting and declaring first if not yet open."""
        if self._js is None:
            await self.open()
        js = self._js
        assert js is not None
        return js

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
                    subjects=[f"{ADVISORY}.{self.stream}.*"],
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
                    name=MOVER,
                    durable_name=MOVER,
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
