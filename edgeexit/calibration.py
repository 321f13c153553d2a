"""Risk-controlled calibration of exit thresholds (Learn-then-Test with fixed-sequence testing, as in CALM).

Guarantee. With probability at least ``1 - delta`` over the draw of the calibration sample (i.i.d. from the
deployment distribution), the chosen thresholds have risk at most ``epsilon``, where the risk is
- ``consistency`` mode: the fraction of inputs whose early-exit answer differs from the final exit's answer;
- ``accuracy`` mode (needs labels): the fraction of inputs the final exit gets right but the early-exit answer
  gets wrong. Its mean bounds the accuracy loss against the final exit from above (a row the early exit
  fixes only helps), so the accuracy drop is <= epsilon with the same probability.

Two schemes; both test an ORDERED sequence of threshold settings from conservative to aggressive:
- ``pareto`` (default; per-exit thresholds, Pareto Testing, Laufer-Goldshtein et al. 2023): the calibration
  rows are split once, with a fixed seed, into a *learn* part (``learn_fraction``) and a *test* part. Every
  combination of per-exit thresholds from a fixed per-exit grid is scored on the learn part (risk, and cost =
  expected executed FLOPs); its Pareto front, ordered by learn risk, is the sequence. The test part never
  influenced the sequence, so testing it there is valid. Exits that are already accurate get aggressive
  thresholds without paying for the weak ones. Used up to 3 early exits (the grid grows as G^exits).
- ``shared``: one parameter ``lambda`` over a fixed grid (confidence/margin/patience/ensemble: ``1 - 1e-6``
  down to 0; entropy: ``1e-6`` up to 1), every early exit using ``tau_j = lambda`` (CALM shares one threshold
  across layers); all rows are test rows. Used beyond 3 early exits or on request.
Then, for each setting in order, test H0: risk > epsilon with the exact binomial p-value
``P(Binomial(n, epsilon) <= k)`` (k losses among the n test rows; in log space, no scipy) and reject when
p <= delta. Fixed-sequence testing stops at the first setting not rejected; the chosen one is the last
rejected. This controls the family-wise error at delta without any multiplicity correction. If not even the
first setting is rejected, calibration says so and stores the explicit "never exit early" policy.
Torch-free (numpy only).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeexit.early_exit import ExitTrace
from edgeexit.errors import ConfigError
from edgeexit.policies import KINDS, LOWER_IS_BETTER, ExitPolicy, make_policy, never_exit

if TYPE_CHECKING:
    from edgeexit.bundle import Manifest

MODES = ("consistency", "accuracy")
SCHEMES = ("pareto", "shared")
MAX_PARETO_EXITS = 3
FORBIDDEN_SPLITS = {
    "train": "the model was trained on it, so its exits are over-confident there and the bound would not hold",
    "test": "it is reserved for evaluation; calibrating on it would make the evaluation optimistic",
}


# ---------------------------------------------------------------- binomial tail, exact, in log space


def _log_factorials(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), exact up to float rounding (log-space sum of the pmf)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lf = _log_factorials(n)
    i = np.arange(0, k + 1)
    logpmf = lf[n] - lf[i] - lf[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    m = logpmf.max()
    return float(min(1.0, math.exp(m) * np.exp(logpmf - m).sum()))


def binom_pvalue(k: int, n: int, epsilon: float) -> float:
    """p-value of H0: risk > epsilon after observing k losses in n rows (valid: P(Bin(n, r) <= k) <= this)."""
    return binom_cdf(k, n, epsilon)


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """One-sided (1 - delta) Clopper-Pearson upper bound on a rate after k events in n trials."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):  # bisection: binom_cdf is decreasing in p
        mid = (lo + hi) / 2
        if binom_cdf(k, n, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def fixed_sequence_test(losses: np.ndarray, n: int, epsilon: float, delta: float) -> tuple[int, list[float]]:
    """Test grid points in order; return (index of the last rejected null or -1, p-values computed so far)."""
    pvalues: list[float] = []
    last = -1
    for g, k in enumerate(np.asarray(losses).tolist()):
        p = binom_pvalue(int(k), n, epsilon)
        pvalues.append(p)
        if p > delta:
            break
        last = g
    return last, pvalues


# ---------------------------------------------------------------- grid and losses


def lambda_grid(kind: str) -> np.ndarray:
    """The fixed grid of the shared parameter, conservative first."""
    fine = np.logspace(-6, -1, 26)  # 1e-6 .. 0.1: most of the action for well-trained exits
    coarse = np.linspace(0.1, 1.0, 37)[1:]
    up = np.concatenate([fine, coarse])  # entropy: small is conservative
    return up if kind in LOWER_IS_BETTER else 1.0 - up


def pareto_path(trace: ExitTrace, y: np.ndarray | None, mode: str, costs: np.ndarray,
                learn: np.ndarray) -> np.ndarray:
    """Per-exit threshold settings [S, early exits] on the learn rows' Pareto front, lowest risk first."""
    num_early = trace.scores.shape[0]
    grid = lambda_grid(trace.policy.kind)
    if num_early == 3:
        grid = grid[::4]  # 16^3 combinations instead of 62^3
    settings = np.array(list(itertools.product(grid, repeat=num_early)), np.float64)
    sub = trace.subset(learn)
    final = sub.labels[-1]
    y_learn = None if y is None else y[learn]
    risk, cost = np.empty(len(settings)), np.empty(len(settings))
    for i, th in enumerate(settings):
        lab, ex = sub.apply(th)
        risk[i] = row_losses(lab, final, y_learn, mode).mean()
        cost[i] = costs[ex].mean()
    front, best = [], np.inf
    for i in np.lexsort((cost, risk)):  # by risk, then cost: keep each setting cheaper than every safer one
        if cost[i] < best - 1e-12:
            front.append(i)
            best = cost[i]
    return settings[front]


def thresholds_for(lam: float, num_early: int) -> list[float]:
    """The "shared" scheme: every early exit gets the same threshold."""
    return [float(lam)] * num_early


def row_losses(labels: np.ndarray, final: np.ndarray, y: np.ndarray | None, mode: str) -> np.ndarray:
    """bool[N] loss per row: disagreement with the final exit, or (accuracy) a right answer turned wrong."""
    if mode == "consistency":
        return labels != final
    if y is None:
        raise ConfigError("accuracy mode needs labels; use --mode consistency for unlabelled data")
    return (final == y) & (labels != y)


@dataclass
class CalibrationOptions:
    kind: str = "confidence"
    epsilon: float = 0.01
    delta: float = 0.05
    mode: str = "consistency"
    params: dict[str, Any] = field(default_factory=dict)  # policy parameters (patience k, ensemble weights)
    scheme: str = "pareto"  # or "shared"; see the module docstring
    learn_fraction: float = 0.3  # pareto: share of the calibration rows that only shape the sequence
    seed: int = 0  # pareto: the learn/test partition

    def rows_needed(self) -> int:
        """The fewest calibration rows with which even a zero-loss setting can pass (the pareto scheme tests only
        the rows it did not learn on): below it calibration can only answer "never exit early"."""
        min_test = math.ceil(math.log(self.delta) / math.log1p(-self.epsilon))
        if self.scheme != "pareto":
            return min_test
        n = math.ceil(min_test / (1.0 - self.learn_fraction))
        while n - int(round(n * self.learn_fraction)) < min_test:  # calibrate() rounds the learn part
            n += 1
        return n

    def check(self) -> None:
        if self.kind not in KINDS or self.kind == "never":
            raise ConfigError(f"unknown policy {self.kind!r} to calibrate; choose one of "
                              f"{', '.join(k for k in KINDS if k != 'never')}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown calibration mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not 0.0 < self.epsilon < 1.0:
            raise ConfigError(f"--epsilon must be in (0, 1) (a risk level such as 0.01), got {self.epsilon}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"--delta must be in (0, 1) (a failure probability such as 0.05), got {self.delta}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown calibration scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if not 0.05 <= self.learn_fraction <= 0.7:
            raise ConfigError(f"learn_fraction must be in [0.05, 0.7], got {self.learn_fraction}")


def check_split(split: str) -> None:
    """Refuse train and test; ``val`` (a named dataset's calibration split) and ``all`` (a user file) pass."""
    if split in FORBIDDEN_SPLITS:
        raise ConfigError(f"refusing to calibrate on the {split!r} split: {FORBIDDEN_SPLITS[split]}. "
                          "Use --split val (carved from the training data and never trained on)")


@dataclass
class GridLosses:
    """Every setting applied to every row once: reused by calibration and by the repeated-split test."""

    settings: np.ndarray  # float[G, early exits]: the thresholds of each setting, conservative first
    losses: np.ndarray  # bool[G, N]
    exit_index: np.ndarray  # int[G, N]
    labels: np.ndarray  # int[G, N]


def grid_losses(trace: ExitTrace, y: np.ndarray | None, mode: str, settings: np.ndarray | None = None
                ) -> GridLosses:
    """Apply every setting (default: the shared lambda grid) to every row."""
    if settings is None:
        num_early = trace.scores.shape[0]
        settings = np.array([thresholds_for(lam, num_early) for lam in lambda_grid(trace.policy.kind)])
    final = trace.labels[-1]
    labels, exits, losses = [], [], []
    for th in settings:
        lab, ex = trace.apply(th)
        labels.append(lab)
        exits.append(ex)
        losses.append(row_losses(lab, final, y, mode))
    return GridLosses(np.asarray(settings, np.float64), np.asarray(losses), np.asarray(exits), np.asarray(labels))


# ---------------------------------------------------------------- the calibration


@dataclass
class CalibrationResult:
    policy: ExitPolicy  # the calibrated policy, or the explicit "never exit early"
    options: CalibrationOptions
    n: int
    chosen: int  # index into candidates, -1 when nothing passed
    candidates: list[dict[str, Any]]
    exit_stats: list[dict[str, Any]]
    message: str
    final_accuracy: float | None = None
    scheme: str = "shared"

    @property
    def calibrated(self) -> bool:
        return self.chosen >= 0

    def to_manifest(self, split: str, dataset: str, seq_len: int | None = None) -> dict[str, Any]:
        """The manifest's ``policy``; ``seq_len``: a text set's tokens per row (recorded with the dataset)."""
        d = self.policy.to_dict()
        where: dict[str, Any] = {"split": split, "n": self.n, "dataset": dataset}
        if seq_len is not None:
            where["seq_len"] = seq_len
        d.update(
            epsilon=self.options.epsilon, delta=self.options.delta, mode=self.options.mode, scheme=self.scheme,
            requested_kind=self.options.kind,
            calibration=where,
            note=self.message, final_accuracy=self.final_accuracy, exit_stats=self.exit_stats,
            candidates=self.candidates,
        )
        return d


def _exit_stats(manifest: Manifest, exit_index: np.ndarray, labels: np.ndarray, final: np.ndarray,
                y: np.ndarray | None) -> list[dict[str, Any]]:
    from edgeexit.early_exit import executed_flops

    seg_flops = executed_flops(manifest)
    n = max(len(exit_index), 1)
    stats = []
    for j, info in enumerate(manifest.exits):
        m = exit_index == j
        cnt = int(m.sum())
        stats.append({
            "exit": j,
            "exit_rate": cnt / n,
            "accuracy": (float((labels[m] == y[m]).mean()) if cnt else None) if y is not None else None,
            "disagreement": float((labels[m] != final[m]).mean()) if cnt else None,
            "cumulative_flops": int(info.cumulative_flops),
            "executed_flops": seg_flops[j],
        })
    return stats


def _candidate_row(manifest: Manifest, gl: GridLosses, g: int, final: np.ndarray, y: np.ndarray | None,
                   delta: float, test: np.ndarray) -> dict[str, Any]:
    """One setting's statistics on all calibration rows (risk: on the test rows, as tested).
    The planner reads exit_rates, accuracy_delta, thresholds, valid, name."""
    from edgeexit.early_exit import executed_flops

    num_exits = len(manifest.exits)
    thresholds = [float(t) for t in gl.settings[g]]
    ex, lab = gl.exit_index[g], gl.labels[g]
    n = len(ex)
    rates = np.bincount(ex, minlength=num_exits) / n
    acc_exit: list[float | None] = []
    acc_delta: list[float | None] = []  # accuracy change vs the final exit on the rows that leave at j
    for j in range(num_exits):
        m = ex == j
        if y is None or not m.any():
            acc_exit.append(None)
            acc_delta.append(None if y is None else 0.0)
            continue
        acc_exit.append(float((lab[m] == y[m]).mean()))
        acc_delta.append(float((lab[m] == y[m]).mean() - (final[m] == y[m]).mean()))
    cum = np.array([e.cumulative_flops for e in manifest.exits], np.float64)
    exe = np.array(executed_flops(manifest), np.float64)
    k = int(gl.losses[g, test].sum())
    return {
        "name": "tau=" + "/".join(f"{t:.4g}" for t in thresholds),
        "thresholds": thresholds,
        "exit_rates": [float(r) for r in rates],
        "accuracy_per_exit": acc_exit,
        "accuracy_delta": acc_delta[:-1],
        "expected_cumulative_flops": float(rates @ cum),
        "relative_flops": float(rates @ exe / exe[-1]) if exe[-1] > 0 else None,
        "disagreement": float((lab != final).mean()),
        "accuracy": float((lab == y).mean()) if y is not None else None,
        "risk": k / len(test),
        "risk_ucb": clopper_pearson_upper(k, len(test), delta),
    }


def calibrate(logits: list[np.ndarray], manifest: Manifest, options: CalibrationOptions,
              labels: np.ndarray | None = None) -> CalibrationResult:
    """Choose thresholds on calibration logits (every exit's logits for the same n rows)."""
    options.check()
    n = len(logits[0]) if logits else 0
    if len(logits) != len(manifest.exits):
        raise ConfigError(f"got logits of {len(logits)} exits, the bundle has {len(manifest.exits)}")
    if len(manifest.exits) < 2:
        raise ConfigError("the bundle has a single exit: there is nothing to calibrate")
    num_early = len(manifest.exits) - 1
    policy = make_policy(options.kind, [0.0] * num_early, **options.params)
    trace = ExitTrace.build(policy, logits)
    scheme = options.scheme if num_early <= MAX_PARETO_EXITS else "shared"
    test = np.arange(n)
    settings = None
    if scheme == "pareto":
        from edgeexit.early_exit import executed_flops

        order = np.random.default_rng(options.seed).permutation(n)
        n_learn = int(round(n * options.learn_fraction))
        learn, test = np.sort(order[:n_learn]), np.sort(order[n_learn:])
        costs = np.asarray(executed_flops(manifest), np.float64)
        settings = pareto_path(trace, labels, options.mode, costs / max(costs[-1], 1.0), learn)
    gl = grid_losses(trace, labels, options.mode, settings)
    chosen, pvalues = fixed_sequence_test(gl.losses[:, test].sum(axis=1), len(test), options.epsilon, options.delta)
    final = trace.labels[-1]
    candidates = []
    for g in range(len(gl.settings)):
        row = _candidate_row(manifest, gl, g, final, labels, options.delta, test)
        row["p_value"] = pvalues[g] if g < len(pvalues) else None  # untested: after the sequence stopped
        row["valid"] = g <= chosen
        candidates.append(row)
    final_acc = float((final == labels).mean()) if labels is not None else None
    if chosen < 0:
        min_n = math.ceil(math.log(options.delta) / math.log1p(-options.epsilon))
        need = options.rows_needed() if scheme == "pareto" else min_n
        msg = (f"no threshold satisfies risk <= {options.epsilon} with probability >= {1 - options.delta} "
               f"({options.mode} mode, {len(test)} test rows of n={n}; even the most conservative setting has "
               f"{int(gl.losses[0, test].sum())} losses, and a zero-loss setting needs >= {min_n} test rows): "
               "falling back to NEVER exiting early")
        if n < need:
            msg += (f". Too few rows: epsilon {options.epsilon} and delta {options.delta} need at least {need} "
                    f"calibration rows ({scheme} scheme) and {n} were given; give more rows, or a larger "
                    "--epsilon or --delta")
        never = never_exit(len(manifest.exits))
        stats = _exit_stats(manifest, np.full(n, len(manifest.exits) - 1), final, final, labels)
        return CalibrationResult(never, options, n, -1, candidates, stats, msg, final_acc, scheme)
    thresholds = [float(t) for t in gl.settings[chosen]]
    policy = make_policy(options.kind, thresholds, **options.params)
    stats = _exit_stats(manifest, gl.exit_index[chosen], gl.labels[chosen], final, labels)
    c = candidates[chosen]
    msg = (f"{options.kind}, {scheme} scheme: setting {c['name']} passes "
           f"fixed-sequence testing ({chosen + 1} of {len(gl.settings)} settings, {len(test)} test rows); test risk "
           f"{c['risk']:.4f}, upper bound {c['risk_ucb']:.4f} "
           f"<= epsilon {options.epsilon} with probability >= {1 - options.delta}")
    return CalibrationResult(policy, options, n, chosen, candidates, stats, msg, final_acc, scheme)
