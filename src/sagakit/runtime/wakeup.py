"""In-process wake-ups, so that loops react to new work instead of sleeping on a poll.

A producer calls :meth:`Wakeups.notify` after its commit; a loop waits on the same
channel with a timeout that is only a safety net (for work written by another process,
which PostgreSQL's LISTEN/NOTIFY or a broker push covers in production).
"""

from __future__ import annotations

import asyncio
import contextlib


class Wakeups:
    """Named channels of level-triggered wake-ups."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        # channel -> the earliest due time the wake-ups since the last take_due() named;
        # None once any of them named none (the waiter must look for itself).
        self._due: dict[str, float | None] = {}
        # channel -> the due time its waiter already waits for (see wait's ``until``).
        self._until: dict[str, float] = {}

    def _event(self, channel: str) -> asyncio.Event:
        event = self._events.get(channel)
        if event is None:
            event = self._events[channel] = asyncio.Event()
        return event

    def notify(self, channel: str, due: float | None = None) -> None:
        """Wake whoever waits on ``channel`` (or the next one to wait).

        ``due``: the new work is due no earlier than this (e.g. the earliest timer a
        commit set), so a waiter already waiting for something due sooner may skip
        looking; see :meth:`take_due`. Without it the waiter must look. A waiter that
        said it waits ``until`` a time no later than ``due`` is not woken at all (every
        step's commit sets a timeout later than the one before): it looks then anyway.
        """
        if channel in self._due:
            known = self._due[channel]
            self._due[channel] = None if due is None or known is None else min(known, due)
        else:
            self._due[channel] = due
        until = self._until.get(channel)
        if (
            until is not None
            and due is not None
            and due >= until
            and self._due[channel] is not None
        ):
            return
        self._event(channel).set()

    def take_due(self, channel: str) -> float | None:
        """The earliest ``due`` named since the last call, and forget it.

        None when a wake-up named none, or when there was no wake-up at all.
        """
        return self._due.pop(channel, None)

    def notify_all(self, prefix: str) -> None:
        """Wake every channel whose name starts with ``prefix`` (e.g. all mailboxes)."""
        for name, event in self._events.items():
            if name.startswith(prefix):
                self._due[name] = None
                event.set()

    async def wait(self, channel: str, timeout: float, *, until: float | None = None) -> bool:
        """Wait for a notification or ``timeout`` seconds; True if notified.

        ``until``: the waiter looks at its work by then anyway (a timer loop sleeping
        until its earliest timer), so a notification naming a ``due`` no earlier than
        it does not wake it (see :meth:`notify`).
        """
        event = self._event(channel)
        if not event.is_set() and timeout > 0:
            if until is not None:
                self._until[channel] = until
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout)
            finally:
                self._until.pop(channel, None)
        notified = event.is_set()
        event.clear()
        return notified
