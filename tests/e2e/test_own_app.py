"""An app written outside the repository runs through sagakit's commands (issue #12).

Each test writes a small travel-booking app into a temp directory, as a team would in
its own project: a local step ``flight`` (with a local compensation), a ``hotel``
participant with its own table (created by the service's migrations) booking and
cancelling rooms with ``tx.execute``, a pivot local step ``charge`` and a retriable
local step ``email`` after it. Business keys ending in ``-nohotel`` fail at the hotel,
``-nocharge`` at the charge: those sagas end COMPENSATED, the others SUCCEEDED. The app
is importable only through the ``PYTHONPATH`` given to the subprocesses, and has a new
name per run.

1. ``sagakit serve --app pkg.app:app --data-dir D``: every role in one process, on
   SQLite files in ``D``; sagas started with ``POST /sagas``.
2. PostgreSQL + NATS: ``sagakit worker``, ``relay``, ``service hotel`` and
   ``serve --api-only`` as separate processes, on a ``?prefix=`` of their own on the
   shared PostgreSQL and a ``?stream=`` of their own on the shared NATS (both removed
   afterwards).
3. A wrong ``--app`` or service name: one line on stderr, exit status 2.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from _cluster import process_env

PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("SAGAKIT_TEST_NATS_URL", "nats://127.0.0.1:4222")

APP_SOURCE = '''\
"""A travel booking: flight (local), hotel (a service of its own), charge, e-mail."""

from __future__ import annotations

from typing import Any

from sagakit import App, RetryPolicy, SagaDefinition, Step, StepContext, StepFailed
from sagakit import command, local
from sagakit.core.definition import SagaView

NAME = "{name}"
QUICK = RetryPolicy(max_attempts=2, initial_backoff=0.05, max_backoff=0.2)
PATIENT = RetryPolicy(max_attempts=10, initial_backoff=0.05, max_backoff=0.2)


def book_flight(ctx: StepContext) -> dict[str, Any]:
    return {{"flight": "fl-" + ctx.business_key}}


def cancel_flight(ctx: StepContext) -> dict[str, Any]:
    return {{"cancelled": "fl-" + ctx.business_key}}


async def charge(ctx: StepContext) -> dict[str, Any]:
    if ctx.business_key.endswith("-nocharge"):
        raise StepFailed("card declined")
    return {{"charged": ctx.data["price"]}}


async def email(ctx: StepContext) -> dict[str, Any]:
    if ctx.attempt < 2:  # the mail server is busy the first time: retried
        raise StepFailed("mail server busy", retryable=True)
    return {{"sent_on_attempt": ctx.attempt}}


def room(v: SagaView) -> dict[str, Any]:
    return {{"trip_id": v.business_key, "city": v.data["city"], "nights": v.data["nights"]}}


def trip_ref(v: SagaView) -> dict[str, Any]:
    return {{"trip_id": v.business_key}}


trip = SagaDefinition(
    "trip",
    [
        Step("flight", local(book_flight), local(cancel_flight), retry=QUICK, timeout=10),
        Step(
            "hotel",
            command("hotel", "BookHotel", room),
            command("hotel", "CancelHotel", trip_ref),
            retry=QUICK,
            timeout=10,
        ),
        Step("charge", local(charge), kind="pivot", retry=QUICK, timeout=10),
        Step("email", local(email), kind="retriable", retry=PATIENT, timeout=10),
    ],
)

app = App(NAME, [trip])
hotel = app.service(
    "hotel",
    migrations=[
        "CREATE TABLE bookings (trip_id TEXT PRIMARY KEY, city TEXT NOT NULL, "
        "nights INTEGER NOT NULL)"
    ],
)


@hotel.handles("BookHotel")
async def book_hotel(tx: Any, env: Any) -> dict[str, Any]:
    p = env.payload
    if p["trip_id"].endswith("-nohotel"):
        raise StepFailed("no room left")
    await tx.execute(
        "INSERT INTO bookings (trip_id, city, nights) VALUES (?, ?, ?)",
        (p["trip_id"], p["city"], p["nights"]),
    )
    return {{"booked": p["trip_id"]}}


@hotel.handles("CancelHotel")
async def cancel_hotel(tx: Any, env: Any) -> dict[str, Any]:
    gone = await tx.execute("DELETE FROM bookings WHERE trip_id = ?", (env.payload["trip_id"],))
    return {{"cancelled": gone}}
'''

TRIPS = {
    "trip-1": "SUCCEEDED",
    "trip-2-nohotel": "COMPENSATED",
    "trip-3-nocharge": "COMPENSATED",
    "trip-4": "SUCCEEDED",
}
KEPT_HOTEL = {"trip-1", "trip-4"}
DATA = {"city": "lis", "nights": 2, "price": 300}


@dataclass(frozen=True)
class OwnApp:
    """The app package written for one test: where it is and how to name it."""

    root: Path
    package: str

    @property
    def spec(self) -> str:
        """Its ``--app``."""
        return f"{self.package}.app:app"

    def env(self) -> dict[str, str]:
        """The subprocesses' environment: the app's directory on PYTHONPATH."""
        env = process_env()
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.root), os.environ.get("PYTHONPATH")) if p
        )
        return env


@pytest.fixture
def own_app(tmp_path: Path) -> OwnApp:
    """The travel app in ``tmp_path/src/travel_<hex>/`` (named like its package)."""
    package = f"travel_{uuid.uuid4().hex[:10]}"
    root = tmp_path / "src"
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (root / package / "app.py").write_text(APP_SOURCE.format(name=package))
    (root / package / "broken.py").write_text('raise RuntimeError("the config file is missing")\n')
    return OwnApp(root, package)


def sagakit(*args: str) -> list[str]:
    """The ``sagakit`` command line (the installed script, as users run it)."""
    script = Path(sys.executable).parent / "sagakit"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "sagakit.cli", *args]


class Processes:
    """Named subprocesses with their output in files; stopped with SIGTERM at the end."""

    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.base = base
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (
            (self.base / f"{name}.out").open("wb") as out,
            (self.base / f"{name}.err").open("wb") as err,
        ):
            proc = subprocess.Popen(
                argv, stdout=out, stderr=err, env=self.env, stdin=subprocess.DEVNULL
            )
        self.procs[name] = proc
        return proc

    def output(self, name: str, stream: str = "err") -> str:
        return (self.base / f"{name}.{stream}").read_text(errors="replace")

    def banner(self, name: str, timeout: float = 60) -> dict[str, Any]:
        """The JSON line ``sagakit serve --json`` prints once it serves."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.output(name, "out")
            if text.endswith("\n"):
                info: dict[str, Any] = json.loads(text.splitlines()[0])
                return info
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited: {self.output(name)[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{name} did not serve within {timeout}s: {self.output(name)[-3000:]}")

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited: {self.output(name)[-3000:]}"

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every process, then wait; exit codes (None: it had to be killed)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes[name] = None
        return codes


@contextlib.contextmanager
def processes(base: Path, app: OwnApp) -> Iterator[Processes]:
    procs = Processes(base, app.env())
    try:
        yield procs
    finally:
        codes = procs.stop()
    stopped = {name: code for name, code in codes.items() if code != 0}
    assert not stopped, {name: procs.output(name)[-2000:] for name in stopped}


def run_trips(url: str, token: str, procs: Processes) -> dict[str, dict[str, Any]]:
    """Start every trip with ``POST /sagas``, wait until each is final; their details."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        ids: dict[str, str] = {}
        for key in TRIPS:
            body = {"definition": "trip", "business_key": key, "data": DATA}
            r = client.post("/sagas", json=body)
            assert r.status_code == 201, r.text
            assert r.json()["business_key"] == key and r.json()["definition"] == "trip"
            ids[key] = r.json()["saga_id"]
        again = client.post("/sagas", json={"definition": "trip", "business_key": "trip-1"})
        assert again.status_code == 200 and again.json()["saga_id"] == ids["trip-1"]
        refused = client.post("/sagas", json={"definition": "cruise", "business_key": "c-1"})
        assert refused.status_code == 422 and "served: trip" in refused.text

        details: dict[str, dict[str, Any]] = {}
        end = time.monotonic() + 60
        while len(details) < len(ids) and time.monotonic() < end:
            for key, saga_id in ids.items():
                if key not in details:
                    d = client.get(f"/sagas/{saga_id}").json()
                    if d["terminal"]:
                        details[key] = d
            procs.check_alive()
            time.sleep(0.1)
        assert len(details) == len(ids), f"not final after 60s: {set(ids) - set(details)}"
        audit = client.get("/audit", params={"limit": 100}).json()["items"]
        outcomes = sorted(r["outcome"] for r in audit if r["action"] == "start_saga")
        assert outcomes == ["created"] * len(TRIPS) + ["existing"]
    for key, d in details.items():
        assert d["state"] == TRIPS[key], (key, d["state"], d["reason"])
        steps = {s["name"]: s for s in d["steps"]}
        # The first command, a local step, ran at once wherever the saga was started
        # (a second attempt means it waited for its timeout).
        assert steps["flight"]["attempt"] == 1, d["history"]
        events = [(h["event"], h["step"]) for h in d["history"]]
        if TRIPS[key] == "SUCCEEDED":
            assert steps["email"]["attempt"] == 2  # the retriable step was retried
            assert steps["charge"]["result"] == {"charged": 300}
        else:
            assert ("compensation.succeeded", "flight") in events  # the local compensation
            kept = ("compensation.succeeded", "hotel") in events
            assert kept is key.endswith("-nocharge")  # a hotel booked is a hotel cancelled
            assert "email" not in {step for _, step in events}
    return details


@pytest.mark.timeout(120)
def test_serve_runs_an_app_of_its_own_on_sqlite(tmp_path: Path, own_app: OwnApp) -> None:
    data = tmp_path / "data"
    with processes(tmp_path, own_app) as procs:
        argv = sagakit("serve", "--app", own_app.spec, "--data-dir", str(data))
        procs.start("serve", [*argv, "--port", "0", "--json", "--log-level", "warning"])
        info = procs.banner("serve")
        assert info["token"]  # no tokens configured: one admin token, shown once
        run_trips(info["url"], info["token"], procs)
        with contextlib.closing(sqlite3.connect(data / "hotel.db")) as conn:
            rows = conn.execute("SELECT trip_id, city, nights FROM bookings").fetchall()
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert sorted(rows) == [(key, "lis", 2) for key in sorted(KEPT_HOTEL)]
        with contextlib.closing(sqlite3.connect(data / "orchestrator.db")) as conn:
            keys = {r[0] for r in conn.execute("SELECT business_key FROM sagas")}
        assert keys == set(TRIPS)
        assert "bookings" in names and "inbox" in names  # the hotel's own store
    assert "Traceback" not in procs.output("serve")


@contextlib.contextmanager
def postgres_prefix() -> Iterator[tuple[str, str]]:
    """A store URL with a ``?prefix=`` of its own on the shared PostgreSQL, and the
    prefix; its schemas are dropped afterwards."""
    psycopg = pytest.importorskip("psycopg", reason="needs the sagakit[postgres] extra")
    prefix = f"own_{uuid.uuid4().hex[:10]}"
    try:
        yield f"{PG_DSN}?prefix={prefix}", prefix
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            for store in ("orchestrator", "hotel"):
                conn.execute(f'DROP SCHEMA IF EXISTS "{prefix}_{store}" CASCADE')


@contextlib.contextmanager
def nats_stream() -> Iterator[str]:
    """A broker URL with a ``?stream=`` of its own on the shared NATS; the stream (and
    its dead-letter and advisory streams) are deleted afterwards."""
    import asyncio

    from sagakit.errors import TransportError
    from sagakit.transports.nats import NatsTransport

    stream = f"own_{uuid.uuid4().hex[:10]}"
    try:
        yield f"{NATS_URL}?stream={stream}"
    finally:
        transport = NatsTransport(
            NATS_URL, stream=stream, endpoints=["orchestrator"], connect_timeout=2.0
        )
        with contextlib.suppress(TransportError):
            asyncio.run(transport.delete_topology())


@pytest.mark.postgres
@pytest.mark.nats
@pytest.mark.timeout(150)
def test_the_process_commands_run_an_app_of_its_own(tmp_path: Path, own_app: OwnApp) -> None:
    import psycopg

    with postgres_prefix() as (store, prefix), nats_stream() as broker:
        urls = ["--app", own_app.spec, "--store", store, "--broker", broker]
        with processes(tmp_path, own_app) as procs:
            procs.start("worker", sagakit("worker", *urls))
            procs.start("relay", sagakit("relay", *urls))
            procs.start("hotel", sagakit("service", "hotel", *urls))
            api = ["--app", own_app.spec, "--store", store, "--api-only"]
            data = ["--data-dir", str(tmp_path / "api"), "--port", "0", "--json"]
            procs.start("api", sagakit("serve", *api, *data, "--log-level", "warning"))
            info = procs.banner("api")
            assert "API only" in info["data"] and f"prefix={prefix}" in info["data"]
            run_trips(info["url"], info["token"], procs)
            with psycopg.connect(PG_DSN) as conn:
                rows = conn.execute(
                    f'SELECT trip_id, city, nights FROM "{prefix}_hotel".bookings'
                ).fetchall()
                sagas = conn.execute(
                    f'SELECT business_key, state FROM "{prefix}_orchestrator".sagas'
                ).fetchall()
                tables = conn.execute(
                    "SELECT table_schema, table_name FROM information_schema.tables "
                    "WHERE table_schema LIKE %s",
                    (f"{prefix}%",),
                ).fetchall()
        assert sorted(rows) == [(key, "lis", 2) for key in sorted(KEPT_HOTEL)]
        assert dict(sagas) == TRIPS
        schemas: dict[str, set[str]] = {}
        for schema, table in tables:
            schemas.setdefault(schema, set()).add(table)
        assert set(schemas) == {f"{prefix}_orchestrator", f"{prefix}_hotel"}
        engine_tables = {"sagas", "saga_history", "outbox", "audit_trail"}
        assert engine_tables <= schemas[f"{prefix}_orchestrator"]
        assert "bookings" in schemas[f"{prefix}_hotel"]
        assert "bookings" not in schemas[f"{prefix}_orchestrator"]
        for name in ("worker", "relay", "hotel"):
            assert f"sagakit {'service' if name == 'hotel' else name} ready" in procs.output(name)


def _refused(argv: list[str], app: OwnApp, cwd: Path) -> str:
    """Run a command that must refuse its arguments; its one line of stderr."""
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=app.env(), cwd=cwd, timeout=60, check=False
    )
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("command", "spec", "said"),
    [
        ("worker", "{missing}.app:app", "no module named '{missing}.app' (is its directory on"),
        ("relay", "{package}.app:nope", "module '{package}.app' has no attribute 'nope'"),
        ("service", "{package}.app:trip", "is a SagaDefinition, not a sagakit.App"),
        ("serve", "{package}.app:NAME", "is a str, not a sagakit.App"),
        ("worker", "{package}.app", "expected module:attribute"),
        (
            "serve",
            "{package}.broken:app",
            "importing {package}.broken failed: RuntimeError: the config file is missing",
        ),
        ("worker", "{package}.app:book_flight", "a function that needs arguments"),
    ],
)
def test_a_wrong_app_is_one_line_and_status_2(
    tmp_path: Path, own_app: OwnApp, command: str, spec: str, said: str
) -> None:
    names = {"package": own_app.package, "missing": f"nowhere_{uuid.uuid4().hex[:8]}"}
    spec, said = spec.format(**names), said.format(**names)
    args = [command, *(["hotel"] if command == "service" else [])]
    urls = ["--store", f"sqlite:///{tmp_path / 'data'}", "--broker", f"{NATS_URL}"]
    if command == "serve":
        urls = ["--data-dir", str(tmp_path / "data")]
    line = _refused(sagakit(*args, "--app", spec, *urls), own_app, tmp_path)
    assert line.startswith(f"sagakit {command}: "), line
    assert said in line, line
    assert not (tmp_path / "data").exists()  # refused before touching anything


@pytest.mark.timeout(120)
def test_a_wrong_service_name_is_one_line_and_status_2(tmp_path: Path, own_app: OwnApp) -> None:
    urls = ["--app", own_app.spec, "--store", f"sqlite:///{tmp_path / 'data'}"]
    urls += ["--broker", NATS_URL]
    line = _refused(sagakit("service", "payment", *urls), own_app, tmp_path)
    expected = f"app {own_app.package!r} has no service 'payment'; its services: hotel"
    assert line == f"sagakit service: {expected}"
    line = _refused(sagakit("relay", "--services", "hotel,spa", *urls), own_app, tmp_path)
    assert line.startswith("sagakit relay: --services: app") and "no store(s) spa" in line
    assert not (tmp_path / "data").exists()
    # Only the subprocesses' PYTHONPATH has the app: it is not importable from here.
    assert importlib.util.find_spec(own_app.package) is None
