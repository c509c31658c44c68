"""Bearer tokens with roles, configured by the deployer and stored hashed.

Roles are ordered: ``viewer`` reads, ``operator`` also places orders and acts on
sagas, ``admin`` may do everything (including reading the API's audit trail). The
deployer lists tokens in a JSON file, one entry per holder, with the SHA-256 of the
token, never the token itself::

    {"tokens": [
      {"name": "ops-alice", "role": "operator", "sha256": "5e884898da28..."},
      {"name": "grafana",   "role": "viewer",   "sha256": "9f86d081884c..."}
    ]}

(a bare list of entries is accepted too). The name is who acts: the actor of every
decision in the audit trail. An entry without a name (a file written before names
were required) gets a stable one derived from its hash, ``token-`` and the first
eight hex digits of its SHA-256 (:func:`derived_name`); ``sagakit tokens`` writes that
name into the file at its next change. An entry may carry ``expires_at`` (epoch
seconds): from then on its token is refused with 401 saying it expired. ``sagakit
tokens add|list|rotate|remove`` (:mod:`sagakit.api.cli_tokens`) edits the file; a
:class:`WatchedTokenStore` (what ``sagakit serve`` uses) notices the changes without a
restart. There is no way to switch authentication off: a request without a valid
token is refused with 401.

This module needs only the standard library, so the CLI can use it without the
``api`` extra.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sagakit.api.problems import ApiError
from sagakit.errors import ConfigurationError
from sagakit.runtime.lockfile import private_dir

TOKENS_FILE_ENV = "SAGAKIT_TOKENS_FILE"
"""The environment variable naming the tokens file (read by the CLI, at the edge)."""
TOKENS_JSON = "tokens.json"
"""The tokens file's name in a data directory."""
RELOAD_INTERVAL = 1.0
"""Seconds between two looks of a :class:`WatchedTokenStore` at its file."""

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:\-]{0,63}$")
# RFC 6750's b64token: what may follow "Bearer ".
_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


class Role(StrEnum):
    """What a token may do; each role includes the ones below it."""

    VIEWER = "viewer"
    """Read orders, sagas, ledgers, metrics."""
    OPERATOR = "operator"
    """Also place orders and act on sagas (retry, compensate, cancel, batches)."""
    ADMIN = "admin"
    """Everything, including the API's audit trail."""

    @property
    def rank(self) -> int:
        """Position in viewer < operator < admin."""
        return _RANKS[self]

    def allows(self, required: Role) -> bool:
        """True when this role may do what ``required`` may."""
        return self.rank >= required.rank


_RANKS = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One configured token: who holds it, its role, the SHA-256 hex of the token and,
    optionally, when it expires (epoch seconds; None: never)."""

    name: str
    role: Role
    sha256: str
    expires_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The tokens-file form (``expires_at`` only when set)."""
        out: dict[str, Any] = {"name": self.name, "role": self.role.value, "sha256": self.sha256}
        if self.expires_at is not None:
            at = self.expires_at
            out["expires_at"] = int(at) if float(at).is_integer() else float(at)
        return out

    def expired(self, now: float | None = None) -> bool:
        """True once ``expires_at`` has passed."""
        if self.expires_at is None:
            return False
        return (time.time() if now is None else now) >= self.expires_at


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the token's name (the actor of audited actions) and role."""

    name: str
    role: Role


def derived_name(sha256: str) -> str:
    """The name of a token entry that has none: ``token-`` and the first eight hex
    digits of its hash (stable: the same entry always gets the same name)."""
    return f"token-{sha256[:8]}"


def hash_token(token: str) -> str:
    """The SHA-256 hex digest of ``token``: what the tokens file stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def generate_token() -> str:
    """A new random token (256 bits, URL-safe)."""
    return "sk_" + secrets.token_urlsafe(32)


def configured_tokens_file(tokens_file: str | os.PathLike[str] | None) -> Path | None:
    """The tokens file given explicitly: ``tokens_file``, else ``$SAGAKIT_TOKENS_FILE``,
    else None (the data directory's ``tokens.json`` is used)."""
    configured = tokens_file if tokens_file is not None else os.environ.get(TOKENS_FILE_ENV)
    return Path(configured) if configured else None


def tokens_path(
    data_dir: str | os.PathLike[str], tokens_file: str | os.PathLike[str] | None = None
) -> Path:
    """The tokens file in use: ``tokens_file``, else ``$SAGAKIT_TOKENS_FILE``, else
    ``<data_dir>/tokens.json`` (what ``sagakit serve`` and ``sagakit tokens`` read)."""
    return configured_tokens_file(tokens_file) or Path(data_dir) / TOKENS_JSON


@contextlib.contextmanager
def tokens_file_lock(path: str | os.PathLike[str], *, timeout: float = 10.0) -> Iterator[None]:
    """Hold ``flock`` on ``<path>.lock`` (created 0600 beside the tokens file): one
    read-modify-write of the file at a time. :class:`ConfigurationError` after
    ``timeout`` seconds of waiting for another holder."""
    lock = Path(f"{os.fspath(path)}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot open the lock file {lock}: {exc}") from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ConfigurationError(
                        f"{lock} is held by another process changing the tokens; try again"
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the flock


class TokenStore:
    """The configured tokens; looks a presented token up by its hash in constant time."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries = tuple(entries)
        names = [e.name for e in self._entries]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigurationError(f"token names must be unique; repeated: {dup}")
        for e in self._entries:
            _check_entry(e)

    def __len__(self) -> int:
        return len(self._current())

    def _current(self) -> tuple[TokenEntry, ...]:
        """The entries to check a request against (a subclass may reload them first)."""
        return self._entries

    @property
    def entries(self) -> tuple[TokenEntry, ...]:
        """The configured entries (hashes only)."""
        return self._current()

    @classmethod
    def from_json(cls, raw: object, *, source: str = "tokens") -> TokenStore:
        """Entries from the parsed tokens file (``{"tokens": [...]}`` or a bare list)."""
        items = raw.get("tokens") if isinstance(raw, dict) else raw
        if not isinstance(items, list):
            raise ConfigurationError(
                f"{source}: expected a list of {{name, role, sha256}} entries "
                '(or {"tokens": [...]})'
            )
        entries = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or set(item) - {"name", "role", "sha256", "expires_at"}:
                raise ConfigurationError(
                    f"{source}: entry {i} must be an object with role and sha256 (and "
                    "optionally name and expires_at)"
                )
            expires = item.get("expires_at")
            if expires is not None and (
                isinstance(expires, bool) or not isinstance(expires, int | float)
            ):
                raise ConfigurationError(
                    f"{source}: entry {i} has expires_at {expires!r}; use epoch seconds (a number)"
                )
            try:
                role = Role(str(item.get("role")))
            except ValueError:
                raise ConfigurationError(
                    f"{source}: entry {i} has role {item.get('role')!r}; "
                    f"use one of {[r.value for r in Role]}"
                ) from None
            digest = str(item.get("sha256", ""))
            name = item.get("name")
            entries.append(
                TokenEntry(
                    derived_name(digest) if name is None else str(name),
                    role,
                    digest,
                    None if expires is None else float(expires),
                )
            )
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TokenStore:
        """Load a tokens file; :class:`ConfigurationError` saying what is wrong with it."""
        p = Path(path)
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigurationError(f"tokens file {p} does not exist") from None
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"tokens file {p} cannot be read as JSON: {exc}") from exc
        return cls.from_json(raw, source=str(p))

    @classmethod
    def from_plain(cls, tokens: Mapping[str, tuple[Role | str, str]]) -> TokenStore:
        """From ``{name: (role, token)}``, hashing each token (tests, generated tokens)."""
        return cls(TokenEntry(n, Role(r), hash_token(t)) for n, (r, t) in tokens.items())

    def to_json(self) -> dict[str, Any]:
        """The tokens-file form of these entries."""
        return {"tokens": [e.to_json() for e in self._current()]}

    def lookup(self, token: str) -> TokenEntry | None:
        """The entry of ``token`` (expired or not), or None. Every entry is compared."""
        digest = hash_token(token)
        found: TokenEntry | None = None
        for entry in self._current():
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found

    def authenticate(self, token: str) -> Principal | None:
        """The holder of ``token``, or None (unknown or expired)."""
        found = self.lookup(token)
        if found is None or found.expired():
            return None
        return Principal(found.name, found.role)

    def principal_for(self, authorization: str | None) -> Principal:
        """The holder of an ``Authorization: Bearer ...`` header; 401 when it is not valid."""
        challenge = {"WWW-Authenticate": 'Bearer realm="sagakit"'}
        if not authorization:
            raise ApiError(
                401,
                "this API needs a bearer token: send 'Authorization: Bearer <token>'",
                headers=challenge,
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        found = None
        if scheme.lower() == "bearer" and _B64TOKEN.match(token):
            found = self.lookup(token)
        invalid = {"WWW-Authenticate": 'Bearer realm="sagakit", error="invalid_token"'}
        if found is None:
            raise ApiError(
                401,
                "the bearer token is not valid (unknown, revoked or malformed)",
                headers=invalid,
            )
        if found.expired():
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(found.expires_at))
            raise ApiError(
                401,
                f"the bearer token {found.name!r} expired at {when}; ask for a new one",
                headers={
                    "WWW-Authenticate": 'Bearer realm="sagakit", error="invalid_token", '
                    'error_description="the token expired"'
                },
            )
        return Principal(found.name, found.role)


class WatchedTokenStore(TokenStore):
    """The tokens of a file, re-read when the file changes: no restart needed.

    At most once per ``interval`` seconds, on a request, the file is looked at: when its
    inode, size or modification time changed (or it was modified within the last two
    seconds, which a coarse clock could hide), it is read again, and parsed when its
    bytes differ. A file that cannot be read or parsed keeps the previous tokens and
    logs an error (once per change of the file).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval: float = RELOAD_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._stat = _signature(self.path)
        self._raw = _read_bytes(self.path)
        super().__init__(_parse(self._raw, self.path).entries)
        self._checked = clock()

    def _current(self) -> tuple[TokenEntry, ...]:
        self.refresh()
        return self._entries

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed (and ``interval`` passed, unless ``force``);
        True when the tokens were replaced."""
        with self._lock:
            now = self._clock()
            if not force and now - self._checked < self._interval:
                return False
            self._checked = now
            stat = _signature(self.path)
            recent = stat is not None and time.time() - stat[3] / 1e9 < 2.0
            if stat == self._stat and not recent:
                return False
            self._stat = stat
            try:
                raw = _read_bytes(self.path)
                if raw == self._raw:
                    return False
                self._raw = raw
                entries = _parse(raw, self.path).entries
            except ConfigurationError as exc:
                log.error("tokens file not reloaded, the previous tokens stay in use: %s", exc)
                return False
            self._entries = entries
            log.info("tokens file %s reloaded: %d token(s)", self.path, len(entries))
            return True


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"tokens file {path} does not exist") from None
    except OSError as exc:
        raise ConfigurationError(f"tokens file {path} cannot be read: {exc}") from exc


def _parse(raw: bytes, path: Path) -> TokenStore:
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise ConfigurationError(f"tokens file {path} cannot be read as JSON: {exc}") from exc
    return TokenStore.from_json(data, source=str(path))


def require(principal: Principal, role: Role) -> None:
    """Raise 403 unless ``principal`` has at least ``role``."""
    if not principal.role.allows(role):
        raise ApiError(
            403,
            f"token {principal.name!r} has role {principal.role.value}; "
            f"this needs {role.value} or above",
        )


def write_tokens_file(path: str | os.PathLike[str], store: TokenStore) -> None:
    """Write ``store`` to ``path`` atomically, readable by the owner only (hashes only)."""
    p = Path(path)
    private_dir(p.parent, warn=False)  # 0700 when new, like every data directory
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tokens-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(store.to_json(), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_entry(e: TokenEntry) -> None:
    if e.expires_at is not None and not math.isfinite(e.expires_at):
        raise ConfigurationError(f"token {e.name!r}: expires_at must be a finite number")
    if not _NAME.match(e.name):
        raise ConfigurationError(
            f"token name {e.name!r} must be 1-64 letters, digits or _.@:- (it is the actor "
            "recorded in audits)"
        )
    if not _HEX64.match(e.sha256):
        raise ConfigurationError(
            f"token {e.name!r}: sha256 must be the 64 lower-case hex digits of the token's "
            "SHA-256 (store the hash, never the token)"
        )
