"""/healthz, /readyz, /metrics and the OpenAPI document."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import schemathesis
from api_support import auth, running_api

from sagakit.errors import StoreError


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


_SAMPLE = re.compile(r'^([a-z_]+)(\{[a-z_]+="[^"]*"\})? (\d+(\.\d+)?)$')


def _parse(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    declared: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind == "gauge"
            declared.add(name)
        elif line.startswith("# HELP "):
            continue
        else:
            m = _SAMPLE.match(line)
            assert m, line
            assert m[1] in declared, f"{m[1]} has no # TYPE line"
            samples[m[1] + (m[2] or "")] = float(m[3])
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
            for name in ("sagakit_outbox_pending", "sagakit_dead_letters", "sagakit_mailbox_depth"):
                assert f'{name}{{store="{store}"}}' in s
        assert r.text.endswith("\n")


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
