"""Dead letters of the NATS transport: what JetStream gave up on (after ``max_deliver``)
moved from ``<stream>`` into ``<stream>_dlq`` with the reason, read back and drained
into a store's dead-letter table (see :mod:`sagakit.transports.nats`)."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import TYPE_CHECKING

from sagakit.transports.base import ParkedByBroker, ParkSink
from sagakit.transports.nats_connection import NatsConnection
from sagakit.transports.nats_names import HEADER_MESSAGE_ID, HEADER_REASON, DeadLetter, untoken

if TYPE_CHECKING:
    from nats.aio.msg import Msg

log = logging.getLogger("sagakit.transports.nats")


class NatsDeadLetters(NatsConnection):
    """The dead-letter part of :class:`~sagakit.transports.nats.NatsTransport`."""

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

        js = await self._jetstream()
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
