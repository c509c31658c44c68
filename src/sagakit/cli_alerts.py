"""Alert settings from the command line and the environment (the edge's part of
:mod:`sagakit.runtime.alerts`).

Every process of a deployment should get the same settings: workers write the alerts
of the sagas they move, relays post them. Either give the webhooks on the command line
or in the environment::

    SAGAKIT_ALERT_WEBHOOKS="https://hooks.example.com/sagakit alertmanager=http://am:9093/hook"

(an entry is a URL, or ``FORMAT=URL``), or put everything in a JSON file
(``--alerts-file``, ``SAGAKIT_ALERTS_FILE``), which can also hold headers such as a
bearer token and should then be readable by its owner only::

    {"webhooks": [{"url": "https://hooks.example.com/sagakit", "name": "ops",
                   "format": "sagakit", "headers": {"Authorization": "Bearer ..."},
                   "timeout": 5}],
     "console_url": "https://ops.example.com", "max_attempts": 10,
     "initial_backoff": 1, "max_backoff": 300}
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sagakit.errors import ConfigurationError
from sagakit.runtime.alerts import FORMATS, AlertSettings, Webhook

__all__ = ["alert_options", "alerts_from_args", "alerts_from_file", "parse_webhooks"]

_SETTINGS = ("console_url", "max_attempts", "initial_backoff", "max_backoff", "poll")
_HOOK_FIELDS = ("url", "format", "name", "headers", "timeout")


def alert_options(parser: argparse.ArgumentParser) -> None:
    """``--alert-webhook``, ``--alerts-file`` and ``--console-url``, with their variables."""
    parser.add_argument(
        "--alert-webhook",
        action="append",
        default=None,
        metavar="[FORMAT=]URL",
        help="post alerts (a saga needs a person or timed out, a dead letter was parked) "
        f"to URL; FORMAT is one of {', '.join(FORMATS)} (default sagakit); repeat for "
        "several (env SAGAKIT_ALERT_WEBHOOKS, separated by spaces)",
    )
    parser.add_argument(
        "--alerts-file",
        default=os.environ.get("SAGAKIT_ALERTS_FILE"),
        metavar="FILE",
        help="alert settings as JSON: webhooks with headers, retries (env SAGAKIT_ALERTS_FILE)",
    )
    parser.add_argument(
        "--console-url",
        default=os.environ.get("SAGAKIT_CONSOLE_URL"),
        metavar="URL",
        help="the API's base URL, for the console links in alerts (env SAGAKIT_CONSOLE_URL)",
    )


def alerts_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> AlertSettings | None:
    """The settings the options (or their variables) give; None when no webhook is set.

    A file and webhooks on the command line together are refused: one place only.
    """
    env = os.environ if environ is None else environ
    hooks = args.alert_webhook
    if hooks is None and env.get("SAGAKIT_ALERT_WEBHOOKS"):
        hooks = env["SAGAKIT_ALERT_WEBHOOKS"].split()
    if args.alerts_file and hooks:
        raise ConfigurationError(
            "alerts are configured twice: give --alerts-file (SAGAKIT_ALERTS_FILE) or "
            "--alert-webhook (SAGAKIT_ALERT_WEBHOOKS), not both"
        )
    if args.alerts_file:
        return alerts_from_file(args.alerts_file, console_url=args.console_url)
    if not hooks:
        return None
    return AlertSettings(parse_webhooks(hooks), console_url=args.console_url)


def parse_webhooks(entries: list[str]) -> list[Webhook]:
    """``URL`` or ``FORMAT=URL`` entries as webhooks."""
    hooks = []
    for entry in entries:
        fmt, sep, url = entry.partition("=")
        if sep and fmt in FORMATS:
            hooks.append(Webhook(url, format=fmt))
        else:
            hooks.append(Webhook(entry))
    return hooks


def alerts_from_file(path: str | Path, *, console_url: str | None = None) -> AlertSettings:
    """The settings of a JSON file (see the module doc); ``console_url`` if it has none."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigurationError(f"cannot read the alerts file {path}: {exc}") from exc
    except ValueError as exc:
        raise ConfigurationError(f"the alerts file {path} is not JSON: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("webhooks"), list):
        raise ConfigurationError(f'the alerts file {path} needs a list of "webhooks"')
    unknown = set(raw) - {"webhooks", *_SETTINGS}
    if unknown:
        raise ConfigurationError(
            f"the alerts file {path} has unknown keys {sorted(unknown)}; "
            f"known: webhooks, {', '.join(_SETTINGS)}"
        )
    hooks = [_webhook(path, i, h) for i, h in enumerate(raw["webhooks"])]
    settings: dict[str, Any] = {k: raw[k] for k in _SETTINGS if k in raw}
    if console_url and "console_url" not in settings:
        settings["console_url"] = console_url
    try:
        return AlertSettings(hooks, **settings)
    except TypeError as exc:
        raise ConfigurationError(f"the alerts file {path}: {exc}") from exc


def _webhook(path: str | Path, index: int, raw: Any) -> Webhook:
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
        raise ConfigurationError(f'the alerts file {path}: webhook {index} needs a "url"')
    unknown = set(raw) - set(_HOOK_FIELDS)
    if unknown:
        raise ConfigurationError(
            f"the alerts file {path}: webhook {index} has unknown keys {sorted(unknown)}; "
            f"known: {', '.join(_HOOK_FIELDS)}"
        )
    if not isinstance(raw.get("headers", {}), dict):
        raise ConfigurationError(f"the alerts file {path}: webhook {index} headers: an object")
    try:
        return Webhook(**raw)
    except TypeError as exc:
        raise ConfigurationError(f"the alerts file {path}: webhook {index}: {exc}") from exc
