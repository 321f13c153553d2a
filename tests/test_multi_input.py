"""Multi-input models and multi-tensor boundaries (issue 15 part 1), on a small transformer-like model with
``forward(ids, mask)`` and a dynamic sequence axis: export, manifest, runner, service over real gRPC, the device
runtime, and the errors. The real MiniLM runs the same paths in tests/test_minilm_bundle.py."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from edgeexit.bundle import Bundle
from edgeexit.errors import BundleError, InvalidTensor
from edgeexit.exporters import ExportOptions, export_model
from edgeexit.manifest_schema import check_manifest_dict
from edgeexit.policies import softmax
from edgeexit.runtime.batching import BatchOptions, DynamicBatcher
from edgeexit.runtime.client import InferenceClient
from edgeexit.runtime.codec import encode_as_is
from edgeexit.runtime.decided import CLOUD
from edgeexit.runtime.device import DeviceOptions, DeviceRuntime
from edgeexit.runtime.oip_server import ServerOptions, build_server
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.service import build_handlers

VOCAB, WIDTH, CLASSES, MAX_SEQ = 50, 8, 3, 64


class TinyText(torch.nn.Module):
    """Embedding + 3 masked self-attention blocks, an exit (masked mean pool + linear) after blocks 1 and 3.
    Each block builds its additive mask from the raw mask input, as MiniLM's layers do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, WIDTH)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(WIDTH, CLASSES) for _ in range(2))

    @staticmethod
    def pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[..., None].type_as(h)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        pos = torch.arange(ids.shape[1])
        h = self.emb(ids) + pos[None, :, None].type_as(self.emb.weight) * 0.01
        exits = []
        for i, lin in enumerate(self.blocks):
            add = (1.0 - mask[:, None, :].type_as(h)) * -1e4
            att = torch.softmax(h @ h.transpose(1, 2) / WIDTH**0.5 + add, -1)
            h = torch.relu(lin(att @ h)) + h
            if i in (0, 2):
                exits.append(self.heads[len(exits)](self.pool(h, mask)))
        return exits


def batch(rows: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a mask with ragged real lengths (padding id 0, mask 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (rows, seq)).astype(np.int64)
    mask = np.ones((rows, seq), np.int64)
    for r in range(rows):
        n = int(rng.integers(2, seq + 1))
        ids[r, n:], mask[r, n:] = 0, 0
    return ids, mask


@pytest.fixture(scope="module")
def text_pt2(tmp_path_factory) -> tuple:
    model = TinyText().eval()
    ids, mask = (torch.from_numpy(a) for a in batch(2, 6))
    b, s = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", min=2, max=MAX_SEQ)
    ep = torch.export.export(model, (ids, mask), dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))
    path = tmp_path_factory.mktemp("text") / "tiny_text.pt2"
    meta = {"inputs": [{"name": "ids", "shape": ["batch", "seq"]}, {"name": "mask", "shape": ["batch", "seq"]}]}
    torch.export.save(ep, str(path), extra_files={"edgeexit.json": json.dumps(meta)})
    return path, model


@pytest.fixture(scope="module")
def text_bundle(text_pt2) -> Bundle:
    path, _ = text_pt2
    return export_model(path, path.with_suffix(".edgeexit"), options=ExportOptions(progress=False))


def torch_exits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in model(torch.from_numpy(ids), torch.from_numpy(mask))]


def test_the_manifest_lists_every_input_and_the_carried_mask(text_bundle):
    m = text_bundle.manifest
    assert (m.input.name, m.input.dtype, m.input.shape) == ("ids", "int64", ["batch", "seq"])
    assert [(t.name, t.dtype, t.shape) for t in m.extra_inputs] == [("mask", "int64", ["batch", "seq"])]
    assert m.dims == {"seq": {"example": 6, "max": MAX_SEQ}}
    assert len(m.segments) >= 2
    for k, seg in enumerate(m.segments[1:], start=1):  # every later segment reads the boundary and the raw mask
        assert [t.name for t in seg.inputs] == [f"boundary{k - 1}", "mask"]
        assert seg.inputs[0].shape == ["batch", "seq", WIDTH]
    assert m.carried(-1) == ["mask"] and all(m.carried(p.index) == ["mask"] for p in m.split_points)
    # bytes per sample at the example length: the boundary in each encoding plus the int64 mask as it is
    p = m.split_points[0].bytes_per_sample
    assert (p["fp32"], p["int8"]) == (6 * WIDTH * 4 + 6 * 8, 6 * WIDTH + 6 * 8)


@pytest.mark.parametrize(("rows", "seq"), [(1, 5), (3, 9), (4, 33)])
def test_every_exit_matches_torch_at_any_batch_and_length(text_bundle, text_pt2, rows, seq):
    ids, mask = batch(rows, seq, seed=rows * seq)
    got = SegmentRunner(text_bundle).run_all(ids, {"mask": mask})
    for g, w in zip(got, torch_exits(text_pt2[1], ids, mask), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_chained_segments_equal_the_whole_run(text_bundle):
    ids, mask = batch(3, 7)
    r = SegmentRunner(text_bundle)
    whole = r.run_all(ids, {"mask": mask})
    out = r.run(ids, 0, 1, extras={"mask": mask})
    rest = r.run(out.boundary, 1, extras={"mask": mask})
    exits = {**out.exits, **rest.exits}
    for j, want in enumerate(whole):
        np.testing.assert_allclose(exits[j], want, atol=1e-6)


@pytest.mark.parametrize(("change", "message"), [
    (lambda ids, mask: (ids, None), "input 'mask' is missing"),
    (lambda ids, mask: (ids, mask[:, :4]), "must match"),
    (lambda ids, mask: (ids.astype(np.float32), mask), "dtype float32 but the bundle expects int64"),
    (lambda ids, mask: (ids, mask.astype(np.int32)), "dtype int32 but the bundle expects int64"),
    (lambda ids, mask: (np.ones((2, MAX_SEQ + 1), np.int64),) * 2, f"at most {MAX_SEQ}"),
])
def test_bad_inputs_are_clear_errors(text_bundle, change, message):
    ids, mask = change(*batch(2, 6))
    r = SegmentRunner(text_bundle)
    with pytest.raises(InvalidTensor, match=message):
        r.check_inputs(ids, None if mask is None else {"mask": mask})
    rt = DeviceRuntime(text_bundle.root, DeviceOptions(split="device", policy="never"))
    with pytest.raises(InvalidTensor, match=message):
        rt.infer(ids, None if mask is None else {"mask": mask})


@pytest.mark.parametrize(("split", "encoding"), [(0, "fp32"), (0, "fp16"), ("cloud", "fp32")])
def test_agent_to_service_equals_the_local_run(text_bundle, split, encoding):
    ids, mask = batch(5, 11, seed=3)
    local = SegmentRunner(text_bundle).run_all(ids, {"mask": mask})[-1]
    server = build_server(build_handlers(text_bundle), ServerOptions()).start()
    try:
        rt = DeviceRuntime(text_bundle.root, DeviceOptions(cloud=server.target, split=split, policy="never",
                                                           encoding=encoding))
        res = rt.infer(ids, {"mask": mask})
        rt.close()
    finally:
        server.stop(1.0)
    assert set(res.decided) == {CLOUD}
    np.testing.assert_allclose(res.probabilities, softmax(local), atol=1e-3 if encoding == "fp16" else 1e-5)
    assert res.bytes_sent >= mask.nbytes  # the mask travelled with the boundary


def test_the_service_refuses_bad_requests_and_keeps_serving(text_bundle):
    ids, mask = batch(2, 6)
    server = build_server(build_handlers(text_bundle), ServerOptions()).start()
    client = InferenceClient(server.target)
    name = text_bundle.manifest.name
    try:
        with pytest.raises(InvalidTensor, match=r"takes the inputs \['ids', 'mask'\]"):
            client.infer(name, "ids", encode_as_is(ids), timeout=10)  # the mask is missing
        with pytest.raises(InvalidTensor, match="must match"):
            client.infer(name, "ids", encode_as_is(ids), timeout=10, extra=[("mask", encode_as_is(mask[:, :3]))])
        with pytest.raises(InvalidTensor, match="INT64"):
            client.infer(name, "ids", encode_as_is(ids.astype(np.float32)), timeout=10,
                         extra=[("mask", encode_as_is(mask))])
        good = client.infer(name, "ids", encode_as_is(ids), timeout=10, extra=[("mask", encode_as_is(mask))])
        meta = build_handlers(text_bundle)[0].metadata()
    finally:
        client.close()
        server.stop(1.0)
    want = SegmentRunner(text_bundle).run_all(ids, {"mask": mask})
    np.testing.assert_allclose(good[f"exit{len(want) - 1}"], want[-1], atol=1e-5)
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("ids", "INT64", [-1, -1]),
                                                                    ("mask", "INT64", [-1, -1])]


def test_the_batcher_only_joins_requests_of_the_same_shapes():
    calls = []

    def run(x):
        calls.append(tuple(a.shape for a in x))
        return {"sum": np.stack([a.reshape(len(a), -1).sum(1) for a in x], 1)}

    batcher = DynamicBatcher(run, BatchOptions(max_batch_size=16, max_delay_ms=50))
    reqs = [(np.ones((1, 4)), np.ones((1, 4))), (np.ones((2, 4)), np.zeros((2, 4))), (np.ones((1, 7)),
                                                                                      np.ones((1, 7)))]
    out = [None] * len(reqs)

    def send(i):
        out[i] = batcher.submit(reqs[i]).outputs["sum"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    for (a, b), got in zip(reqs, out, strict=True):  # each caller got its own rows
        np.testing.assert_array_equal(got, np.stack([a.sum(1), b.sum(1)], 1))
    assert all(len({s[1] for s in shapes}) == 1 for shapes in [calls[i] for i in range(len(calls))])
    assert sum(s[0][0] for s in calls) == 4 and len(calls) <= 3


def test_one_input_manifests_have_no_new_keys(tiny_bundle):
    text = (tiny_bundle / "manifest.json").read_text()
    assert '"extra_inputs"' not in text and '"dims"' not in text


def test_the_schema_checks_named_axes(text_bundle):
    d = json.loads((text_bundle.root / "manifest.json").read_text())
    check_manifest_dict(d)
    bad = json.loads(json.dumps(d))
    bad["extra_inputs"][0]["shape"] = ["batch", "tokens"]  # an axis dims does not name
    with pytest.raises(BundleError, match=r"extra_inputs\[0\].shape\[1\] must be a positive integer"):
        check_manifest_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["dims"]["seq"] = {"example": 100, "max": 64}
    with pytest.raises(BundleError, match="example"):
        check_manifest_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["segments"][1]["inputs"][1]["dtype"] = "int32"  # a segment reading the mask as another tensor
    from edgeexit.bundle import Manifest

    with pytest.raises(BundleError, match="extra inputs"):
        Manifest.from_dict(bad).check()


def test_profile_and_plan_count_every_input(text_bundle):
    from edgeexit.planner import Planner
    from edgeexit.profiles import NetworkProfile
    from edgeexit.runtime.profiling import measure_profile

    m = text_bundle.manifest
    prof = measure_profile(SegmentRunner(text_bundle), repeats=3, warmup=1)
    assert len(prof.segment_ms[1]) == len(m.segments) and all(v > 0 for v in prof.segment_ms[1])
    planner = Planner(m, prof, prof)
    assert planner.input_bytes == 2 * 6 * 8  # ids and mask, int64, at the example length
    assert planner.plan(NetworkProfile("x", 10.0, 10.0, 5.0)).choice is not None
