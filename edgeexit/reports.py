"""Writing results: Markdown tables, JSON files, and PNG figures (matplotlib imported lazily, Agg backend).

Every report (evaluate, calibrate, plan, the demo, bench, the benchmarks) writes its tables and figures
through these, so they all look the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 0) -> str:
    """A Markdown table; the first ``left`` columns (names) align left, the rest (numbers) right."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if k < left else "---:" for k in range(len(headers))) + "|"]
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


@contextmanager
def figure(path: str | Path, panels: int = 1, size: tuple[float, float] = (7, 4.5), dpi: int = 120,
           title: str = "") -> Iterator[list[Any]]:
    """``panels`` matplotlib axes side by side; the figure is saved as a PNG at ``path`` when the block ends
    (and closed either way). The Agg backend: files only, never a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=size, dpi=dpi, squeeze=False)
    try:
        yield list(axes[0])
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p)
    finally:
        plt.close(fig)


def bandwidth_axes(ax: Any, ylabel: str, title: str) -> None:
    """Log-log axes of a latency against the uplink bandwidth (the planner's and the testbed's figures)."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("uplink bandwidth (Mbit/s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)


def plot_curves(path: str | Path, curves: Sequence[Curve], xlabel: str, ylabel: str, title: str,
                points: Sequence[tuple[str, float, float]] = ()) -> Path:
    """Line plot of ``curves`` plus labelled single ``points`` (label, x, y); saved as PNG."""
    with figure(path) as (ax,):
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
    return Path(path)
