"""Statistics of the end-to-end benchmark: bootstrap intervals, the two oracles, the planner's cost-model error.

Input: the measured rows of one condition (every strategy on the same requests, interleaved). Output: per
strategy the mean and p95 latency with 95% bootstrap intervals, and per condition

- the **best static configuration in hindsight** (the static strategy with the lowest measured mean; itself a
  noisy estimate, biased low as the minimum of several noisy means) with its interval;
- the **per-request hindsight bound** (for each request the fastest strategy on that request; a true lower
  bound for any strategy that must choose before the request runs);
- adaptive / best static as a ratio of means with a *paired* bootstrap interval (the same requests are
  resampled for both), so "within noise" is decided by whether the interval contains 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

CONFIDENCE = 0.95


@dataclass
class StrategyStats:
    strategy: str
    n: int
    mean_ms: float
    mean_ci: tuple[float, float]
    p95_ms: float
    p95_ci: tuple[float, float]
    accuracy: float
    offloaded: float  # share of requests answered by the cloud
    fallbacks: float  # share of requests that fell back on the device
    bytes_mean: float
    splits: dict[str, int] = field(default_factory=dict)  # split the agent ran with -> requests
    predicted_ms: float | None = None  # the planner's expected latency for this strategy, when it has one


@dataclass
class ConditionStats:
    condition: str
    strategies: dict[str, StrategyStats]
    best_static: str
    hindsight_ms: float  # mean over requests of the fastest strategy on each request
    adaptive_over_best_static: dict[str, tuple[float, float, float]]  # name -> (ratio, lo, hi)
    winner_is_tie: bool  # the runner-up static strategy's interval overlaps the winner's


def _intervals(values: np.ndarray, rng: np.random.Generator, boots: int) -> tuple[tuple[float, float], ...]:
    idx = rng.integers(0, len(values), (boots, len(values)))
    resampled = values[idx]
    alpha = (1 - CONFIDENCE) / 2
    means = resampled.mean(axis=1)
    p95s = np.percentile(resampled, 95, axis=1)
    return (tuple(np.quantile(means, [alpha, 1 - alpha])), tuple(np.quantile(p95s, [alpha, 1 - alpha])))


def paired_ratio(num: np.ndarray, den: np.ndarray, rng: np.random.Generator, boots: int = 2000
                 ) -> tuple[float, float, float]:
    """mean(num) / mean(den) with a paired bootstrap interval (num[i] and den[i] are the same request)."""
    if len(num) != len(den) or len(num) == 0:
        raise ValueError("paired_ratio needs two equally long, non-empty series")
    idx = rng.integers(0, len(num), (boots, len(num)))
    ratios = num[idx].mean(axis=1) / den[idx].mean(axis=1)
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha])
    return float(num.mean() / den.mean()), float(lo), float(hi)


def strategy_stats(name: str, rows: Sequence, rng: np.random.Generator, boots: int = 2000) -> StrategyStats:
    wall = np.array([r.wall_ms for r in rows], float)
    mean_ci, p95_ci = _intervals(wall, rng, boots)
    splits: dict[str, int] = {}
    for r in rows:
        splits[r.split] = splits.get(r.split, 0) + 1
    return StrategyStats(
        strategy=name, n=len(rows), mean_ms=float(wall.mean()), mean_ci=_round(mean_ci),
        p95_ms=float(np.percentile(wall, 95)), p95_ci=_round(p95_ci),
        accuracy=float(np.mean([r.label == r.truth for r in rows])),
        offloaded=float(np.mean([r.decided == "cloud" for r in rows])),
        fallbacks=float(np.mean([r.fallback for r in rows])),
        bytes_mean=float(np.mean([r.bytes_sent for r in rows])), splits=dict(sorted(splits.items())))


def condition_stats(condition: str, rows: Iterable, static: Sequence[str], adaptive: Sequence[str],
                    seed: int = 0, boots: int = 2000) -> ConditionStats:
    """Everything the report says about one condition; ``static`` and ``adaptive`` name the strategies."""
    rng = np.random.default_rng(seed)
    by: dict[str, dict[int, object]] = {}
    for r in rows:
        by.setdefault(r.strategy, {})[r.index] = r
    common = sorted(set.intersection(*(set(v) for v in by.values())))
    if not common:
        raise ValueError(f"condition {condition}: no request was measured for every strategy")
    series = {s: np.array([by[s][i].wall_ms for i in common], float) for s in by}
    stats = {s: strategy_stats(s, [by[s][i] for i in common], rng, boots) for s in by}
    present = [s for s in static if s in stats]
    ranked = sorted(present, key=lambda s: stats[s].mean_ms)
    best = ranked[0]
    tie = len(ranked) > 1 and stats[ranked[1]].mean_ci[0] <= stats[best].mean_ci[1]
    hindsight = np.min(np.stack([series[s] for s in by]), axis=0)
    ratios = {a: paired_ratio(series[a], series[best], rng, boots) for a in adaptive if a in series}
    return ConditionStats(condition, stats, best, float(hindsight.mean()), ratios, tie)


def cost_model_error(conditions: Iterable[ConditionStats]) -> float | None:
    """Median over strategies x conditions of |predicted - measured| / measured (strategies with a prediction)."""
    errors = [abs(st.predicted_ms - st.mean_ms) / st.mean_ms for c in conditions for st in c.strategies.values()
              if st.predicted_ms is not None and st.mean_ms > 0]
    return float(np.median(errors)) if errors else None


def headline(conditions: Sequence[ConditionStats], planner: str, baselines: tuple[str, str] = ("device-only",
             "cloud-only")) -> dict[str, float | int | None]:
    """The benchmark's goal figures over all conditions (see `edgeexit bench --help`)."""
    over = [c.strategies[planner].mean_ms / c.strategies[c.best_static].mean_ms for c in conditions]
    speedup = [min(c.strategies[b].mean_ms for b in baselines) / c.strategies[planner].mean_ms for c in conditions]
    return {
        "worst_over_oracle": round(max(over), 4),
        "mean_over_oracle": round(float(np.mean(over)), 4),
        "distinct_winners": len({c.best_static for c in conditions}),
        "best_speedup_over_baselines": round(max(speedup), 4),
        "mean_speedup_over_baselines": round(float(np.mean(speedup)), 4),
        "cost_model_error": None if (e := cost_model_error(conditions)) is None else round(e, 4),
    }


def _round(pair: tuple[float, ...]) -> tuple[float, float]:
    return (round(float(pair[0]), 3), round(float(pair[1]), 3))
