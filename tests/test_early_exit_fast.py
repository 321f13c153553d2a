"""The batched early-exit path (stages, compress-regrouping, history only for policies that read it) answers
every row exactly as a plain per-row loop over ``ExitPolicy.decide`` does, on a real exported bundle with real
onnxruntime sessions: same exit, label, probabilities and FLOPs, for every policy kind, including thresholds
where nobody or everybody leaves early, and batch sizes that leave partial batches."""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit.early_exit import ExitTrace, collect_logits, executed_flops, run_early_exit
from edgeexit.policies import KINDS, make_policy
from tests.fixtures_bundles import digits_28

# thresholds that no row passes / every row passes at every early exit (scores are in [0, 1]; -inf for patience)
NOBODY = {"entropy": -1.0}
EVERYBODY = {"entropy": 2.0}


def reference(policy, logits: list[np.ndarray], flops: list[int]):
    """One row at a time, exit by exit, through the public (checked, unoptimised) ``decide``."""
    n = len(logits[0])
    labels, exits, probs, seg_flops = (np.full(n, -1), np.full(n, -1), np.zeros_like(logits[0]), np.zeros(n, int))
    for i in range(n):
        for j in range(len(logits)):
            d = policy.decide([h[i:i + 1] for h in logits[: j + 1]])
            if d.mask[0]:
                labels[i], exits[i], probs[i], seg_flops[i] = d.labels[0], j, d.probs[0], flops[j]
                break
    return labels, exits, probs, seg_flops


@pytest.fixture(scope="module")
def setup(tiny_bundle):
    from edgeexit.runtime.runner import SegmentRunner

    runner = SegmentRunner(tiny_bundle)
    x = digits_28(90, seed=11)
    return runner, x, collect_logits(runner, x, batch_size=32)


def thresholds(kind: str, which: str, logits: list[np.ndarray], k: int) -> list[float]:
    n_early = len(logits) - 1
    if which == "nobody":
        return [NOBODY.get(kind, 2.0)] * n_early
    if which == "everybody":
        return [EVERYBODY.get(kind, 0.0)] * n_early
    trace = ExitTrace.build(make_policy(kind, [0.0] * n_early, k=k), logits)  # medians: a real mix of exits
    finite = [trace.scores[j][np.isfinite(trace.scores[j])] for j in range(n_early)]
    return [float(np.median(f)) if len(f) else 0.0 for f in finite]


@pytest.mark.parametrize("which", ["median", "nobody", "everybody"])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_equals_the_per_row_loop(setup, kind, which):
    runner, x, logits = setup
    k = 1 if which == "everybody" else 2  # patience with k=2 cannot exit at exit 0, whatever the threshold
    pol = make_policy(kind, thresholds(kind, which, logits, k), k=k)
    flops = executed_flops(runner.manifest)
    labels, exits, probs, seg_flops = reference(pol, logits, flops)
    for batch_size, refill in ((1, False), (7, False), (32, False), (90, False), (7, True), (32, True)):
        got = run_early_exit(runner, pol, x, batch_size=batch_size, refill=refill)
        np.testing.assert_array_equal(got.exit_index, exits, err_msg=f"{kind} {which} batch {batch_size} {refill}")
        np.testing.assert_array_equal(got.labels, labels)
        np.testing.assert_array_equal(got.probs, probs)
        np.testing.assert_array_equal(got.segment_flops, seg_flops)
    counts = np.bincount(exits, minlength=len(logits))
    if which == "nobody" or kind == "never":
        assert counts[:-1].sum() == 0
    elif which == "everybody":
        assert counts[0] == len(x)
    elif kind != "patience":
        assert counts[0] > 0 and counts[-1] > 0, counts


class CountingRunner:
    """The real runner, recording the rows of every call per segment range."""

    def __init__(self, runner):
        self.inner, self.manifest, self.num_segments = runner, runner.manifest, runner.num_segments
        self.calls: dict[int, list[int]] = {}

    def normalize(self, x):
        return self.inner.normalize(x)

    def run_segment(self, k, x):
        self.calls.setdefault(k, []).append(len(x))
        return self.inner.run_segment(k, x)

    def run(self, x, start, stop):
        self.calls.setdefault(start, []).append(len(x))
        return self.inner.run(x, start, stop)


@pytest.mark.parametrize("kind", ["entropy", "patience"])
def test_refill_runs_every_stage_at_the_full_batch(setup, kind):
    runner, x, logits = setup
    pol = make_policy(kind, thresholds(kind, "median", logits, 2), k=2)
    plain, filled = CountingRunner(runner), CountingRunner(runner)
    a = run_early_exit(plain, pol, x, batch_size=16)
    b = run_early_exit(filled, pol, x, batch_size=16, refill=True)
    np.testing.assert_array_equal(a.exit_index, b.exit_index)
    np.testing.assert_array_equal(a.probs, b.probs)
    for k, sizes in filled.calls.items():
        assert all(n == 16 for n in sizes[:-1]) and 0 < sizes[-1] <= 16, (k, sizes)  # only the flush is short
        assert sum(sizes) == sum(plain.calls[k]), k  # the same rows reach the stage
        assert len(sizes) <= len(plain.calls[k])
    if kind == "entropy":  # about half leave at each early exit: fewer, fuller calls
        assert any(len(filled.calls[k]) < len(plain.calls[k]) for k in filled.calls), (plain.calls, filled.calls)


def test_only_history_policies_keep_history():
    assert {k for k in KINDS if make_policy(k, [0.5, 0.5]).uses_history} == {"patience", "ensemble"}


def test_stages_end_at_the_segments_that_own_exits(tiny_bundle):
    from edgeexit.early_exit import exit_stages

    m = tiny_bundle_manifest(tiny_bundle)
    stages = exit_stages(m)
    assert stages[0].start == 0 and stages[-1].stop == len(m.segments)
    assert all(a.stop == b.start for a, b in zip(stages, stages[1:], strict=False))  # contiguous, no gaps
    assert [j for s in stages for j in s.exits] == list(range(len(m.exits)))
    for s in stages:  # a decision is due only at a stage's end
        assert all(not m.segments[k].exits for k in range(s.start, s.stop - 1))


def tiny_bundle_manifest(path):
    from edgeexit.bundle import Bundle

    return Bundle.load(path).manifest
