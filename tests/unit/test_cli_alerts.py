"""Alert settings from flags, variables and a JSON file (sagakit.cli_alerts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from sagakit.cli_alerts import alert_options, alerts_from_args
from sagakit.errors import ConfigurationError


def parse(argv: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    alert_options(parser)
    args = parser.parse_args(argv)
    args.alerts_file = args.alerts_file or (env or {}).get("SAGAKIT_ALERTS_FILE")
    return args


def test_no_webhook_means_no_alerts() -> None:
    assert alerts_from_args(parse([]), {}) is None


def test_webhooks_from_flags_with_formats() -> None:
    args = parse(
        [
            "--alert-webhook",
            "https://hooks.example.com/a",
            "--alert-webhook",
            "alertmanager=http://am:9093/hook?x=1",
            "--console-url",
            "https://ops.example.com/",
        ]
    )
    settings = alerts_from_args(args, {})
    assert settings is not None
    assert [(w.url, w.format) for w in settings.webhooks] == [
        ("https://hooks.example.com/a", "sagakit"),
        ("http://am:9093/hook?x=1", "alertmanager"),
    ]
    assert settings.console_url == "https://ops.example.com"


def test_webhooks_from_the_environment() -> None:
    env = {"SAGAKIT_ALERT_WEBHOOKS": "https://a.example/x  alertmanager=https://b.example/y"}
    settings = alerts_from_args(parse([]), env)
    assert settings is not None
    assert [w.format for w in settings.webhooks] == ["sagakit", "alertmanager"]


def test_a_settings_file_with_headers(tmp_path: Path) -> None:
    path = tmp_path / "alerts.json"
    path.write_text(
        json.dumps(
            {
                "webhooks": [
                    {
                        "url": "https://hooks.example.com/a",
                        "name": "ops",
                        "headers": {"Authorization": "Bearer t"},
                        "timeout": 3,
                    }
                ],
                "max_attempts": 4,
            }
        )
    )
    settings = alerts_from_args(parse(["--alerts-file", str(path)]), {})
    assert settings is not None
    (hook,) = settings.webhooks
    assert (hook.name, hook.timeout, dict(hook.headers)) == (
        "ops",
        3,
        {"Authorization": "Bearer t"},
    )
    assert settings.max_attempts == 4


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        ('{"hooks": []}', 'needs a list of "webhooks"'),
        ('{"webhooks": [{"url": "https://a/x", "secret": 1}]}', "unknown keys \\['secret'\\]"),
        ('{"webhooks": [{"url": "https://a/x"}], "retries": 3}', "unknown keys \\['retries'\\]"),
        ('{"webhooks": [{"name": "x"}]}', 'needs a "url"'),
        ('{"webhooks": [{"url": "https://a/x", "timeout": "5"}]}', "webhook 0"),
    ],
)
def test_a_bad_settings_file_is_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "alerts.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=message):
        alerts_from_args(parse(["--alerts-file", str(path)]), {})


def test_a_file_and_flags_together_are_refused(tmp_path: Path) -> None:
    args = parse(["--alerts-file", str(tmp_path / "a.json"), "--alert-webhook", "https://a/x"])
    with pytest.raises(ConfigurationError, match="configured twice"):
        alerts_from_args(args, {})


def test_every_engine_of_a_deployment_gets_the_settings(tmp_path: Path) -> None:
    """Workers write alerts, relays post them, the API's engine writes only; serve's
    embedded engine (every role) does both."""
    from sagakit.api.serve_setup import ServeRequest, deploy
    from sagakit.app import load_app
    from sagakit.deployment import Deployment

    app = load_app("sagakit_checkout:app")
    settings = alerts_from_args(parse(["--alert-webhook", "https://hooks.example.com/a"]), {})
    assert settings is not None
    dep = Deployment(app, f"sqlite:///{tmp_path / 'dep'}", "nats://127.0.0.1:4222", alerts=settings)
    worker, relay = dep.worker(), dep.relay()
    assert worker.orchestrator.alerts is not None and worker.notifier is None
    assert relay.notifier is not None
    assert {s.name for s in relay.notifier.stores} == set(app.store_names)
    _, served, _ = deploy(app, ServeRequest(tmp_path / "serve", alerts=settings))
    assert served.alerts is settings and served.notifier is not None
    _, api, _ = deploy(
        app,
        ServeRequest(
            tmp_path / "api",
            store_url=f"sqlite:///{tmp_path / 'dep'}",
            api_only=True,
            alerts=settings,
        ),
    )
    assert api.orchestrator.alerts is not None and api.notifier is None
