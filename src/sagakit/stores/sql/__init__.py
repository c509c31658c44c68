"""sagakit's own SQL, kept as files beside this module and read once per process.

Per dialect (the file prefix: ``sqlite`` or ``postgres``):

- ``<dialect>_queries.sql``: every statement the store runs, each under a
  ``-- name: <name>`` line; :func:`named_queries` maps the names to their text.
- ``<dialect>_NNNN_<what>.sql``: sagakit's migration steps, numbered 1..n;
  :func:`engine_migrations` returns them in order.

A new query goes into both dialects' query files under the same name; a new table is
a new migration step in each dialect (never an edit of an applied one).
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable

from sagakit.errors import ConfigurationError

__all__ = ["DIALECTS", "engine_migrations", "named_queries"]

DIALECTS = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
"""File prefix -> the database's name in errors."""


def _sql_dir() -> Traversable:
    return resources.files(__name__)


@cache
def named_queries(dialect: str) -> dict[str, str]:
    """The statements of ``<dialect>_queries.sql`` by name, comment lines left out."""
    text = _sql_dir().joinpath(f"{dialect}_queries.sql").read_text(encoding="utf-8")
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", text, flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        queries[name.strip()] = "\n".join(lines).strip()
    return queries


@cache
def engine_migrations(dialect: str) -> tuple[str, ...]:
    """The scripts of sagakit's migration steps for ``dialect``, step 1 first."""
    pattern = re.compile(rf"{dialect}_(\d{{4}})_\w+\.sql")
    found = sorted(
        (int(match[1]), entry.name)
        for entry in _sql_dir().iterdir()
        if (match := pattern.fullmatch(entry.name))
    )
    # Step numbers are positions in the sequence, so the files must number 1..n.
    if [number for number, _ in found] != list(range(1, len(found) + 1)):
        raise ConfigurationError(
            f"sagakit's {DIALECTS[dialect]} migrations are not numbered 1..n: {found}"
        )
    return tuple(_sql_dir().joinpath(name).read_text(encoding="utf-8") for _, name in found)
