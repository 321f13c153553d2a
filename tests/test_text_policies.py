"""Exit policies on a transformer's exits (issue 15 part 4): `edgeexit calibrate`/`evaluate` on the MiniLM bundle
with stdlib-docstrings, every policy kind on its exit logits, the early-exit loop's regrouping with an attention
mask (rows of different real lengths padded to one length: each row keeps its own mask), padding and batch
invariance of a row's answer, and the clear errors when data and bundle do not fit.

Uses the cached MiniLM fixtures (tests/fixtures_text.py); skips, saying how to install them, without the weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from edgeexit.calibration import CalibrationOptions, calibrate
from edgeexit.cli import main
from edgeexit.early_exit import ExitTrace, ModelInputs, collect_logits, run_early_exit
from edgeexit.errors import ConfigError
from edgeexit.evaluation import load_for_bundle, seq_len_for
from edgeexit.policies import make_policy
from tests.fixtures_text import minilm_bundle, minilm_pt2, needs_minilm  # noqa: F401 (fixtures)

pytestmark = needs_minilm
KINDS = ("confidence", "entropy", "margin", "patience", "ensemble")
SEQ = 32  # long enough that the test texts' real lengths differ (many are padded, some truncated)
N_ROWS = 48


@pytest.fixture(scope="module")
def runner(minilm_bundle):  # noqa: F811 (the fixture)
    from edgeexit.runtime.runner import SegmentRunner

    return SegmentRunner(minilm_bundle)


@pytest.fixture(scope="module")
def texts(runner):
    """Test texts at SEQ tokens: (inputs, labels, every exit's logits) with a mix of real lengths."""
    x, y = load_for_bundle(runner.manifest, "stdlib-docstrings", "test", N_ROWS, SEQ)
    assert isinstance(x, ModelInputs) and x.x.shape == (N_ROWS, SEQ) and x.x.dtype == np.int64
    lengths = x.extras["attention_mask"].sum(1)
    assert len(np.unique(lengths)) >= 8 and lengths.min() < SEQ, "the rows need different real lengths"
    return x, y, collect_logits(runner, x, batch_size=16)


def _taus(trace: ExitTrace) -> list[float]:
    """Per early exit, a threshold in the widest gap among the middle scores: a real mix of rows leave, and no
    score sits within float noise of it (batch-size rounding cannot flip a decision)."""
    taus = []
    for s in trace.scores:
        s = np.sort(s[np.isfinite(s)])
        if len(s) < 4:
            taus.append(float(s[0]) if len(s) else 0.0)
            continue
        lo, hi = len(s) // 4, max(len(s) * 3 // 4, len(s) // 4 + 1)
        gaps = np.diff(s[lo:hi + 1])
        i = int(gaps.argmax())
        assert gaps[i] > 1e-4, "scores too close together to place a threshold away from them"
        taus.append(float((s[lo + i] + s[lo + i + 1]) / 2))
    return taus


def _same(a, b, atol: float = 1e-5) -> None:
    np.testing.assert_array_equal(a.exit_index, b.exit_index)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.segment_flops, b.segment_flops)
    np.testing.assert_allclose(a.probs, b.probs, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_early_exit_equals_each_row_alone(runner, texts, kind):
    """Regrouping with a mask: rows leave at every exit, the rest go on with their own mask rows; the answers
    equal running each row alone, with and without refill, and the offline simulation on the full-model logits."""
    x, _, logits = texts
    trace = ExitTrace.build(make_policy(kind, [0.0] * (len(logits) - 1), k=2), logits)
    pol = make_policy(kind, _taus(trace), k=2)
    batched = run_early_exit(runner, pol, x, batch_size=16)
    counts = np.bincount(batched.exit_index, minlength=len(logits))
    assert counts[:-1].sum() > 0 and counts[-1] > 0, counts  # some rows left early, some went to the end
    assert (counts[:-1] > 0).sum() >= 2 or kind == "patience", counts  # regrouped at several exits
    _same(batched, run_early_exit(runner, pol, x, batch_size=1))
    _same(batched, run_early_exit(runner, pol, x, batch_size=7, refill=True))  # queues split and join rows
    labels, exit_index = trace.apply(pol.thresholds)
    np.testing.assert_array_equal(batched.exit_index, exit_index)
    np.testing.assert_array_equal(batched.labels, labels)


def test_a_rows_answer_does_not_depend_on_padding_or_batch(runner, texts):
    """Each row run alone at its own real length (no padding) gives the exit logits it gets padded in the batch,
    and the same early-exit answer."""
    x, _, logits = texts
    mask = x.extras["attention_mask"]
    trace = ExitTrace.build(make_policy("confidence", [0.0] * (len(logits) - 1)), logits)
    pol = make_policy("confidence", _taus(trace))
    batched = run_early_exit(runner, pol, x, batch_size=N_ROWS)
    for i in range(0, N_ROWS, 3):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()  # right-padded: the real tokens come first
        alone = ModelInputs(x.x[i:i + 1, :n], {"attention_mask": mask[i:i + 1, :n]})
        for j, lg in enumerate(collect_logits(runner, alone)):
            np.testing.assert_allclose(lg[0], logits[j][i], atol=1e-4, err_msg=f"row {i} exit {j} ({n} tokens)")
        one = run_early_exit(runner, pol, alone)
        assert (one.exit_index[0], one.labels[0]) == (batched.exit_index[i], batched.labels[i]), i
        np.testing.assert_allclose(one.probs[0], batched.probs[i], atol=1e-5)


@pytest.fixture(scope="module")
def val_test(runner):
    """The whole val split and 64 test rows at 16 tokens, with the exit logits of each."""
    xv, _ = load_for_bundle(runner.manifest, "stdlib-docstrings", "val", None, 16)
    xt, _ = load_for_bundle(runner.manifest, "stdlib-docstrings", "test", 64, 16)
    return xv, collect_logits(runner, xv), xt, collect_logits(runner, xt)


@pytest.mark.parametrize("kind", KINDS)
def test_every_policy_calibrates_on_the_transformers_exits(runner, val_test, kind):
    """Calibration on val logits (consistency, epsilon 0.05) gives a policy for every kind whose online run on
    test rows is what its thresholds say; the calibrated confidence policy exits some rows early."""
    xv, val_logits, xt, test_logits = val_test
    params = {"k": 2} if kind == "patience" else {}
    res = calibrate(val_logits, runner.manifest, CalibrationOptions(kind, 0.05, 0.05, params=params))
    assert res.n == len(xv) and res.policy.num_exits == len(runner.manifest.exits)
    got = run_early_exit(runner, res.policy, xt, batch_size=32)
    labels, exit_index = ExitTrace.build(res.policy, test_logits).apply(res.policy.thresholds)
    np.testing.assert_array_equal(got.exit_index, exit_index)
    np.testing.assert_array_equal(got.labels, labels)
    if kind == "confidence":
        assert res.calibrated and (got.exit_index < len(runner.manifest.exits) - 1).any(), res.message


def test_calibrate_and_evaluate_cli_on_text(minilm_bundle, tmp_path):  # noqa: F811 (the fixture)
    """calibrate on val (the bundle's example length by default), evaluate on test: a policy is written and
    evaluated, with its relative compute and accuracy against the final exit."""
    bundle = tmp_path / "minilm.edgeexit"
    shutil.copytree(minilm_bundle, bundle)
    assert main(["calibrate", str(bundle), "--data", "stdlib-docstrings", "--epsilon", "0.05", "--no-progress"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    pol = manifest["policy"]
    assert pol["kind"] == "confidence" and pol["calibration"]["dataset"] == "stdlib-docstrings"
    assert pol["calibration"]["seq_len"] == manifest["dims"]["seq"]["example"]
    assert pol["calibration"]["n"] > 300  # the whole val split
    out = tmp_path / "eval"
    assert main(["evaluate", str(bundle), "--data", "stdlib-docstrings", "--seq-len", "24", "--limit", "120",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "evaluate.json").read_text())
    assert report["n"] == 120 and report["seq_len"] == 24
    ev = report["policy"]
    assert 0 < ev["relative_flops"] <= 1 and sum(r["exit_rate"] for r in ev["rows"]) == pytest.approx(1.0)
    assert 0 <= ev["accuracy"] <= 1 and ev["final_accuracy"] > 0.3  # chance (always tkinter) is ~0.25


def test_data_that_does_not_fit_the_bundle_is_a_clear_error(runner, tmp_path, capsys):
    from edgeexit import datasets
    from edgeexit.bundle import InputSpec

    m = runner.manifest
    with pytest.raises(ConfigError, match="takes token ids.*--data stdlib-docstrings"):
        load_for_bundle(m, "fashion-mnist", "val", 10)
    image = replace(m, input=InputSpec("input", ["batch", 1, 28, 28]), extra_inputs=[], dims={})
    with pytest.raises(ConfigError, match="is a text set .* takes images .*give an image set"):
        load_for_bundle(image, "stdlib-docstrings", "val", 10)
    with pytest.raises(ConfigError, match="--seq-len is for text sets"):
        load_for_bundle(image, "fashion-mnist", "val", 10, seq_len=32)
    top = m.dims["seq"]["max"]
    with pytest.raises(ConfigError, match=f"takes 2..{top} tokens"):
        load_for_bundle(m, "stdlib-docstrings", "val", 10, seq_len=top + 1)
    assert seq_len_for(replace(m, dims={"seq": {"example": 100, "max": 64}})) == 64  # the default is capped
    assert seq_len_for(replace(m, dims={})) == 128  # no example length: 128
    with pytest.raises(ConfigError, match="is a text set"):
        datasets.load("stdlib-docstrings", "val")
    # the CLI: exit code 2 and the message, before any model runs; the manifest is not written
    bundle = tmp_path / "b.edgeexit"
    shutil.copytree(runner.bundle.root, bundle)
    before = (bundle / "manifest.json").read_bytes()
    assert main(["calibrate", str(bundle), "--data", "fashion-mnist", "--no-progress"]) == 2
    assert "stdlib-docstrings" in capsys.readouterr().err
    assert main(["evaluate", str(bundle), "--data", "digits", "--no-progress"]) == 2
    assert (bundle / "manifest.json").read_bytes() == before
