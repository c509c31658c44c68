"""Publishing on the NATS transport: every envelope to ``<stream>.<destination>`` with
its copy id, returning once JetStream acknowledged all (see :mod:`sagakit.transports.nats`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sagakit.core.envelope import Envelope
from sagakit.errors import TransportError
from sagakit.transports.nats_connection import NatsConnection
from sagakit.transports.nats_names import HEADER_MESSAGE_ID, copy_id
from sagakit.transports.shared import split_routable, unroutable_error

if TYPE_CHECKING:
    from nats.js import JetStreamContext


class NatsPublisher(NatsConnection):
    """The publishing part of :class:`~sagakit.transports.nats.NatsTransport`."""

    _issue_lock: asyncio.Lock
    """Held while one batch is issued (see :meth:`_publish`)."""

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish every envelope and wait for all PubAcks (duplicates count as accepted)."""
        if not envelopes:
            return
        js = await self._jetstream()
        routable, unroutable = split_routable(envelopes, self.endpoints)
        if routable:
            await self._publish(js, routable)
        if unroutable:
            raise unroutable_error(unroutable, self.endpoints)

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
