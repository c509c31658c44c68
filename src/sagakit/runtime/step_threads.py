"""Blocking local-step callables on a bounded pool of threads, results back in bursts.

Up to ``threads`` threads of the pool take calls from one shared queue, one call at a
time each, so a slow call holds one thread and nothing else: the other threads keep
taking the calls behind it. Results go back to the event loop together: one wake-up of
the loop for whatever finished meanwhile. (One pool job and one wake-up per call, as
``loop.run_in_executor`` does, cost about a fifth of the engine's throughput on local
steps that do little: measured with ``benchmarks/run.py --only engine``.)
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

K = TypeVar("K")

Finished = tuple[K, BaseException | None, Any]
"""A finished call: its key, the error it raised (or None) and the value it returned."""


class ThreadLane(Generic[K]):
    """Runs jobs on ``executor`` with at most ``threads`` at once; ``deliver`` gets the
    finished ones on ``loop``, in bursts, keyed as submitted.

    The lane's threads are long-lived pool jobs that wait for calls: handing one a call
    is a notify, not a new pool job (on a virtual machine each thread wake-up is dear).
    The executor is the caller's (it shuts it down); :meth:`close` stops this lane
    first: queued jobs are dropped, the waiting threads end, running calls finish in
    their threads and their results are dropped too.
    """

    def __init__(
        self,
        executor: Executor,
        threads: int,
        deliver: Callable[[list[Finished[K]]], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._executor = executor
        self._threads = max(threads, 1)
        self._deliver = deliver
        self._loop = loop
        self._cond = threading.Condition(threading.Lock())  # guards all below; held briefly
        self._todo: deque[tuple[K, Callable[[], Any]]] = deque()
        self._done: list[Finished[K]] = []
        self._started = 0  # threads of this lane (pool jobs that have not ended)
        self._waiting = 0  # of them, waiting for a call and not yet woken for one
        self._flush_due = False  # a _flush is scheduled on the loop
        self._kick_due = False  # a _kick is scheduled on the loop
        self._closed = False

    def submit(self, key: K, job: Callable[[], Any]) -> None:
        """Queue ``job``; a thread runs it as soon as one is free (call on the loop).

        The threads are woken for what was queued once the loop is done with its
        current callback (:meth:`_kick`): a thread woken at once would only wait for
        the loop to let go of the GIL, one more sleep and wake-up per call.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("the local-step thread lane is closed")
            self._todo.append((key, job))
            kick = not self._kick_due
            self._kick_due = True
        if kick:
            self._loop.call_soon(self._kick)

    def _kick(self) -> None:
        """Wake a waiting thread, or start one (up to ``threads``), per queued call, so
        that no call waits behind another while a thread could take it."""
        with self._cond:
            self._kick_due = False
            if self._closed:
                return
            wake = min(len(self._todo), self._waiting)
            self._waiting -= wake  # claimed: a later kick wakes others
            self._cond.notify(wake)
            start = min(len(self._todo) - wake, self._threads - self._started)
            self._started += max(start, 0)
        for _ in range(start):
            try:
                self._executor.submit(self._work)
            except RuntimeError:  # the pool is shut down: the engine is closing
                with self._cond:
                    self._started -= 1

    def close(self) -> None:
        """Run nothing more and deliver nothing more; the waiting threads end."""
        with self._cond:
            self._closed = True
            self._todo.clear()
            self._done.clear()
            self._cond.notify_all()

    def _work(self) -> None:
        """A lane thread: run calls as they come, until the lane closes (a pool job)."""
        while True:
            with self._cond:
                while not self._todo and not self._closed:
                    self._waiting += 1
                    self._cond.wait()  # submit() took us off _waiting when it woke us
                if self._closed:
                    self._started -= 1
                    return
                key, job = self._todo.popleft()
            value: Any = None
            error: BaseException | None = None
            try:
                value = job()
            except BaseException as exc:  # every error is the loop's to judge
                error = exc
            with self._cond:
                if self._closed:
                    continue
                self._done.append((key, error, value))
                if self._flush_due:
                    continue  # the scheduled flush takes this one too
                self._flush_due = True
            try:
                self._loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the loop is closed: nobody waits for results
                with self._cond:
                    self._closed = True

    def _flush(self) -> None:
        with self._cond:
            done, self._done = self._done, []
            self._flush_due = False
        if done:
            self._deliver(done)
