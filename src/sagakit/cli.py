"""The ``sagakit`` command line.

Environment variables (prefix ``SAGAKIT_``) are read here, at the edge, and nowhere in
the library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _configure_logging(data_dir: Path | None, level: str) -> None:
    # The library installs no handlers; the CLI decides where logs go. Without this,
    # Python's last-resort handler would print injected-fault warnings over the demo.
    root = logging.getLogger("sagakit")
    root.setLevel(level)
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(data_dir / "sagakit.log")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.propagate = False


def _demo(args: argparse.Namespace) -> int:
    from sagakit_checkout.demo import render, run_demo, stderr_progress

    data_dir = Path(args.data_dir) if args.data_dir else None
    _configure_logging(data_dir, args.log_level)
    try:
        result = asyncio.run(
            run_demo(
                orders=args.orders,
                faults=args.faults,
                seed=args.seed,
                data_dir=data_dir,
                progress=stderr_progress(),
                synchronous=args.synchronous,
                timeout=args.timeout,
            )
        )
    except (ValueError, RuntimeError) as exc:
        print(f"sagakit demo: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), sort_keys=False))
    else:
        print(render(result))
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="sagakit", description="Durable sagas for Python.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="run the embedded checkout demo and check its invariants",
        description="Place orders through the orchestrated checkout (four services, each "
        "with its own SQLite database), inject faults, and check the invariants from the "
        "services' own ledgers. Exit status 1 if any invariant fails.",
    )
    demo.add_argument("--orders", type=int, default=200, help="how many orders (default 200)")
    demo.add_argument("--faults", choices=["none", "default", "chaos"], default="default")
    demo.add_argument("--seed", type=int, default=int(os.environ.get("SAGAKIT_SEED", "0")))
    demo.add_argument(
        "--data-dir",
        default=os.environ.get("SAGAKIT_DATA_DIR"),
        help="keep the databases here; rerun after a crash to resume (default: a temp dir)",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.add_argument(
        "--synchronous",
        choices=["FULL", "NORMAL"],
        default="FULL",
        help="SQLite durability: FULL survives power loss, NORMAL survives kill -9",
    )
    demo.add_argument(
        "--timeout", type=float, default=600.0, help="give up waiting after this many seconds"
    )
    demo.add_argument("--log-level", default=os.environ.get("SAGAKIT_LOG_LEVEL", "INFO"))
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sagakit`` command."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
