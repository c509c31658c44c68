"""The README's first example runs as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_first_python_example_runs(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(code.group(1))
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SUCCEEDED"
    assert len(code.group(1).strip().splitlines()) <= 20


def test_readme_commands_are_the_ci_commands() -> None:
    text = (ROOT / "README.md").read_text()
    first_screen = text[: text.index("## ")]
    assert "python3 dev.py demo" in first_screen
    assert "python3 dev.py test" in first_screen
    assert "python3 dev.py test" in (ROOT / ".ci" / "run").read_text()
