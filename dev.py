#!/usr/bin/env python3
"""Set-up and run in one command, with nothing but Python 3.11+ installed.

    python3 dev.py demo [demo options]   install sagakit into .venv and run the checkout demo
    python3 dev.py test [pytest options] install sagakit with its dev tools, then ruff, mypy,
                                         pytest; the fault scenarios the run injected
                                         (tests/faults.toml) become build/reliability/*.md
    python3 dev.py reliability [--from JSON] [--out PAGE] [pytest options]
                                         run the tests marked `fault` (not the slow ones) and
                                         render docs/reliability.md from tests/faults.toml and
                                         the run; --from renders a report an earlier run wrote

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
EXTRAS = {
    "demo": "[schemas,api]",
    "test": "[dev,postgres,nats,rabbitmq]",
    "reliability": "[dev,postgres,nats,rabbitmq]",
}


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


def run(cmd: list[str], env: dict[str, str] | None = None) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def reliability(argv: list[str]) -> int:
    """Run the fault-injecting tests with SAGAKIT_FAULT_REPORT set (unless --from names
    a report already written), then render the page; exit non-zero if a test failed."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="dev.py reliability")
    parser.add_argument("--from", dest="report", type=Path, help="render this report only")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    args, pytest_args = parser.parse_known_args(argv)
    code = 0
    with tempfile.TemporaryDirectory(prefix="sagakit-faults-") as tmp:
        report = args.report
        if report is None:
            report = Path(tmp) / "faults.json"
            env = {**os.environ, "SAGAKIT_FAULT_REPORT": str(report)}
            cmd = [str(PY), "-m", "pytest", "-p", "no:cacheprovider", "-m", "fault and not slow"]
            code = run([*cmd, "-q", *pytest_args], env=env)
            if not report.exists():
                print(f"no fault report was written (pytest exited {code})", file=sys.stderr)
                return code or 1
        render = [str(PY), str(ROOT / "tests" / "fault_report.py"), "render", str(report)]
        return run([*render, "--out", str(args.out)]) or code


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    what, rest = argv[0], argv[1:]
    ensure_env(EXTRAS[what])
    if what == "demo":
        return run([str(BIN / "sagakit"), "demo", *rest])
    if what == "reliability":
        return reliability(rest)
    for step in (
        [str(BIN / "ruff"), "check", "src", "examples", "tests", "dev.py"],
        [str(BIN / "mypy")],
    ):
        code = run(step)
        if code:
            return code
    # Every test run records the fault scenarios it injected, and renders the reliability
    # page of this very run next to the build (the committed docs/reliability.md is made
    # with `dev.py reliability`): what CI ran is in its log.
    out = ROOT / "build" / "reliability"
    out.mkdir(parents=True, exist_ok=True)
    report = Path(os.environ.get("SAGAKIT_FAULT_REPORT") or out / "faults.json")
    report.unlink(missing_ok=True)
    code = run(
        [str(PY), "-m", "pytest", *rest], env={**os.environ, "SAGAKIT_FAULT_REPORT": str(report)}
    )
    if not report.exists():
        print(f"no fault report was written (pytest exited {code})", file=sys.stderr)
        return code or 1
    page = out / "reliability.md"
    render = [str(PY), str(ROOT / "tests" / "fault_report.py"), "render", str(report)]
    command = " ".join(["python3 dev.py test", *rest])
    return run([*render, "--out", str(page), "--command", command]) or code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
