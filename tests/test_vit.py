"""The ViT-style reference (``vit-exits``: patch embedding, class token, pre-norm blocks, exits on the class
token) through the real exporter and runtime: cuts between blocks, every exit vs torch, LiteRT, split execution
agent -> service over real gRPC, and every exit policy on its logits. The test model has the reference's
structure at a smaller size (3 blocks of width 32, an exit after each), seeded and trained a few steps on
digits: export time grows with the number of blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeexit.bundle import Bundle
from edgeexit.early_exit import ExitTrace, collect_logits, run_early_exit
from edgeexit.models import build, flops_per_exit, vit_exits
from edgeexit.policies import KINDS, make_policy, softmax
from edgeexit.runtime.decided import CLOUD
from edgeexit.runtime.device import DeviceOptions, DeviceRuntime
from edgeexit.runtime.oip_server import ServerOptions, build_server
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.service import build_handlers
from tests.fixtures_bundles import digits_28, make_bundle, seeded

DIM, TOKENS = 32, 17  # 4x4 patches of 7x7 pixels + the class token


def digits_with_labels(n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """digits_28's images with their labels (the same seeded permutation)."""
    from sklearn.datasets import load_digits

    y = load_digits().target
    idx = np.random.default_rng(0).permutation(len(y))[:n]
    return digits_28(n), y[idx].astype(np.int64)


def small_vit(steps: int = 30) -> torch.nn.Module:
    """Seeded, then a few joint-loss steps on digits, so exits are confident on some rows and agree on some
    (patience needs agreement) while every number stays reproducible."""
    torch.manual_seed(0)
    model = seeded(vit_exits(dim=DIM, heads=2, depth=3, exit_after=(1, 2, 3))).train()
    x, y = (torch.from_numpy(a) for a in digits_with_labels())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        loss = sum(torch.nn.functional.cross_entropy(o, y[idx]) for o in model(x[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return small_vit()


@pytest.fixture(scope="module")
def vit_bundle(vit, tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("vit"), vit, name="vit", split_points="exits",
                       calibration_data=digits_28(200))


@pytest.fixture(scope="module")
def cloud(vit_bundle):
    handle = build_server(build_handlers(vit_bundle), ServerOptions()).start()
    yield handle
    handle.stop(1.0)


def torch_exits(model: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in model(torch.from_numpy(x))]


def test_reference_architecture_is_a_vit_with_four_exits():
    model = build("vit-exits").eval()
    outs = model(torch.rand(3, 1, 28, 28))
    assert [tuple(o.shape) for o in outs] == [(3, 10)] * 4
    blocks = [m for m in model.modules() if type(m).__name__ == "EncoderBlock"]
    assert len(blocks) == 6
    flops = flops_per_exit(model)
    assert flops == sorted(flops) and 0.25 < flops[0] / flops[-1] < 0.45  # exit 0 after 2 of 6 blocks


def test_flops_count_every_token_and_the_attention_matmuls():
    model = vit_exits(dim=DIM, heads=2, depth=2, exit_after=(1, 2))
    per_block = 2 * TOKENS * (4 * DIM * DIM + 2 * DIM * 2 * DIM) + 4 * TOKENS * TOKENS * DIM  # q,k,v,proj + MLP
    patch = 2 * 49 * DIM * TOKENS - 2 * 49 * DIM  # the conv runs on the 16 patches only
    head = 2 * DIM * 10
    assert flops_per_exit(model) == [patch + per_block + head, patch + 2 * per_block + 2 * head]


def test_export_cuts_between_blocks_with_one_token_tensor_per_split(vit_bundle):
    m = Bundle.load(vit_bundle).manifest
    assert [s.exits for s in m.segments] == [[0], [1], [2]]
    for sp in m.split_points:
        assert list(sp.tensor.shape) == ["batch", TOKENS, DIM]
        assert sp.bytes_per_sample == {"fp32": 4 * TOKENS * DIM, "fp16": 2 * TOKENS * DIM, "int8": TOKENS * DIM}
        assert sp.quantization is not None  # per-tensor int8 scale calibrated on digits


@pytest.mark.parametrize("batch", [1, 5])
def test_every_exit_matches_torch(vit, vit_bundle, batch):
    x = digits_28(batch, seed=batch)
    runner = SegmentRunner(vit_bundle)
    got = runner.run_all(runner.normalize(x))
    ref = torch_exits(vit, x)
    assert len(got) == 3
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape == (batch, 10)
        assert np.abs(g - r).max() <= 1e-4


@pytest.mark.parametrize("split", [0, 1])
def test_split_execution_over_grpc_equals_the_local_run(vit_bundle, cloud, split):
    x = digits_28(24, seed=3)
    runner = SegmentRunner(vit_bundle)
    final = runner.run_all(runner.normalize(x))[-1]
    rt = DeviceRuntime(vit_bundle, DeviceOptions(cloud=cloud.target, split=split, policy="never"))
    try:
        res = rt.infer(x)
    finally:
        rt.close()
    assert set(res.decided) == {CLOUD} and res.bytes_sent >= 24 * 4 * TOKENS * DIM
    np.testing.assert_allclose(res.probabilities, softmax(final), atol=1e-5)
    assert (res.labels == final.argmax(1)).all()


def test_int8_boundary_per_tensor_scale_keeps_the_answers(vit_bundle, cloud):
    """A [B, T, D] boundary as int8 with one calibrated scale: labels agree, probabilities move a little."""
    x = digits_28(64, seed=5)
    runner = SegmentRunner(vit_bundle)
    ref = softmax(runner.run_all(runner.normalize(x))[-1])
    rt = DeviceRuntime(vit_bundle, DeviceOptions(cloud=cloud.target, split=0, policy="never", encoding="int8"))
    try:
        res = rt.infer(x)
    finally:
        rt.close()
    assert set(res.decided) == {CLOUD} and res.bytes_sent < 64 * 2 * TOKENS * DIM  # int8: a quarter of fp32
    assert np.abs(res.probabilities - ref).max() < 0.05
    assert (res.labels == ref.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "never"])
def test_every_policy_runs_on_the_vit_logits_batched_as_offline(vit_bundle, kind):
    """Thresholds at each exit's median score make rows leave at every exit; the regrouped online
    run (batches of 7, rows leaving mid-batch) must give what the offline trace gives from the full logits."""
    x = digits_28(60, seed=11)
    runner = SegmentRunner(vit_bundle)
    logits = collect_logits(runner, x)
    params = {"k": 2} if kind == "patience" else {}
    probe = make_policy(kind, [0.0] * 2, **params)
    scores = ExitTrace.build(probe, logits).scores
    finite = [s[np.isfinite(s)] for s in scores]
    policy = make_policy(kind, [float(np.median(s)) if len(s) else 1.0 for s in finite], **params)
    want_labels, want_exit = ExitTrace.build(policy, logits).apply(policy.thresholds)
    for batch_size in (7, 60):
        got = run_early_exit(runner, policy, x, batch_size=batch_size)
        np.testing.assert_array_equal(got.exit_index, want_exit)
        np.testing.assert_array_equal(got.labels, want_labels)
    assert len(set(want_exit.tolist())) >= 2  # rows leave at different exits: the runner regroups mid-batch


@pytest.mark.slow
def test_litert_round_trip_every_exit_vs_torch(vit, tmp_path):
    """LiteRT conversion of attention, LayerNorm and GELU (litert-torch): every exit vs torch, batch 1 and 5.

    litert-torch 0.10 keeps no symbolic batch for [B, T, D] token tensors (a Linear on 3-D lowers to
    view(-1, D), LayerNorm and select fail with a symbolic batch), so these segments are batch-1 models and the
    runtime runs a batch row by row; the answers must still match torch at batch 5."""
    bundle = make_bundle(tmp_path, vit, name="vit_tfl", split_points="exits", formats=("onnx", "tflite"))
    entry = Bundle.load(bundle).manifest.segments[0].files["tflite"]
    runner = SegmentRunner(bundle, backend="litert")
    for batch in (1, 5):
        x = digits_28(batch, seed=batch)
        got, ref = runner.run_all(runner.normalize(x)), torch_exits(vit, x)
        for g, r in zip(got, ref, strict=True):
            assert g.shape == r.shape == (batch, 10)
            assert np.abs(g - r).max() <= 1e-4
    assert entry.batch == "dynamic" or entry.batch == "fixed:1"  # fixed:1 today (see above): rows are looped
