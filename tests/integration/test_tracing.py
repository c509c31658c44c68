"""One checkout is one trace: spans from the orchestrator and all four services."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sagakit_checkout.demo import make_orders
from sagakit_checkout.services import checkout_engine, migrate, open_checkout

from sagakit import SagaState, observability


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observability.use_tracer_provider(provider)
    yield exporter
    observability.use_tracer_provider(None)


async def test_a_checkout_is_one_trace_across_all_services(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    orders, stock = make_orders(3, seed=3)  # a success, two orders racing for a last item
    checkout = open_checkout(tmp_path)
    async with checkout_engine(checkout) as engine:
        await migrate(checkout, initial_stock=stock)
        started = await engine.start_many([("checkout", o.order_id, o.data) for o in orders])
        done = [await engine.wait(s.saga_id, timeout=30) for s in started]
    finished = spans.get_finished_spans()
    by_trace: dict[int, list[str]] = defaultdict(list)
    for span in finished:
        by_trace[span.context.trace_id].append(span.name)
    succeeded = next(i for i in done if i.state is SagaState.SUCCEEDED)
    trace = next(
        t
        for t, names in by_trace.items()
        if any(
            s.attributes and s.attributes.get("sagakit.saga_id") == succeeded.saga_id
            for s in finished
            if s.context.trace_id == t
        )
    )
    names = by_trace[trace]
    # Handler spans from every service and the orchestrator, under one trace id...
    for endpoint in ("orchestrator", "order", "payment", "inventory", "shipping"):
        assert any(n.startswith(f"{endpoint} handle ") for n in names), (endpoint, names)
    # ...plus a span per step and one for the saga, with real durations.
    assert {
        f"step {s}"
        for s in ("create_order", "authorize_payment", "capture_payment", "complete_order")
    } <= set(names)
    assert "saga checkout" in names
    saga_span = next(
        s for s in finished if s.name == "saga checkout" and s.context.trace_id == trace
    )
    assert saga_span.end_time is not None and saga_span.start_time is not None
    assert saga_span.end_time >= saga_span.start_time
    # Different orders are different traces.
    assert len({s.context.trace_id for s in finished if s.name == "saga checkout"}) == 3


def test_json_logs_carry_the_saga_fields() -> None:
    import io
    import json
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(observability.JsonFormatter())
    logger = logging.getLogger("sagakit.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning('step "pay" failed', extra={"saga_id": "s-1", "step": "pay", "attempt": 2})
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["message"] == 'step "pay" failed'
    assert (line["saga_id"], line["step"], line["attempt"], line["level"]) == (
        "s-1",
        "pay",
        2,
        "WARNING",
    )
    assert line["at"].endswith("Z")


def test_no_configured_provider_costs_nothing() -> None:
    # The API alone (no SDK provider set) records nothing, so no span is even built.
    assert observability._tracer() is None
    observability.use_tracer_provider(TracerProvider())
    try:
        assert observability._tracer() is not None
    finally:
        observability.use_tracer_provider(None)
