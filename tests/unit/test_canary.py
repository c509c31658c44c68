"""Canary starts: a share of new sagas on a definition's latest version, by business key."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from sagakit import Engine, SagaDefinition, Step
from sagakit.errors import ConfigurationError
from sagakit.runtime.canary import canary_point
from sagakit.runtime.orchestrator import Orchestrator
from sagakit.stores.memory import MemoryStore


def trip(version: int, name: str = "trip") -> SagaDefinition:
    return SagaDefinition(name, version=version, steps=[Step("book", lambda ctx: None)])


def orchestrator(canary: dict[str, Any] | None, *versions: int) -> Orchestrator:
    return Orchestrator(MemoryStore(), [trip(v) for v in versions], canary=canary)


async def started_versions(o: Orchestrator, keys: list[str]) -> dict[str, int]:
    await o.store.open()
    got = await o.start_many([("trip", k, {}) for k in keys])
    return {inst.business_key: inst.definition_version for inst, _ in got}


def test_canary_point_is_a_stable_hash_in_the_unit_interval() -> None:
    points = [canary_point("trip", f"order-{i}") for i in range(1000)]
    assert all(0.0 <= p < 1.0 for p in points)
    assert canary_point("trip", "order-1") == canary_point("trip", "order-1")
    # Pinned: a key keeps its version across processes and releases.
    digest = hashlib.sha256(b"trip\x00order-1").digest()
    assert canary_point("trip", "order-1") == int.from_bytes(digest[:8], "big") / 2**64
    assert canary_point("trip", "order-1") == pytest.approx(0.31421, abs=1e-5)
    assert canary_point("trip", "order-1") != canary_point("tour", "order-1")


async def test_the_share_of_new_sagas_on_the_latest_version_is_roughly_the_canary() -> None:
    o = orchestrator({"trip": 0.1}, 1, 2, 3)
    keys = [f"order-{i}" for i in range(4000)]
    versions = await started_versions(o, keys)
    on_latest = sum(1 for v in versions.values() if v == 3)
    assert 0.08 * len(keys) < on_latest < 0.12 * len(keys)
    # The rest on the version just below the latest, none on older ones.
    assert set(versions.values()) == {2, 3}
    # Below the share, on the latest; at or above it, on the previous one.
    assert all((v == 3) == (canary_point("trip", k) < 0.1) for k, v in versions.items())


async def test_the_same_key_always_gets_the_same_version() -> None:
    keys = [f"order-{i}" for i in range(300)]
    first = await started_versions(orchestrator({"trip": 0.5}, 1, 2), keys)
    again = await started_versions(orchestrator({"trip": 0.5}, 1, 2), list(reversed(keys)))
    assert first == again
    assert set(first.values()) == {1, 2}


async def test_without_a_canary_new_sagas_start_on_the_latest_version() -> None:
    versions = await started_versions(orchestrator(None, 1, 2), [f"k{i}" for i in range(50)])
    assert set(versions.values()) == {2}


async def test_an_explicit_version_wins_over_the_canary() -> None:
    o = orchestrator({"trip": 0.5}, 1, 2)
    await o.store.open()
    keys = [f"order-{i}" for i in range(40)]
    for version in (1, 2):
        got = await o.start_many([("trip", f"{k}-{version}", {}) for k in keys], version=version)
        assert {inst.definition_version for inst, _ in got} == {version}


async def test_an_existing_saga_is_returned_whatever_the_canary_says() -> None:
    store = MemoryStore()
    plain = Orchestrator(store, [trip(1), trip(2)])
    await store.open()
    # A key the canary would start on version 1.
    key = next(k for k in (f"order-{i}" for i in range(100)) if canary_point("trip", k) >= 0.5)
    before, _ = await plain.start("trip", key)
    assert before.definition_version == 2
    again, created = await Orchestrator(store, [trip(1), trip(2)], canary={"trip": 0.5}).start(
        "trip", key
    )
    assert (again.saga_id, again.definition_version, created) == (before.saga_id, 2, False)


@pytest.mark.parametrize("share", [0, 0.0, 1, 1.0, 1.5, -0.1, float("nan"), True, "0.1"])
def test_a_share_outside_0_1_is_refused(share: object) -> None:
    with pytest.raises(ConfigurationError, match="canary share of 'trip'"):
        orchestrator({"trip": share}, 1, 2)


def test_a_canary_needs_two_versions_of_a_known_definition() -> None:
    with pytest.raises(ConfigurationError, match=r"only trip@1 is registered"):
        orchestrator({"trip": 0.1}, 1)
    with pytest.raises(ConfigurationError, match="no saga definition of that name"):
        orchestrator({"tour": 0.1}, 1, 2)


async def test_the_engine_passes_its_canary_to_the_orchestrator(tmp_path: Path) -> None:
    from sagakit.stores.sqlite import SQLiteStore

    engine = Engine(SQLiteStore(tmp_path / "o.db"), [trip(1), trip(2)], canary={"trip": 0.25})
    assert engine.orchestrator.canary == {"trip": 0.25}
    with pytest.raises(ConfigurationError, match="between 0 and 1"):
        Engine(SQLiteStore(tmp_path / "o.db"), [trip(1), trip(2)], canary={"trip": 2.0})
