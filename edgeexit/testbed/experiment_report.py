"""Summaries of measured rows (edgeexit.testbed.experiment), derived strategies (best of a set: the oracle), ratios,
Markdown rows and the latency-vs-bandwidth PNG. Shared by ``edgeexit bench`` and ``benchmarks/planner.py``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgeexit.errors import ConfigError
from edgeexit.testbed.experiment import Sample

COLUMNS = ["condition", "strategy", "samples", "accuracy", "mean ms", "p95 ms", "median ms", "bytes sent/req",
           "device ms (emulated)", "cloud ms", "offloaded", "fallbacks", "splits used"]


@dataclass
class Summary:
    strategy: str
    condition: str
    samples: int
    accuracy: float
    mean_ms: float
    p95_ms: float
    bytes_per_request: float
    device_ms: float  # mean per request (EMULATED device when a device class is set)
    cloud_ms: float  # mean per request, from the service's own metrics
    offloaded: float  # fraction of requests answered by the cloud
    fallbacks: int
    splits: dict[str, int] = field(default_factory=dict)  # split used -> requests
    median_ms: float = 0.0  # robust to the scheduling hiccups of a shared machine (which emulation multiplies)
    picked: str = ""  # for a derived strategy (best of a set): the strategy it picked

    def row(self) -> list[str]:
        splits = ", ".join(f"{k}:{v}" for k, v in sorted(self.splits.items()))
        name = f"{self.strategy} (= {self.picked})" if self.picked else self.strategy
        return [self.condition, name, str(self.samples), f"{100 * self.accuracy:.1f}%", f"{self.mean_ms:.1f}",
                f"{self.p95_ms:.1f}", f"{self.median_ms:.1f}", f"{self.bytes_per_request:.0f}", f"{self.device_ms:.2f}",
                f"{self.cloud_ms:.2f}", f"{100 * self.offloaded:.0f}%", str(self.fallbacks), splits]


def summarize(rows: Sequence[Sample]) -> Summary:
    if not rows:
        raise ConfigError("no measured rows to summarize; give at least one sample")
    wall = np.array([r.wall_ms for r in rows])
    splits: dict[str, int] = {}
    for r in rows:
        splits[r.split] = splits.get(r.split, 0) + 1
    return Summary(
        strategy=rows[0].strategy, condition=rows[0].condition, samples=len(rows),
        accuracy=float(np.mean([r.label == r.truth for r in rows])), mean_ms=float(wall.mean()),
        p95_ms=float(np.percentile(wall, 95)), bytes_per_request=float(np.mean([r.bytes_sent for r in rows])),
        device_ms=float(np.mean([r.device_ms for r in rows])), cloud_ms=float(np.mean([r.cloud_ms for r in rows])),
        offloaded=float(np.mean([r.decided == "cloud" for r in rows])), fallbacks=sum(r.fallback for r in rows),
        splits=splits, median_ms=float(np.median(wall)),
    )


def summarize_all(rows: Iterable[Sample]) -> dict[str, dict[str, Summary]]:
    """condition -> strategy -> Summary (insertion order kept)."""
    groups: dict[str, dict[str, list[Sample]]] = {}
    for r in rows:
        groups.setdefault(r.condition, {}).setdefault(r.strategy, []).append(r)
    return {c: {s: summarize(g) for s, g in by.items()} for c, by in groups.items()}


def best_of(by_strategy: dict[str, Summary], names: Iterable[str], label: str) -> Summary:
    """The measured strategy with the lowest mean latency among ``names``, relabelled ``label``."""
    pool = [by_strategy[n] for n in names if n in by_strategy]
    if not pool:
        raise ConfigError(f"{label}: none of the strategies it picks from was measured")
    best = min(pool, key=lambda s: s.mean_ms)
    return replace(best, strategy=label, picked=best.strategy)


def ratio_stats(ratios: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(ratios, float)
    return {"worst": float(arr.max()), "mean": float(arr.mean()), "best": float(arr.min())}


def markdown(summaries: Iterable[Summary]) -> str:
    from edgeexit.reports import markdown_table

    return markdown_table(COLUMNS, [s.row() for s in summaries])


def plot_latency_vs_bandwidth(path: str | Path, panels: dict[str, dict[str, list[tuple[float, float]]]],
                              title: str) -> Path:
    """One panel per group (e.g. per RTT): mean latency (ms, log) vs uplink bandwidth (Mbit/s, log) per strategy."""
    from edgeexit.reports import bandwidth_axes, figure

    with figure(path, len(panels), size=(5.2 * len(panels), 4.4), dpi=110, title=title) as axes:
        for ax, (panel, series) in zip(axes, panels.items(), strict=True):
            for name, points in series.items():
                pts = sorted(points)
                bold = name.startswith(("edgeexit", "planner"))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                        linewidth=2.5 if bold else 1.2, linestyle="--" if name.startswith("oracle") else "-",
                        label=name)
            bandwidth_axes(ax, "measured mean latency per request (ms)", panel)
        axes[0].legend(fontsize=7)
    return Path(path)
