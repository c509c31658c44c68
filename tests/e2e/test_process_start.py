"""Production processes started before their servers wait for them (``--wait-for-servers``)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from _cluster import NatsServer, free_port, process_env


@contextmanager
def worker(
    store: str, *args: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """``sagakit worker --store STORE ARGS...``, killed on the way out if still running."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sagakit.cli_processes",
            "worker",
            "--app",
            "sagakit_checkout:app",
            "--store",
            store,
            *args,
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**process_env(), **(env or {})},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def sqlite_dir(tmp_path: Path) -> str:
    (tmp_path / "data").mkdir(exist_ok=True)
    return f"sqlite:///{tmp_path / 'data'}"


def nowhere(scheme: str = "nats") -> str:
    return f"{scheme}://127.0.0.1:{free_port()}"


def read_until(proc: subprocess.Popen[str], text: str, timeout: float) -> list[str]:
    """stderr lines up to and including the first one containing ``text``."""
    assert proc.stderr is not None
    lines: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} within {timeout}s; stderr so far: {lines}")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(resp.read().decode())


def fails_at_once(proc: subprocess.Popen[str], reason: str) -> None:
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert reason in err and "waiting for servers" not in err, err


@pytest.mark.nats
@pytest.mark.timeout(120)
def test_a_worker_started_before_its_broker_waits_then_runs(tmp_path: Path) -> None:
    if not NatsServer.available():
        pytest.skip("needs the nats-server binary")
    server = NatsServer(tmp_path)
    port = free_port()
    metrics = ("--metrics-port", str(port))
    try:
        with worker(sqlite_dir(tmp_path), "--broker", server.url, *metrics) as proc:
            waiting = read_until(proc, "waiting for servers", 30)
            assert any("cannot connect to NATS" in line for line in waiting), waiting
            assert proc.poll() is None  # still there, not exited
            assert "sagakit_sagas_started_total" in scrape(port)  # observable while waiting
            server.start()
            read_until(proc, "sagakit worker ready", 60)
            text = scrape(port)
            assert "# TYPE sagakit_step_duration_seconds histogram" in text
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    finally:
        server.kill()


@pytest.mark.timeout(120)
def test_a_worker_waits_for_postgresql_and_sigterm_meanwhile_exits_cleanly() -> None:
    pytest.importorskip("psycopg", reason="needs the sagakit[postgres] extra")
    no_pg = f"{nowhere('postgresql')}/test".replace("://", "://postgres@")
    with worker(no_pg, env={"SAGAKIT_BROKER_URL": nowhere()}) as proc:  # default wait: 60 s
        lines = read_until(proc, "waiting for servers", 30)
        assert "PostgreSQL store 'orchestrator' could not connect" in lines[-1], lines
        read_until(proc, "waiting for servers", 30)  # and tries again
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_without_waiting_an_unreachable_broker_fails_at_once(tmp_path: Path) -> None:
    with worker(sqlite_dir(tmp_path), "--broker", nowhere(), "--wait-for-servers", "0") as proc:
        fails_at_once(proc, "cannot connect to NATS")


def test_a_store_that_cannot_be_opened_fails_at_once_even_when_waiting(tmp_path: Path) -> None:
    """Not a server that is still starting: waiting would only delay the error."""
    missing = f"sqlite:///{tmp_path / 'missing' / 'dir'}"
    with worker(missing, "--broker", nowhere(), "--wait-for-servers", "60") as proc:
        fails_at_once(proc, "could not open")
