"""``/healthz`` latency while ``sagakit serve`` is under the loads of issue #14.

Starts ``sagakit serve`` as a child process (its own data directory, a free port, the
reference checkout seeded with ``--orders``, an open-file limit of ``--nofile``), then
applies each load from this process while a prober asks ``/healthz`` on a fresh
connection every ``--probe-every`` seconds (as a load balancer's probe does):

* ``half_open``: that many connections that send half a request header and hold;
* ``list``: that many ``GET /sagas?limit=500``, ``--concurrency`` at a time;
* ``batch_cancel``: one ``POST /sagas/actions/batch`` cancel over every saga;
* ``streams``: that many console event streams (``/console/events``), held open;
* ``disconnect``: clients that hang up in the middle of a request body (then the
  server's log lines about it are counted).

Prints one line per load: ``/healthz`` p50/p95/p99/max in ms, probes that failed or
timed out, and the HTTP statuses the load itself got (429 = rate limited). Nothing is
asserted: these are the figures of one run, on whatever else the machine is doing.

    .venv/bin/python benchmarks/bench_api_load.py            # small sizes (< 1 min)
    .venv/bin/python benchmarks/bench_api_load.py --full     # the sizes of the issue
    .venv/bin/python benchmarks/bench_api_load.py --serve-arg=--rate-limit=0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE_TIMEOUT = 5.0
"""A probe that has no answer after this long counts as failed (and as this long)."""


@dataclass
class Sizes:
    """How big each load is."""

    orders: int
    half_open: int
    hold: float
    lists: int
    concurrency: int
    streams: int
    disconnects: int


SMALL = Sizes(
    orders=300, half_open=260, hold=3.0, lists=100, concurrency=20, streams=60, disconnects=5
)
FULL = Sizes(
    orders=830, half_open=260, hold=5.0, lists=500, concurrency=50, streams=300, disconnects=20
)


@dataclass
class Probe:
    """``/healthz`` latencies (seconds) and failures seen during one load."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0


async def _request(
    host: str, port: int, raw: bytes, timeout: float = PROBE_TIMEOUT
) -> tuple[int, bytes]:
    """Send ``raw`` on a new connection; ``(status, whole answer)`` (Connection: close)."""

    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(raw)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        return status, data

    return await asyncio.wait_for(go(), timeout)


def _get(path: str, token: str, extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode()


def _post(path: str, token: str, body: object) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + data


async def _probe(host: str, port: int, token: str, every: float, stop: asyncio.Event) -> Probe:
    out = Probe()
    raw = _get("/healthz", token)
    while not stop.is_set():
        began = time.perf_counter()
        try:
            status, _ = await _request(host, port, raw)
            if status != 200:
                out.failures += 1
            out.latencies.append(time.perf_counter() - began)
        except (OSError, TimeoutError, ValueError, IndexError):
            out.failures += 1
            out.latencies.append(max(time.perf_counter() - began, PROBE_TIMEOUT))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _cpu(pid: int) -> tuple[float, float, float]:
    """``(process CPU s, event loop thread's CPU s, seconds it waited for a CPU)``: the
    last says how much of a latency the machine's other work caused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        process = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        on_cpu, waited, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
        return process, int(on_cpu) / 1e9, int(waited) / 1e9
    except (OSError, ValueError, IndexError):  # not Linux: no figures
        return 0.0, 0.0, 0.0


async def _measured(
    name: str,
    host: str,
    port: int,
    token: str,
    every: float,
    load: Callable[[], Awaitable[dict[str, object]]],
    pid: int,
) -> dict[str, object]:
    """Run ``load`` while probing ``/healthz``; one result row."""
    stop = asyncio.Event()
    prober = asyncio.create_task(_probe(host, port, token, every, stop))
    await asyncio.sleep(every * 2)  # a few probes before the load starts
    cpu_before = _cpu(pid)
    began = time.perf_counter()
    detail = await load()
    took = time.perf_counter() - began
    cpu = [after - before for after, before in zip(_cpu(pid), cpu_before, strict=True)]
    stop.set()
    probe = await prober
    lat = probe.latencies
    return {
        "load": name,
        "seconds": round(took, 2),
        "probes": len(lat),
        "healthz_p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "healthz_p95_ms": round(1000 * _pct(lat, 0.95), 1),
        "healthz_p99_ms": round(1000 * _pct(lat, 0.99), 1),
        "healthz_max_ms": round(1000 * max(lat), 1) if lat else None,
        "healthz_failed": probe.failures,
        "server_cpu_s": round(cpu[0], 2),
        "loop_cpu_s": round(cpu[1], 2),
        "loop_waited_for_cpu_s": round(cpu[2], 2),
        "load_average": os.getloadavg()[0],
        **detail,
    }


# -- the loads ---------------------------------------------------------------------------


async def half_open(host: str, port: int, count: int, hold: float) -> dict[str, object]:
    """``count`` connections that send half a header and wait."""
    socks: list[socket.socket] = []
    refused = 0
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(s, (host, port))
            s.send(b"GET /sagas HTTP/1.1\r\nHost: bench\r\n")
            socks.append(s)
        except OSError:
            refused += 1
            s.close()
    await asyncio.sleep(hold)
    closed_by_server = 0
    for s in socks:
        try:
            if s.recv(1024) == b"":
                closed_by_server += 1
        except BlockingIOError:
            pass
        except OSError:
            closed_by_server += 1
        s.close()
    return {"opened": len(socks), "refused": refused, "closed_by_server": closed_by_server}


async def lists(host: str, port: int, token: str, count: int, conc: int) -> dict[str, object]:
    """``count`` list queries of 500 rows, ``conc`` at a time."""
    statuses: Counter[int] = Counter()
    sem = asyncio.Semaphore(conc)
    raw = _get("/sagas?limit=500", token)

    async def one() -> None:
        async with sem:
            try:
                status, _ = await _request(host, port, raw, timeout=120)
            except (OSError, TimeoutError):
                status = 0
            statuses[status] += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return {"statuses": dict(statuses)}


async def batch_cancel(host: str, port: int, token: str, limit: int) -> dict[str, object]:
    """One batch cancel over every saga of the checkout (most are refused: finished)."""
    body = {
        "action": "cancel",
        "reason": "load benchmark",
        "dry_run": False,
        "limit": limit,
        "filter": {"definition": "checkout"},
    }
    status, data = await _request(host, port, _post("/sagas/actions/batch", token, body), 300)
    detail: dict[str, object] = {"statuses": {status: 1}}
    with contextlib.suppress(ValueError, IndexError):
        answer = json.loads(data.split(b"\r\n\r\n", 1)[1])
        detail["sagas"] = len(answer.get("results", []))
    return detail


async def streams(host: str, port: int, token: str, count: int, hold: float) -> dict[str, object]:
    """``count`` console event streams, held open for ``hold`` seconds."""
    statuses: Counter[int] = Counter()
    writers: list[asyncio.StreamWriter] = []
    raw = _get("/console/events", token, "Accept: text/event-stream\r\n")

    async def one() -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            writer.write(raw)
            line = await asyncio.wait_for(reader.readline(), 30)
            statuses[int(line.split(b" ", 2)[1]) if line.startswith(b"HTTP/") else 0] += 1
            writers.append(writer)
            with contextlib.suppress(Exception):
                while await reader.read(4096):  # keep reading, as a browser does
                    pass
        except (OSError, TimeoutError, ValueError, IndexError):
            statuses[0] += 1

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await asyncio.sleep(hold)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for w in writers:
        w.close()
    return {"statuses": dict(statuses)}


async def disconnects(host: str, port: int, token: str, count: int) -> dict[str, object]:
    """Clients that announce a 1 kB body, send 10 bytes and hang up."""
    for _ in range(count):
        _reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            (
                f"POST /sagas/actions/batch HTTP/1.1\r\nHost: bench\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                "Content-Length: 1000\r\n\r\n"
            ).encode()
            + b'{"action":'
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    await asyncio.sleep(0.5)  # let the server notice and log
    return {"clients": count}


# -- the server ----------------------------------------------------------------------------


async def _settle(host: str, port: int, token: str, limit: float) -> tuple[float, int]:
    """Wait until no seeded saga is running, at most ``limit`` s (some demo orders wait
    for long timeouts): ``(seconds waited, sagas still running)``."""
    began = time.perf_counter()
    raw = _get("/sagas?limit=1", token)
    running = -1
    while True:
        with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
            status, data = await _request(host, port, raw)
            if status == 200:
                counts = json.loads(data.split(b"\r\n\r\n", 1)[1])["counts"]
                running = counts.get("RUNNING", 0) + counts.get("COMPENSATING", 0)
        if running == 0 or time.perf_counter() - began >= limit:
            return time.perf_counter() - began, running
        await asyncio.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


Started = tuple["subprocess.Popen[str]", str, int, Path]
"""The server process, its token, its port and its log file."""


def _start(data: Path, orders: int, nofile: int, extra: list[str]) -> Started:
    port = _free_port()
    log = data / "serve.log"

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    cmd = [
        sys.executable, "-c", "import sys; from sagakit.cli import main; sys.exit(main())",
        "serve", "--data-dir", str(data / "d"),
        "--port", str(port), "--orders", str(orders), "--json", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        cwd=ROOT,
        preexec_fn=limit_files,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise SystemExit(f"sagakit serve did not start:\n{log.read_text()[-3000:]}")
    info = json.loads(line)
    return proc, str(info["token"]), port, log


def _log_summary(log: Path, since: int) -> dict[str, object]:
    """What the server logged after byte ``since``: lines about the disconnects by level,
    ERROR lines of any kind, and tracebacks."""
    text = log.read_text(errors="replace")[since:]
    about: Counter[str] = Counter()
    errors = 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
            level, message = str(record.get("level")), str(record.get("message"))
        except (ValueError, AttributeError):
            level, message = "plain text", line
        errors += level == "ERROR" or "ERROR" in message
        if "disconnect" in message.lower() or "Exception in ASGI" in message:
            about[level] += 1
    return {
        "disconnect_lines": dict(about),
        "error_lines": errors,
        "tracebacks": text.count("Traceback"),
    }


async def _main(args: argparse.Namespace) -> list[dict[str, object]]:
    sizes = FULL if args.full else SMALL
    if args.settle is None:
        args.settle = 60.0 if args.full else 5.0
    for name in ("orders", "half_open", "hold", "lists", "concurrency", "streams", "disconnects"):
        if getattr(args, name) is not None:
            setattr(sizes, name, getattr(args, name))
    host = "127.0.0.1"
    with tempfile.TemporaryDirectory(prefix="sagakit-bench-api-") as tmp:
        began = time.perf_counter()
        proc, token, port, log = _start(Path(tmp), sizes.orders, args.nofile, args.serve_arg)
        try:
            print(
                f"# serve started in {time.perf_counter() - began:.1f}s with {sizes.orders} "
                f"orders, nofile={args.nofile}, extra args {args.serve_arg}",
                file=sys.stderr,
            )
            settled, running = await _settle(host, port, token, args.settle)
            print(
                f"# waited {settled:.1f}s for the seeded sagas; {running} still running",
                file=sys.stderr,
            )
            every = args.probe_every
            loads: dict[str, Callable[[], Awaitable[dict[str, object]]]] = {
                "idle": lambda: asyncio.sleep(1.0, {}),
                "half_open": lambda: half_open(host, port, sizes.half_open, sizes.hold),
                "list": lambda: lists(host, port, token, sizes.lists, sizes.concurrency),
                "batch_cancel": lambda: batch_cancel(host, port, token, 1000),
                "streams": lambda: streams(host, port, token, sizes.streams, sizes.hold),
            }
            rows = []
            for name, load in loads.items():
                if args.only and name not in args.only.split(","):
                    continue
                rows.append(await _measured(name, host, port, token, every, load, proc.pid))
                print(json.dumps(rows[-1]), flush=True)
                await asyncio.sleep(args.pause)  # let the server settle between loads
            if not args.only or "disconnect" in args.only.split(","):
                since = len(log.read_text(errors="replace"))
                row = await _measured(
                    "disconnect",
                    host,
                    port,
                    token,
                    every,
                    lambda: disconnects(host, port, token, sizes.disconnects),
                    proc.pid,
                )
                row.update(_log_summary(log, since))
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            if args.keep_log:
                shutil.copy(log, args.keep_log)
    return rows


def main() -> None:
    """Parse the flags, run the loads, print one JSON line per load."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--full", action="store_true", help="the sizes of issue #14")
    p.add_argument("--orders", type=int, help="sagas seeded at start")
    p.add_argument("--half-open", type=int, help="half-open connections")
    p.add_argument("--hold", type=float, help="seconds half-open connections/streams are held")
    p.add_argument("--lists", type=int, help="list queries of 500 rows")
    p.add_argument("--concurrency", type=int, help="list queries in flight")
    p.add_argument("--streams", type=int, help="console event streams")
    p.add_argument("--disconnects", type=int, help="clients that hang up mid-body")
    p.add_argument("--nofile", type=int, default=256, help="the server's open-file limit")
    p.add_argument("--probe-every", type=float, default=0.02, help="seconds between probes")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between loads")
    p.add_argument(
        "--settle",
        type=float,
        help="seconds to wait at most for the seeded sagas to finish (default 5, --full 60)",
    )
    p.add_argument("--only", default="", help="comma-separated loads to run")
    p.add_argument("--keep-log", default="", help="copy the server's log to this file")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="an extra argument for sagakit serve (repeat), e.g. --serve-arg=--rate-limit=0",
    )
    args = p.parse_args()
    if os.environ.get("PYTHONPATH") is None:
        os.environ["PYTHONPATH"] = str(ROOT / "src")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
