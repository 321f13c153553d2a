"""The pretrained MiniLM (all-MiniLM-L6-v2 with 6 exit heads, tests/fixtures_text.py) through the exporter and the
runtime: every exit of the bundle vs torch (<= 1e-4) at several sequence lengths and batch sizes, split execution
device -> service over real gRPC equal to the local run, and the refusals of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeexit import text_data
from edgeexit.bundle import Bundle
from edgeexit.errors import InvalidTensor
from edgeexit.policies import softmax
from edgeexit.runtime.decided import CLOUD
from edgeexit.runtime.device import DeviceOptions, DeviceRuntime
from edgeexit.runtime.oip_server import ServerOptions, build_server
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.service import build_handlers
from tests.fixtures_text import needs_minilm

pytestmark = needs_minilm


@pytest.fixture(scope="module")
def torch_model(minilm_pt2):
    return torch.export.load(str(minilm_pt2)).module()


def texts(rows: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask, _ = text_data.load_text("test", seq_len=seq, limit=rows)
    return ids, mask


def test_the_manifest_describes_the_token_inputs(minilm_bundle):
    m = Bundle.load(minilm_bundle).manifest
    assert [(t.name, t.dtype, t.shape) for t in m.inputs] == [("input_ids", "int64", ["batch", "seq"]),
                                                              ("attention_mask", "int64", ["batch", "seq"])]
    assert m.dims["seq"]["max"] == 512 and len(m.exits) == 6
    # a split after each layer at least; every one carries the hidden state and the raw mask
    assert len(m.split_points) >= 6
    assert all(m.carried(p.index) == ["attention_mask"] and p.tensor.shape == ["batch", "seq", 384]
               for p in m.split_points[1:])
    assert all(p.quantization for p in m.split_points)  # calibrated on real texts


@pytest.mark.parametrize(("rows", "seq"), [(1, 32), (5, 32), (1, 128), (5, 128)])
def test_every_exit_matches_torch(minilm_bundle, torch_model, rows, seq):
    ids, mask = texts(rows, seq)
    got = SegmentRunner(minilm_bundle).run_all(ids, {"attention_mask": mask})
    with torch.no_grad():
        want = [t.numpy() for t in torch_model(torch.from_numpy(ids), torch.from_numpy(mask))]
    assert len(got) == len(want) == 6
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("split", "encoding"), [(3, "fp32"), (3, "int8"), ("cloud", "fp32")])
def test_device_to_service_equals_the_local_run(minilm_bundle, split, encoding):
    ids, mask = texts(5, 48)
    local = softmax(SegmentRunner(minilm_bundle).run_all(ids, {"attention_mask": mask})[-1])
    server = build_server(build_handlers(minilm_bundle), ServerOptions()).start()
    try:
        rt = DeviceRuntime(minilm_bundle, DeviceOptions(cloud=server.target, split=split, policy="never",
                                                        encoding=encoding))
        res = rt.infer(ids, {"attention_mask": mask})
        rt.close()
    finally:
        server.stop(1.0)
    assert set(res.decided) == {CLOUD}
    if encoding == "fp32":
        np.testing.assert_allclose(res.probabilities, local, atol=1e-4)
    else:  # per-tensor int8 of the hidden state: a small, bounded change
        assert (res.labels == local.argmax(1)).mean() >= 0.8
        assert np.abs(res.probabilities - local).max() < 0.2


@pytest.mark.parametrize(("change", "message"), [
    (lambda ids, mask: (ids.astype(np.float32), mask), "dtype float32 but the bundle expects int64"),
    (lambda ids, mask: (ids, mask[:, :-3]), "must match"),
    (lambda ids, mask: (np.ones((1, 513), np.int64), np.ones((1, 513), np.int64)), "at most 512"),
    (lambda ids, mask: (ids, None), "'attention_mask' is missing"),
    (lambda ids, mask: (ids - 200, mask), "negative values"),
    (lambda ids, mask: (ids + 40000, mask), "past the vocabulary"),
    (lambda ids, mask: (ids[:, :0], mask[:, :0]), "axis is empty"),
])
def test_bad_input_is_a_clear_error(minilm_bundle, change, message):
    ids, mask = change(*texts(2, 16))
    rt = DeviceRuntime(minilm_bundle, DeviceOptions(split="device", policy="never"))
    with pytest.raises(InvalidTensor, match=message):
        rt.infer(ids, None if mask is None else {"attention_mask": mask})
    good_ids, good_mask = texts(2, 16)  # and it keeps answering
    assert len(rt.infer(good_ids, {"attention_mask": good_mask}).labels) == 2
