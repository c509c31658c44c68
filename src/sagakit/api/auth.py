"""Bearer tokens with roles, configured by the deployer and stored hashed.

Roles are ordered: ``viewer`` reads, ``operator`` also places orders and acts on
sagas, ``admin`` may do everything (including reading the API's audit trail). The
deployer lists tokens in a JSON file, one entry per holder, with the SHA-256 of the
token, never the token itself::

    {"tokens": [
      {"name": "ops-alice", "role": "operator", "sha256": "5e884898da28..."},
      {"name": "grafana",   "role": "viewer",   "sha256": "9f86d081884c..."}
    ]}

(a bare list of entries is accepted too). Make a token and its hash with
``python -c "from sagakit.api.auth import generate_token, hash_token as h;
t = generate_token(); print(t, h(t))"``. There is no way to switch authentication
off: a request without a valid token is refused with 401.

This module needs only the standard library, so the CLI can use it without the
``api`` extra.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sagakit.api.problems import ApiError
from sagakit.errors import ConfigurationError

TOKENS_FILE_ENV = "SAGAKIT_TOKENS_FILE"
"""The environment variable naming the tokens file (read by the CLI, at the edge)."""

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
    """One configured token: who holds it, its role, and the SHA-256 hex of the token."""

    name: str
    role: Role
    sha256: str

    def to_json(self) -> dict[str, str]:
        """The tokens-file form."""
        return {"name": self.name, "role": self.role.value, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the token's name (the actor of audited actions) and role."""

    name: str
    role: Role


def hash_token(token: str) -> str:
    """The SHA-256 hex digest of ``token``: what the tokens file stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def generate_token() -> str:
    """A new random token (256 bits, URL-safe)."""
    return "sk_" + secrets.token_urlsafe(32)


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
        return len(self._entries)

    @property
    def entries(self) -> tuple[TokenEntry, ...]:
        """The configured entries (hashes only)."""
        return self._entries

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
            if not isinstance(item, dict) or set(item) - {"name", "role", "sha256"}:
                raise ConfigurationError(
                    f"{source}: entry {i} must be an object with exactly name, role, sha256"
                )
            try:
                role = Role(str(item.get("role")))
            except ValueError:
                raise ConfigurationError(
                    f"{source}: entry {i} has role {item.get('role')!r}; "
                    f"use one of {[r.value for r in Role]}"
                ) from None
            entries.append(TokenEntry(str(item.get("name", "")), role, str(item.get("sha256", ""))))
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
        return {"tokens": [e.to_json() for e in self._entries]}

    def authenticate(self, token: str) -> Principal | None:
        """The holder of ``token``, or None. Every entry is compared, match or not."""
        digest = hash_token(token)
        found: TokenEntry | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return None if found is None else Principal(found.name, found.role)

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
        principal = None
        if scheme.lower() == "bearer" and _B64TOKEN.match(token):
            principal = self.authenticate(token)
        if principal is None:
            raise ApiError(
                401,
                "the bearer token is not valid (unknown, revoked or malformed)",
                headers={"WWW-Authenticate": 'Bearer realm="sagakit", error="invalid_token"'},
            )
        return principal


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
    p.parent.mkdir(parents=True, exist_ok=True)
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
