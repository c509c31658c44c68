"""The time as your saga code should read it: :func:`now`.

A participant's handlers and a service's periodic jobs run with the clock of the
process that calls them: real time in production, the virtual clock under the
simulator (``sagakit simulate``) and the testing kit (:mod:`sagakit.testing.kit`).
Code that reads ``sagakit.now()`` instead of ``time.time()`` (a hold's expiry, a
ledger row's timestamp, a fake external system's answer) is therefore tested at the
speed of the virtual clock: a two-hour timeout in a millisecond, and the same run for
the same seed::

    from sagakit import now

    @hotel.handles("HoldRoom")
    async def hold_room(tx, env):
        await tx.execute("INSERT INTO holds (trip, expires_at) VALUES (?, ?)",
                         (env.business_key, now() + 600))

Outside a handler or a job, :func:`now` is ``time.time()``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

Clock = Callable[[], float]
"""A clock: called for the current time in seconds since the epoch."""

_CLOCK: ContextVar[Clock] = ContextVar("sagakit_clock", default=time.time)


def now() -> float:
    """The current time of the code running now (see the module docstring)."""
    return _CLOCK.get()()


@contextlib.contextmanager
def using(clock: Clock) -> Iterator[None]:
    """Run the block with :func:`now` reading ``clock`` (what the runtime does around
    every handler and job; a test may use it around code it calls directly)."""
    token = _CLOCK.set(clock)
    try:
        yield
    finally:
        _CLOCK.reset(token)
