"""Exit policies on hand-made logits: each rule, ties, a single exit, all/none exiting, NaN, the manifest round trip."""

import numpy as np
import pytest

from edgeexit.early_exit import ExitTrace
from edgeexit.errors import ConfigError, InvalidTensor
from edgeexit.policies import log_softmax, make_policy, never_exit, policy_from_manifest
from tests.fixtures_policies import exit_manifest, make_synthetic_logits

# Three rows, 3 classes: confident on class 0, uniform, and moderately sure of class 2.
L = np.array([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], np.float32)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_confidence_exits_rows_whose_max_softmax_reaches_tau():
    p = _softmax(L.astype(np.float64))
    d = make_policy("confidence", [0.6, 0.6]).decide([L])
    assert d.mask.tolist() == [True, False, True]  # 0.9999, 1/3, 0.665
    assert d.labels.tolist() == [0, 0, 2]  # tie in row 1: the lowest class index, deterministically
    np.testing.assert_allclose(d.probs, p, rtol=1e-6)
    assert d.labels.dtype == np.int64 and d.probs.dtype == np.float32 and d.mask.dtype == bool


def test_entropy_uses_normalised_entropy_and_lower_is_better():
    pol = make_policy("entropy", [0.99, 0.99])
    s = pol.score([L])
    assert s.score[1] == pytest.approx(1.0)  # uniform over 3 classes: entropy / log(3) = 1
    assert s.score[0] < 1e-3
    assert pol.decide([L]).mask.tolist() == [True, False, True]


def test_margin_is_top1_minus_top2():
    p = _softmax(L.astype(np.float64))
    s = make_policy("margin", [0.3]).score([L])
    np.testing.assert_allclose(s.score, [p[0, 0] - p[0, 1], 0.0, p[2, 2] - p[2, 1]], atol=1e-12)
    assert make_policy("margin", [0.3, 0.3]).decide([L]).mask.tolist() == [True, False, True]


def test_patience_needs_k_agreeing_exits():
    other = np.array([[0.0, 10.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], np.float32)
    pol = make_policy("patience", [0.0, 0.0, 0.0], k=2)
    assert not pol.decide([L]).mask.any()  # fewer than k exits seen: nobody leaves
    assert pol.decide([other, L]).mask.tolist() == [False, True, True]  # row 0 changed its mind
    strict = make_policy("patience", [0.9, 0.9, 0.9], k=2)  # plus a confidence floor
    assert strict.decide([L, L]).mask.tolist() == [True, False, False]
    with pytest.raises(ConfigError, match="k must be"):
        make_policy("patience", [0.0], k=0)


def test_ensemble_is_the_weighted_geometric_mean_and_answers_with_it():
    a = np.array([[3.0, 0.0, 0.0]], np.float32)
    b = np.array([[0.0, 2.0, 0.0]], np.float32)
    pol = make_policy("ensemble", [0.0, 0.0], weights=[1.0, 3.0])
    d = pol.decide([a, b])
    comb = (1 * log_softmax(a) + 3 * log_softmax(b)) / 4
    np.testing.assert_allclose(d.probs, _softmax(comb), rtol=1e-5)
    assert d.labels.tolist() == [1]  # the deeper exit's vote weighs three times as much
    # The final exit answers with its own softmax, so "never exit" equals the full model.
    d_final = pol.decide([a, b, a])
    assert d_final.mask.all() and d_final.labels.tolist() == [0]


def test_final_exit_always_answers_and_none_or_all_exit_early():
    none = make_policy("confidence", [1.1, 1.1])
    assert not none.decide([L]).mask.any() and not none.decide([L, L]).mask.any()
    assert none.decide([L, L, L]).mask.all()
    every = make_policy("confidence", [0.0, 0.0])
    assert every.decide([L]).mask.all()
    single = make_policy("confidence", [])  # a model with only the final exit
    assert single.num_exits == 1 and single.decide([L]).mask.all()
    with pytest.raises(ConfigError, match="thresholds for 3 exits"):
        every.decide([L, L, L, L])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_raise_invalid_tensor(bad):
    x = L.copy()
    x[1, 2] = bad
    with pytest.raises(InvalidTensor, match=r"exit 1: logits contain NaN or inf \(rows \[1\]"):
        make_policy("confidence", [0.5, 0.5]).decide([L, x])


def test_malformed_history_and_thresholds():
    with pytest.raises(InvalidTensor, match="rows"):
        make_policy("confidence", [0.5, 0.5]).decide([L, L[:2]])
    with pytest.raises(InvalidTensor, match=r"\[batch, classes\]"):
        make_policy("confidence", [0.5]).decide([L[0]])
    with pytest.raises(ConfigError, match="unknown exit policy"):
        make_policy("greedy", [0.5])
    with pytest.raises(ConfigError, match="must be numbers"):
        make_policy("confidence", [float("nan")])


def test_softmax_is_stable_for_huge_logits():
    big = np.array([[1e30, 0.0], [-1e30, 1e30]], np.float32)
    d = make_policy("confidence", [0.5]).decide([big])
    assert np.isfinite(d.probs).all() and d.labels.tolist() == [0, 1] and d.mask.all()


def test_never_and_manifest_round_trip():
    m = exit_manifest(3)
    pol = policy_from_manifest(m)
    assert pol.kind == "never" and not pol.decide([L, L]).mask.any() and pol.decide([L, L, L]).mask.all()
    with pytest.raises(ConfigError, match="no calibrated 'margin' policy"):
        policy_from_manifest(m, "margin")
    m.policy = make_policy("entropy", [0.2, 0.3]).to_dict()
    got = policy_from_manifest(m)
    assert got.kind == "entropy" and got.thresholds == [0.2, 0.3]
    with pytest.raises(ConfigError, match="calibrated for 'entropy'"):
        policy_from_manifest(m, "confidence")
    m.policy = never_exit(3).to_dict()
    assert m.policy["thresholds"] == [None, None] and policy_from_manifest(m).kind == "never"
    m.policy = make_policy("confidence", [0.5]).to_dict()
    with pytest.raises(ConfigError, match="re-run `edgeexit calibrate`"):
        policy_from_manifest(m)


@pytest.mark.parametrize("kind,params", [("confidence", {}), ("entropy", {}), ("margin", {}),
                                         ("patience", {"k": 2}), ("ensemble", {})])
def test_offline_trace_equals_online_decisions(kind, params):
    """ExitTrace (used by calibration/evaluation) must reproduce decide() row by row."""
    logits, _ = make_synthetic_logits(n=300, n_exits=3, seed=3)
    taus = [0.4, 0.6] if kind == "entropy" else [0.9, 0.7]
    pol = make_policy(kind, taus, **params)
    labels, exit_index = ExitTrace.build(pol, logits).apply(taus)
    for i in range(300):
        for j in range(3):
            d = pol.decide([h[i:i + 1] for h in logits[: j + 1]])
            if d.mask[0]:
                assert (exit_index[i], labels[i]) == (j, d.labels[0])
                break
    assert len(np.unique(exit_index)) >= 2  # rows leave at different exits, so the comparison has teeth


# ---------------------------------------------------------------- batched regrouping == per-sample


class RowwiseRunner:
    """A stand-in runner (isolates the regrouping logic): 2 segments, segment 0 owns exits 0 AND 1.

    Every output row depends only on its input row, like a real network in eval mode; the same property is
    then checked for real on the exported tiny bundle below."""

    def __init__(self):
        from edgeexit.bundle import ExitInfo, InputSpec, Manifest, Segment, SplitPoint, TensorSpec

        b0 = TensorSpec("boundary0", ["batch", 4])
        self.manifest = Manifest(
            "rowwise", InputSpec("input", ["batch", 4]),
            [Segment(0, {}, [TensorSpec("input", ["batch", 4])],
                     [b0, TensorSpec("exit0", ["batch", 3]), TensorSpec("exit1", ["batch", 3])], [0, 1], flops=10),
             Segment(1, {}, [b0], [TensorSpec("exit2", ["batch", 3])], [2], flops=30)],
            [SplitPoint(0, b0, {"fp32": 16})],
            [ExitInfo(0, 0, "exit0", 3, 5), ExitInfo(1, 0, "exit1", 3, 10), ExitInfo(2, 1, "exit2", 3, 40)],
        )
        self.num_segments = 2
        self.w = np.random.default_rng(7).normal(size=(3, 4, 3)).astype(np.float32) * 3
        self.rows_seen = [0, 0]

    def normalize(self, x):
        return x

    def _head(self, x, j):  # x @ w[j] written out elementwise: BLAS would round differently per batch size
        return sum(x[:, i:i + 1] * self.w[j][i] for i in range(4))

    def run_segment(self, k, x):
        from edgeexit.runtime.runner import SegmentOutput

        self.rows_seen[k] += len(x)
        if k == 0:
            return SegmentOutput(np.tanh(x) * 2, {0: self._head(x, 0), 1: self._head(x, 1)})
        return SegmentOutput(None, {2: self._head(x, 2)})


def _assert_same(a, b):
    np.testing.assert_array_equal(a.exit_index, b.exit_index)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.segment_flops, b.segment_flops)


@pytest.mark.parametrize("kind", ["confidence", "patience", "ensemble"])
def test_regrouping_with_two_exits_in_one_segment(kind):
    from edgeexit.early_exit import run_early_exit

    runner = RowwiseRunner()
    x = np.random.default_rng(1).normal(size=(200, 4)).astype(np.float32)
    pol = make_policy(kind, [0.8, 0.6], k=2)
    batched = run_early_exit(runner, pol, x, batch_size=64)
    rows_seg1 = runner.rows_seen[1]
    single = run_early_exit(RowwiseRunner(), pol, x, batch_size=1)
    _assert_same(batched, single)
    counts = np.bincount(batched.exit_index, minlength=3)
    assert counts[2] > 0 and counts[:2].sum() > 0 and (counts[0] > 0 or kind == "patience")
    assert counts[1] > 0 or kind == "confidence"
    assert rows_seg1 == counts[2]  # only the continuing rows went through segment 1
    assert set(batched.segment_flops.tolist()) <= {10, 40}


def test_regrouping_on_the_exported_bundle(tiny_bundle):
    from edgeexit.early_exit import collect_logits, run_early_exit
    from edgeexit.runtime.runner import SegmentRunner
    from tests.fixtures_bundles import digits_28

    runner = SegmentRunner(tiny_bundle)
    x = digits_28(96, seed=5)
    logits = collect_logits(runner, x, batch_size=32)
    for kind in ("confidence", "entropy", "margin", "patience", "ensemble"):
        probe = make_policy(kind, [0.0, 0.0], k=2)
        trace = ExitTrace.build(probe, logits)
        # thresholds at the scores' medians, so roughly half leave at each early exit: a real mix
        finite = [trace.scores[j][np.isfinite(trace.scores[j])] for j in range(2)]
        taus = [float(np.median(f)) if len(f) else 0.0 for f in finite]
        pol = make_policy(kind, taus, k=2)
        batched = run_early_exit(runner, pol, x, batch_size=40)
        single = run_early_exit(runner, pol, x, batch_size=1)
        _assert_same(batched, single)
        labels, exit_index = trace.apply(taus)  # the offline simulation is the same decision
        np.testing.assert_array_equal(batched.exit_index, exit_index)
        np.testing.assert_array_equal(batched.labels, labels)
        assert len(np.unique(batched.exit_index)) >= 2 or kind == "patience", kind  # random exits rarely agree


def test_never_is_always_available_even_on_a_calibrated_bundle():
    m = exit_manifest(3)
    m.policy = make_policy("confidence", [0.9, 0.8]).to_dict()
    assert policy_from_manifest(m).kind == "confidence"
    assert policy_from_manifest(m, "never").kind == "never"
    with pytest.raises(ConfigError, match="calibrated for 'confidence'"):
        policy_from_manifest(m, "entropy")
