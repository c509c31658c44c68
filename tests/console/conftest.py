"""Fixtures of the console tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: ``$SAGAKIT_SCREENSHOTS`` when set, else tmp_path."""
    out = Path(os.environ.get("SAGAKIT_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out
