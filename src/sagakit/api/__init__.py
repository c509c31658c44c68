"""sagakit's HTTP API (the ``api`` extra: Starlette and uvicorn).

``create_app(engine, checkout=..., tokens=TokenStore.from_file(...))`` builds the
Starlette app over a running engine; ``sagakit serve`` runs the embedded checkout and
the API in one process. Authentication (:mod:`sagakit.api.auth`) needs only the
standard library, so it is importable without the extra; the web parts are imported
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sagakit.api.auth import Principal, Role, TokenEntry, TokenStore, generate_token, hash_token

if TYPE_CHECKING:
    from sagakit.api.app import create_app
    from sagakit.api.serve import serve

__all__ = [
    "Principal",
    "Role",
    "TokenEntry",
    "TokenStore",
    "create_app",
    "generate_token",
    "hash_token",
    "serve",
]


def __getattr__(name: str) -> Any:
    # Starlette and uvicorn load only when the web parts are asked for.
    if name == "create_app":
        from sagakit.api.app import create_app

        return create_app
    if name == "serve":
        from sagakit.api.serve import serve

        return serve
    raise AttributeError(f"module 'sagakit.api' has no attribute {name!r}")
