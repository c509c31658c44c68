"""The wheel holds every package of the source tree.

``pyproject.toml`` lists the packages by name; an editable install finds a package
that is missing from that list anyway, so only a built wheel would show it gone."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _setuptools() -> dict[str, Any]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    tool: dict[str, Any] = config["tool"]["setuptools"]
    return tool


def _listed() -> set[str]:
    return set(_setuptools()["packages"])


def test_every_package_under_src_is_listed_for_the_wheel() -> None:
    src = ROOT / "src"
    found = {".".join(init.parent.relative_to(src).parts) for init in src.rglob("__init__.py")}
    assert "sagakit.stores.sqlite" in found
    missing = sorted(found - _listed())
    assert not missing, f"add these packages to [tool.setuptools] packages: {missing}"


def test_every_listed_package_exists() -> None:
    dirs = {"": ROOT / "src"}
    dirs.update((name, ROOT / path) for name, path in _setuptools()["package-dir"].items() if name)
    for package in _listed():
        top = package.split(".")[0]
        base = dirs[top] if top in dirs else dirs[""] / top
        folder = base.joinpath(*package.split(".")[1:])
        assert (folder / "__init__.py").is_file(), f"{package} is listed but has no {folder}"
