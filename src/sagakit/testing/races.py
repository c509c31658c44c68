"""Concurrent transactions of real handlers: every interleaving, on SQLite.

The exhaustive checker (:mod:`sagakit.testing.checker`) treats each delivery as one
step: it finds what an order of messages can do, not what two transactions running side
by side can. Those are the bugs of a handler written as read-then-write (read the stock,
check it in Python, write the computed numbers back), which PostgreSQL under READ
COMMITTED, its default, lets two transactions interleave, and which SQLite, one writer
at a time, hides in production.

:func:`explore` runs a :class:`Race`: a few actors, each running real code through the
public path (a participant's ``transaction()`` and ``process_batch``, see
:func:`deliver`, or a job such as a sweeper that opens its own transactions), over every
interleaving of their transactions' statements, each time from the same seeded database
file, and checks the race's invariants at the end of each run.

How READ COMMITTED is reproduced on SQLite. Each actor has its own connection to the
file, and each of its transactions runs in two phases:

* until its first write, every statement reads the latest committed data (the
  connection is in autocommit mode: a fresh snapshot per statement, as in READ
  COMMITTED). The runtime's writes whose result it does not read (idempotency records,
  outbox rows) are kept aside; an inbox insert reads whether the id is already there and
  keeps the insert aside;
* at its first business write, or at commit, it takes the file's write lock, writes
  what it kept aside (an id another transaction put in the inbox meanwhile fails the
  transaction, which is delivered again, as a unique violation would be), and runs to
  its end with no other transaction in between.

Each statement of the first phase is a point where another actor may run instead, so
every placement of other transactions' commits between a transaction's reads and its
writes is explored: every lost update of a read-then-write. Write phases run one after
the other (SQLite has one writer), a subset of what READ COMMITTED allows: two writing
transactions interleaving on different rows (write skew) are out of reach here; the
PostgreSQL race test in the repository runs real concurrent transactions. Orders that
differ only in how reads of different actors are placed between the same two commits
see the same data, so only one of them is run (such reads are taken in actor order).
"""

from __future__ import annotations

import contextvars
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sagakit.core.envelope import MANUAL_RETRY, Envelope, MessageKind, Outcome
from sagakit.core.machine import action_key, compensation_key
from sagakit.errors import StoreError
from sagakit.runtime.participant import Participant
from sagakit.stores.sqlite import SQLiteStore
from sagakit.testing.race_tx import RaceError, _ActorStore, _Gate, _Point

Actor = Callable[[Any], Awaitable[object]]
"""An actor: given its store (transactions on its own connection), does its work and
returns what the race's check needs (e.g. the outcome a participant recorded)."""

Check = Callable[[SQLiteStore, Sequence[object]], Awaitable[Sequence[str]]]
"""A race's invariants: given the run's store and each actor's result (in actor order),
the violations found (empty when the run was correct)."""


@dataclass(frozen=True)
class Race:
    """Actors run concurrently from a seeded database, and what must hold afterwards."""

    name: str
    setup: Callable[[SQLiteStore], Awaitable[None]]
    """Seeds the database (migrations, rows) through a real store, once per race."""
    actors: Sequence[tuple[str, Actor]]
    """``(label, actor)``: the label names the actor in traces."""
    check: Check
    about: str = ""
    """One line: what the race tries."""


@dataclass
class RaceResult:
    """What :func:`explore` found for one race."""

    name: str
    schedules: int = 0
    complete: bool = True
    violations: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    """The schedule of the first violation: which actor ran which statement, in order."""

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {
            "schedules": self.schedules,
            "complete": self.complete,
            "violations": self.violations,
            "trace": self.trace,
        }


@dataclass(frozen=True)
class ActorFailed:
    """An actor's result when it raised (a check usually reports it as a violation)."""

    label: str
    error: BaseException

    def __str__(self) -> str:
        return f"{self.label} raised {type(self.error).__name__}: {self.error}"


def command(
    destination: str,
    type_: str,
    payload: Mapping[str, Any],
    *,
    saga_id: str,
    step: str,
    attempt: int = 1,
    rung: int | None = None,
    manual_retries: int = 0,
    now: float = 0.0,
) -> Envelope:
    """A command as the orchestrator sends it: try ``attempt`` of ``step``'s action, or
    with ``rung``, of that rung of its compensation (keys and ids as the machine makes
    them, so the participant runtime treats it as in production); ``manual_retries``
    counts the retries a person asked for on the step (the try of a person's retry runs
    the handler again after a definite failure)."""
    key = action_key(saga_id, step) if rung is None else compensation_key(saga_id, step, rung)
    return Envelope(
        message_id=f"{key}:{attempt}" + (f"#m{manual_retries}" if manual_retries else ""),
        type=type_,
        kind=MessageKind.COMMAND,
        source="orchestrator",
        destination=destination,
        correlation_id=saga_id,
        saga_id=saga_id,
        step=step,
        attempt=attempt,
        fence=attempt,
        idempotency_key=key,
        compensates=None if rung is None else action_key(saga_id, step),
        reply_to="orchestrator",
        occurred_at=now,
        payload=dict(payload),
        headers={MANUAL_RETRY: str(manual_retries)} if manual_retries else {},
    )


def delivering(build: Callable[[Any], Participant], cmd: Envelope, *, now: float = 0.0) -> Actor:
    """An actor: a replica of the participant ``build(store)`` makes, delivering ``cmd``
    (see :func:`deliver`) with its clock at ``now``; its result is the recorded outcome."""

    async def run(store: Any) -> Outcome | None:
        participant = build(store)
        participant.clock = lambda: now
        return await deliver(participant, cmd, now=now)

    return run


async def deliver(
    participant: Participant, command: Envelope, *, now: float, deliveries: int = 5
) -> Outcome | None:
    """Deliver ``command`` as the consumer does: one transaction, ``process_batch``, and
    again when the transaction fails with a :class:`~sagakit.errors.StoreError` (up to
    ``deliveries`` times). Returns the outcome recorded for its idempotency key (for the
    try of a person's retry, the newest record of the key), if any."""
    for n in range(1, deliveries + 1):
        try:
            async with participant.transaction() as tx:
                await participant.process_batch(tx, [command], now)
            break
        except StoreError:
            if n == deliveries:
                raise
    key = command.idempotency_key
    if key is None:
        return None
    # A person's retry N answers under key#mN when it ran the handler again; else the
    # answer is the one recorded before it (or the tombstone that refused it).
    retries = command.headers.get(MANUAL_RETRY, "0")
    names = [f"{key}#m{n}" for n in range(int(retries) if retries.isdigit() else 0, 0, -1)]
    async with participant.transaction() as tx:
        for name in [*names, key]:
            record = await tx.idempotency_get(participant.name, name)
            if record is not None:
                return Outcome.from_payload(record.outcome)
    return None


# -- the explorer --------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")  # a scratch copy: durability buys nothing here
    return conn


def _scratch_dir() -> str | None:
    # Each schedule copies the seeded file and commits a few times: in memory when the
    # machine has a RAM disk, the disk's syncs would be most of the run's time.
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


@dataclass
class _Run:
    choices: list[tuple[list[int], int]] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


async def _run_once(
    race: Race, template: Path, path: Path, prefix: Sequence[int], before: _Run | None
) -> _Run:
    """One run of ``race``: the picks of ``prefix``, then the first actor allowed.

    ``before`` is the run ``prefix`` branches from: up to the branch, this run must make
    the same statements with the same actors allowed, or the race is not deterministic.
    """
    shutil.copyfile(template, path)
    base = SQLiteStore(path, name=f"race-{race.name}")
    await base.open()
    labels = [label for label, _ in race.actors]
    gates = [_Gate(_connect(path)) for _ in race.actors]
    run = _Run()
    coros = [
        actor(_ActorStore(base, gate)) for (_, actor), gate in zip(race.actors, gates, strict=True)
    ]
    contexts = [contextvars.copy_context() for _ in coros]
    pending: list[_Point | None] = [None] * len(coros)
    finished = [False] * len(coros)
    try:
        results: list[object] = [None] * len(coros)

        def advance(i: int) -> None:
            coro = cast(Coroutine[Any, Any, object], coros[i])
            try:
                while True:
                    yielded = contexts[i].run(coro.send, None)
                    if isinstance(yielded, _Point):
                        pending[i] = yielded
                        return
                    if yielded is not None:  # a bare yield (asyncio.sleep(0)) is no wait
                        coro.close()
                        raise RaceError(
                            f"actor {labels[i]} awaited {yielded!r}: an actor may await only "
                            "its store's transactions (no I/O, locks or sleeps)"
                        )
            except StopIteration as stop:
                pending[i], results[i], finished[i] = None, stop.value, True
            except RaceError:
                raise
            except Exception as exc:  # a handler or store error: the check decides
                pending[i], results[i], finished[i] = None, ActorFailed(labels[i], exc), True

        for i in range(len(coros)):  # up to each actor's first statement: nothing shared
            advance(i)
        last: tuple[int, str] | None = None
        while any(p is not None for p in pending):
            allowed = [
                i
                for i, p in enumerate(pending)
                if p is not None
                and not (last is not None and last[1] == "read" == p.kind and i < last[0])
            ]
            # After a read by an actor that then ended, no later actor may read first.
            allowed = allowed or [i for i, p in enumerate(pending) if p is not None]
            step = len(run.choices)
            pick = prefix[step] if step < len(prefix) else allowed[0]
            point = pending[pick]
            what = f"{labels[pick]}: {point.what}" if point is not None else ""
            if before is not None and step < len(prefix):
                same = before.choices[step][0] == allowed and (
                    step == len(prefix) - 1 or before.trace[step] == what
                )
                if not same:
                    raise _diverged(race)
            assert point is not None
            run.choices.append((allowed, pick))
            run.trace.append(what)
            last = (pick, point.kind)
            advance(pick)
        if len(run.choices) < len(prefix):
            raise _diverged(race)
        run.violations = [str(r) for r in results if isinstance(r, ActorFailed)]
        run.violations += list(await race.check(base, results))
    finally:
        for i, coro in enumerate(coros):  # close an actor cut short in its own context
            if not finished[i]:
                contexts[i].run(cast(Coroutine[Any, Any, object], coro).close)
        for gate in gates:
            gate.conn.close()
        await base.close()
    return run


def _diverged(race: Race) -> RaceError:
    return RaceError(
        f"race {race.name} did not replay the same way: its actors must depend only on "
        "the database (a fixed clock, no randomness, no state kept between runs)"
    )


async def explore(
    race: Race, *, max_schedules: int = 20_000, workdir: Path | None = None
) -> RaceResult:
    """Run ``race`` in every interleaving (up to ``max_schedules``); stop at the first
    that breaks its check."""
    result = RaceResult(race.name)
    where = str(workdir) if workdir is not None else _scratch_dir()
    with tempfile.TemporaryDirectory(prefix="sagakit-race-", dir=where) as tmp:
        template = Path(tmp) / "seed.db"
        seed = SQLiteStore(template, name=f"race-{race.name}")
        await seed.open()
        try:
            await race.setup(seed)
        finally:
            await seed.close()
        prefix: list[int] = []
        run: _Run | None = None
        while True:
            run = await _run_once(race, template, Path(tmp) / "run.db", prefix, run)
            result.schedules += 1
            if run.violations:
                result.violations = run.violations
                result.trace = run.trace
                return result
            for k in range(len(run.choices) - 1, -1, -1):
                allowed, pick = run.choices[k]
                nxt = allowed.index(pick) + 1
                if nxt < len(allowed):
                    prefix = [c for _, c in run.choices[:k]] + [allowed[nxt]]
                    break
            else:
                return result  # every schedule run
            if result.schedules >= max_schedules:
                result.complete = False
                return result


async def explore_all(
    races: Sequence[Race], *, max_schedules: int = 20_000, workdir: Path | None = None
) -> list[RaceResult]:
    """:func:`explore` each race in turn; stop after the first with a violation."""
    out: list[RaceResult] = []
    for race in races:
        out.append(await explore(race, max_schedules=max_schedules, workdir=workdir))
        if out[-1].violations:
            break
    return out
