"""A JetStream pull subscription: batches from one durable consumer, through a private
inbox (:class:`Puller`, used by :class:`~sagakit.transports.nats.NatsTransport`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sagakit.errors import TransportError

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

IDLE_PULL = 5.0
"""Seconds a lingering pull waits for the first message."""
QUIET = 0.02
"""A pause that ends a batch short of its size."""


class Puller:
    """Pulls batches from one durable consumer through a private inbox.

    Each pull request gets its own reply subject (``<inbox>.<n>``), so the status that
    ends a request (404 no messages, 408 expired) is matched to it; a message that
    arrives late for an older request is still kept and handed out with the next batch.
    """

    def __init__(self, nc: Client, stream: str, consumer: str, request_timeout: float) -> None:
        self.nc = nc
        self.consumer = consumer
        self.request_timeout = request_timeout
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = nc.new_inbox()
        self.buffer: deque[Msg] = deque()
        self.sub: Subscription | None = None
        self.wake = asyncio.Event()
        self.closing = False
        self.interrupted = False
        self._tokens = itertools.count(1)
        self._current = ""
        self._status: tuple[str, str] | None = None

    async def subscribe(self) -> None:
        if self.sub is None:
            self.sub = await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self.buffer.append(msg)
        elif status != "100" and msg.subject.rsplit(".", 1)[-1] == self._current:
            # 100 (idle heartbeat) says nothing; other statuses end the current request.
            self._status = (status, (msg.headers or {}).get("Description", ""))
        self.wake.set()

    def interrupt(self) -> None:
        """End the current wait (after a reconnect the server forgot our pull request)."""
        self.interrupted = True
        self.wake.set()

    def stop(self) -> None:
        self.closing = True
        self.wake.set()

    def _take(self, limit: int) -> list[Msg]:
        out: list[Msg] = []
        while self.buffer and len(out) < limit:
            out.append(self.buffer.popleft())
        return out

    async def _request(self, batch: int, *, expires: float | None) -> None:
        self._current = str(next(self._tokens))
        self._status = None
        req: dict[str, Any] = {"batch": batch}
        if expires is None:
            req["no_wait"] = True
        else:
            req["expires"] = int(expires * 1e9)
        await self.nc.publish(
            self.next_subject, json.dumps(req).encode(), reply=f"{self.inbox}.{self._current}"
        )

    async def _wait(
        self,
        done: Callable[[], bool],
        timeout: float,
        *,
        quiet: float | None = None,
        have: int = 0,
    ) -> bool:
        """Wait until ``done()``; with ``quiet``, also after a pause once messages are in hand."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done():
            if self.closing or self.interrupted:
                return False
            left = deadline - loop.time()
            if left <= 0:
                return False
            self.wake.clear()
            if done():
                break
            step = min(left, quiet) if quiet is not None and (have or self.buffer) else left
            try:
                await asyncio.wait_for(self.wake.wait(), step)
            except TimeoutError:
                if step < left:
                    return True
        return True

    def _refused(self) -> TransportError | None:
        if self._status is None or self._status[0] in ("404", "408"):
            return None
        code, desc = self._status
        return TransportError(f"JetStream refused a pull from {self.consumer!r}: {code} {desc}")

    async def next_batch(self, limit: int) -> list[Msg]:
        """Up to ``limit`` messages; ``[]`` when none came within the idle wait."""
        msgs = self._take(limit)
        if len(msgs) < limit:
            need = limit - len(msgs)
            await self._request(need, expires=None)
            # The server answers a no-wait pull with what it has, then a status; when
            # max_ack_pending holds the rest back no status comes, hence ``quiet``.
            answered = await self._wait(
                lambda: self._status is not None or len(self.buffer) >= need,
                self.request_timeout,
                quiet=QUIET,
                have=len(msgs),
            )
            msgs += self._take(limit - len(msgs))
            if msgs:
                return msgs
            refused = self._refused()
            if refused is not None:
                raise refused
            if not answered and not (self.closing or self.interrupted):
                raise TransportError(f"no answer from JetStream to a pull from {self.consumer!r}")
        if msgs or self.closing:
            return msgs
        self.interrupted = False
        started = time.monotonic()
        await self._request(1, expires=IDLE_PULL)
        await self._wait(lambda: self._status is not None or bool(self.buffer), IDLE_PULL + 1.0)
        self.interrupted = False
        if not self.buffer:
            refused = self._refused()
            if refused is not None:
                raise refused
            if self._status is not None and time.monotonic() - started < IDLE_PULL / 2:
                # Ended early without a message: do not spin on the server.
                await self._wait(lambda: bool(self.buffer), 0.1)
        return []  # the caller comes back: the buffer is drained and the batch filled

    async def close(self) -> list[Msg]:
        """Unsubscribe (the server drops our pending pull) and return undelivered messages.

        Draining first takes in what the server sent before it saw the unsubscribe.
        """
        sub, self.sub = self.sub, None
        if sub is not None:
            try:
                drain = sub.drain()  # type: ignore[no-untyped-call]
                await asyncio.wait_for(drain, self.request_timeout)
            except Exception:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        left = list(self.buffer)
        self.buffer.clear()
        return left
