"""A saga waiting for a definition version, as the API, the console and /metrics show
it, and manual actions on it from a process without that version: refused, clearly."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from versions_support import Calls, Site, hotel, trip, until

from sagakit import Engine, SagaState
from sagakit.api import TokenStore, create_app

PLAIN = {"viewer": "tok-viewer", "operator": "tok-operator"}
TOKENS = TokenStore.from_plain({name: (name, token) for name, token in PLAIN.items()})


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {PLAIN[role]}"}


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site("sqlite", tmp_path)


async def test_api_and_console_show_what_a_saga_waits_for(site: Site) -> None:
    calls = Calls()
    both = [trip(1, calls), trip(2, calls)]
    async with Engine(site.store("orchestrator"), both, roles=frozenset()) as api:
        old = await api.start("trip", "trip-1", version=1)
    worker = Engine(
        site.store("orchestrator"),
        [trip(2, calls)],
        participants=[hotel(site.store("hotel"))],
        idle_poll=0.1,
    )
    async with worker:
        await until(lambda: _aside(worker, old.saga_id), what="the v1 reply set aside")
        new = await worker.start("trip", "mute-2")  # the hotel never answers: it runs
        app = create_app(worker, tokens=TOKENS, console_secret=b"s" * 32)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            r = await client.get(f"/sagas/{old.saga_id}", headers=auth("viewer"))
            assert r.status_code == 200, r.text
            assert r.json()["waiting_for"] == "trip@1"
            r = await client.get(f"/sagas/{new.saga_id}", headers=auth("viewer"))
            assert r.json()["waiting_for"] is None

            for action in ("cancel", "mark_done"):
                r = await client.post(
                    f"/sagas/{old.saga_id}/actions",
                    json={"action": action, "reason": "customer called", "confirm": True},
                    headers=auth("operator"),
                )
                assert r.status_code == 409, r.text
                assert r.json()["error"] == "version_missing"
                assert "trip@1" in r.json()["message"]

            metrics = (await client.get("/metrics", headers=auth("viewer"))).text
            assert 'sagakit_inputs_set_aside{waiting_for="trip@1"} 1' in metrics

            # The console: signed in with the operator's token (a cookie).
            login = await client.post("/console-login", data={"token": PLAIN["operator"]})
            assert login.status_code == 303
            page = await client.get(f"/console/sagas/{old.saga_id}")
            assert page.status_code == 200
            assert "Waiting for trip@1" in page.text
            # A form's token (the running v2 saga may be cancelled), posted for the v1 one.
            other = await client.get(f"/console/sagas/{new.saga_id}")
            assert "Waiting for" not in other.text
            found = re.search(r'name="csrf" value="([0-9a-f]{64})"', other.text)
            assert found, "no decision form on the running saga's page"
            refused = await client.post(
                f"/console/sagas/{old.saga_id}/act",
                data={
                    "action": "cancel",
                    "reason": "customer called",
                    "csrf": found[1],
                    "version": str((await worker.get(old.saga_id)).version),
                },
            )
            assert refused.status_code == 409
            assert "lacks trip@1" in refused.text
        assert (await worker.get(old.saga_id)).state is SagaState.RUNNING


async def _aside(worker: Engine, saga_id: str) -> bool:
    return bool(await worker.store.set_aside_of_saga(saga_id))
