"""What ``<stream>`` still holds for the NATS transport's endpoints (``backlog()``):
per endpoint from its durable consumer, and the held messages' ids read back from the
work-queue stream (see :mod:`sagakit.transports.nats`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sagakit.errors import TransportError
from sagakit.transports.base import Backlog, EndpointBacklog
from sagakit.transports.nats_connection import NatsConnection
from sagakit.transports.nats_names import HEADER_MESSAGE_ID, token, untoken

if TYPE_CHECKING:
    from nats.js import JetStreamContext

log = logging.getLogger("sagakit.transports.nats")


class NatsBacklog(NatsConnection):
    """The backlog part of :class:`~sagakit.transports.nats.NatsTransport`."""

    async def backlog(self, *, names: bool = True, name_limit: int = 10_000) -> Backlog:
        """What ``<stream>`` still holds for this transport's endpoints.

        Per endpoint, from its durable consumer: ``waiting`` (``num_pending``, not yet
        delivered) and ``unsettled`` (``num_ack_pending``: being handled, held for a
        retry, or nak'ed with a delay still running, by any process). The stream is
        a work queue, so every message it still has is one of those; up to
        ``name_limit`` of them are read back for their message ids (with ``names``).
        """
        from nats.js.errors import NotFoundError

        js = await self._jetstream()
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
