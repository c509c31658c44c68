"""Liveness, readiness and Prometheus metrics.

``/metrics`` is the Prometheus text exposition format (0.0.4), written by hand: gauges
read with the stores' cheap counting methods (sagas by state, manual cases and how long
the oldest has waited, outbox pending and lag, dead letters, mailbox depth, inputs set
aside for a missing definition version), followed by the counters and histograms the
runtime records in :data:`sagakit.metrics.REGISTRY` (sagas started and finished, step
durations, inbox duplicates, inputs set aside and resumed, alerts raised and posted). A
rendering is cached for a second so that many scrapers cost no more than one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response

from sagakit.api.auth import Role
from sagakit.api.http import ApiContext, Endpoint, Reply, json_reply, request_path
from sagakit.api.problems import PROBLEM_JSON, problem_bytes, problem_document
from sagakit.core.instance import MANUAL_STATES, SagaState
from sagakit.metrics import REGISTRY, Registry, format_value, label_text
from sagakit.runtime.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
READY_TIMEOUT = 2.0
"""Seconds a store has to answer the readiness probe."""


class Metrics:
    """Renders the gauges and ``registry``; one rendering serves every scrape within ``ttl`` s."""

    def __init__(
        self,
        engine: Engine,
        *,
        ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        registry: Registry = REGISTRY,
    ) -> None:
        self.engine = engine
        self.ttl = ttl
        self.clock = clock
        self.registry = registry
        self._cached: tuple[float, str] | None = None
        self._lock = asyncio.Lock()

    async def text(self) -> str:
        """The exposition text (fresh at most ``ttl`` seconds ago)."""
        async with self._lock:
            if self._cached is None or self.clock() - self._cached[0] >= self.ttl:
                self._cached = (self.clock(), await self._render())
            return self._cached[1]

    async def _render(self) -> str:
        engine = self.engine
        counts = await engine.store.count_sagas()
        lines: list[str] = []

        def gauge(name: str, help_text: str, samples: Sequence[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} gauge")
            for labels, value in samples:
                lines.append(f"{name}{labels} {format_value(float(value))}")

        gauge(
            "sagakit_sagas",
            "Saga instances by state.",
            [(f'{{state="{s.value}"}}', counts.get(s, 0)) for s in SagaState],
        )
        gauge(
            "sagakit_manual_cases",
            "Sagas waiting for a person (FAILED_NEEDS_MANUAL).",
            [("", sum(counts.get(s, 0) for s in MANUAL_STATES))],
        )
        oldest = await engine.store.oldest_update(MANUAL_STATES)
        gauge(
            "sagakit_manual_oldest_age_seconds",
            "Seconds the oldest open manual case has waited for a person (0 when none).",
            [("", 0.0 if oldest is None else max(engine.clock() - oldest, 0.0))],
        )
        pending, lag, dead, depth = [], [], [], []
        now = engine.clock()
        for store in engine.stores:
            label = f"{{{label_text(('store',), (store.name,))}}}"
            pending.append((label, await store.outbox_pending()))
            oldest = await store.outbox_oldest_pending()
            lag.append((label, 0.0 if oldest is None else max(now - oldest, 0.0)))
            dead.append((label, await store.dead_letter_count()))
            depth.append((label, await store.queue_depth()))
        gauge("sagakit_outbox_pending", "Outbox rows not yet published, per store.", pending)
        gauge(
            "sagakit_outbox_lag_seconds",
            "Age of the oldest unpublished outbox row, per store (0 when none waits).",
            lag,
        )
        gauge(
            "sagakit_dead_letters",
            "Dead letters nobody replayed or discarded yet, per store.",
            dead,
        )
        gauge("sagakit_mailbox_depth", "Messages waiting in a store's mailboxes.", depth)
        aside = await engine.store.set_aside_counts()
        gauge(
            "sagakit_inputs_set_aside",
            "Saga inputs waiting for a process that has their definition version (name@N).",
            [
                (f"{{{label_text(('waiting_for',), (f'{d}@{v}',))}}}", n)
                for (d, v), n in sorted(aside.items())
            ],
        )
        return "\n".join(lines) + "\n" + self.registry.exposition()


def endpoints(ctx: ApiContext) -> list[Endpoint]:
    """``/healthz``, ``/readyz`` and ``/metrics``."""
    engine = ctx.engine
    metrics = Metrics(engine)

    async def healthz(request: Request) -> Response:
        return json_reply({"status": "ok"})

    async def readyz(request: Request) -> Response:
        stores: dict[str, str] = {}
        ready = True
        for store in engine.stores:
            try:
                await asyncio.wait_for(store.outbox_pending(), READY_TIMEOUT)
                stores[store.name] = "ok"
            except Exception as exc:  # any failure means "not ready", with its reason
                ready = False
                stores[store.name] = f"{type(exc).__name__}: {exc}"
        try:
            await asyncio.wait_for(ctx.records.ensure(), READY_TIMEOUT)
        except Exception as exc:
            ready = False
            stores["api"] = f"{type(exc).__name__}: {exc}"
        if ready:
            return json_reply({"ready": True, "stores": stores})
        # Not ready is an error like any other (a problem document), with the stores'
        # answers as extension members so that a person sees which one failed and why.
        body = problem_document(
            503,
            "not_ready",
            "a store does not answer; see stores",
            request_path(request.scope),
            {"ready": False, "stores": stores},
        )
        return Response(problem_bytes(body), status_code=503, media_type=PROBLEM_JSON)

    async def metrics_text(request: Request) -> Response:
        return Response(await metrics.text(), media_type=CONTENT_TYPE)

    return [
        Endpoint(
            "GET",
            "/healthz",
            Role.VIEWER,
            healthz,
            "healthz",
            "The process is alive",
            "health",
            {200: Reply("Alive.", "Health")},
        ),
        Endpoint(
            "GET",
            "/readyz",
            Role.VIEWER,
            readyz,
            "readyz",
            "Every store answers",
            "health",
            {
                200: Reply("Ready: every store answered.", "Ready"),
                503: Reply(
                    "Not ready: a problem document with the stores that did not answer, and why.",
                    "NotReady",
                    PROBLEM_JSON,
                ),
            },
        ),
        Endpoint(
            "GET",
            "/metrics",
            Role.VIEWER,
            metrics_text,
            "metrics",
            "Prometheus metrics (text exposition format 0.0.4)",
            "health",
            {
                200: Reply(
                    "Gauges: sagas by state, manual cases, outbox pending and lag, dead "
                    "letters and mailbox depth per store. Counters: sagas started and "
                    "finished, inbox duplicates. Histogram: step durations.",
                    None,
                    "text/plain",
                )
            },
        ),
    ]
