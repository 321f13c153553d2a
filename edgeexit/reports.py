"""Writing results: Markdown tables, JSON files, and accuracy-vs-compute PNGs (matplotlib imported lazily).

Benchmarks and `edgeexit evaluate` share these, so every report looks the same.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def fmt(value: Any, spec: str = ".4g") -> str:
    """A table cell: '-' for None, numbers formatted with ``spec``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, data: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return p


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


@dataclass
class Curve:
    label: str
    x: list[float]
    y: list[float]
    marker: str = "-"


def plot_curves(path: str | Path, curves: Sequence[Curve], xlabel: str, ylabel: str, title: str,
                points: Sequence[tuple[str, float, float]] = ()) -> Path:
    """Line plot of ``curves`` plus labelled single ``points`` (label, x, y); saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for c in curves:
        ax.plot(c.x, c.y, c.marker, label=c.label, linewidth=1.5, markersize=3)
    for label, x, y in points:
        ax.plot([x], [y], "k*", markersize=10)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p)
    plt.close(fig)
    return p
