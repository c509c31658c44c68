"""Open stores that simulator worlds take turns on, one world at a time.

Opening a set of SQLite stores (and migrating them) costs far more than a simulated run
of a few sagas, so a world factory keeps the set of a finished run and empties it for
the next: :class:`SlotPool` is that bookkeeping, shared by the checkout's worlds and any
app's. A slot belongs to the event loop that opened it (a set that outlives its loop is
closed and a new one opened).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Generic, Protocol, TypeVar


class Slot(Protocol):
    """A set of open stores a world runs on."""

    loop: asyncio.AbstractEventLoop | None
    clean: bool
    """False once a world ran on it: :meth:`reset` before the next one."""

    async def reset(self) -> None:
        """Bring the stores back to their state before the first world."""
        ...

    async def close(self) -> None:
        """Close the stores and delete their files."""
        ...


S = TypeVar("S", bound=Slot)
W = TypeVar("W")


class SlotPool(ABC, Generic[S, W]):
    """A :data:`~sagakit.testing.sim.WorldFactory` whose worlds reuse idle slots.

    Subclasses say how a slot is opened (:meth:`_new_slot`) and how a world is built on
    one (:meth:`_world`, which opens the world too). Call :meth:`aclose` when done.
    """

    def __init__(self) -> None:
        self._idle: list[S] = []

    async def __call__(self, seed: int) -> W:
        loop = asyncio.get_running_loop()
        slot: S | None = None
        while self._idle and slot is None:
            slot = self._idle.pop()
            if slot.loop is not loop:
                await slot.close()
                slot = None
            elif not slot.clean:
                await slot.reset()
        if slot is None:
            slot = await self._new_slot(loop)
        try:
            return await self._world(seed, slot)
        except BaseException:
            await slot.close()
            raise

    @abstractmethod
    async def _new_slot(self, loop: asyncio.AbstractEventLoop) -> S:
        """A freshly opened slot (closed again by this method if opening fails)."""

    @abstractmethod
    async def _world(self, seed: int, slot: S) -> W:
        """The world of ``seed`` on ``slot``, opened."""

    async def release(self, slot: S, *, reusable: bool) -> None:
        """Take a slot back from a finished world (closed unless ``reusable``)."""
        if reusable:
            self._idle.append(slot)
        else:
            await slot.close()

    async def aclose(self) -> None:
        """Close every idle slot and delete its files."""
        while self._idle:
            await self._idle.pop().close()
