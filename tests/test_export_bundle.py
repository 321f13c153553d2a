"""The shared tiny bundle: structure, manifest facts, and a real onnxruntime round trip against torch."""

from __future__ import annotations

import numpy as np
import torch

from edgeexit.bundle import Bundle
from edgeexit.runtime.runner import SegmentRunner
from tests.fixtures_bundles import TinyResNet, digits_28, seeded


def test_tiny_bundle_layout(tiny_bundle):
    b = Bundle.load(tiny_bundle)
    m = b.manifest
    assert len(m.segments) == 3 and len(m.split_points) == 2
    assert [s.exits for s in m.segments] == [[0], [1], [2]]
    assert m.input.shape == ["batch", 1, 28, 28] and m.input.normalization is None
    assert [p.tensor.shape for p in m.split_points] == [["batch", 8, 28, 28], ["batch", 16, 14, 14]]
    for p in m.split_points:
        n = p.tensor.sample_elements()
        assert p.bytes_per_sample == {"fp32": 4 * n, "fp16": 2 * n, "int8": n}
        assert p.quantization is not None and p.quantization["scale"] > 0
        assert -128 <= p.quantization["zero_point"] <= 127
    assert all(e.num_classes == 10 for e in m.exits)
    cum = [e.cumulative_flops for e in m.exits]
    assert cum == sorted(cum) and cum[0] > 0
    assert all(s.flops > 0 and s.param_bytes > 0 for s in m.segments)
    assert sum(s.flops for s in m.segments) >= cum[-1]
    assert m.export["source"] == "module" and m.export["opset"] == 18 and m.export["max_abs_error"] < 1e-4


def test_tiny_bundle_matches_torch(tiny_bundle):
    model = seeded(TinyResNet())
    runner = SegmentRunner(tiny_bundle)
    for x in (digits_28(1, seed=5), digits_28(5, seed=6)):
        got = runner.run_all(x)
        with torch.no_grad():
            want = [t.numpy() for t in model(torch.from_numpy(x))]
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-3)


def test_int8_boundary_roundtrip_is_close(tiny_bundle):
    """The calibrated int8 parameters keep the boundary within a couple of quantisation steps."""
    from edgeexit.runtime.codec import decode, encode

    runner = SegmentRunner(tiny_bundle)
    q = runner.manifest.split_points[0].quantization
    boundary = runner.run(digits_28(20, seed=9), 0, 1).boundary
    wire = encode(boundary, "int8", q)
    back = decode(wire.data, wire.datatype, wire.shape, wire.params)
    inside = boundary <= (127 - q["zero_point"]) * q["scale"]
    assert np.max(np.abs(back - boundary)[inside]) <= q["scale"]
