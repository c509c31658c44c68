"""The race explorer: every interleaving of real handlers' transactions, on SQLite.

A counter participant written two ways shows what it finds: incremented as
read-then-write, two concurrent deliveries lose an update in some interleaving (and the
trace names both); as one ``UPDATE ... SET n = n + 1`` no interleaving does. The
checkout's own races pass, and its read-then-write reservation is caught.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sagakit_checkout import inventory
from sagakit_checkout.races import checkout_races

from sagakit.cli import main
from sagakit.core.envelope import Envelope, MessageKind
from sagakit.runtime.participant import Participant
from sagakit.stores.base import Tx
from sagakit.stores.sqlite import SQLiteStore
from sagakit.testing.races import ActorFailed, Race, RaceError, deliver, explore

MIGRATION = "CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);"


def bump(n: int) -> Envelope:
    """Event ``n`` of the counter (no idempotency key: the inbox alone dedups it)."""
    return Envelope(
        message_id=f"bump-{n}",
        type="Bump",
        kind=MessageKind.EVENT,
        source="test",
        correlation_id=f"c-{n}",
        occurred_at=0.0,
    )


def counter(store: Any, *, atomic: bool) -> Participant:
    p = Participant("counter", store)

    @p.handles("Bump")
    async def _(tx: Tx, env: Envelope) -> None:
        if atomic:
            await tx.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
            return
        row = await tx.fetchone("SELECT n FROM counter WHERE id = 1")
        assert row is not None
        await tx.execute("UPDATE counter SET n = ? WHERE id = 1", (row[0] + 1,))

    return p


async def seed_counter(store: SQLiteStore) -> None:
    await store.apply_migrations("test.counter", [MIGRATION])
    async with store.transaction() as tx:
        await tx.execute("INSERT INTO counter (id, n) VALUES (1, 0)")


def bumper(env: Envelope, *, atomic: bool) -> Any:
    async def run(store: Any) -> None:
        await deliver(counter(store, atomic=atomic), env, now=0.0)

    return run


def counted(expected: int) -> Any:
    async def check(store: SQLiteStore, results: Sequence[object]) -> list[str]:
        async with store.transaction() as tx:
            row = await tx.fetchone("SELECT n FROM counter WHERE id = 1")
        n = None if row is None else row[0]
        return [] if n == expected else [f"counter is {n}, {expected} expected"]

    return check


def counter_race(*envs: Envelope, atomic: bool, expected: int) -> Race:
    actors = [(f"replica-{i}", bumper(env, atomic=atomic)) for i, env in enumerate(envs, 1)]
    return Race("counter", seed_counter, actors, counted(expected))


def test_a_read_then_write_increment_loses_an_update_in_some_interleaving() -> None:
    result = asyncio.run(explore(counter_race(bump(1), bump(2), atomic=False, expected=2)))
    assert result.violations == ["counter is 1, 2 expected"]
    # The trace: both read 0 before either writes.
    reads = [i for i, s in enumerate(result.trace) if "SELECT n FROM counter" in s]
    writes = [i for i, s in enumerate(result.trace) if "UPDATE counter" in s]
    assert len(reads) == 2 and len(writes) == 2 and max(reads) < min(writes), result.trace
    assert {s.split(":")[0] for s in result.trace} == {"replica-1", "replica-2"}


def test_one_conditional_update_is_safe_in_every_interleaving() -> None:
    race = counter_race(bump(1), bump(2), bump(3), atomic=True, expected=3)
    result = asyncio.run(explore(race))
    assert result.violations == [] and result.complete
    assert result.schedules > 10  # three actors: many orders were really run


@pytest.mark.fault("F-DUPLICATE")
def test_the_same_message_to_two_replicas_takes_effect_once_in_every_interleaving() -> None:
    # Each replica reads that the inbox lacks the id; the second to write finds it there,
    # rolls back and is delivered again, and then skips it as a duplicate.
    result = asyncio.run(explore(counter_race(bump(1), bump(1), atomic=True, expected=1)))
    assert result.violations == [] and result.complete and result.schedules > 1


def test_the_budget_cuts_the_exploration_short_and_says_so() -> None:
    race = counter_race(bump(1), bump(2), bump(3), atomic=True, expected=3)
    result = asyncio.run(explore(race, max_schedules=3))
    assert result.schedules == 3 and not result.complete and result.violations == []


def test_an_actor_that_waits_on_something_else_is_refused_with_the_reason() -> None:
    async def sleeper(store: Any) -> None:
        await asyncio.sleep(0.01)

    race = Race("sleeper", seed_counter, [("sleeper", sleeper)], counted(0))
    with pytest.raises(RaceError, match=r"sleeper awaited .*only its store's transactions"):
        asyncio.run(explore(race))


def test_an_actor_that_does_not_replay_the_same_way_is_refused() -> None:
    runs: list[int] = []

    async def erratic(store: Any) -> None:
        runs.append(1)
        async with store.transaction() as tx:  # a different statement on each run
            await tx.fetchone(f"SELECT n FROM counter WHERE id = {len(runs)}")
            await tx.fetchone("SELECT n FROM counter WHERE id = 1")

    race = Race(
        "erratic",
        seed_counter,
        [("a", erratic), ("b", bumper(bump(1), atomic=True))],
        counted(1),
    )
    with pytest.raises(RaceError, match="did not replay the same way"):
        asyncio.run(explore(race))


def test_an_actor_that_raises_is_a_violation_with_its_error() -> None:
    async def broken(store: Any) -> None:
        async with store.transaction() as tx:
            await tx.execute("UPDATE no_such_table SET n = 1")

    race = Race("broken", seed_counter, [("broken", broken)], counted(0))
    result = asyncio.run(explore(race))
    assert len(result.violations) == 1
    assert result.violations[0].startswith("broken raised StoreError")
    assert "no such table" in result.violations[0]


@pytest.mark.fault("F-LAST-ITEM", "F-DUPLICATE", "F-REORDER")
def test_the_checkout_races_hold_in_every_interleaving() -> None:
    async def run() -> list[Any]:
        return [await explore(race) for race in checkout_races()]

    results = asyncio.run(run())
    assert [r.name for r in results] == [
        "last-item",
        "same-command-twice",
        "retry-beside-first-try",
        "release-overtakes-reserve",
        "release-beside-a-persons-retry",
        "sweeper-vs-commit",
        "sweeper-vs-release",
    ]
    for r in results:
        assert r.violations == [] and r.complete and r.schedules > 1, (r.name, r.to_json())


@pytest.mark.fault("F-LAST-ITEM")
def test_a_read_then_write_reservation_sells_the_last_unit_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def reserve(tx: Tx, order_id: str, sku: str, qty: int, **_: Any) -> dict[str, Any]:
        row = await tx.fetchone("SELECT available, reserved FROM stock WHERE sku = ?", (sku,))
        assert row is not None
        if row[0] < qty:
            raise inventory.StepFailed(inventory.OUT_OF_STOCK)
        await tx.execute(
            "UPDATE stock SET available = ?, reserved = ? WHERE sku = ?",
            (row[0] - qty, row[1] + qty, sku),
        )
        await tx.execute(
            "INSERT INTO reservations (order_id, sku, qty, status, created_at, updated_at, "
            "expires_at) VALUES (?, ?, ?, 'RESERVED', 0, 0, 1e12)",
            (order_id, sku, qty),
        )
        return {"sku": sku, "reserved": qty}

    monkeypatch.setattr(inventory, "reserve", reserve)
    result = asyncio.run(explore(checkout_races()[0]))
    assert "2 orders got the last unit" in " ".join(result.violations), result.to_json()


def test_check_runs_the_races_first_and_reports_them(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", "checkout", "--sagas", "1", "--faults", "0", "--failures", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert set(out["races"]) == {r.name for r in checkout_races()}
    assert all(r["complete"] and not r["violations"] for r in out["races"].values())


def test_check_with_races_that_cannot_be_loaded_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["check", "checkout", "--races", "sagakit_checkout.races:no_such_thing"])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"cannot load the races 'sagakit_checkout.races:no_such_thing'", err)
    code = main(["check", "checkout", "--races", "sagakit_checkout.races:SKU"])
    assert code == 2 and "is not a list of sagakit.testing.races.Race" in capsys.readouterr().err


def test_an_actor_failure_is_reported_with_its_label() -> None:
    assert str(ActorFailed("replica-1", ValueError("boom"))) == "replica-1 raised ValueError: boom"


def test_the_workdir_holds_the_scratch_files_only_while_exploring(tmp_path: Path) -> None:
    asyncio.run(explore(counter_race(bump(1), atomic=True, expected=1), workdir=tmp_path))
    assert list(tmp_path.iterdir()) == []
