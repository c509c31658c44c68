"""Formatting shared by the report's sections: numbers, Markdown tables, paragraphs."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from _common import Result, summary


def fmt(v: float | None) -> str:
    """A number as the report prints it: whole numbers with separators, else 2-3 digits."""
    if v is None:
        return "—"
    if v == int(v) and abs(v) < 1e6:
        return f"{int(v):,}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> list[str]:
    """The lines of a Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def median(by_name: Mapping[str, Result], name: str) -> float | None:
    """The median over runs of the result called ``name``; None if absent or unmeasured."""
    r = by_name.get(name)
    return None if r is None else summary(r.values)["median"]


def per_run(
    outcomes: Sequence[Any], lines_of: Callable[[int, dict[str, Any]], list[str]]
) -> list[str]:
    """A list item per run: a failed run's error, else what ``lines_of`` says of its value."""
    out: list[str] = []
    for i, o in enumerate(outcomes, 1):
        if o.value is None:
            out.append(f"- run {i}: **failed**: {o.error}")
            continue
        out += lines_of(i, o.value)
    return out


def reflow(text: str, width: int = 92) -> str:
    """Re-wrap paragraphs and numbered items after the numbers were filled in."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        starts_item = bool(re.match(r"\d+\. ", line))
        if not line.strip() or line.startswith("#"):
            blocks.append([line])
            blocks.append([])
        elif starts_item or not blocks or not blocks[-1]:
            blocks.append([line])
        else:
            blocks[-1].append(line.strip())
    out: list[str] = []
    for block in blocks:
        if not block:
            continue
        first = block[0]
        if not first.strip() or first.startswith("#"):
            out.append(first)
            continue
        item = re.match(r"(\d+\. )", first)
        indent = " " * len(item.group(1)) if item else ""
        joined = " ".join([first.strip(), *block[1:]])
        out.append(textwrap.fill(joined, width, subsequent_indent=indent, break_on_hyphens=False))
    return "\n".join(out)
