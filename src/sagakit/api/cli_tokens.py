"""``sagakit tokens add|list|rotate|remove``: the API's bearer tokens, edited on disk.

Each token has a name, its holder's: the actor recorded in the audit trail for every
decision taken with it (``GET /audit?actor=NAME``). ``remove`` (also spelled
``revoke``) deletes a token; a file whose entries have no name loads with names derived
from their hashes (:func:`~sagakit.api.auth.derived_name`), written into the file at
the next change.

The commands edit the tokens file that ``sagakit serve`` reads (``--tokens-file``, else
``$SAGAKIT_TOKENS_FILE``, else ``<data-dir>/tokens.json``: the same resolution,
:func:`sagakit.api.auth.tokens_path`). ``add`` and ``rotate`` print the new token once
and store only its SHA-256; ``list`` shows names, roles, expiries and the first eight
hex digits of each hash as an id, never a whole hash. A running server notices the
change within about a second (:class:`~sagakit.api.auth.WatchedTokenStore`): a revoked
token is refused from then on, no restart needed.

Each change is one read-modify-write under ``flock`` on ``<tokens file>.lock`` (two
commands at once take turns; the second sees the first's change), and the file is
replaced atomically (:func:`~sagakit.api.auth.write_tokens_file`, mode 0600), so the
server never reads half a file. Only the standard library is needed.

Exit status: 0 on success, 2 for a usage error (unknown or repeated name, bad role,
missing file or directory, a file that cannot be parsed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sagakit.api.auth import (
    Role,
    TokenEntry,
    TokenStore,
    generate_token,
    hash_token,
    tokens_file_lock,
    tokens_path,
    write_tokens_file,
)
from sagakit.errors import ConfigurationError

DAY = 86400.0
ID_LENGTH = 8
"""Hex digits of a token's hash shown as its id."""


class _Refused(Exception):
    """A usage error, shown on stderr with exit status 2."""


def _path(args: argparse.Namespace) -> Path:
    return tokens_path(args.data_dir, args.tokens_file)


def _load(path: Path) -> TokenStore:
    if not path.exists():
        raise _Refused(
            f"tokens file {path} does not exist (pass --data-dir or --tokens-file; "
            "`sagakit tokens add` creates it)"
        )
    return TokenStore.from_file(path)


def _when(at: float | None) -> str:
    if at is None:
        return "never"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _expiry(days: float | None) -> float | None:
    if days is None:
        return None
    if not days > 0:
        raise _Refused(f"--expires-in must be a positive number of days, got {days}")
    return round(time.time() + days * DAY)


def _find(store: TokenStore, name: str, path: Path) -> int:
    for i, entry in enumerate(store.entries):
        if entry.name == name:
            return i
    names = ", ".join(e.name for e in store.entries) or "none"
    raise _Refused(f"no token named {name!r} in {path} (tokens: {names})")


def _described(entry: TokenEntry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "role": entry.role.value,
        "id": entry.sha256[:ID_LENGTH],
        "expires_at": entry.expires_at,
        "expired": entry.expired(),
    }


def _show_new(
    args: argparse.Namespace, entry: TokenEntry, token: str, path: Path, verb: str
) -> None:
    note = f"the token will not be shown again: only its SHA-256 is kept in {path}"
    if args.json:
        print(json.dumps({**_described(entry), "token": token, "tokens_file": str(path)}))
        print(note, file=sys.stderr)
        return
    expires = "no expiry" if entry.expires_at is None else f"expires {_when(entry.expires_at)}"
    ident = entry.sha256[:ID_LENGTH]
    print(f"{verb} token {entry.name!r} (role {entry.role.value}, {expires}, id {ident}):")
    print(f"  {token}")
    print(note)


def _add(args: argparse.Namespace) -> None:
    path = _path(args)
    if not path.parent.is_dir():
        raise _Refused(f"directory {path.parent} does not exist (the tokens file goes there)")
    expires_at = _expiry(args.expires_in)
    token = generate_token()
    entry = TokenEntry(args.name, Role(args.role), hash_token(token), expires_at)
    with tokens_file_lock(path):
        entries = list(_load(path).entries) if path.exists() else []
        if any(e.name == args.name for e in entries):
            raise _Refused(
                f"a token named {args.name!r} exists in {path}; "
                "use `sagakit tokens rotate` for a new token, or another name"
            )
        write_tokens_file(path, TokenStore([*entries, entry]))  # checks the name
    _show_new(args, entry, token, path, "new")


def _rotate(args: argparse.Namespace) -> None:
    path = _path(args)
    token = generate_token()
    with tokens_file_lock(path):
        store = _load(path)
        entries = list(store.entries)
        i = _find(store, args.name, path)
        old = entries[i]
        if args.expires_in is not None:
            expires_at = _expiry(args.expires_in)
        elif old.expired():
            raise _Refused(
                f"token {args.name!r} expired at {_when(old.expires_at)}; "
                "pass --expires-in DAYS for the new one"
            )
        else:
            expires_at = old.expires_at
        entries[i] = TokenEntry(old.name, old.role, hash_token(token), expires_at)
        write_tokens_file(path, TokenStore(entries))
    _show_new(args, entries[i], token, path, "rotated")


def _revoke(args: argparse.Namespace) -> None:
    path = _path(args)
    with tokens_file_lock(path):
        store = _load(path)
        gone = store.entries[_find(store, args.name, path)]
        left = [e for e in store.entries if e.name != args.name]
        write_tokens_file(path, TokenStore(left))
    verb = "removed" if args.tokens_command == "remove" else "revoked"
    if args.json:
        print(json.dumps({verb: _described(gone), "left": len(left)}))
    else:
        print(f"{verb} token {gone.name!r} (role {gone.role.value}, id {gone.sha256[:ID_LENGTH]})")
    if not left:
        print(
            f"warning: {path} lists no tokens now: the API refuses every request "
            "(add one with `sagakit tokens add`)",
            file=sys.stderr,
        )


def _list(args: argparse.Namespace) -> None:
    path = _path(args)
    entries = _load(path).entries
    if args.json:
        print(json.dumps({"tokens_file": str(path), "tokens": [_described(e) for e in entries]}))
        return
    if not entries:
        print(f"no tokens in {path}")
        return
    rows = [["NAME", "ROLE", "ID", "EXPIRES"]]
    for e in entries:
        expires = _when(e.expires_at) + (" (expired)" if e.expired() else "")
        rows.append([e.name, e.role.value, e.sha256[:ID_LENGTH], expires])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


_COMMANDS = {"add": _add, "list": _list, "rotate": _rotate, "remove": _revoke, "revoke": _revoke}


def _run(args: argparse.Namespace) -> int:
    try:
        _COMMANDS[args.tokens_command](args)
    except (_Refused, ConfigurationError) as exc:
        print(f"sagakit tokens {args.tokens_command}: {exc}", file=sys.stderr)
        return 2
    return 0


def register(subparsers: Any) -> None:
    """Add ``tokens add|list|rotate|remove`` to the command line."""
    tokens = subparsers.add_parser(
        "tokens",
        help="add, list, rotate or remove the API's bearer tokens",
        description="Edit the tokens file of `sagakit serve` (only SHA-256 hashes are "
        "stored). A running server picks the change up within about a second.",
    )
    sub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-dir",
            default=os.environ.get("SAGAKIT_DATA_DIR", "sagakit-data"),
            help="the server's data directory: its tokens.json (default $SAGAKIT_DATA_DIR "
            "or %(default)s)",
        )
        p.add_argument(
            "--tokens-file",
            default=None,
            help="the tokens file (default $SAGAKIT_TOKENS_FILE, else <data-dir>/tokens.json)",
        )
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=_run)

    add = sub.add_parser(
        "add", help="add a token and print it once", description="Add a token; print it once."
    )
    add.add_argument("name", help="who holds it (1-64 of A-Z a-z 0-9 _.@:-; audits show it)")
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    add.add_argument(
        "--expires-in", type=float, metavar="DAYS", help="refuse it after DAYS (default: never)"
    )
    common(add)
    lst = sub.add_parser("list", help="list the tokens (never their hashes)")
    common(lst)
    rotate = sub.add_parser(
        "rotate",
        help="replace a token by a new one (same name and role) and print it once",
        description="Replace a token by a new one with the same name and role; the old "
        "one stops working.",
    )
    rotate.add_argument("name")
    rotate.add_argument(
        "--expires-in",
        type=float,
        metavar="DAYS",
        help="the new token's lifetime (default: the old token's expiry)",
    )
    common(rotate)
    remove = sub.add_parser(
        "remove",
        aliases=["revoke"],
        help="remove a token: it stops working",
        description="Remove a token from the file: it stops working (and its console "
        "sessions end) within about a second. Its name stays in the audit trail.",
    )
    remove.add_argument("name")
    common(remove)
