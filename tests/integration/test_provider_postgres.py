"""The fake card provider in a PostgreSQL schema of its own.

Its records outlive the process (what a rerun of the demo on PostgreSQL relies on),
two callers racing on one key get one effect, two keys racing on one authorization see
each other's effect, and the checkout app puts it in ``<prefix>_card_provider`` when its
stores are on PostgreSQL. Marked ``postgres``: a database of its own on the shared
server, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sagakit_checkout.app import app, provider_of, provider_url
from sagakit_checkout.provider import (
    CardRules,
    FakeCardProvider,
    OperationRefused,
    ProviderTimeout,
    Receipt,
    postgres_location,
)
from server_support import fresh_database

from sagakit import Deployment
from sagakit.errors import ConfigurationError

psycopg = pytest.importorskip("psycopg", reason="needs the sagakit[postgres] extra")

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A new database on the shared server for this module; dropped afterwards."""
    with fresh_database("sagakit_provider") as url:
        yield url


@pytest.fixture
def url(database: str) -> str:
    """A provider location in a schema of its own."""
    return f"{database}?schema=provider_{uuid.uuid4().hex[:8]}"


def race(n: int, call: Callable[[FakeCardProvider, int], Any], url: str) -> list[Any]:
    """``call(provider, i)`` from ``n`` threads at once, each with a provider (a
    connection) of its own; each result, or the exception it raised."""
    providers = [FakeCardProvider(url) for _ in range(n)]
    for p in providers:
        p.rules("card-warm-up")  # connect first, so the calls start together
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = asyncio.run(call(providers[i], i))
        except Exception as exc:  # the race's outcome is what is checked
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for p in providers:
        p.close()
    return results


async def test_records_outlive_the_connection_that_wrote_them(url: str) -> None:
    first = FakeCardProvider(url)
    receipt = await first.authorize(
        "k-auth", order_id="o-1", card="card-ok-1", amount=1250, currency="EUR"
    )
    await first.capture("k-capture", authorization=receipt.authorization)
    first.configure("card-plain", CardRules(decline=True, outage_requests=2))
    first.close()

    again = FakeCardProvider(url)  # a rerun: another process, the same schema
    assert [(e.op, e.amount) for e in await again.effects("o-1")] == [
        ("authorize", 1250),
        ("capture", 1250),
    ]
    [auth] = await again.authorizations("o-1")
    assert (auth.status, auth.captured) == ("CAPTURED", 1250)
    assert await again.lookup("k-auth") == receipt
    assert again.rules("card-plain") == CardRules(decline=True, outage_requests=2)
    # The same key replays the first answer: no second effect.
    assert (
        await again.authorize(
            "k-auth", order_id="o-1", card="card-ok-1", amount=1250, currency="EUR"
        )
        == receipt
    )
    assert len(await again.effects()) == 2
    again.close()


async def test_a_slow_card_commits_then_times_out_and_the_retry_gets_the_answer(
    url: str,
) -> None:
    p = FakeCardProvider(url)
    with pytest.raises(ProviderTimeout):
        await p.authorize("k-slow", order_id="o-2", card="card-slow-2", amount=5, currency="EUR")
    receipt = await p.authorize(
        "k-slow", order_id="o-2", card="card-slow-2", amount=5, currency="EUR"
    )
    assert [e.key for e in await p.effects("o-2")] == ["k-slow"]
    assert await p.calls("k-slow") == 2
    assert receipt.amount == 5
    p.close()


def test_callers_racing_on_one_key_get_one_effect(url: str) -> None:
    results = race(
        6,
        lambda p, _: p.authorize(
            "k-race", order_id="o-3", card="card-ok-3", amount=700, currency="EUR"
        ),
        url,
    )
    assert all(isinstance(r, Receipt) for r in results), results
    assert len({r.authorization for r in results}) == 1
    p = FakeCardProvider(url)
    assert len(asyncio.run(p.effects("o-3"))) == 1
    assert asyncio.run(p.calls("k-race")) == 6
    p.close()


def test_a_capture_and_a_void_racing_on_one_authorization_get_one_effect(url: str) -> None:
    p = FakeCardProvider(url)
    auth = asyncio.run(
        p.authorize("k-a4", order_id="o-4", card="card-ok-4", amount=900, currency="EUR")
    ).authorization

    def capture_or_void(q: FakeCardProvider, i: int) -> Any:
        if i % 2:
            return q.capture(f"k-capture-{i}", authorization=auth)
        return q.void(f"k-void-{i}", authorization=auth)

    results = race(6, capture_or_void, url)
    assert all(isinstance(r, Receipt | OperationRefused) for r in results), results
    effects = [e.op for e in asyncio.run(p.effects("o-4"))]
    # The authorization, then exactly one of a capture or a void: never both, never two.
    assert effects[0] == "authorize" and len(effects) == 2, effects
    assert sum(isinstance(r, Receipt) for r in results) == 1
    p.close()


def test_the_checkout_keeps_the_provider_beside_its_postgresql_stores(
    database: str, tmp_path: Path
) -> None:
    assert provider_url(f"{database}?prefix=shop-a&sslmode=disable", "checkout") == (
        f"{database}?sslmode=disable&schema=shop_a_card_provider"
    )
    assert provider_url(database, "checkout") == f"{database}?schema=checkout_card_provider"
    assert provider_url(f"sqlite:///{tmp_path}", "checkout") is None

    on_pg = provider_of(Deployment(app, f"{database}?prefix=shop", data_dir=tmp_path).ctx)
    assert on_pg.path is None and on_pg.url is not None
    assert postgres_location(on_pg.url) == (database, "shop_card_provider")

    on_files = provider_of(Deployment(app, f"sqlite:///{tmp_path}").ctx)
    assert on_files.path == tmp_path / "provider.db" and on_files.url is None

    chosen = Deployment(app, database, options={"provider": str(tmp_path / "p.db")})
    assert provider_of(chosen.ctx).path == tmp_path / "p.db"


def test_a_bad_location_is_refused_clearly(database: str) -> None:
    with pytest.raises(ValueError, match="give a file path or a postgresql:// URL"):
        FakeCardProvider("mysql://db/provider")
    with pytest.raises(ValueError, match="schema must be 1 to 63 bytes"):
        FakeCardProvider(f"{database}?schema={'x' * 64}")
    bad = Deployment(app, database, options={"provider": "nats://somewhere"})
    with pytest.raises(ConfigurationError, match=r"card provider location .* give a file path"):
        provider_of(bad.ctx)
