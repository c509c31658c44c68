"""The console's sign-in sessions: signed, expiring cookies that never hold the token.

A browser signs in once with its API token on ``/console-login``; the server checks the
token and answers with a *session*, not the token::

    v1.<token name, base64url>.<issued at, epoch ms>.<expires at, epoch ms>.<MAC>

where the MAC is HMAC-SHA256 over the version, the name, both times and the SHA-256 of
the token (the hash the tokens file keeps), under a key derived from the deployment's
console key (:func:`load_console_key`, ``<data-dir>/console.key``). So:

- the cookie holds no credential for the JSON API, and a copy of it expires
  (:data:`SESSION_LIFETIME`, and never after the token's own ``expires_at``);
- it cannot be forged or stretched without the key (a changed byte fails the MAC);
- every request looks the token up again by name in the (reloaded) tokens file: a
  revoked or expired token ends its sessions, a rotated one too (its hash changed, so
  the MAC no longer matches), and a changed role applies at once;
- signing out (:meth:`ConsoleSessions.sign_out`) refuses, in this process, every
  session of that token issued before that moment. It is kept in memory: another
  process behind the same load balancer, or this one after a restart, still accepts a
  copied cookie until it expires. To end a token's sessions everywhere, rotate or
  revoke the token.

The same key also signs the console's CSRF tokens (a separate derived key), so forms
survive a restart and work across processes that share the key.

Standard library only, like :mod:`sagakit.api.auth`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sagakit.api.auth import Principal, TokenEntry, TokenStore, hash_token
from sagakit.errors import ConfigurationError
from sagakit.runtime.lockfile import private_dir

SESSION_LIFETIME = 8 * 3600.0
"""Seconds a console sign-in lasts (8 hours), unless the token expires sooner."""
CONSOLE_KEY = "console.key"
"""The console key's file name in a data directory."""
CLOCK_SKEW = 60.0
"""Seconds a session's issue time may lie in the future (clocks of several processes)."""

_VERSION = "v1"
_SESSION = re.compile(
    r"^v1\.([A-Za-z0-9_\-]{1,88})\.([0-9]{1,15})\.([0-9]{1,15})\.([A-Za-z0-9_\-]{43})$"
)
_KEY_HEX = re.compile(r"^[0-9a-f]{64,128}$")
# Compared against when a session names no known token, so that the answer takes as
# long as for a known one.
_NO_TOKEN = hash_token("")


@dataclass(frozen=True, slots=True)
class Session:
    """A session just issued: the cookie's value, who it is for, and until when."""

    cookie: str
    principal: Principal
    issued_at: float
    """Epoch seconds."""
    expires_at: float
    """Epoch seconds."""

    @property
    def max_age(self) -> int:
        """The cookie's ``Max-Age``: the session's whole seconds (at least 1)."""
        return max(1, round(self.expires_at - self.issued_at))


class ConsoleSessions:
    """Issues and checks console sessions for the tokens of ``tokens``.

    ``key`` is the deployment's console key (32 bytes or more; None: random for this
    process, so sessions end when it restarts). ``lifetime`` is how long a session
    lasts, in seconds; a session issued under a longer lifetime is cut to this one.
    """

    def __init__(
        self,
        tokens: TokenStore,
        key: bytes | None = None,
        *,
        lifetime: float = SESSION_LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if key is not None and len(key) < 32:
            raise ConfigurationError(f"the console key must be 32 bytes or more, not {len(key)}")
        if not 60 <= lifetime <= 31 * 86400:
            raise ConfigurationError(
                f"the console session lifetime must be 60 s to 31 days, not {lifetime} s"
            )
        root = key if key is not None else secrets.token_bytes(32)
        # Derived keys: a MAC made for one purpose is never valid for another.
        self._key = _derive(root, b"sagakit console session v1")
        self.csrf_key = _derive(root, b"sagakit console csrf v1")
        """The key of the console's CSRF tokens (:class:`sagakit.console.http.Csrf`)."""
        self.tokens = tokens
        self.lifetime = float(lifetime)
        self._clock = clock
        self._lock = threading.Lock()
        self._signed_out: dict[str, int] = {}  # token name -> epoch ms of its last sign-out

    def issue(self, token: str) -> Session | None:
        """A session for ``token``, or None when the token is unknown or expired."""
        entry = self.tokens.lookup(token)
        now = self._clock()
        if entry is None or entry.expired(now):
            return None
        with self._lock:
            # Strictly after the token's last sign-out, even within the same millisecond
            # (or with a clock that stepped back): a new sign-in is never born signed out.
            issued = max(_ms(now), self._signed_out.get(entry.name, -1) + 1)
        expires = issued + _ms(self.lifetime)
        if entry.expires_at is not None:
            expires = min(expires, _ms(entry.expires_at))
        name = base64.urlsafe_b64encode(entry.name.encode()).decode().rstrip("=")
        body = f"{_VERSION}.{name}.{issued}.{expires}"
        cookie = f"{body}.{self._mac(entry.name, issued, expires, entry.sha256)}"
        return Session(cookie, Principal(entry.name, entry.role), issued / 1000, expires / 1000)

    def principal(self, cookie: str) -> Principal | None:
        """Who ``cookie`` signs in, with the token's current role; None when the cookie
        is malformed, tampered with, expired, signed out, or its token is gone, rotated
        or expired. Never raises on bad input."""
        checked = self._check(cookie)
        return None if checked is None else Principal(checked[0].name, checked[0].role)

    def sign_out(self, cookie: str) -> Principal | None:
        """End ``cookie``'s session and, in this process, every other session of its
        token issued until now; who signed out (None: the cookie was not valid)."""
        checked = self._check(cookie)
        if checked is None:
            return None
        entry, _ = checked
        now = _ms(self._clock())
        with self._lock:
            # Older marks cannot matter any more: sessions that old have expired anyway.
            horizon = now - _ms(self.lifetime)
            for name in [n for n, at in self._signed_out.items() if at < horizon]:
                del self._signed_out[name]
            self._signed_out[entry.name] = now
        return Principal(entry.name, entry.role)

    def _check(self, cookie: str) -> tuple[TokenEntry, int] | None:
        found = _SESSION.match(cookie)
        if found is None:
            return None
        raw_name, raw_issued, raw_expires, mac = found.groups()
        try:
            name = base64.urlsafe_b64decode(raw_name + "=" * (-len(raw_name) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        issued, expires = int(raw_issued), int(raw_expires)
        entry = next((e for e in self.tokens.entries if e.name == name), None)
        digest = _NO_TOKEN if entry is None else entry.sha256
        good = hmac.compare_digest(mac, self._mac(name, issued, expires, digest))
        if not good or entry is None:
            return None
        now = _ms(self._clock())
        if not issued <= now + _ms(CLOCK_SKEW) or now >= expires:
            return None
        if expires - issued > _ms(self.lifetime) or entry.expired(now / 1000):
            return None
        with self._lock:
            signed_out = self._signed_out.get(name)
        if signed_out is not None and issued <= signed_out:
            return None
        return entry, issued

    def _mac(self, name: str, issued: int, expires: int, token_sha256: str) -> str:
        msg = "\x00".join((_VERSION, name, str(issued), str(expires), token_sha256)).encode()
        raw = hmac.new(self._key, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def load_console_key(path: str | os.PathLike[str]) -> bytes:
    """The console key kept in ``path`` (hex, 32 bytes or more), created with 32 random
    bytes, readable by its owner only (0600), when the file does not exist yet.

    Processes that serve the same console behind a load balancer need the same key
    (copy the file): a session or form signed by one is then accepted by the others.
    :class:`ConfigurationError` when the file cannot be read, written or parsed."""
    p = Path(path)
    if not p.exists():
        _create_key(p)
    try:
        text = p.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"the console key {p} cannot be read: {exc}") from exc
    if not _KEY_HEX.match(text):
        raise ConfigurationError(
            f"the console key {p} must hold 64 to 128 lower-case hex digits (32 to 64 "
            "bytes); delete it to have a new one made (everyone signs in again)"
        )
    return bytes.fromhex(text)


def _create_key(path: Path) -> None:
    """Write a new key to ``path`` unless another process just did (never overwrites)."""
    try:
        private_dir(path.parent, warn=False)  # 0700 when new, like every data directory
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".console-", suffix=".key")
    except OSError as exc:
        raise ConfigurationError(f"cannot create the console key {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        # A hard link appears whole or not at all, and fails when the name exists: two
        # processes starting together end up with one key.
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigurationError(f"cannot create the console key {path}: {exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def _derive(key: bytes, purpose: bytes) -> bytes:
    return hmac.new(key, purpose, hashlib.sha256).digest()


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
