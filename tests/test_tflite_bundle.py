"""End to end through the real exporter: a bundle with ONNX and every TFLite variant, run by SegmentRunner on
LiteRT and onnxruntime side by side, and served by real `edgeexit serve` / `edgeexit agent` processes."""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit import datasets
from edgeexit.bundle import Bundle
from edgeexit.errors import ConfigError
from edgeexit.exporters.tflite import VARIANTS
from edgeexit.runtime.runner import SegmentRunner
from tests.fixtures_bundles import TinyResNet, digits_28, make_bundle, seeded

pytestmark = pytest.mark.slow  # 3 segments x 4 variants converted once per module (~15-30 s)
QUANTIZE = ("fp16", "int8-dynamic", "int8-static")


@pytest.fixture(scope="module")
def tflite_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("tfl"), seeded(TinyResNet()), split_points="exits", name="tfl",
                       formats=("onnx", "tflite"), quantize=QUANTIZE, calibration_data=digits_28(200))


def test_manifest_lists_every_variant_with_checksum_size_and_names(tflite_bundle):
    bundle = Bundle.load(tflite_bundle)  # verifies every sha256
    assert set(bundle.formats) == {"onnx", *VARIANTS}
    for seg in bundle.manifest.segments:
        for fmt in VARIANTS:
            entry = seg.files[fmt]
            assert entry.bytes == (tflite_bundle / entry.path).stat().st_size > 0
            assert len(entry.sha256) == 64
            assert entry.batch == "dynamic" or (entry.batch == "fixed:1" and entry.extra["resizable"])
            assert entry.extra["outputs"] == [t.name for t in seg.outputs]
            assert entry.extra["input"] == seg.inputs[0].name
        assert set(seg.files["tflite-int8-static"].extra["io_quantization"]) == {
            seg.inputs[0].name, *[t.name for t in seg.outputs]}


@pytest.mark.parametrize("batch", [1, 16])
def test_litert_fp32_matches_onnx_per_exit_on_fashion_mnist(tflite_bundle, batch):
    x, _ = datasets.load("fashion-mnist", "test", limit=batch)
    ort, lite = SegmentRunner(tflite_bundle), SegmentRunner(tflite_bundle, backend="litert")
    ref, got = ort.run_all(ort.normalize(x)), lite.run_all(lite.normalize(x))
    assert len(got) == 3
    for r, g in zip(ref, got, strict=True):
        assert g.shape == r.shape == (batch, 10)
        assert np.abs(g - r).max() < 1e-4


@pytest.mark.parametrize("fmt", [f"tflite-{q}" for q in QUANTIZE])
def test_every_variant_runs_split_execution(tflite_bundle, fmt):
    """Device runs segment 0 on the variant, the tail resumes from its boundary: the wire's split path."""
    x, _ = datasets.load("fashion-mnist", "test", limit=5)
    runner = SegmentRunner(tflite_bundle, backend="litert", fmt=fmt)
    head = runner.run(x, 0, 1)
    assert head.boundary is not None and head.boundary.dtype == np.float32 and set(head.exits) == {0}
    tail = runner.run(head.boundary, 1)
    assert set(tail.exits) == {1, 2} and tail.exits[2].shape == (5, 10)
    assert np.isfinite(tail.exits[2]).all()


def test_backend_and_format_must_match(tflite_bundle):
    with pytest.raises(ConfigError, match="tflite"):
        SegmentRunner(tflite_bundle, backend="litert", fmt="onnx")


def test_int8_static_without_calibration_data_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--calibration-data"):
        make_bundle(tmp_path, seeded(TinyResNet()), split_points="exits", formats=("onnx", "tflite"),
                    quantize=("int8-static",))


def test_serve_and_agent_run_on_litert(tflite_bundle, tmp_path):
    from edgeexit.testbed.harness import AgentClient, launch

    x = np.random.default_rng(5).random((4, 1, 28, 28), dtype=np.float32)
    ort = SegmentRunner(tflite_bundle)
    want = ort.run_all(ort.normalize(x))[-1].argmax(1)
    serve_args = ["serve", str(tflite_bundle), "--port", "0", "--backend", "litert"]
    with launch("serve", serve_args, tmp_path) as serve:
        agent_args = ["agent", str(tflite_bundle), "--cloud", serve.target, "--split", "0", "--policy", "never",
                      "--listen", "127.0.0.1:0", "--backend", "litert"]
        with launch("agent", agent_args, tmp_path) as agent, AgentClient(agent.target, "tfl") as app:
            ans = app.infer(x)
        assert ans.decided == ["cloud"] * 4
        np.testing.assert_array_equal(ans.labels, want)
    assert serve.popen.returncode == 0


# Stated bound: on 1000 Fashion-MNIST test images every quantised variant's top-1 accuracy at every exit stays
# within 2 percentage points of the fp32 TFLite model's (fp16 within 0.5).
BOUND_PP = {"tflite-fp16": 0.5, "tflite-int8-dynamic": 2.0, "tflite-int8-static": 2.0}


def test_quantised_accuracy_on_trained_model_within_bound(trained_resnet_pt2, tmp_path):
    bundle = make_bundle(tmp_path, trained_resnet_pt2, name="trained", formats=("onnx", "tflite"),
                         quantize=QUANTIZE, calibration_data="fashion-mnist", calibration_samples=256)
    x, y = datasets.load("fashion-mnist", "test", limit=1000)
    acc = {}
    for fmt in VARIANTS:
        runner = SegmentRunner(bundle, backend="litert", fmt=fmt)
        acc[fmt] = [float((e.argmax(1) == y).mean()) for e in runner.run_all(runner.normalize(x))]
    assert min(acc["tflite"]) > 0.6, acc  # trained: accuracy differences mean something
    for fmt, bound in BOUND_PP.items():
        drops = [100 * (a - b) for a, b in zip(acc["tflite"], acc[fmt], strict=True)]
        assert max(drops) <= bound, (fmt, acc)


@pytest.mark.parametrize("fmt", ["tflite-fp16", "tflite-int8-dynamic"])
def test_device_runtime_and_cli_run_a_chosen_variant(tflite_bundle, fmt):
    import subprocess
    import sys

    from edgeexit.runtime.device import DeviceOptions, DeviceRuntime

    x = np.random.default_rng(6).random((3, 1, 28, 28), dtype=np.float32)
    rt = DeviceRuntime(tflite_bundle, DeviceOptions(backend="litert", fmt=fmt, split="device", policy="never"))
    assert rt.runner.fmt == fmt and str(rt.runner.bundle.segment_path(0, fmt)).endswith(f"{fmt[7:]}.tflite")
    fp32 = SegmentRunner(tflite_bundle, backend="litert")
    np.testing.assert_allclose(rt.infer(x).probabilities, softmax(fp32.run_all(fp32.normalize(x))[-1]), atol=0.05)
    out = subprocess.run([sys.executable, "-m", "edgeexit", "profile", str(tflite_bundle), "--backend", "litert",
                          "--format", fmt, "--repeats", "3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| 1 |" in out.stdout


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
