"""Every code block of ``docs/own-transaction.md`` runs as printed.

Python blocks run each on its own, as a script, in a fresh directory; a block that
needs PostgreSQL (it names ``postgresql://``) is marked ``postgres`` and gets the test
server's DSN as ``DATABASE_URL``. The guide has no other kind of block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "own-transaction.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def blocks() -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in FENCE.finditer(GUIDE.read_text())]


def block_params() -> list[object]:
    params: list[object] = []
    for index, (_, code) in enumerate(blocks()):
        marks = [pytest.mark.postgres] if "postgresql://" in code else []
        params.append(pytest.param(index, marks=marks, id=f"block-{index}"))
    return params


def test_the_guide_has_only_runnable_blocks() -> None:
    kinds = [kind for kind, _ in blocks()]
    assert len(kinds) >= 6
    assert set(kinds) == {"python"}, kinds


@pytest.mark.parametrize("index", block_params())
def test_every_block_of_the_guide_runs(index: int, tmp_path: Path) -> None:
    _, code = blocks()[index]
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    env["DATABASE_URL"] = PG_DSN
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"block {index}:\n{code}\n{out.stdout}\n{out.stderr}"
    assert out.stdout.strip(), f"block {index} printed nothing"
