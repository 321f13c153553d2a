"""Fixtures for exit policies, calibration and evaluation.

- ``exit_manifest(n_exits)``: a structurally valid manifest (no files) with one exit per segment, for numpy-only
  calibration tests;
- ``synthetic_exit_logits``: exit logits whose quality rises with depth, with labels (fast, no model);
- ``real_exit_logits``: every exit's logits of a REAL trained bundle on REAL Fashion-MNIST images, computed once
  per session (the repeated-partition guarantee test shuffles indices of these).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit.bundle import ExitInfo, InputSpec, Manifest, Segment, SplitPoint, TensorSpec


def exit_manifest(n_exits: int = 3, num_classes: int = 10, flops: int = 1000) -> Manifest:
    segs, splits, exits = [], [], []
    for k in range(n_exits):
        inp = TensorSpec("input" if k == 0 else f"boundary{k - 1}", ["batch", 4])
        outs = ([TensorSpec(f"boundary{k}", ["batch", 4])] if k < n_exits - 1 else [])
        outs.append(TensorSpec(f"exit{k}", ["batch", num_classes]))
        segs.append(Segment(k, {}, [inp], outs, [k], flops=flops))
        if k < n_exits - 1:
            splits.append(SplitPoint(k, outs[0], {"fp32": 16}))
        exits.append(ExitInfo(k, k, f"exit{k}", num_classes, cumulative_flops=flops * (k + 1)))
    m = Manifest("synthetic", InputSpec("input", ["batch", 4]), segs, splits, exits)
    m.check()
    return m


def make_synthetic_logits(n: int = 4000, n_exits: int = 3, num_classes: int = 10, seed: int = 0):
    """Logits = signal * onehot(y) + noise; deeper exits see more signal. Returns (logits list, y)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    hard = rng.random(n)  # per-sample difficulty shared by all exits (so exits agree on easy inputs)
    logits = []
    for j in range(n_exits):
        signal = (1.0 + 2.0 * j) * (1.5 - hard)[:, None]
        z = rng.normal(0, 1.0, (n, num_classes)) + signal * np.eye(num_classes)[y] * 3
        logits.append(z.astype(np.float32))
    return logits, y


@pytest.fixture(scope="session")
def synthetic_exit_logits():
    return make_synthetic_logits()


@pytest.fixture(scope="session")
def real_exit_logits(trained_resnet_pt2, tmp_path_factory):
    """(logits per exit, labels) of a trained bundle on real Fashion-MNIST: the 5k val + first 5k test images.

    Uses ``trained_resnet_pt2`` (tests/fixtures_models.py: a trained reference model), exported for real with
    ``make_bundle``; computed once per session, so repeated-partition tests only shuffle indices."""
    from edgeexit import datasets
    from edgeexit.early_exit import collect_logits
    from edgeexit.runtime.runner import SegmentRunner
    from tests.fixtures_bundles import make_bundle

    bundle = make_bundle(tmp_path_factory.mktemp("trained"), trained_resnet_pt2, name="resnet_exits")
    xv, yv = datasets.load("fashion-mnist", "val")
    xt, yt = datasets.load("fashion-mnist", "test", limit=5000)
    logits = collect_logits(SegmentRunner(bundle), np.concatenate([xv, xt]), batch_size=500)
    return logits, np.concatenate([yv, yt])
