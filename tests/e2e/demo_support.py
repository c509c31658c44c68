"""What the end-to-end tests of ``sagakit demo`` share: the command line and a clean
environment (the servers' part is in ``tests/server_support.py``)."""

from __future__ import annotations

import os
import sys

from server_support import fresh_broker, fresh_database

__all__ = ["demo_cmd", "env", "fresh_broker", "fresh_database"]


def demo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sagakit.cli", "demo", *args]


def env() -> dict[str, str]:
    """The caller's environment without SAGAKIT_* settings that would change defaults."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    out["PYTHONUNBUFFERED"] = "1"
    return out
