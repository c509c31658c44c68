"""Private servers and production processes for the end-to-end chaos tests.

Everything here is private to one test: a PostgreSQL 15 cluster initialised in a temp
directory (owned by the ``postgres`` user: the server refuses to run as root), a
nats-server with JetStream on its own store directory, a RabbitMQ node with its own
name, ports, cookie, database and no plugins, and the sagakit processes
(``python -m sagakit.cli_processes worker|relay|service``). Each runs on a free port of
127.0.0.1 and can be stopped cleanly, killed with SIGKILL and started again on the same
data. :class:`Cluster` owns them all and :meth:`Cluster.cleanup` stops whatever still
runs (gracefully, then SIGKILL for leftovers, found by the temp directory in their
command line): the shared servers on the default ports are never touched.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = Path(os.environ.get("SAGAKIT_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
HOST = "127.0.0.1"


class ClusterError(RuntimeError):
    """A private server or process did not do what it was told."""


# -- small helpers ---------------------------------------------------------------------


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port nobody listens on now (and not handed out before in this process)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        # The RabbitMQ CLI uses dist ports near the node's; keep clear of low ports too.
        if port not in _handed_out and 20000 < port < 60000:
            _handed_out.add(port)
            return port
    raise ClusterError("no free port found")


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_port(port: int, timeout: float, what: str, alive: object = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if port_open(port):
            return
        if callable(alive) and not alive():
            raise ClusterError(f"{what} exited before listening on port {port}")
        time.sleep(0.05)
    raise ClusterError(f"{what} did not listen on port {port} within {timeout}s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), deepest last."""
    by_parent: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        by_parent.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for c in by_parent.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (our unique temp directory)."""
    out = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            out.append(int(entry.name))
    return out


def sigkill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)


def as_user(user: str, argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
    """``argv`` run as ``user`` (we are root in CI; otherwise we must already be them)."""
    prefix: list[str] = []
    if os.geteuid() == 0 and user != "root":
        prefix = ["runuser", "-u", user, "--"]
    if env:
        prefix += ["env", *(f"{k}={v}" for k, v in env.items())]
    return [*prefix, *argv]


def run(argv: Sequence[str], timeout: float, what: str) -> str:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"{what}: no answer within {timeout}s ({exc})") from exc
    if proc.returncode != 0:
        raise ClusterError(
            f"{what} failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
        )
    return proc.stdout


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


# -- PostgreSQL ------------------------------------------------------------------------


class PostgresServer:
    """A private PostgreSQL 15 cluster on ``port``, data in ``base/pgdata``."""

    USER = "postgres"

    def __init__(self, base: Path, port: int | None = None, *, max_connections: int = 300) -> None:
        self.base = base
        self.port = port or free_port()
        self.data = base / "pgdata"
        self.socket_dir = base / "pgsock"
        self.log = base / "postgres.log"
        self.max_connections = max_connections
        self.starts = 0

    def available(self) -> bool:
        return (PG_BIN / "initdb").exists() and (os.geteuid() != 0 or _user_exists(self.USER))

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    def _ctl(self, *args: str) -> list[str]:
        return as_user(self.USER, [str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args])

    def init(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        self.log.touch()
        if os.geteuid() == 0:
            chown_tree(self.base, self.USER)
        run(
            as_user(
                self.USER,
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-sync",  # initdb's own files only; the server runs with fsync=on
                ],
            ),
            120,
            "initdb",
        )

    def start(self, timeout: float = 60) -> None:
        opts = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses={HOST} -c fsync=on "
            f"-c max_connections={self.max_connections}"
        )
        run(
            self._ctl("-l", str(self.log), "-w", "-t", str(int(timeout)), "-o", opts, "start"),
            timeout + 10,
            "pg_ctl start",
        )
        self.starts += 1

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        run(
            self._ctl("-m", mode, "-w", "-t", str(int(timeout)), "stop"),
            timeout + 10,
            "pg_ctl stop",
        )

    def restart(self) -> None:
        """Fast stop (every connection is cut) and start on the same data."""
        self.stop("fast")
        self.start()

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def running(self) -> bool:
        pid = self.postmaster_pid()
        return pid is not None and pid_alive(pid)

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend (a crash; recovery runs on start)."""
        pid = self.postmaster_pid()
        if pid is None or not pid_alive(pid):
            return
        family = [pid, *children(pid)]
        sigkill(family)
        for p in family:
            wait_gone(p, 10)

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        if self.running:
            try:
                self.stop("immediate", timeout=20)
            except ClusterError:
                self.kill()
        sigkill(pids_mentioning(str(self.data)))


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


# -- NATS ------------------------------------------------------------------------------


class NatsServer:
    """A private nats-server with JetStream, its store in ``base/nats``."""

    def __init__(self, base: Path, port: int | None = None) -> None:
        self.base = base
        self.port = port or free_port()
        self.store_dir = base / "nats"
        self.log = base / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @staticmethod
    def available() -> bool:
        return Path(NATS_SERVER).exists()

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-a", HOST, "-p", str(self.port), "-js", "-sd", str(self.store_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = self.proc
        wait_port(self.port, timeout, "nats-server", lambda: proc.poll() is None)
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: JetStream recovers its store directory on the next start."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def cleanup(self) -> None:
        self.stop()
        sigkill(pids_mentioning(str(self.store_dir)))


# -- RabbitMQ --------------------------------------------------------------------------


class RabbitNode:
    """A private RabbitMQ node: own name, AMQP and distribution ports, database, cookie.

    Runs as the ``rabbitmq`` user (whose HOME is pointed at our directory, so the node
    and our ``rabbitmqctl`` calls share a private Erlang cookie); no plugins.
    """

    USER = "rabbitmq"

    def __init__(self, base: Path) -> None:
        self.base = base / "rabbitmq"
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"sagakit{secrets.token_hex(4)}@localhost"
        self.pid_file = self.base / "node.pid"
        self.log_dir = self.base / "log"
        self.starts = 0

    @classmethod
    def available(cls) -> bool:
        return (RABBITMQ_BIN / "rabbitmq-server").exists() and (
            os.geteuid() != 0 or _user_exists(cls.USER)
        )

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}/"

    def env(self) -> dict[str, str]:
        return {
            "HOME": str(self.base),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
        }

    def prepare(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        cookie = self.base / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (self.base / "enabled_plugins").write_text("[].\n")
        # The listener comes from RABBITMQ_NODE_IP_ADDRESS/PORT; keep the file harmless.
        (self.base / "rabbitmq.conf").write_text("log.file.level = info\n")
        (self.base / "advanced.config").write_text("[].\n")
        if os.geteuid() == 0:
            chown_tree(self.base, self.USER)

    def _cmd(self, tool: str, *args: str) -> list[str]:
        return as_user(self.USER, [str(RABBITMQ_BIN / tool), *args], self.env())

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        pid = self.pid()
        return pid is not None and pid_alive(pid)

    def start(self, timeout: float = 90) -> None:
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        run(self._cmd("rabbitmq-server", "-detached"), 30, "rabbitmq-server -detached")
        end = time.monotonic() + timeout
        # await_startup waits for the pid file's node to finish booting.
        while True:
            try:
                run(
                    self._cmd("rabbitmqctl", "-n", self.node, "--timeout", "30", "await_startup"),
                    45,
                    "rabbitmqctl await_startup",
                )
                break
            except ClusterError:
                if time.monotonic() > end:
                    raise ClusterError(
                        f"RabbitMQ node {self.node} did not start: "
                        f"{tail(self.log_dir / f'{self.node}.log')}"
                    ) from None
                time.sleep(0.5)
        wait_port(self.port, max(1.0, end - time.monotonic()), f"RabbitMQ {self.node}")
        self.starts += 1

    def stop(self, timeout: float = 60) -> None:
        pid = self.pid()
        if pid is None or not pid_alive(pid):
            return
        try:
            run(
                self._cmd("rabbitmqctl", "-n", self.node, "stop", str(self.pid_file)),
                timeout,
                "rabbitmqctl stop",
            )
        except ClusterError:
            self.kill()
        wait_gone(pid, 10)

    def kill(self) -> None:
        """SIGKILL the Erlang VM (and its port programs)."""
        pid = self.pid()
        if pid is None or not pid_alive(pid):
            return
        family = [pid, *children(pid)]
        sigkill(family)
        for p in family:
            wait_gone(p, 10)

    def cleanup(self) -> None:
        with contextlib.suppress(ClusterError):
            self.stop(timeout=30)
        self.kill()
        sigkill(pids_mentioning(str(self.base)))


# -- sagakit processes -----------------------------------------------------------------


@dataclass
class Proc:
    """One ``python -m sagakit.cli_processes ...`` process, restartable, with its log."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    started_at: float = 0.0
    exits: list[int] = field(default_factory=list)
    """Exit codes of runs that ended without us killing or stopping them."""
    _log_offset: int = 0
    _expected_end: bool = False

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        if self.alive:
            raise ClusterError(f"{self.name} is already running")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"--- start #{self.starts + 1} at {time.time():.3f}\n".encode())
            out.flush()
            self._log_offset = out.tell()
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        self._expected_end = False
        self.starts += 1
        self.started_at = time.time()

    def ready(self) -> bool:
        """True once this run printed ``sagakit <role> ready``."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_offset)
                return b" ready" in f.read()
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while not self.ready():
            if not self.alive:
                raise ClusterError(f"{self.name} exited ({self.returncode}):\n{tail(self.log)}")
            if time.monotonic() > end:
                raise ClusterError(f"{self.name} not ready within {timeout}s:\n{tail(self.log)}")
            time.sleep(0.05)

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def unexpected_exit(self) -> int | None:
        """The exit code if this run ended by itself (not killed or stopped by us)."""
        if self.popen is None or self._expected_end:
            return None
        code = self.popen.poll()
        if code is None:
            return None
        self._expected_end = True
        self.exits.append(code)
        return code

    def kill9(self) -> None:
        if self.alive:
            assert self.popen is not None
            self._expected_end = True
            self.popen.kill()
            self.popen.wait(10)
            self.kills += 1

    def local_ports(self) -> set[int]:
        """Local TCP ports of this process's sockets (to find its database sessions)."""
        if not self.alive or self.pid is None:
            return set()
        inodes = set()
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{self.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(link[len("socket:[") : -1])
        ports = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    parts = line.split()
                    if len(parts) > 9 and parts[9] in inodes:
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        return ports

    def pause(self) -> None:
        if self.alive and self.pid is not None:
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive and self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)

    def signal_stop(self) -> None:
        """Send one SIGTERM (after a SIGCONT, in case it is paused)."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self._expected_end = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGCONT)
            os.kill(self.popen.pid, signal.SIGTERM)

    def terminate(self, timeout: float = 30, *, signal_first: bool = True) -> int | None:
        """SIGTERM (once) and wait; returns the exit code (None: it had to be killed)."""
        if self.popen is None:
            return None
        if self.popen.poll() is not None:
            return self.popen.returncode
        if signal_first:
            self.signal_stop()
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            return None


def process_env() -> dict[str, str]:
    """The caller's environment without SAGAKIT_* settings, unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Cluster:
    """The servers and processes of one test, and their cleanup."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: dict[str, Proc] = {}
        self.postgres: PostgresServer | None = None
        self.nats: NatsServer | None = None
        self.rabbit: RabbitNode | None = None
        self.env = process_env()
        self.passed = False
        """Set by a test that passed: its directory is removed."""

    # servers
    def start_postgres(self, database: str = "sagakit") -> str:
        pg = PostgresServer(self.base / "pg")
        self.postgres = pg
        pg.init()
        pg.start()
        return pg.create_database(database)

    def start_nats(self) -> str:
        self.nats = NatsServer(self.base / "broker")
        self.nats.start()
        return self.nats.url

    def start_rabbitmq(self) -> str:
        self.rabbit = RabbitNode(self.base / "broker")
        self.rabbit.prepare()
        self.rabbit.start()
        return self.rabbit.url

    # processes
    def add(self, name: str, *args: str) -> Proc:
        proc = Proc(
            name,
            [sys.executable, "-m", "sagakit.cli_processes", *args],
            self.base / "logs" / f"{name}.log",
            self.env,
        )
        self.procs[name] = proc
        return proc

    def start_all(self, timeout: float = 90) -> None:
        for p in self.procs.values():
            p.start()
        for p in self.procs.values():
            p.wait_ready(timeout)

    def stop_all(self, timeout: float = 30) -> dict[str, int | None]:
        """SIGTERM every process at once; their exit codes (None: needed SIGKILL)."""
        for p in self.procs.values():
            p.signal_stop()
        return {name: p.terminate(timeout, signal_first=False) for name, p in self.procs.items()}

    def cleanup(self) -> None:
        for p in self.procs.values():
            if p.alive:
                with contextlib.suppress(Exception):
                    p.resume()
                    p.kill9()
        for server in (self.rabbit, self.nats, self.postgres):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.cleanup()
        # Anything left that names our directory is ours.
        sigkill(pids_mentioning(str(self.base)))
