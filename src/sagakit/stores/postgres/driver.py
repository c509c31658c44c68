"""What the PostgreSQL store needs of psycopg: the optional-driver guard, the
driver's types, qmark parameters rewritten for psycopg, and driver errors as sagakit's.

psycopg 3 and psycopg-pool come with the ``sagakit[postgres]`` extra. Without them the
store's package still imports; building a :class:`~sagakit.stores.postgres.PostgresStore`
calls :func:`require_driver`, which names the extra. The store's other modules take
``psycopg``, ``psycopg_pool`` and ``sql`` from here: this is the one place that tries
to import the driver.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeAlias

from sagakit.errors import ConcurrencyError, ConfigurationError, StoreError

# The driver is optional: `import sagakit` never imports this package, and a missing
# extra is reported when a PostgresStore is built (require_driver).
_MISSING_DRIVER: ImportError | None = None
try:
    import psycopg
    import psycopg_pool
    from psycopg import sql
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    _MISSING_DRIVER = exc
    if not TYPE_CHECKING:
        # Bound all the same, so that the store's modules can import them from here;
        # nothing uses them before require_driver() has passed.
        psycopg = psycopg_pool = sql = None

if TYPE_CHECKING:
    _Conn: TypeAlias = psycopg.AsyncConnection[tuple[Any, ...]]
    _Pool: TypeAlias = psycopg_pool.AsyncConnectionPool[_Conn]
    _Cursor: TypeAlias = psycopg.AsyncCursor[tuple[Any, ...]]

_Params: TypeAlias = "Sequence[Any] | Mapping[str, Any]"

__all__ = [
    "log",
    "psycopg",
    "psycopg_pool",
    "qmark_to_psycopg",
    "require_driver",
    "sql",
    "translate_error",
]

# The backend's one logger, named after its package (as when it was one module).
log = logging.getLogger("sagakit.stores.postgres")


def require_driver() -> None:
    """Raise :class:`~sagakit.errors.ConfigurationError` naming the ``sagakit[postgres]``
    extra if psycopg 3 or psycopg-pool could not be imported."""
    if _MISSING_DRIVER is not None:
        raise ConfigurationError(
            "PostgresStore needs psycopg 3 and psycopg-pool: install the "
            f"`sagakit[postgres]` extra (pip install 'sagakit[postgres]'); {_MISSING_DRIVER}"
        )


# -- qmark parameters ----------------------------------------------------------------

# Whatever may contain a "?" that is not a parameter, or a "%" psycopg would misread.
# An E-string or dollar quote must not continue an identifier (date'...' is no E-string).
_SQL_TOKEN = re.compile(
    r"""
      (?<![\w$])[Ee]'(?:[^'\\]|\\.|'')*'?   # escape string: backslash escapes
    | '(?:[^']|'')*'?                       # string literal
    | "(?:[^"]|"")*"?                       # quoted identifier
    | --[^\n]*                              # line comment
    | /\*                                   # block comment (they nest)
    | (?<![\w$])\$(?:[A-Za-z_]\w*)?\$       # dollar quote, opening tag
    | \?\d*                                 # qmark parameter (numbered: refused)
    | %                                     # psycopg's placeholder mark
    """,
    re.VERBOSE | re.DOTALL,
)
_BLOCK_COMMENT = re.compile(r"/\*|\*/")


@lru_cache(maxsize=4096)
def qmark_to_psycopg(query: str) -> str:
    """Rewrite SQLite-style ``?`` parameters as psycopg's ``%s`` (cached per string).

    A ``?`` inside a string literal, quoted identifier, comment or dollar-quoted body
    stays as it is, and every ``%`` becomes ``%%`` (psycopg reads ``%`` everywhere,
    literals included). PostgreSQL's JSON operators ``?``, ``?|`` and ``?&`` cannot be
    told from a parameter: write ``jsonb_exists(doc, key)`` and friends instead.
    """
    if "?" not in query and "%" not in query:
        return query
    out: list[str] = []
    pos = 0
    while (match := _SQL_TOKEN.search(query, pos)) is not None:
        token, start, end = match.group(), match.start(), match.end()
        out.append(query[pos:start])
        if token == "?":
            out.append("%s")
        elif token.startswith("?"):
            raise StoreError(
                f"numbered parameter {token!r} is not supported by PostgresStore; "
                f"use plain ? parameters in order (in {query[:200]!r})"
            )
        elif token == "%":
            out.append("%%")
        else:
            if token == "/*":
                end = _block_comment_end(query, end)
            elif token.startswith("$"):
                close = query.find(token, end)
                end = len(query) if close < 0 else close + len(token)
            out.append(query[start:end].replace("%", "%%"))
        pos = end
    out.append(query[pos:])
    return "".join(out)


def _block_comment_end(query: str, pos: int) -> int:
    depth = 1
    while depth and (match := _BLOCK_COMMENT.search(query, pos)) is not None:
        depth += 1 if match.group() == "/*" else -1
        pos = match.end()
    return pos if depth == 0 else len(query)


# -- errors --------------------------------------------------------------------------

# Lost a race with another transaction: retrying the transaction is the remedy.
_CONFLICT_STATES = {
    "23505": "a unique key is already taken",
    "40001": "serialization failure",
    "40P01": "deadlock detected",
    "55P03": "lock not available",
}


# The SQLSTATEs of sagakit_refuse, raised by a transaction's last flush (see buffer.py).
_REFUSED = "SK001"  # sagakit_refuse: a buffered saga write did not apply (migration 0005)
_RECORDED = "SK002"  # sagakit_refuse: a buffered idempotency key was recorded before


def translate_error(store: str, what: str, exc: Exception) -> StoreError:
    """A driver error as sagakit's :class:`StoreError` (raise it ``from exc``).

    Unique violations, serialization failures, deadlocks and lock timeouts become
    :class:`ConcurrencyError` (another transaction won; retry); everything else,
    :class:`StoreError`.
    """
    state: str | None = getattr(exc, "sqlstate", None)
    if state in (_REFUSED, _RECORDED):  # sagakit_refuse: its message says what and why
        diag = getattr(exc, "diag", None)
        said = getattr(diag, "message_primary", None) or str(exc)
        return ConcurrencyError(said) if state == _REFUSED else StoreError(said)
    detail = " ".join(str(exc).split()) or type(exc).__name__
    message = f"PostgreSQL store {store!r} could not {what}: {detail}"
    if state is not None:
        message += f" (SQLSTATE {state})"
    if state in _CONFLICT_STATES:
        return ConcurrencyError(f"{message}; {_CONFLICT_STATES[state]}: retry the transaction")
    if state == "25P02":
        message += "; an earlier statement of this transaction failed, so it can only roll back"
    return StoreError(message)
