"""``sagakit schemas check`` and ``sagakit schemas dump``: message schemas against a baseline.

``check`` compares a registry (``module:attribute``, the checkout's by default) with
the baseline committed next to its module and exits 1 on a breaking change; ``dump``
writes the baseline after an intended change. Needs the ``schemas`` extra (pydantic).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_REGISTRY = "sagakit_checkout.events:REGISTRY"
BASELINE_NAME = "schemas.baseline.json"


def register(sub: Any) -> None:
    """Add ``sagakit schemas check|dump`` to the ``sagakit`` parser's subcommands."""
    schemas = sub.add_parser(
        "schemas",
        help="check message schemas against the committed baseline, or write it",
        description="Every event and command has a versioned schema. 'check' fails (exit 1) "
        "on a change that breaks consumers: a removed type, version or field, a changed "
        "field type, a new required field without a default. 'dump' writes the baseline.",
    )
    actions = schemas.add_subparsers(dest="schemas_command", required=True)
    for name, help_text in (
        ("check", "compare the registry with the baseline; exit 1 on a breaking change"),
        ("dump", "write the registry as the new baseline"),
    ):
        p = actions.add_parser(name, help=help_text)
        p.add_argument(
            "--registry",
            default=DEFAULT_REGISTRY,
            help=f"module:attribute of a SchemaRegistry (default {DEFAULT_REGISTRY})",
        )
        p.add_argument(
            "--baseline",
            help=f"baseline file (default: {BASELINE_NAME} next to the registry's module)",
        )
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=_run)


def _load(spec: str) -> tuple[Any, Path]:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--registry must be module:attribute, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == "pydantic":
            raise ValueError(
                "message schemas need pydantic: pip install 'sagakit[schemas]'"
            ) from exc
        raise ValueError(f"cannot import {module_name!r}: {exc}") from exc
    registry = getattr(module, attr, None)
    if registry is None or not hasattr(registry, "snapshot"):
        raise ValueError(f"{spec!r} is not a SchemaRegistry")
    return registry, Path(module.__file__ or ".").parent / BASELINE_NAME


def _run(args: argparse.Namespace) -> int:
    try:
        from sagakit.schemas import compare, load_baseline, write_baseline

        registry, default_path = _load(args.registry)
    except (ValueError, ImportError) as exc:
        print(f"sagakit schemas: {exc}", file=sys.stderr)
        return 2
    path = Path(args.baseline) if args.baseline else default_path
    if args.schemas_command == "dump":
        write_baseline(registry, path)
        count = len(registry.snapshot()["messages"])
        if args.json:
            print(json.dumps({"baseline": str(path), "messages": count}))
        else:
            print(f"wrote {path}: {count} message types")
        return 0
    if not path.exists():
        print(
            f"sagakit schemas: no baseline at {path}; write one with 'sagakit schemas dump'",
            file=sys.stderr,
        )
        return 2
    result = compare(load_baseline(path), registry.snapshot())
    if args.json:
        print(
            json.dumps(
                {
                    "baseline": str(path),
                    "ok": result.ok,
                    "breaking": result.breaking,
                    "compatible": result.compatible,
                }
            )
        )
    else:
        print(f"sagakit schemas check {args.registry} against {path}")
        for line in result.breaking:
            print(f"  BREAKING  {line}")
        for line in result.compatible:
            print(f"  ok        {line}")
        if result.ok:
            print("  no breaking change" + ("" if result.compatible else "; nothing changed"))
    return 0 if result.ok else 1
