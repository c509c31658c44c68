"""``--app module:attribute`` for the commands that run an app, and the app's own options.

The app is loaded before the parser is built (:func:`prescan`), so that its options
(:class:`~sagakit.app.AppOption`) are real flags of the command: they show in
``--help``, get argparse's type checks, and read their environment variables.
``demo`` and ``serve`` run the reference checkout when no app is named; the production
commands (``worker``, ``relay``, ``service``, ``versions``) need ``--app`` or
``SAGAKIT_APP``. As with uvicorn, the current directory is importable: ``--app
myproject.sagas:app`` finds ``./myproject`` without setting ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sagakit.app import APP_COMMANDS, App, load_app
from sagakit.errors import ConfigurationError

APP_ENV = "SAGAKIT_APP"
DEFAULT_APPS = {"demo": "sagakit_checkout:app", "serve": "sagakit_checkout:app"}
"""The app of a command when neither ``--app`` nor ``SAGAKIT_APP`` names one."""


def app_spec(command: str, argv: Sequence[str] = ()) -> str | None:
    """The ``module:attribute`` a command runs: ``--app``, else ``SAGAKIT_APP``, else the
    command's default (None: the command needs one)."""
    for i, arg in enumerate(argv):
        if arg == "--app" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--app="):
            return arg[len("--app=") :]
    return os.environ.get(APP_ENV) or DEFAULT_APPS.get(command)


def _load(spec: str) -> App:
    """:func:`load_app` with the current directory importable (the command line's habit)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return load_app(spec)


@dataclass(frozen=True, slots=True)
class Prescan:
    """The app command found in an argv, and its app (or why it did not load)."""

    command: str | None
    app: App | None
    error: str | None


def prescan(argv: Sequence[str]) -> Prescan:
    """Find the command in ``argv`` and load its app, before any parsing."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in APP_COMMANDS:
        return Prescan(command, None, None)
    spec = app_spec(command, argv)
    if spec is None:
        return Prescan(command, None, None)
    try:
        return Prescan(command, _load(spec), None)
    except ConfigurationError as exc:
        return Prescan(command, None, str(exc))


def default_app(command: str) -> App | None:
    """The app a command runs without ``--app`` (None if none, or if it cannot load)."""
    spec = app_spec(command)
    if spec is None:
        return None
    try:
        return _load(spec)
    except ConfigurationError:
        return None


def add_app_argument(parser: argparse.ArgumentParser, command: str) -> None:
    """``--app module:attribute`` (env ``SAGAKIT_APP``)."""
    default = DEFAULT_APPS.get(command)
    parser.add_argument(
        "--app",
        default=os.environ.get(APP_ENV) or default,
        metavar="MODULE:ATTRIBUTE",
        help="the app to run, e.g. myproject.sagas:app (env SAGAKIT_APP"
        + (f"; default {default}, the reference checkout)" if default else "; required)"),
    )


def add_app_options(parser: argparse.ArgumentParser, command: str, app: App | None) -> None:
    """The options ``app`` declares for ``command``, as flags of ``parser``."""
    if app is None:
        return
    group = parser.add_argument_group(f"options of app {app.name!r}")
    for o in app.options:
        if command not in o.commands:
            continue
        default: Any = o.default
        if o.env and os.environ.get(o.env):
            default = os.environ[o.env]  # argparse applies ``type`` to a string default
        env = f" (env {o.env})" if o.env else ""
        try:
            group.add_argument(
                o.flag,
                dest=o.name,
                type=o.type,
                default=default,
                choices=list(o.choices) if o.choices else None,
                help=o.help + env,
            )
        except argparse.ArgumentError as exc:
            raise ConfigurationError(
                f"app {app.name!r}: option {o.flag} clashes with sagakit {command}'s own "
                f"options ({exc}); rename it"
            ) from None


def options_of(args: argparse.Namespace, command: str, app: App) -> dict[str, Any]:
    """The values of ``app``'s options for ``command`` from parsed ``args``."""
    return {o.name: getattr(args, o.name, o.default) for o in app.options if command in o.commands}


def loaded(args: argparse.Namespace, command: str) -> App:
    """The app of parsed ``args`` (``--app``); a clear error when none is named."""
    if not args.app:
        raise ConfigurationError(
            f"--app is required: the app to run, as module:attribute (e.g. "
            f"myproject.sagas:app), or set {APP_ENV}"
        )
    return _load(args.app)
