"""One process per embedded database or data directory, enforced by a lock file.

``embedded("x.db")`` holds ``x.db.lock`` while open; ``sagakit serve`` and ``sagakit
demo`` hold ``<data-dir>/.lock``. A second process is refused with an error that names
the first one's pid. The holders here are real second processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sagakit import ConfigurationError, SagaDefinition, SagaState, Step, embedded
from sagakit.runtime.lockfile import LockFile, holder

HOLD_ENGINE = """
import asyncio, sys
from sagakit import embedded

async def main():
    async with embedded(sys.argv[1], []):
        print("ready", flush=True)
        sys.stdin.readline()

asyncio.run(main())
"""

HOLD_DATA_DIR = """
import sys
from sagakit.runtime.lockfile import data_dir_lock

with data_dir_lock(sys.argv[1]):
    print("ready", flush=True)
    sys.stdin.readline()
"""


@contextlib.contextmanager
def second_process(code: str, arg: Path) -> Iterator[subprocess.Popen[str]]:
    """A Python process running ``code`` with ``arg``; it holds its lock until we let go."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(arg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            raise AssertionError(f"the holder did not start: {proc.communicate()[1]}")
        yield proc
    finally:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def trip() -> SagaDefinition:
    return SagaDefinition("trip", steps=[Step("book", lambda ctx: {"ok": True})])


async def test_a_second_process_on_one_database_is_refused_naming_the_first(
    tmp_path: Path,
) -> None:
    db = tmp_path / "x.db"
    with second_process(HOLD_ENGINE, db) as first:
        assert holder(f"{db}.lock") == first.pid
        engine = embedded(db, [trip()])
        expected = (
            f"the database {re.escape(str(db))} is in use by another sagakit process "
            rf"\(pid {first.pid}\); stop it or use another file"
        )
        with pytest.raises(ConfigurationError, match=expected):
            await engine.open()
    # Released when the first one closed its engine: this one runs now.
    async with embedded(db, [trip()]) as engine:
        assert holder(f"{db}.lock") == os.getpid()
        inst = await engine.start("trip", "t-1")
        assert (await engine.wait(inst.saga_id, timeout=10)).state is SagaState.SUCCEEDED
    assert holder(f"{db}.lock") is None  # no stale pid once released


@pytest.mark.fault("F-KILL9")
async def test_a_killed_holder_leaves_no_lock_behind(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    with second_process(HOLD_ENGINE, db) as first:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=20)
    async with embedded(db, [trip()]):
        assert holder(f"{db}.lock") == os.getpid()


async def test_one_process_cannot_open_one_database_twice(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    async with embedded(db, [trip()]):
        with pytest.raises(ConfigurationError, match=rf"pid {os.getpid()}"):
            await embedded(db, [trip()]).open()
    async with embedded(db, [trip()]):  # released at close
        pass


def test_a_lock_file_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot create the lock file"):
        LockFile(tmp_path / "missing" / "x.lock").acquire()


async def test_serve_names_the_process_holding_its_data_directory(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn", reason="needs the sagakit[api] extra")
    from sagakit.api.serve import serve

    with (
        second_process(HOLD_DATA_DIR, tmp_path) as first,
        pytest.raises(ConfigurationError, match=r"\(pid \d+\)") as refused,
    ):
        await serve("127.0.0.1", 0, tmp_path)
    assert f"(pid {first.pid})" in str(refused.value)


def test_demo_names_the_process_holding_its_data_directory(tmp_path: Path) -> None:
    with second_process(HOLD_DATA_DIR, tmp_path) as first:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sagakit.cli",
                "demo",
                "--orders",
                "1",
                "--data-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode != 0
    assert f"is in use by another sagakit process (pid {first.pid})" in done.stderr
