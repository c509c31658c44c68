"""Safe versioning end to end: a process without a saga's definition version sets its
inputs aside (never spinning, never dead-lettering), others go on, and a process that
has the version applies them (at its start, or while it runs), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from versions_support import BOOK_TIMEOUT, Calls, Site, hotel, tour, trip, until

from sagakit import Engine, SagaDefinition, SagaState
from sagakit.errors import VersionMissing
from sagakit.metrics import INPUTS_RESUMED, INPUTS_SET_ASIDE
from sagakit.runtime.set_aside import waiting_for


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    s = Site(request.param, tmp_path)
    yield s
    s.drop()


def engine(site: Site, definitions: list[SagaDefinition], **kw: Any) -> Engine:
    return Engine(
        site.store("orchestrator"),
        definitions,
        participants=[hotel(site.store("hotel"))],
        idle_poll=0.1,
        **kw,
    )


async def test_a_worker_without_the_version_sets_inputs_aside_and_a_later_one_applies_them(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls()
    v1 = [trip(1, calls), tour(1, calls)]
    v2 = [trip(2, calls), tour(2, calls)]
    set_aside_before = INPUTS_SET_ASIDE.value("trip@1", "reply")
    resumed_before = INPUTS_RESUMED.value("tour@1", "local")

    # Version 1 sagas in flight: their commands written, nothing run yet.
    async with engine(site, [*v1, *v2], roles=frozenset()) as api:
        booked = await api.start("trip", "trip-1", version=1)
        muted = await api.start("trip", "mute-1", version=1)
        guided = await api.start("tour", "tour-1", version=1)

    # The worker restarts with version 2 only.
    caplog.set_level(logging.DEBUG, logger="sagakit")
    async with engine(site, v2) as worker:
        store = worker.store

        async def aside(saga_id: str, kind: str) -> bool:
            return any(r.kind == kind for r in await store.set_aside_of_saga(saga_id))

        await until(lambda: aside(booked.saga_id, "reply"), what="the hotel's reply set aside")
        await until(lambda: aside(guided.saga_id, "local"), what="the local step set aside")
        # A v2 saga goes through, retry timer included, while v1 inputs wait.
        fresh = await worker.start("trip", "flaky-2")
        done = await worker.wait(fresh.saga_id, timeout=20)
        assert done.state is SagaState.SUCCEEDED and done.definition_version == 2
        assert ("trip@2", "confirm", "flaky-2") in calls.made
        # The muted saga's step times out: its timer is set aside, not fired again.
        await until(lambda: aside(muted.saga_id, "timer"), timeout=BOOK_TIMEOUT + 20)
        await asyncio.sleep(0.3)  # room for the timer loop to spin, were it to

        # A duplicate of the reply is recognised by the inbox: not set aside twice.
        (row,) = [r for r in await store.set_aside_of_saga(booked.saga_id) if r.kind == "reply"]
        await store.queue_push("orchestrator", [row.body], now=worker.clock())
        await asyncio.sleep(0.5)
        replies = [r for r in await store.set_aside_of_saga(booked.saga_id) if r.kind == "reply"]
        assert replies == [row]

        assert await waiting_for(store, booked.saga_id) == "trip@1"
        assert await waiting_for(store, fresh.saga_id) is None
        assert (await store.set_aside_counts()).keys() == {("trip", 1), ("tour", 1)}
        assert await store.dead_letter_count() == 0
        for saga_id in (booked.saga_id, muted.saga_id, guided.saga_id):
            inst = await worker.get(saga_id)
            assert inst.state is SagaState.RUNNING
        assert not [c for c in calls.made if c[0].endswith("@1")]  # nothing of v1 ran
        with pytest.raises(VersionMissing, match="trip@1") as refused:
            await worker.cancel(booked.saga_id, "customer asked")
        assert refused.value.waiting_for == "trip@1"

    # One log line per missing version, not one per input or retry; no spinning.
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    aside_lines = [r for r in warned if "is set aside" in r.getMessage()]
    assert sorted(r.__dict__["waiting_for"] for r in aside_lines) == ["tour@1", "trip@1"]
    assert not [r for r in caplog.records if "timer loop failed" in r.getMessage()]
    assert not [r for r in caplog.records if "parking" in r.getMessage()]
    assert INPUTS_SET_ASIDE.value("trip@1", "reply") == set_aside_before + 1

    # A worker with both versions applies everything at its start, in order.
    async with engine(site, [*v1, *v2]) as worker:
        for saga_id in (booked.saga_id, guided.saga_id):
            done = await worker.wait(saga_id, timeout=20)
            assert done.state is SagaState.SUCCEEDED, done
        await until(lambda: _moved(worker, muted.saga_id), what="the muted saga's timer applied")
        assert await worker.store.set_aside_counts() == {}
        assert await worker.store.dead_letter_count() == 0
        assert await waiting_for(worker.store, booked.saga_id) is None
    assert ("trip@1", "confirm", "trip-1") in calls.made
    assert calls.made.count(("tour@1", "guide", "tour-1")) == 1
    assert INPUTS_RESUMED.value("tour@1", "local") == resumed_before + 1


async def _moved(worker: Engine, saga_id: str) -> bool:
    return any(h.event == "step.timed_out" for h in await worker.store.history(saga_id))


async def test_a_running_worker_applies_inputs_another_process_set_aside(site: Site) -> None:
    """Two engines on one store at once: one lacks v1, the other has it and is woken
    (PostgreSQL's notification) or polls (SQLite), without a restart."""
    calls = Calls()
    async with engine(site, [trip(1, calls), trip(2, calls)], roles=frozenset()) as api:
        booked = await api.start("trip", "trip-7", version=1)
    # Only the v2 worker consumes replies; the v1 one runs no consumer, just the resume.
    async with engine(site, [trip(2, calls)]) as new:
        await until(
            lambda: _has_aside(new, booked.saga_id), what="the v1 reply set aside by the v2 worker"
        )
        async with Engine(
            site.store("orchestrator"),
            [trip(1, calls), trip(2, calls)],
            roles={"timers"},
            set_aside_poll=0.2,
        ) as old:
            # The reply applied by the v1 worker; its local step, set aside by the v2
            # worker's consumer in turn, is run by the v1 worker as well.
            done = await old.wait(booked.saga_id, timeout=20)
            assert done.state is SagaState.SUCCEEDED
    assert calls.made == [("trip@1", "confirm", "trip-7")]


async def _has_aside(worker: Engine, saga_id: str) -> bool:
    return bool(await worker.store.set_aside_of_saga(saga_id))


async def test_an_engine_without_the_definition_never_blocks_other_sagas(site: Site) -> None:
    """Many v1 sagas in flight do not hold up a v2 one: every batch still commits."""
    calls = Calls()
    async with engine(site, [trip(1, calls), trip(2, calls)], roles=frozenset()) as api:
        old = [await api.start("trip", f"old-{i}", version=1) for i in range(20)]
    async with engine(site, [trip(2, calls)]) as worker:
        new = [await worker.start("trip", f"new-{i}") for i in range(5)]
        for inst in new:
            assert (await worker.wait(inst.saga_id, timeout=20)).state is SagaState.SUCCEEDED

        async def all_aside() -> bool:
            return (await worker.store.set_aside_counts()).get(("trip", 1), 0) == len(old)

        await until(all_aside, what="every v1 reply set aside")
        assert await worker.store.dead_letter_count() == 0


async def test_two_workers_with_the_version_share_the_inputs_without_running_any_twice(
    site: Site,
) -> None:
    """Claims are leases: two workers resuming at once split the inputs between them."""
    calls = Calls()
    async with engine(site, [tour(1, calls), tour(2, calls)], roles=frozenset()) as api:
        sagas = [await api.start("tour", f"tour-{i}", version=1) for i in range(20)]
    async with engine(site, [tour(2, calls)]) as new:

        async def all_aside() -> bool:
            return (await new.store.set_aside_counts()).get(("tour", 1), 0) == len(sagas)

        await until(all_aside, what="every v1 local step set aside")
    both = [tour(1, calls), tour(2, calls)]
    first = Engine(site.store("orchestrator"), both, roles={"timers"}, batch_size=4)
    second = Engine(site.store("orchestrator"), both, roles={"timers"}, batch_size=4)
    async with first, second:
        for inst in sagas:
            assert (await first.wait(inst.saga_id, timeout=20)).state is SagaState.SUCCEEDED
    runs = [c for c in calls.made if c[0] == "tour@1"]
    assert sorted(runs) == sorted(("tour@1", "guide", i.business_key) for i in sagas)
