"""The shipped Prometheus alerting rules name only metrics sagakit serves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sagakit import SagaDefinition, Step
from sagakit.runtime.engine import Engine
from sagakit.stores.memory import MemoryStore

pytest.importorskip("starlette")

RULES = Path(__file__).parents[2] / "deploy" / "prometheus" / "sagakit-alerts.yml"
METRIC = re.compile(r"\bsagakit_[a-z_]+\b")


async def served_metrics() -> set[str]:
    """The metric names of ``GET /metrics`` on an engine of one store."""
    from sagakit.api.health import Metrics

    definition = SagaDefinition("noop", steps=[Step("a", lambda ctx: {})])
    async with Engine(MemoryStore(), [definition]) as engine:
        text = await Metrics(engine).text()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


async def test_every_rule_names_metrics_sagakit_serves() -> None:
    doc = yaml.safe_load(RULES.read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert {r["alert"] for r in rules} == {
        "SagakitManualCasesOpen",
        "SagakitManualCaseWaitingLong",
        "SagakitDeadLetters",
        "SagakitRelayLagging",
    }
    served = await served_metrics()
    for rule in rules:
        names = set(METRIC.findall(rule["expr"]))
        assert names, f"{rule['alert']} names no sagakit metric"
        assert names <= served, f"{rule['alert']}: {sorted(names - served)} are not served"
        assert rule["labels"]["severity"] in {"page", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    opened = next(r for r in rules if r["alert"] == "SagakitManualCasesOpen")
    assert opened["for"] == "5m"
    assert "sagakit_manual_oldest_age_seconds" in served
    assert {"sagakit_alerts_raised_total", "sagakit_alert_deliveries_total"} <= served
