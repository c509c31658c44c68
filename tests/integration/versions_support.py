"""Sagas in two versions, a hotel that answers them, and the stores they run on.

``trip`` books a hotel (a command; the hotel never answers keys starting ``mute``, so
their step times out) and then confirms locally (``flaky`` keys fail once, retryably,
so a retry timer fires). ``tour`` starts with a local step. Version 2 of each differs
only in its confirmation (it records its version), which is all these tests need.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagakit import (
    Envelope,
    Participant,
    RetryPolicy,
    SagaDefinition,
    Step,
    StepContext,
    StepFailed,
    command,
    local,
)
from sagakit.runtime.participant import DEFER
from sagakit.stores.base import Store, Tx

PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
QUICK = RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.1, jitter=0.0)
ONCE = RetryPolicy(max_attempts=1, initial_backoff=0.05, max_backoff=0.1, jitter=0.0)
BOOK_TIMEOUT = 1.0


@dataclass
class Calls:
    """What the local steps ran: (definition key, step, business key), in order."""

    made: list[tuple[str, str, str]] = field(default_factory=list)
    flaky_left: dict[str, int] = field(default_factory=dict)

    def step(self, key: str, name: str) -> Callable[[StepContext], dict[str, Any]]:
        def run(ctx: StepContext) -> dict[str, Any]:
            self.made.append((key, name, ctx.business_key))
            if ctx.business_key.startswith("flaky"):
                left = self.flaky_left.setdefault(ctx.business_key, 1)
                if left:
                    self.flaky_left[ctx.business_key] = left - 1
                    raise StepFailed("busy", retryable=True)
            return {"by": key}

        run.__name__ = name
        return run


def trip(version: int, calls: Calls) -> SagaDefinition:
    """``trip@version``: book a hotel (a command), then confirm (a local step)."""
    key = f"trip@{version}"
    return SagaDefinition(
        "trip",
        version=version,
        steps=[
            Step(
                "book",
                command("hotel", "BookHotel"),
                command("hotel", "CancelHotel"),
                timeout=BOOK_TIMEOUT,
                retry=ONCE,
            ),
            Step("confirm", local(calls.step(key, "confirm")), retry=QUICK),
        ],
    )


def tour(version: int, calls: Calls) -> SagaDefinition:
    """``tour@version``: a local step first."""
    key = f"tour@{version}"
    return SagaDefinition(
        "tour", version=version, steps=[Step("guide", local(calls.step(key, "guide")))]
    )


def hotel(store: Store) -> Participant:
    """Answers BookHotel (except for ``mute`` keys: never) and CancelHotel."""
    p = Participant("hotel", store)

    async def book(tx: Tx, env: Envelope) -> Any:
        if (env.business_key or "").startswith("mute"):
            return DEFER
        return {"room": env.business_key}

    async def cancel(tx: Tx, env: Envelope) -> Any:
        return {}

    p.add_handler("BookHotel", book)
    p.add_handler("CancelHotel", cancel)
    return p


@dataclass
class Site:
    """The stores of one test: SQLite files in ``path``, or PostgreSQL schemas."""

    backend: str
    path: Path
    prefix: str = field(default_factory=lambda: f"sagakit_test_{uuid.uuid4().hex[:10]}")
    names: set[str] = field(default_factory=set)

    def store(self, name: str) -> Any:
        """A new (unopened) store ``name``; the same data each time it is built."""
        self.names.add(name)
        if self.backend == "postgres":
            from sagakit.stores.postgres import PostgresStore

            return PostgresStore(PG_DSN, name=name, schema=f"{self.prefix}_{name}")
        from sagakit.stores.sqlite import SQLiteStore

        return SQLiteStore(self.path / f"{name}.db", name=name, synchronous="NORMAL")

    def drop(self) -> None:
        if self.backend != "postgres":
            return
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            for name in self.names:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.prefix}_{name}" CASCADE')


async def until(
    check: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition"
) -> None:
    """Poll ``check`` until it holds (a generous bound: these are not speed tests)."""
    end = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.02)
