"""The plugin as a user's project gets it: the ``pytest11`` entry point of the installed
package, no conftest of sagakit's. The kit's own tests are copied into an empty
directory and run there by a fresh pytest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_a_project_without_sagakits_conftest_runs_the_kits_tests(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(HERE / "test_saga_kit.py", project / "test_my_saga.py")
    (project / "pytest.ini").write_text("[pytest]\n")  # the project's own root: not ours
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout, done.stdout[-2000:]
