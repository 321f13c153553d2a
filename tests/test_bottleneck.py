"""Learned bottlenecks (edgeexit/bottleneck.py, `edgeexit bottleneck`, the exporter's bottleneck split point).

One bottleneck is trained once per module through the real CLI on the cached trained resnet-exits model
(tests/fixtures_models.py): split 2 (stage 1's 48x7x7 output) -> 8x4x4 (stride 2), 2,048 samples.
It is exported for real and checked: every exit vs torch, exits before the split untouched, the manifest's
bottleneck split point, the agent->service split at the bottleneck through real gRPC equal to the local run.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeexit import datasets
from edgeexit.bottleneck import load_multi_exit
from edgeexit.bundle import Bundle
from edgeexit.cli import main
from edgeexit.errors import BundleError
from edgeexit.exporters import ExportOptions, export_model
from edgeexit.exporters.graph_cut import GraphAnalysis, plan_cuts
from edgeexit.exporters.sources import load_traced
from edgeexit.manifest_schema import check_manifest_dict
from edgeexit.policies import softmax
from edgeexit.runtime.decided import CLOUD
from edgeexit.runtime.device import DeviceOptions, DeviceRuntime
from edgeexit.runtime.oip_server import ServerOptions, build_server
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.service import build_handlers

SPLIT, CHANNELS = 2, 8
# 1,024 x 2 epochs agreed 0.61-0.81 with a freshly trained base (CI) and 0.78-0.89 with a cached one: too close
# to the bound below; 2,048 x 3 measured 0.86-0.92 over 4 seeds on the fresh base (~20 s more).
CLI_TRAIN = ["--limit", "2048", "--epochs", "3", "--val-limit", "300", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def bn_pt2(trained_resnet_pt2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bottleneck") / "bn.pt2"
    rc = main(["bottleneck", str(trained_resnet_pt2), "--split", str(SPLIT), "--channels", str(CHANNELS),
               "--stride", "2", "--out", str(out), *CLI_TRAIN])
    assert rc == 0 and out.is_file()
    return out


@pytest.fixture(scope="module")
def bn_bundle(bn_pt2) -> Path:
    out = bn_pt2.parent / "bn.edgeexit"
    export_model(bn_pt2, out, options=ExportOptions(calibration_data="fashion-mnist", calibration_samples=300,
                                                    progress=False))
    return out


@pytest.fixture(scope="module")
def val() -> np.ndarray:
    return datasets.load("fashion-mnist", "val", limit=64)[0]


def torch_exits(pt2: Path, x: np.ndarray) -> list[np.ndarray]:
    module = torch.export.load(str(pt2)).module()
    with torch.no_grad():
        return [t.numpy() for t in module(torch.from_numpy(x))]


def test_cli_prints_the_table_and_the_model_keeps_the_contract(bn_pt2, trained_resnet_pt2, val, capsys):
    with zipfile.ZipFile(bn_pt2) as z:
        meta = json.loads(z.read(next(n for n in z.namelist() if n.endswith("edgeexit.json"))))
    assert meta["bottleneck"]["split"] == SPLIT and meta["bottleneck"]["channels"] == CHANNELS
    new, old = torch_exits(bn_pt2, val), torch_exits(trained_resnet_pt2, val)
    assert len(new) == len(old) == 3
    # exits before the split read the original features through the original (frozen) layers: unchanged
    np.testing.assert_array_equal(new[0], old[0])
    np.testing.assert_array_equal(new[1], old[1])
    # the final exit went through an 8x4x4 code (vs 48x7x7) and still mostly agrees with the original
    agree = (new[2].argmax(1) == old[2].argmax(1)).mean()
    assert agree >= 0.7, agree


def test_export_cuts_at_the_encoder_output_and_marks_it(bn_bundle, bn_pt2):
    m = Bundle.load(bn_bundle).manifest
    shapes = [p.tensor.shape[1:] for p in m.split_points]
    assert shapes == [[1, 28, 28], [16, 14, 14], [CHANNELS, 4, 4], [112, 4, 4]]  # same numbering as the original
    marked = [p.index for p in m.split_points if p.bottleneck]
    assert marked == [SPLIT]
    p = m.split_points[SPLIT]
    assert p.bottleneck["module"] == "bottleneck" and p.bottleneck["input_shape"] == [48, 7, 7]
    assert p.bottleneck["encoder_param_bytes"] == 4 * (48 * CHANNELS * 9 + 4 * CHANNELS)
    assert p.bytes_per_sample["int8"] == CHANNELS * 16
    # hardtanh keeps the code in [-1, 1]: the calibrated int8 step is at most 2/255
    assert 0 < p.quantization["scale"] <= 2 / 255 + 1e-9


def cut_plan(pt2: Path, mode: str):
    an = GraphAnalysis(load_traced(pt2, ExportOptions()).module)
    return plan_cuts(an, mode)[0]


def test_exits_mode_cuts_at_the_code_too(bn_pt2):
    plan = cut_plan(bn_pt2, "exits")  # the exit-1 branch point (stage 1's output) moves to the code
    assert [list(c.meta["val"].shape[1:]) for c in plan.cuts] == [[16, 14, 14], [CHANNELS, 4, 4]]
    assert list(plan.bottlenecks) == [1] and plan.exits_per_segment == [[0], [1], [2]]


def test_every_exit_of_the_bundle_matches_torch(bn_bundle, bn_pt2, val):
    r = SegmentRunner(bn_bundle)
    got = r.run_all(r.normalize(val))
    for g, want in zip(got, torch_exits(bn_pt2, val), strict=True):
        np.testing.assert_allclose(g, want, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(("encoding", "compress"), [("fp32", False), ("int8", False), ("int8", True)])
def test_agent_to_service_at_the_bottleneck_equals_the_local_run(bn_bundle, val, encoding, compress):
    r = SegmentRunner(bn_bundle)
    local = r.run_all(r.normalize(val))[-1]
    server = build_server(build_handlers(bn_bundle), ServerOptions()).start()
    try:
        rt = DeviceRuntime(bn_bundle, DeviceOptions(cloud=server.target, split=SPLIT, policy="never",
                                                    encoding=encoding, compress=compress))
        res = rt.infer(val)
        rt.close()
    finally:
        server.stop(1.0)
    assert set(res.decided) == {CLOUD}
    if encoding == "fp32":
        np.testing.assert_allclose(res.probabilities, softmax(local), atol=1e-5)
        assert res.bytes_sent >= len(val) * CHANNELS * 16 * 4
    else:  # int8 of a [-1, 1] code: a small, bounded change of the answer
        assert (res.labels == local.argmax(1)).mean() >= 0.95
        assert np.abs(res.probabilities - softmax(local)).max() < 0.05
        assert res.bytes_sent <= len(val) * CHANNELS * 16 + 1024  # 1 byte per element (+ request overhead)


def test_a_model_or_bundle_without_a_bottleneck_is_unchanged(trained_resnet_pt2, tiny_bundle):
    plan = cut_plan(trained_resnet_pt2, "auto")
    assert [list(c.meta["val"].shape[1:]) for c in plan.cuts] == [[1, 28, 28], [16, 14, 14], [48, 7, 7], [112, 4, 4]]
    assert plan.bottlenecks == {}
    m = Bundle.load(tiny_bundle).manifest
    assert all(p.bottleneck is None for p in m.split_points)
    # no new key, not even a null: manifests (and so digests) of plain bundles are as before
    assert "bottleneck" not in (Path(tiny_bundle) / "manifest.json").read_text()
    assert "bottleneck" not in json.dumps(m.to_dict())


def test_the_schema_checks_the_bottleneck_field(bn_bundle):
    d = json.loads((bn_bundle / "manifest.json").read_text())
    check_manifest_dict(d)
    d["split_points"][SPLIT]["bottleneck"]["encoder_param_bytes"] = -1
    with pytest.raises(BundleError, match="encoder_param_bytes"):
        check_manifest_dict(d)
    d["split_points"][SPLIT]["bottleneck"] = {"module": "bottleneck"}
    with pytest.raises(BundleError, match="bottleneck"):
        check_manifest_dict(d)


@pytest.mark.parametrize(("args", "message"), [
    (["--split", "0", "--channels", "4"], "--split 0 is not a split point a bottleneck can sit at"),
    (["--split", "3", "--channels", "4"], "this model's are 1..2"),
    (["--split", "1", "--channels", "0"], "--channels must be a positive number"),
    (["--split", "1", "--channels", "-3"], "--channels must be a positive number"),
    (["--split", "1", "--channels", "4", "--arch", "branchynet"], "does not fit --arch branchynet"),
    (["--split", "1", "--channels", "4", "--kl-from", "1.5"], "--kl-from in [0, 1]"),
])
def test_bad_options_are_clear_errors_with_exit_code_2(trained_resnet_pt2, tmp_path, capsys, args, message):
    rc = main(["bottleneck", str(trained_resnet_pt2), *args, "--out", str(tmp_path / "x.pt2"), *CLI_TRAIN])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "Traceback" not in err and not (tmp_path / "x.pt2").exists()


def test_a_missing_model_is_a_clear_error(tmp_path, capsys):
    rc = main(["bottleneck", str(tmp_path / "nope.pt2"), "--split", "1", "--channels", "4",
               "--out", str(tmp_path / "x.pt2")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_load_multi_exit_finds_the_architecture(trained_resnet_pt2):
    model = load_multi_exit(trained_resnet_pt2, None, 10, 1)
    assert len(model.stages) == 3


def test_the_planner_sees_the_bottleneck_bytes_and_chooses_it(bn_bundle):
    from edgeexit.planner import ExitSetting, Planner
    from edgeexit.profiles import LatencyProfile, NetworkProfile

    m = Bundle.load(bn_bundle).manifest
    n = len(m.segments)  # 5: input, stage 0, stage 1 + encoder (split 2 = the code), decoder + stage 2, final head

    def profile(ms: list[float]) -> LatencyProfile:
        return LatencyProfile("onnxruntime", 1, {1: ms})

    # a slow device for the deep segments, a fast cloud, a 1 Mbit/s uplink: the 128-byte int8 code at split 2
    # beats the 784-byte uint8 input (cloud-only, cascades) and every other split's boundary
    planner = Planner(m, profile([1.0, 1.0, 1.0, 30.0, 30.0][:n]), profile([0.1] * n),
                      settings=[ExitSetting("none", (), (0.0,) * (len(m.exits) - 1))])
    choice = planner.plan(NetworkProfile("slow", 1.0, 10.0, 20.0)).choice
    assert (choice.strategy, choice.split, choice.encoding) == ("split", SPLIT, "int8")
