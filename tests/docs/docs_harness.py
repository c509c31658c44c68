"""Runs the fenced code blocks of a Markdown page: the conventions of tests/docs.

A page's blocks run in order, as one reader working through the page in one terminal
would run them. The conventions (also in test_docs.py's docstring, which users of the
guide never see; the markers are HTML comments, invisible on the rendered pages):

Languages
    ``python``   a complete program, run on its own (``python3 block.py``) in a new empty
                 directory, with the session's environment: blocks share no names and no
                 files, so each can be copied alone.
    ``python`` made only of snippet lines (``--8<-- "examples/x/pkg/mod.py:section"``)
                 shows code of an example module: it "runs" as that module, imported in
                 a fresh interpreter (the section must exist in the file).
    ``bash``     run with ``bash -e -o pipefail``. The blocks of one page share one
                 session: each bash block starts in the working directory and with the
                 *exported* variables the previous bash block left (python blocks get
                 those variables too); ``cmd &`` keeps running until the page ends, then
                 the harness kills its process group.
    ``text``, ``json``, ``mermaid``  shown only (output, shapes, diagrams): never run.
    Anything else, or no language, fails: say what the block is.

    A bash block made only of ``python3 dev.py demo|test ...`` lines is the set-up this
    test already runs in (the README's first block): checked against dev.py, not run.

Markers (one per line, right above the block, no blank line between)
    ``<!-- docs-test: background until "TEXT" -->``  a long-running command (a server):
        started in the background; the page goes on once TEXT is in its output.
    ``<!-- docs-test: prints "TEXT" -->``  its output must contain TEXT (may repeat); the
        output of what the block left running counts, within a minute (a "ready" line).
    ``<!-- docs-test: replace "A" with "B" -->``  run with A replaced by B (A must occur):
        for a measurement whose printed size takes minutes.
    ``<!-- docs-test: needs postgres nats rabbitmq -->``  any of the three: the block uses
        the shared servers through ``$SAGAKIT_STORE_URL`` / ``$SAGAKIT_BROKER_URL``.
    ``<!-- docs-test: timeout SECONDS -->``  for a block that needs longer than 120 s.

The session
    Each page runs in its own temporary directory, which stands for the root of a
    checkout: it holds links to the repository's ``examples`` and to the virtual
    environment as ``.venv`` (blocks must not write through them), and the venv's
    ``bin`` is first on PATH. ``SAGAKIT_*`` and ``PYTHONPATH`` are not inherited. From the
    first block that ``needs`` a server on, the session has ``SAGAKIT_STORE_URL``
    (``postgresql://...?prefix=docs_<random>``) and ``SAGAKIT_BROKER_URL``
    (``nats://...?stream=docs_<random>`` or ``amqp://...?prefix=docs_<random>``, the
    last broker needed), as a reader who followed the page would have set them; the
    schemas, stream and queues of that prefix are deleted after the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = {"python", "bash"}
SHOWN = {"text", "json", "mermaid"}
SERVICES = ("postgres", "nats", "rabbitmq")
DEFAULT_TIMEOUT = 120.0
BACKGROUND_TIMEOUT = 90.0
PRINTS_WAIT = 60.0
"""How long the output of a block's background processes may take to show a ``prints``."""
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
NATS_URL = "nats://127.0.0.1:4222"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
API_PORT = 8000
"""The port the guide's `sagakit serve` examples use: pages using it run one at a time."""

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_SNIPPET = re.compile(r'^\s*--8<--\s+"(?P<path>[^":]+)(?::(?P<section>[\w.-]+))?"\s*$')
_SETUP = re.compile(r"^python3 dev\.py (?P<command>\S+)")
_URL_NEEDS = {
    "postgres": ("postgresql://", "postgres://"),
    "nats": ("nats://",),
    "rabbitmq": ("amqp://",),
}


class DocsError(AssertionError):
    """A block failed, or a page breaks the conventions: the message names file:line."""


@dataclass
class Block:
    """One fenced code block of a page."""

    path: Path
    line: int
    """1-based line of the opening fence."""
    language: str
    code: str
    background: str | None = None
    prints: list[str] = field(default_factory=list)
    replace: list[tuple[str, str]] = field(default_factory=list)
    needs: set[str] = field(default_factory=set)
    timeout: float = DEFAULT_TIMEOUT

    @property
    def where(self) -> str:
        try:
            shown = self.path.relative_to(ROOT)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in RUN and not self.setup

    @property
    def includes(self) -> list[tuple[str, str | None]]:
        """The snippet lines of a block made only of them (else empty)."""
        lines = [line for line in self.code.splitlines() if line.strip()]
        found = [_SNIPPET.match(line) for line in lines]
        if lines and all(found):
            return [(m["path"], m["section"]) for m in found if m is not None]
        return []

    @property
    def setup(self) -> bool:
        """A bash block of ``python3 dev.py`` commands only: the set-up of this test."""
        lines = [ln for ln in self.code.splitlines() if ln.strip() and not ln.startswith("#")]
        return self.language == "bash" and bool(lines) and all(_SETUP.match(ln) for ln in lines)

    def program(self) -> str:
        """The code as run: with the ``replace`` markers applied."""
        code = self.code
        for old, new in self.replace:
            if old not in code:
                raise DocsError(f"{self.where}: marker replaces {old!r}, which the block lacks")
            code = code.replace(old, new)
        return code


def parse(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` with their markers; conventions are checked."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        language = opening["info"].lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if closing and closing["fence"].startswith(fence) and not closing["info"]:
                break
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        else:
            raise DocsError(f"{path}:{i + 1}: a code block that is never closed")
        block = Block(path, i + 1, language, "\n".join(body) + "\n")
        k = i - 1
        while k >= 0 and (marker := _MARKER.match(lines[k])):
            _apply(block, marker["body"], f"{block.where} (marker on line {k + 1})")
            k -= 1
        _check(block)
        blocks.append(block)
        i = j + 1
    return blocks


def _apply(block: Block, body: str, where: str) -> None:
    words = shlex.split(body)
    if len(words) == 3 and words[:2] == ["background", "until"]:
        block.background = words[2]
    elif len(words) == 2 and words[0] == "prints":
        block.prints.append(words[1])
    elif len(words) == 4 and words[0] == "replace" and words[2] == "with":
        block.replace.append((words[1], words[3]))
    elif len(words) >= 2 and words[0] == "needs" and set(words[1:]) <= set(SERVICES):
        block.needs |= set(words[1:])
    elif len(words) == 2 and words[0] == "timeout" and words[1].isdigit():
        block.timeout = float(words[1])
    else:
        raise DocsError(f"{where}: unknown docs-test marker {body!r} (see docs_harness.py)")


def _check(block: Block) -> None:
    if block.language not in RUN | SHOWN:
        raise DocsError(
            f"{block.where}: a ```{block.language or '(no language)'} block: mark it "
            f"```python or ```bash to run it, or ```{'/```'.join(sorted(SHOWN))} to show it"
        )
    marked = block.background or block.prints or block.replace or block.needs
    if block.language in SHOWN and marked:
        raise DocsError(f"{block.where}: a ```{block.language} block is never run: no markers")
    if block.includes and block.language != "python":
        raise DocsError(f"{block.where}: snippets are included in ```python blocks only")
    if block.background and block.language != "bash":
        raise DocsError(f"{block.where}: only a bash block runs in the background")


def needs(blocks: Sequence[Block]) -> set[str]:
    """The servers a page uses: its markers, and the URLs its runnable blocks name."""
    out: set[str] = set()
    for b in blocks:
        if b.runs:
            out |= b.needs
            out |= {s for s, schemes in _URL_NEEDS.items() if any(x in b.code for x in schemes)}
    return out


# -- running --------------------------------------------------------------------------
class Session:
    """One reader's terminal for one page: working directory, environment, processes."""

    def __init__(self, page: Path, base: Path, page_needs: set[str]) -> None:
        self.page = page
        self.base = base
        self.cwd = base / "work"
        self.cwd.mkdir(parents=True)
        (self.cwd / "examples").symlink_to(ROOT / "examples")
        (self.cwd / ".venv").symlink_to(Path(sys.prefix))
        self.state = base / "state"
        self.state.mkdir()
        self.prefix = f"docs_{uuid.uuid4().hex[:10]}"
        self.needs = page_needs
        bin_dir = str(Path(sys.executable).parent)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("SAGAKIT_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
        }
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        self.env = env
        self.groups: list[subprocess.Popen[bytes]] = []
        self.count = 0

    def broker(self, kind: str) -> str:
        if kind == "nats":
            return f"{NATS_URL}?stream={self.prefix}"
        return f"{AMQP_URL}?prefix={self.prefix}"

    # blocks
    def run(self, block: Block) -> None:
        """Run ``block`` (or check it); :class:`DocsError` naming it when it fails."""
        if block.setup:
            check_setup(block)
            return
        if not block.runs:
            return
        self.count += 1
        log = self.state / f"block{self.count}.log"
        # The servers' URLs appear where a reader would set them: at the first block that
        # needs them, and from then on (the page says how to set them before that block).
        if "postgres" in block.needs:
            self.env["SAGAKIT_STORE_URL"] = f"{PG_DSN}?prefix={self.prefix}"
        for broker in ("nats", "rabbitmq"):
            if broker in block.needs:
                self.env["SAGAKIT_BROKER_URL"] = self.broker(broker)
        env = dict(self.env)
        if block.includes:
            argv = self._import_argv(block, env)
        elif block.language == "python":
            script = self.state / f"block{self.count}.py"
            script.write_text(block.program())
            argv = ["python3", str(script)]
        else:
            argv = ["bash", str(self._bash_script(block))]
        cwd = self.cwd
        if block.language == "python":
            # A program of its own: its files (SQLite databases...) in a directory of its own.
            cwd = self.base / f"python{self.count}"
            cwd.mkdir()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.groups.append(proc)
        if block.background is not None:
            self._until(block, proc, log)
            return
        try:
            code = proc.wait(block.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            why = f"still running after {block.timeout:.0f}s"
            raise DocsError(self._report(block, log, why)) from None
        if code != 0:
            raise DocsError(self._report(block, log, f"exit status {code}"))
        # Processes the block left in the background may still be on their way to
        # printing what is expected (a "ready" line): give them time.
        end = time.monotonic() + min(block.timeout, PRINTS_WAIT)
        while missing := [t for t in block.prints if t not in log.read_text(errors="replace")]:
            if time.monotonic() > end:
                raise DocsError(self._report(block, log, f"its output lacks {missing[0]!r}"))
            time.sleep(0.1)
        if block.language == "bash":
            self._take_state()

    def _bash_script(self, block: Block) -> Path:
        script = self.state / f"block{self.count}.sh"
        body = block.program()
        epilogue = (
            ""
            if block.background
            else f"\nenv -0 > {shlex.quote(str(self.state / 'env'))}\n"
            f"pwd > {shlex.quote(str(self.state / 'cwd'))}\n"
        )
        script.write_text("set -e -o pipefail\n" + body + epilogue)
        return script

    def _import_argv(self, block: Block, env: dict[str, str]) -> list[str]:
        modules = []
        roots = []
        for rel, section in block.includes:
            path = (ROOT / rel).resolve()
            if not path.is_file() or path.suffix != ".py":
                raise DocsError(f"{block.where}: includes {rel}, which is not a Python file")
            if section and f"--8<-- [start:{section}]" not in path.read_text():
                raise DocsError(f"{block.where}: {rel} has no section {section!r}")
            root = path.parent
            while (root / "__init__.py").exists():
                root = root.parent
            roots.append(str(root))
            modules.append(".".join(path.relative_to(root).with_suffix("").parts))
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots))
        code = f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
        return ["python3", "-c", code]

    def _take_state(self) -> None:
        raw = (self.state / "env").read_bytes()
        env = {}
        for item in raw.split(b"\0"):
            key, sep, value = item.decode(errors="surrogateescape").partition("=")
            if sep and key not in ("_", "SHLVL", "PWD", "OLDPWD"):
                env[key] = value
        self.env = env
        self.cwd = Path((self.state / "cwd").read_text().strip())

    def _until(self, block: Block, proc: subprocess.Popen[bytes], log: Path) -> None:
        end = time.monotonic() + min(block.timeout, BACKGROUND_TIMEOUT)
        while time.monotonic() < end:
            if block.background and block.background in log.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                raise DocsError(self._report(block, log, f"exited ({proc.returncode}) early"))
            time.sleep(0.1)
        raise DocsError(self._report(block, log, f"never printed {block.background!r}"))

    def _report(self, block: Block, log: Path, what: str) -> str:
        output = log.read_text(errors="replace").splitlines()
        shown = "\n".join(output[-60:])
        return (
            f"{block.where}: the {block.language} block failed: {what}\n"
            f"--- block ---\n{block.program()}--- output (last {min(60, len(output))} lines)"
            f" ---\n{shown}"
        )

    # the end of the page
    def close(self) -> None:
        """Stop every process of the page, then delete what it made on the servers."""
        for proc in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        end = time.monotonic() + 20
        for proc in self.groups:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(end - time.monotonic(), 0.1))
            _kill_group(proc)
        # Children that outlived their block's bash: its process group, SIGKILL.
        for proc in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self.needs & set(SERVICES):
            asyncio.run(cleanup(self.prefix, self.needs))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def check_setup(block: Block) -> None:
    """A ``python3 dev.py ...`` block names commands dev.py has."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dev", ROOT / "dev.py")
    assert spec is not None and spec.loader is not None
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    for line in block.code.splitlines():
        m = _SETUP.match(line)
        if m and m["command"] not in dev.EXTRAS:
            raise DocsError(f"{block.where}: dev.py has no command {m['command']!r}")


async def cleanup(prefix: str, used: set[str]) -> None:
    """Delete the schemas, stream and queues named after ``prefix``."""
    if "postgres" in used:
        import psycopg

        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s",
                (prefix.replace("_", r"\_") + r"\_%",),
            )
            for (schema,) in await cur.fetchall():
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    endpoints = _all_endpoints()
    if "nats" in used:
        from sagakit.transports.nats import NatsTransport

        await NatsTransport(NATS_URL, stream=prefix, endpoints=endpoints).delete_topology()
    if "rabbitmq" in used:
        from sagakit.transports.rabbitmq import RabbitMqTransport

        await RabbitMqTransport(AMQP_URL, prefix=prefix, endpoints=endpoints).delete_topology()


def _all_endpoints() -> list[str]:
    """Every endpoint of the apps the guide runs (the travel app, the checkout)."""
    sys.path.insert(0, str(ROOT / "examples" / "travel"))
    try:
        from sagakit import load_app

        found: list[str] = []
        for spec in ("travel.app:app", "sagakit_checkout:app"):
            found += load_app(spec).endpoints
        return sorted(set(found))
    finally:
        sys.path.remove(str(ROOT / "examples" / "travel"))


@contextlib.contextmanager
def api_port(timeout: float = 120.0) -> Iterator[None]:
    """Hold the guide's API port for this page: one page (in any test run) at a time."""
    lock_path = Path("/tmp") / f"sagakit-docs-port-{API_PORT}.lock"
    with lock_path.open("w") as lock:
        end = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    raise DocsError(
                        f"port {API_PORT}: another docs test held it {timeout}s"
                    ) from None
                time.sleep(0.5)
        try:
            while _port_busy(API_PORT):
                if time.monotonic() > end:
                    raise DocsError(
                        f"port {API_PORT} is taken by another program; the guide's "
                        "`sagakit serve` examples need it"
                    )
                time.sleep(0.5)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def uses_api_port(blocks: Sequence[Block]) -> bool:
    """True when the page serves or calls the API on the guide's port."""
    return any(b.runs and ("sagakit serve" in b.code or f":{API_PORT}" in b.code) for b in blocks)


def run_page(path: Path, base: Path) -> None:
    """Run every block of the page at ``path`` in one session under ``base``."""
    blocks = parse(path)
    session = Session(path, base, needs(blocks))
    guard = api_port() if uses_api_port(blocks) else contextlib.nullcontext()
    with guard:
        try:
            for block in blocks:
                session.run(block)
        except BaseException:
            with contextlib.suppress(Exception):  # the block's failure is the news
                session.close()
            raise
        session.close()
