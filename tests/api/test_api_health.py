"""/healthz, /readyz, /metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from api_support import auth, running_api
from sagakit_checkout.sagas import checkout_definition

from sagakit import Engine
from sagakit.api.health import Metrics
from sagakit.core.envelope import Envelope, MessageKind
from sagakit.errors import StoreError
from sagakit.metrics import INBOX_DUPLICATES, REGISTRY, Registry
from sagakit.stores.memory import MemoryStore


async def test_health_and_readiness(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        r = await env.client.get("/healthz", headers=auth("viewer"))
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = await env.client.get("/readyz", headers=auth("viewer"))
        assert r.status_code == 200
        assert r.json() == {
            "ready": True,
            "stores": dict.fromkeys(
                ["orchestrator", "order", "payment", "inventory", "shipping"], "ok"
            ),
        }
        store = env.checkout.shipping_store

        async def down() -> int:
            raise StoreError("SQLite store 'shipping' could not answer: disk I/O error")

        store.outbox_pending = down  # type: ignore[method-assign]  # a store that fails
        r = await env.client.get("/readyz", headers=auth("viewer"))
        assert r.status_code == 503
        body = r.json()
        assert body["ready"] is False and body["error"] == "not_ready"
        assert "disk I/O error" in body["stores"]["shipping"]
        assert body["stores"]["payment"] == "ok"
        # Liveness does not depend on the stores.
        assert (await env.client.get("/healthz", headers=auth("viewer"))).status_code == 200
        del store.outbox_pending
        assert (await env.client.get("/readyz", headers=auth("viewer"))).status_code == 200


_SAMPLE = re.compile(
    r'^([a-z_]+)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (\d+(\.\d+)?(e[+-]\d+)?)$'
)


def _parse(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    declared: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("gauge", "counter", "histogram")
            assert name not in declared, f"{name} declared twice"
            declared[name] = kind
        elif line.startswith("# HELP "):
            continue
        else:
            m = _SAMPLE.match(line)
            assert m, line
            base = re.sub(r"_(bucket|sum|count)$", "", m[1])
            assert m[1] in declared or declared.get(base) == "histogram", f"{m[1]} has no # TYPE"
            samples[m[1] + (m[2] or "")] = float(m[4])
    return samples


async def test_metrics_are_prometheus_text(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        await env.settled("ok")
        await env.manual_case("m")
        r = await env.client.get("/metrics", headers=auth("viewer"))
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        s = _parse(r.text)
        assert s['sagakit_sagas{state="SUCCEEDED"}'] == 1
        assert s['sagakit_sagas{state="FAILED_NEEDS_MANUAL"}'] == 1
        assert s['sagakit_sagas{state="RUNNING"}'] == 0
        assert s["sagakit_manual_cases"] == 1
        for store in ("orchestrator", "order", "payment", "inventory", "shipping"):
            for name in (
                "sagakit_outbox_pending",
                "sagakit_outbox_lag_seconds",
                "sagakit_dead_letters",
                "sagakit_mailbox_depth",
            ):
                assert f'{name}{{store="{store}"}}' in s
        assert r.text.endswith("\n")


def _registry_values() -> dict[str, float]:
    return _parse(REGISTRY.exposition())


async def _until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


async def test_metrics_count_sagas_steps_and_duplicates(tmp_path: Path) -> None:
    # The registry is per process: other tests may have counted before; compare deltas.
    before = _registry_values()
    async with running_api(tmp_path) as env:
        ok = [await env.settled(f"ok-{i}") for i in range(2)]
        await env.settled("declined", card="card-decline-1")
        await env.manual_case("manual")
        # A reply and a command delivered again: both inboxes skip them, and count them.
        saga_id = ok[0]["saga_id"]
        command = next(
            e
            for e, _ in await env.engine.store.outbox_of_saga(saga_id)
            if e.destination == "payment"
        )
        reply = next(
            e
            for e, _ in await env.checkout.payment_store.outbox_of_saga(saga_id)
            if e.destination == "orchestrator"
        )
        await env.engine.transport.publish([reply, command])
        duplicates = 'sagakit_inbox_duplicates_total{consumer="%s"}'
        await _until(
            lambda: all(
                INBOX_DUPLICATES.value(c) >= before.get(duplicates % c, 0) + 1
                for c in ("orchestrator", "payment")
            )
        )
        r = await env.client.get("/metrics", headers=auth("viewer"))
        after = _parse(r.text)
        ok_sagas = [await env.engine.get(o["saga_id"]) for o in ok]

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta('sagakit_sagas_started_total{definition="checkout"}') == 4
    finished = 'sagakit_sagas_finished_total{definition="checkout",state="%s"}'
    assert delta(finished % "SUCCEEDED") == 2
    assert delta(finished % "COMPENSATED") == 1
    assert delta(finished % "FAILED_NEEDS_MANUAL") == 1
    assert delta(duplicates % "orchestrator") == 1 and delta(duplicates % "payment") == 1
    step = 'sagakit_step_duration_seconds_%s{definition="checkout",step="%s",outcome="%s"}'
    assert delta(step % ("count", "create_order", "succeeded")) == 4
    assert delta(step % ("count", "authorize_payment", "succeeded")) == 3
    assert delta(step % ("count", "authorize_payment", "failed")) == 1
    assert delta(step % ("count", "complete_order", "succeeded")) == 2
    # The sum is the time from each step's first command to the reply that settled it.
    index = [s.name for s in checkout_definition().steps].index("complete_order")
    spent = sum(
        (s.steps[index].finished_at or 0) - (s.steps[index].started_at or 0) for s in ok_sagas
    )
    assert delta(step % ("sum", "complete_order", "succeeded")) == pytest.approx(spent, abs=1e-6)
    bucket = (
        'sagakit_step_duration_seconds_bucket{definition="checkout",step="%s",outcome="%s",le="%s"}'
    )
    assert delta(bucket % ("complete_order", "succeeded", "+Inf")) == 2


async def test_outbox_lag_is_the_age_of_the_oldest_unpublished_row() -> None:
    store = MemoryStore("lagging")
    engine = Engine(store, [], clock=lambda: 1000.0)
    await store.open()
    metrics = Metrics(engine, registry=Registry())
    lag = 'sagakit_outbox_lag_seconds{store="lagging"}'
    assert _parse(await metrics.text())[lag] == 0
    message = Envelope("m1", "Ping", MessageKind.EVENT, "test", "c1", occurred_at=1.0)
    async with store.transaction() as tx:
        await tx.outbox_add([message], now=900.0)
        await tx.dead_letter("x", "m9", "{}", "unknown type", now=1.0)
    metrics.ttl = 0.0
    s = _parse(await metrics.text())
    assert s[lag] == 100
    assert s['sagakit_outbox_pending{store="lagging"}'] == 1
    assert s['sagakit_dead_letters{store="lagging"}'] == 1
    await store.close()


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [
            r for v in node.values() for r in _refs(v)
        ]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_openapi_describes_every_route_and_error(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        r = await env.client.get("/openapi.json", headers=auth("viewer"))
        doc = r.json()
        assert doc["openapi"].startswith("3.")
        # A valid OpenAPI document, by the official meta-schema.
        schemathesis.openapi.from_dict(doc).validate()
        # Every JSON route is documented; the console (HTML, under /console) is not an API.
        routes = {
            (m, route.path)
            for route in env.app.routes
            if not route.path.startswith("/console")
            for m in getattr(route, "methods", ())
            if m != "HEAD"
        }
        documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
        assert routes == documented
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                codes = set(op["responses"])
                assert {"401", "403"} <= codes, (method, path)
                assert any(c.startswith("2") for c in codes)
                if "requestBody" in op:
                    assert {"400", "413", "415", "422"} <= codes, (method, path)
                if "{" in path:
                    assert "404" in codes, (method, path)
                    names = {p["name"] for p in op["parameters"] if p["in"] == "path"}
                    assert names == set(re.findall(r"\{(\w+)\}", path))
                if any(p["in"] == "query" for p in op.get("parameters", [])):
                    assert "422" in codes, (method, path)
                assert op["security"] == [{"bearer": []}]
        for ref in _refs(doc):
            name = ref.removeprefix("#/components/schemas/")
            assert name in doc["components"]["schemas"], ref
        idem = [p for p in doc["paths"]["/orders"]["post"]["parameters"]]
        assert idem[0]["name"] == "Idempotency-Key" and idem[0]["required"] is True
