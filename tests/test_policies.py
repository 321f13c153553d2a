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
