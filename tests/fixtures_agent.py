"""Fixtures for the device runtime and agent tests: a bundle, a real cloud service, a slow link, processes.

``agent_bundle`` is the export engineer's ``tiny_bundle`` when that fixture exists; otherwise a 3-segment
bundle built here with torch (random weights, int8 quantisation calibrated on random inputs), so these
tests do not depend on the exporter landing first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _build_bundle(root: Path) -> Path:
    import torch
    from torch import nn

    from edgeexit.bundle import (
        Bundle,
        ExitInfo,
        InputSpec,
        Manifest,
        Segment,
        SplitPoint,
        TensorSpec,
        file_entry,
        write_manifest,
    )
    from edgeexit.runtime.codec import affine_params

    torch.manual_seed(0)

    class Seg(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, last: bool):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU())
            self.head = nn.Linear(cout, 10)
            self.last = last

        def forward(self, x):
            b = self.body(x)
            e = self.head(b.mean(dim=(2, 3)))
            return e if self.last else (b, e)

    segs = [Seg(1, 4, 1, False), Seg(4, 8, 2, False), Seg(8, 8, 2, True)]
    (root / "segments").mkdir(parents=True)
    x = torch.rand(64, 1, 8, 8)
    segments, splits, exits, shapes = [], [], [], []
    cur = (x - 0.5) / 0.25
    for k, m in enumerate(segs):
        m.eval()
        last = k == len(segs) - 1
        in_name = "input" if k == 0 else f"boundary{k - 1}"
        outs = [f"exit{k}"] if last else [f"boundary{k}", f"exit{k}"]
        rel = f"segments/seg{k}.onnx"
        axes = {n: {0: "batch"} for n in [in_name, *outs]}
        torch.onnx.export(m, (cur[:2],), str(root / rel), input_names=[in_name], output_names=outs,
                          dynamic_axes=axes, opset_version=17, dynamo=False)
        with torch.no_grad():
            res = m(cur)
        in_spec = TensorSpec(in_name, ["batch", *cur.shape[1:]])
        out_specs = [TensorSpec(f"exit{k}", ["batch", 10])]
        if not last:
            bnd = res[0]
            out_specs.insert(0, TensorSpec(f"boundary{k}", ["batch", *bnd.shape[1:]]))
            n = int(np.prod(bnd.shape[1:]))
            splits.append(SplitPoint(k, out_specs[0], {"fp32": 4 * n, "fp16": 2 * n, "int8": n},
                                     affine_params(float(bnd.min()), float(bnd.max()))))
            cur = bnd
        segments.append(Segment(k, {"onnx": file_entry(root, rel)}, [in_spec], out_specs, [k]))
        exits.append(ExitInfo(k, k, f"exit{k}", 10))
        shapes.append(in_spec.shape)
    manifest = Manifest(
        name="tiny", input=InputSpec("input", ["batch", 1, 8, 8], normalization={"mean": [0.5], "std": [0.25]}),
        segments=segments, split_points=splits, exits=exits,
    )
    write_manifest(root, manifest)
    Bundle.load(root)
    return root


@pytest.fixture(scope="session")
def agent_bundle(request, tmp_path_factory) -> Path:
    try:
        return Path(request.getfixturevalue("tiny_bundle"))
    except pytest.FixtureLookupError:
        return _build_bundle(tmp_path_factory.mktemp("agent") / "tiny.edgeexit")


def input_shape(bundle: Path) -> tuple[int, ...]:
    from edgeexit.bundle import Bundle

    return tuple(int(d) for d in Bundle.load(bundle, verify=False).manifest.input.shape[1:])


@pytest.fixture
def raw_batch(agent_bundle) -> np.ndarray:
    """Raw [0, 1] pixels shaped for the bundle input (8 rows)."""
    return np.random.default_rng(1).random((8, *input_shape(agent_bundle)), dtype=np.float32)
