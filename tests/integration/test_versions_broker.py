"""Two workers with different version sets behind NATS JetStream, on PostgreSQL.

A reply or a local step's command may reach either worker. The one without ``@1``
sets v1 inputs aside; the one with both versions applies them, woken by the store's
notification, while v2 sagas keep flowing through both.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from versions_support import Calls, Site, hotel, tour, trip, until

from sagakit import Engine, SagaState
from sagakit.errors import TransportError

pytest.importorskip("nats")
pytest.importorskip("psycopg")

pytestmark = [pytest.mark.postgres, pytest.mark.nats]

NATS_URL = os.environ.get("SAGAKIT_TEST_NATS_URL", "nats://127.0.0.1:4222")
ENDPOINTS = ("orchestrator", "orchestrator.local", "hotel")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site("postgres", tmp_path)
    yield s
    s.drop()


@contextlib.asynccontextmanager
async def stream() -> AsyncIterator[str]:
    from sagakit.transports.nats import NatsTransport

    name = f"sagakit_test_{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        with contextlib.suppress(TransportError):
            await NatsTransport(
                NATS_URL, stream=name, endpoints=ENDPOINTS, connect_timeout=2.0
            ).delete_topology()


async def test_two_workers_with_different_versions_behind_a_broker(site: Site) -> None:
    from sagakit.transports.nats import NatsTransport

    calls = Calls()
    v1 = [trip(1, calls), tour(1, calls)]
    v2 = [trip(2, calls), tour(2, calls)]
    async with stream() as name, AsyncExitStack() as stack:

        def nats() -> NatsTransport:
            return NatsTransport(NATS_URL, stream=name, endpoints=ENDPOINTS)

        async def run(engine: Engine) -> Engine:
            return await stack.enter_async_context(engine)

        relay = Engine(
            site.store("orchestrator"),
            [],
            extra_stores=[site.store("hotel")],
            transport=nats(),
            roles={"relays"},
        )
        hotel_store = site.store("hotel")
        service = Engine(
            hotel_store,
            [],
            participants=[hotel(hotel_store)],
            transport=nats(),
            roles={"participants"},
        )
        api = Engine(site.store("orchestrator"), [*v1, *v2], transport=nats(), roles=frozenset())
        new = Engine(
            site.store("orchestrator"), v2, transport=nats(), roles={"orchestrator", "timers"}
        )
        for engine in (relay, service, api, new):
            await run(engine)

        # Only the v2 worker runs: v1 inputs are set aside, v2 sagas finish.
        old_trips = [await api.start("trip", f"trip-{i}", version=1) for i in range(10)]
        old_tours = [await api.start("tour", f"tour-{i}", version=1) for i in range(3)]
        fresh = [await api.start("trip", f"new-{i}") for i in range(5)]
        for inst in fresh:
            assert (await api.wait(inst.saga_id, timeout=30)).state is SagaState.SUCCEEDED

        async def all_aside() -> bool:
            counts = await api.store.set_aside_counts()
            return counts == {("trip", 1): len(old_trips), ("tour", 1): len(old_tours)}

        await until(all_aside, timeout=30, what="every v1 input set aside")
        assert not [c for c in calls.made if c[0].endswith("@1")]

        # A worker with both versions joins: it applies what waits, and from now on a
        # v1 input may reach either worker.
        both = Engine(
            site.store("orchestrator"),
            [*v1, *v2],
            transport=nats(),
            roles={"orchestrator", "timers"},
        )
        await run(both)
        more = [await api.start("trip", f"later-{i}", version=1) for i in range(10)]
        more += [await api.start("trip", f"later-new-{i}") for i in range(10)]
        for inst in [*old_trips, *old_tours, *more]:
            done = await api.wait(inst.saga_id, timeout=30)
            assert done.state is SagaState.SUCCEEDED, done
        assert await api.store.set_aside_counts() == {}
        assert await api.store.dead_letter_count() == 0
    # Every v1 local step ran (at least once, as local steps do), by the worker with v1.
    v1_runs = {c for c in calls.made if c[0].endswith("@1")}
    assert len(v1_runs) == len(old_trips) + len(old_tours) + 10
