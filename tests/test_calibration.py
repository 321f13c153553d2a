"""Calibration: the exact binomial tail, fixed-sequence testing, the manifest record, and the guarantee on real data."""

import math

import numpy as np
import pytest

from edgeexit.calibration import (
    CalibrationOptions,
    binom_cdf,
    calibrate,
    check_split,
    clopper_pearson_upper,
    fixed_sequence_test,
    grid_losses,
    lambda_grid,
)
from edgeexit.early_exit import ExitTrace
from edgeexit.errors import ConfigError
from edgeexit.policies import make_policy, policy_from_manifest
from tests.fixtures_policies import exit_manifest


def test_binomial_cdf_matches_scipy_and_is_stable():
    stats = pytest.importorskip("scipy.stats")
    for k, n, p in [(0, 10, 0.1), (3, 50, 0.01), (40, 5000, 0.01), (200, 60000, 0.005), (9, 10, 0.5), (10, 10, 0.3)]:
        assert binom_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9, abs=1e-300)
    assert binom_cdf(0, 100000, 0.5) == pytest.approx(0.0, abs=1e-300)  # underflows gracefully, no NaN
    assert binom_cdf(-1, 10, 0.1) == 0.0 and binom_cdf(10, 10, 0.1) == 1.0


def test_clopper_pearson_upper_bound():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 300), (5, 1000), (38, 5000)]:
        ub = clopper_pearson_upper(k, n, 0.05)
        assert ub == pytest.approx(stats.beta.ppf(0.95, k + 1, n - k), rel=1e-6)
    assert clopper_pearson_upper(0, 300, 0.05) == pytest.approx(1 - 0.05 ** (1 / 300), rel=1e-6)


def test_fixed_sequence_stops_at_first_failure():
    # n=1000, eps=0.02, delta=0.05: k=11 passes (p~0.002), k=30 fails, and later passes do not count.
    last, pvals = fixed_sequence_test(np.array([0, 5, 11, 30, 0]), 1000, 0.02, 0.05)
    assert last == 2 and len(pvals) == 4 and pvals[3] > 0.05
    assert fixed_sequence_test(np.array([30, 0]), 1000, 0.02, 0.05)[0] == -1


def test_grid_runs_conservative_to_aggressive():
    g = lambda_grid("confidence")
    assert g[0] > 0.999 and np.all(np.diff(g) < 0) and g[-1] == pytest.approx(0.0)
    e = lambda_grid("entropy")
    assert e[0] < 1e-3 and np.all(np.diff(e) > 0) and e[-1] == pytest.approx(1.0)


def test_refuses_train_and_test_splits():
    for split in ("train", "test"):
        with pytest.raises(ConfigError, match=f"refusing to calibrate on the '{split}' split.*--split val"):
            check_split(split)
    check_split("val")


def test_bad_options():
    m = exit_manifest(3)
    logits = [np.zeros((10, 10), np.float32)] * 3
    for opts, msg in [(CalibrationOptions(epsilon=0), "epsilon"), (CalibrationOptions(delta=1.5), "delta"),
                      (CalibrationOptions(mode="x"), "mode"), (CalibrationOptions(kind="never"), "policy")]:
        with pytest.raises(ConfigError, match=msg):
            calibrate(logits, m, opts)
    with pytest.raises(ConfigError, match="needs labels"):
        calibrate(logits, m, CalibrationOptions(mode="accuracy"))


@pytest.mark.parametrize("kind", ["confidence", "entropy", "margin", "patience", "ensemble"])
def test_calibrates_and_records_statistics(kind, synthetic_exit_logits):
    logits, y = synthetic_exit_logits
    m = exit_manifest(3)
    res = calibrate(logits, m, CalibrationOptions(kind=kind, epsilon=0.02, delta=0.05), labels=y)
    assert res.calibrated, res.message
    c = res.candidates[res.chosen]
    assert c["valid"] and c["risk_ucb"] <= 0.02 and c["p_value"] <= 0.05
    assert sum(c["exit_rates"]) == pytest.approx(1.0) and c["exit_rates"][-1] < 1.0  # something exits early
    assert c["relative_flops"] < 1.0
    if res.chosen + 1 < len(res.candidates):  # the next one failed (or was never tested): not valid
        assert not res.candidates[res.chosen + 1]["valid"]
    d = res.to_manifest("val", "synthetic")
    assert d["kind"] == kind and d["calibration"] == {"split": "val", "n": len(y), "dataset": "synthetic"}
    assert [s["cumulative_flops"] for s in d["exit_stats"]] == [1000, 2000, 3000]
    assert d["final_accuracy"] == pytest.approx(float((logits[-1].argmax(1) == y).mean()))
    m.policy = d
    pol = policy_from_manifest(m)
    assert pol.kind == kind and pol.thresholds == c["thresholds"]
    # The recorded exit rates are what the policy does on these rows.
    _, ex = ExitTrace.build(pol, logits).apply(pol.thresholds)
    np.testing.assert_allclose(np.bincount(ex, minlength=3) / len(y), c["exit_rates"])


def test_accuracy_mode_bounds_right_answers_turned_wrong(synthetic_exit_logits):
    logits, y = synthetic_exit_logits
    res = calibrate(logits, exit_manifest(3), CalibrationOptions(epsilon=0.01, mode="accuracy"), labels=y)
    assert res.calibrated
    c = res.candidates[res.chosen]
    final_acc = (logits[-1].argmax(1) == y).mean()
    assert final_acc - c["accuracy"] <= c["risk"] + 1e-12  # the loss bounds the accuracy drop


def test_falls_back_to_never_exit_explicitly():
    logits = [np.random.default_rng(0).normal(size=(100, 10)).astype(np.float32) for _ in range(3)]
    m = exit_manifest(3)
    res = calibrate(logits, m, CalibrationOptions(epsilon=0.01, delta=0.05))  # n=100 < 299 needed
    assert not res.calibrated and res.policy.kind == "never"
    assert "falling back to NEVER exiting early" in res.message and ">= 299 test rows" in res.message
    d = res.to_manifest("val", "x")
    assert d["kind"] == "never" and d["requested_kind"] == "confidence"
    assert not any(c["valid"] for c in d["candidates"])
    assert [s["exit_rate"] for s in d["exit_stats"]] == [0.0, 0.0, 1.0]


def _violation_rate(logits, y, kind, eps, delta, n_cal, repeats, seed):
    """Repeat calibration on random calibration/test partitions; return (violations, repeats, mean rate)."""
    pol = make_policy(kind, [0.0] * (len(logits) - 1))
    gl = grid_losses(ExitTrace.build(pol, logits), y, "consistency")  # every setting on every row, once
    rng = np.random.default_rng(seed)
    n = len(y)
    violations, exit_rates = 0, []
    for _ in range(repeats):
        perm = rng.permutation(n)
        cal, test = perm[:n_cal], perm[n_cal:]
        chosen, _ = fixed_sequence_test(gl.losses[:, cal].sum(axis=1), n_cal, eps, delta)
        if chosen < 0:
            continue  # never exits early: zero risk
        violations += gl.losses[chosen, test].mean() > eps
        exit_rates.append((gl.exit_index[chosen, test] < len(logits) - 1).mean())
    return violations, repeats, float(np.mean(exit_rates)) if exit_rates else 0.0


def _allowed_violations(repeats: int, delta: float, alpha: float = 1e-3) -> int:
    """If each repeat violates with probability <= delta, the count is stochastically below Binomial(R, delta):
    allow the smallest c with P(Binomial(R, delta) > c) <= alpha, so a correct method fails this test with
    probability <= alpha (0.1%)."""
    c = 0
    while 1.0 - binom_cdf(c, repeats, delta) > alpha:
        c += 1
    return c


def test_allowed_violation_margin():
    assert _allowed_violations(300, 0.05) == 28  # 15 expected at most; 28 leaves room for 1-in-1000 bad luck
    assert math.isclose(1.0 - binom_cdf(28, 300, 0.05), 0.00061, abs_tol=1e-5)


@pytest.mark.slow
def test_guarantee_holds_on_real_data(real_exit_logits):
    """Fashion-MNIST through a real trained bundle: test disagreement > eps in at most ~delta of the repeats.

    The test part (the rows not used for calibration) stands in for the deployment distribution; the
    allowance for finitely many repeats is a binomial tail bound (see _allowed_violations)."""
    logits, y = real_exit_logits
    eps, delta, repeats = 0.02, 0.1, 300
    for kind in ("confidence", "entropy"):
        v, r, rate = _violation_rate(logits, y, kind, eps, delta, n_cal=len(y) // 3, repeats=repeats, seed=1)
        assert v <= _allowed_violations(r, delta), (kind, v, r)
        assert rate > 0.05, f"{kind}: calibration never lets rows exit, so the guarantee is vacuous here"


@pytest.mark.slow
def test_per_exit_pareto_guarantee_holds_on_real_data(real_exit_logits):
    """The default per-exit (Pareto Testing) scheme, end to end through calibrate(): each repeat learns its
    own threshold path on 30% of its calibration rows and tests on the rest; judged like the shared scheme."""
    logits, y = real_exit_logits
    eps, delta, repeats = 0.02, 0.1, 150
    manifest = exit_manifest(len(logits))
    pol = make_policy("confidence", [0.0] * (len(logits) - 1))
    trace = ExitTrace.build(pol, logits)
    rng = np.random.default_rng(2)
    violations, exit_rates = 0, []
    for r in range(repeats):
        perm = rng.permutation(len(y))
        cal, test = perm[: len(y) // 3], perm[len(y) // 3:]
        res = calibrate([lg[cal] for lg in logits], manifest, CalibrationOptions(epsilon=eps, delta=delta, seed=r))
        if not res.calibrated:
            continue
        labels, ex = trace.subset(test).apply(res.policy.thresholds)
        violations += (labels != trace.labels[-1, test]).mean() > eps
        exit_rates.append((ex < len(logits) - 1).mean())
    assert violations <= _allowed_violations(repeats, delta), (violations, repeats)
    assert np.mean(exit_rates) > 0.05


def test_planner_reads_the_calibrated_candidates(synthetic_exit_logits):
    """The planner (edgeexit.planner.exit_settings) chooses among the settings calibration validated."""
    from edgeexit.planner import exit_settings

    logits, y = synthetic_exit_logits
    m = exit_manifest(3)
    res = calibrate(logits, m, CalibrationOptions(epsilon=0.02), labels=y)
    m.policy = res.to_manifest("val", "synthetic")
    settings = exit_settings(m)
    assert len(settings) == 1 + res.chosen + 1  # "no exit" plus every valid candidate
    chosen = settings[-1]
    c = res.candidates[res.chosen]
    assert chosen.exit_rates == tuple(c["exit_rates"][:2]) and chosen.thresholds == tuple(c["thresholds"])
    # rates x accuracy deltas reproduce the candidate's overall accuracy
    acc = chosen.final_accuracy + sum(r * d for r, d in zip(chosen.exit_rates, chosen.accuracy_delta, strict=True))
    assert acc == pytest.approx(c["accuracy"])
