"""Tracing with OpenTelemetry: one trace per business flow, across every service.

Every envelope carries a W3C ``traceparent`` whose trace id is derived from the flow's
correlation id, so the spans of all services that touch one checkout share one trace:

* a ``handle`` span around each message a consumer handles (orchestrator, local steps,
  participants), child of the message's ``traceparent``;
* a ``step`` span for each step of a saga and a ``saga`` span for the whole saga,
  written when they end, with their real start time (they outlive any one process, so
  they are recorded from the instance's own timestamps, not kept open).

The OpenTelemetry API is optional (``sagakit[otel]``): without it every call here is a
no-op. The library never configures a provider or exporter; the application does
(``opentelemetry.trace.set_tracer_provider``), or a test passes its own with
:func:`use_tracer_provider`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from sagakit.core.envelope import Envelope, traceparent_for
from sagakit.core.instance import HistoryEntry, SagaInstance

try:  # optional dependency
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover - exercised only without the extra
    _trace = None  # type: ignore[assignment]

_provider: Any = None
_propagator: Any = None if _trace is None else TraceContextTextMapPropagator()

_STEP_ENDS = {
    "step.succeeded": "succeeded",
    "step.failed": "failed",
    "step.skipped": "skipped",
    "compensation.succeeded": "compensated",
}


def use_tracer_provider(provider: Any) -> None:
    """Send sagakit's spans to ``provider`` instead of the global one (tests, embedding)."""
    global _provider, _none_until
    _provider = provider
    _none_until = 0.0


# While no provider is configured, _tracer() answers None without asking the API again
# until this monotonic time: the API's answer reads os.environ on every call, ~2% of
# the engine's CPU. A provider set later is picked up within _RECHECK seconds.
_none_until = 0.0
_RECHECK = 1.0


def _tracer() -> Any:
    global _none_until
    if _trace is None:
        return None
    if _provider is None and time.monotonic() < _none_until:
        return None
    provider = _provider or _trace.get_tracer_provider()
    # With the API installed but no provider configured, every span would be a no-op:
    # skip building contexts and attributes on the hot path (it cost ~10% per message).
    if isinstance(provider, _trace.ProxyTracerProvider | _trace.NoOpTracerProvider):
        _none_until = time.monotonic() + _RECHECK
        return None
    return provider.get_tracer("sagakit")


def _parent(traceparent: str | None) -> Any:
    if traceparent is None or _propagator is None:
        return None
    return _propagator.extract({"traceparent": traceparent})


@contextlib.contextmanager
def handler_span(endpoint: str, env: Envelope) -> Iterator[None]:
    """A span around handling ``env`` at ``endpoint``, child of the message's trace."""
    tracer = _tracer()
    if tracer is None:
        yield
        return
    attributes = {
        "messaging.destination.name": endpoint,
        "messaging.message.id": env.message_id,
        "sagakit.message.type": env.type,
        "sagakit.message.kind": env.kind.value,
        "sagakit.correlation_id": env.correlation_id,
        "sagakit.attempt": env.attempt,
    }
    for name, value in (
        ("sagakit.saga_id", env.saga_id),
        ("sagakit.step", env.step),
        ("sagakit.causation_id", env.causation_id),
    ):
        if value is not None:
            attributes[name] = value
    with tracer.start_as_current_span(
        f"{endpoint} handle {env.type}",
        context=_parent(env.traceparent),
        kind=_trace.SpanKind.CONSUMER,
        attributes=attributes,
    ):
        yield


def record_transition(
    instance: SagaInstance, step_names: Sequence[str], history: Sequence[HistoryEntry]
) -> None:
    """Write the ``step`` and ``saga`` spans that ``history`` ends."""
    tracer = _tracer()
    if tracer is None:
        return
    context = _parent(traceparent_for(instance.correlation_id, instance.saga_id))
    for entry in history:
        outcome = _STEP_ENDS.get(entry.event)
        if outcome is not None and entry.step is not None and entry.step in step_names:
            state = instance.steps[step_names.index(entry.step)]
            start = state.started_at if state.started_at is not None else entry.at
            _span(
                tracer,
                f"step {entry.step}",
                context,
                start,
                entry.at,
                {
                    "sagakit.saga_id": instance.saga_id,
                    "sagakit.step": entry.step,
                    "sagakit.step.outcome": outcome,
                    "sagakit.step.attempts": state.attempt,
                },
            )
        elif entry.event == "saga.finished":
            _span(
                tracer,
                f"saga {instance.definition}",
                context,
                instance.created_at,
                entry.at,
                {
                    "sagakit.saga_id": instance.saga_id,
                    "sagakit.business_key": instance.business_key,
                    "sagakit.state": instance.state.value,
                },
            )


def _span(
    tracer: Any, name: str, context: Any, start: float, end: float, attrs: dict[str, Any]
) -> None:
    span = tracer.start_span(name, context=context, start_time=int(start * 1e9), attributes=attrs)
    span.end(end_time=int(max(end, start) * 1e9))


# -- structured logs ------------------------------------------------------------------

_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the record's ``extra`` fields (saga_id, step, ...).

    The library logs with ``extra={"saga_id": ..., "step": ...}``; this formatter, which
    the CLI installs (the library installs no handlers), turns them into fields.
    """

    converter = time.gmtime  # type: ignore[assignment]  # typeshed: gmtime takes an optional float

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "at": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))
