#!/usr/bin/env python3
"""Set-up and run in one command, with nothing but Python 3.11+ installed.

    python3 dev.py demo [demo options]   install sagakit into .venv and run the checkout demo
    python3 dev.py test [pytest options] install sagakit with its dev tools, then ruff, mypy, pytest

The virtual environment is reused while pyproject.toml is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("SAGAKIT_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
EXTRAS = {"demo": "[schemas,api]", "test": "[dev,postgres,nats,rabbitmq]"}


def ensure_env(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py itself runs on any Python 3
        sys.exit(f"sagakit needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".sagakit-installed{extras or '[]'}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"installing sagakit{extras} into {VENV}", flush=True)
    quiet = ["--quiet", "--disable-pip-version-check"]
    subprocess.run([str(PY), "-m", "pip", "install", *quiet, "-e", f"{ROOT}{extras}"], check=True)
    stamp.write_text(digest)


def run(cmd: list[str]) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    what, rest = argv[0], argv[1:]
    ensure_env(EXTRAS[what])
    if what == "demo":
        return run([str(BIN / "sagakit"), "demo", *rest])
    for step in (
        [str(BIN / "ruff"), "check", "src", "examples", "tests", "dev.py"],
        [str(BIN / "mypy")],
    ):
        code = run(step)
        if code:
            return code
    return run([str(PY), "-m", "pytest", *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
