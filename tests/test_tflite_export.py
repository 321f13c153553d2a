"""TFLite segment export and the LiteRT backend on a small, briefly trained two-segment CNN (no bundle needed):
fp32 parity with onnxruntime on real Fashion-MNIST images, names and order, batch handling, quantised variants.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # the module fixture trains briefly and converts 2 segments x 4 variants (~25 s)

from edgeexit.errors import BundleError, ConfigError, InvalidTensor  # noqa: E402
from edgeexit.exporters.tflite import VARIANTS, SegmentNames, export_tflite_segment  # noqa: E402
from edgeexit.runtime.backends import OrtSession  # noqa: E402
from edgeexit.runtime.litert_backend import LiteRTSession  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def fashion(split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Real Fashion-MNIST images in [0, 1] (edgeexit.datasets when present, else the idx files directly)."""
    try:
        from edgeexit import datasets

        return datasets.load("fashion-mnist", "train" if split == "train" else "test", limit=limit)
    except ImportError:
        prefix = "train" if split == "train" else "t10k"
        with gzip.open(FMNIST / f"{prefix}-images-idx3-ubyte.gz") as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:limit]
        with gzip.open(FMNIST / f"{prefix}-labels-idx1-ubyte.gz") as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8)[:limit]
        return (x / 255.0).astype(np.float32), y.astype(np.int64)


class Head(torch.nn.Module):
    """Early-exit head with ``mean(dim=(2,3))`` so the batch axis stays dynamic in litert-torch."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 48, 3, padding=1)
        self.fc = torch.nn.Linear(48, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class Seg0(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU())
        self.head = Head(16)

    def forward(self, x):
        b = self.body(x)
        return b, self.head(b)


class Seg1(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU())
        self.head = Head(32)

    def forward(self, b):
        return (self.head(self.body(b)),)


@pytest.fixture(scope="module")
def segments():
    """Two segments trained jointly for 100 steps: far from converged, but well above chance, so quantised
    accuracy is compared on a model whose predictions mean something."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is faster than two contended ones
    torch.manual_seed(0)
    s0, s1 = Seg0(), Seg1()
    x, y = fashion("train", 6400)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(list(s0.parameters()) + list(s1.parameters()), lr=1e-2)
    for _ in range(1):
        for i in range(0, len(xt), 64):
            b, e0 = s0(xt[i:i + 64])
            (e1,) = s1(b)
            loss = torch.nn.functional.cross_entropy(e0, yt[i:i + 64]) + torch.nn.functional.cross_entropy(
                e1, yt[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    return s0.eval(), s1.eval()


@pytest.fixture(scope="module")
def exported(segments, tmp_path_factory):
    """Both segments in ONNX and in every TFLite variant, static int8 calibrated on real (train) images."""
    out = tmp_path_factory.mktemp("tflite_segments")
    s0, s1 = segments
    calib0, _ = fashion("train", 256)
    with torch.no_grad():
        calib1 = s0(torch.from_numpy(calib0))[0].numpy()
    sample0 = torch.from_numpy(calib0[:2])
    sample1 = torch.from_numpy(calib1[:2])
    res = [
        export_tflite_segment(s0, sample0, out, "seg0", list(VARIANTS), calib0,
                              SegmentNames("input", ("boundary0", "exit0"))),
        export_tflite_segment(s1, sample1, out, "seg1", list(VARIANTS), calib1,
                              SegmentNames("boundary0", ("exit1",))),
    ]
    for k, (mod, sample, inp, outs) in enumerate(
            [(s0, sample0, "input", ["boundary0", "exit0"]), (s1, sample1, "boundary0", ["exit1"])]):
        torch.onnx.export(mod, (sample,), str(out / f"seg{k}.onnx"), input_names=[inp], output_names=outs,
                          dynamic_axes={n: {0: "batch"} for n in [inp, *outs]}, external_data=False, dynamo=False)
    return out, res


def run_chain(out: Path, res, fmt: str, x: np.ndarray) -> list[np.ndarray]:
    """Exit logits of both segments for one backend/format."""
    if fmt == "onnx":
        s0, s1 = OrtSession(out / "seg0.onnx"), OrtSession(out / "seg1.onnx")
    else:
        s0, s1 = (LiteRTSession(out / r[fmt]["file"], 1, extra=r[fmt]["extra"]) for r in res)
    b, e0 = s0.run({"input": x})
    (e1,) = s1.run({"boundary0": b})
    return [e0, e1]


@pytest.mark.parametrize("batch", [1, 7])
def test_fp32_tflite_matches_onnx_per_exit_on_real_images(exported, batch):
    out, res = exported
    x, _ = fashion("test", batch)
    ref = run_chain(out, res, "onnx", x)
    got = run_chain(out, res, "tflite", x)
    for r, g in zip(ref, got, strict=True):
        assert g.shape == r.shape == (batch, 10)
        assert np.abs(g - r).max() < 1e-4


def test_signature_uses_onnx_names_and_records_order_and_batch(exported):
    out, res = exported
    for k, outs in enumerate([["boundary0", "exit0"], ["exit1"]]):
        entry = res[k]["tflite"]
        assert entry["batch"] == "dynamic"
        assert entry["extra"]["outputs"] == outs
        sess = LiteRTSession(out / entry["file"])  # no manifest facts: the file alone describes itself
        assert sess.output_names == outs
        assert sess.input_names == [["input", "boundary0"][k]]
    assert {r["file"] for r in res[0].values()} == {"seg0" + v.suffix for v in VARIANTS.values()}


def test_variant_sizes_shrink(exported):
    out, res = exported
    size = {v: (out / res[1][v]["file"]).stat().st_size for v in VARIANTS}
    assert size["tflite-fp16"] < 0.7 * size["tflite"]
    assert size["tflite-int8-dynamic"] < 0.5 * size["tflite"]
    assert size["tflite-int8-static"] < 0.5 * size["tflite"]


def test_static_int8_has_int8_io_handled_by_the_session(exported):
    out, res = exported
    entry = res[0]["tflite-int8-static"]
    q = entry["extra"]["io_quantization"]
    assert set(q) == {"input", "boundary0", "exit0"} and q["input"]["dtype"] == "int8"
    assert entry["extra"]["calibration_samples"] == 256
    x, _ = fashion("test", 5)
    b, e0 = LiteRTSession(out / entry["file"], extra=entry["extra"]).run({"input": x})
    assert b.dtype == np.float32 and e0.dtype == np.float32
    ref_b, ref_e0 = LiteRTSession(out / res[0]["tflite"]["file"]).run({"input": x})
    # One int8 step of the boundary's scale per element at most a few steps off: the affine maths is right.
    assert np.abs(b - ref_b).max() < 8 * q["boundary0"]["scale"]


# Stated bound: every quantised variant stays within 3 percentage points of fp32 top-1 on 500 test images.
ACCURACY_BOUND_PP = 3.0


def test_quantised_variants_accuracy_within_bound_of_fp32(exported):
    out, res = exported
    x, y = fashion("test", 500)
    acc = {fmt: [float((e.argmax(1) == y).mean()) for e in run_chain(out, res, fmt, x)]
           for fmt in VARIANTS}
    assert min(acc["tflite"]) > 0.4  # chance is 0.1: the model learned something, so the comparison is meaningful
    for fmt in VARIANTS:
        for j in range(2):
            assert abs(acc[fmt][j] - acc["tflite"][j]) * 100 <= ACCURACY_BOUND_PP, (fmt, j, acc)


def test_static_int8_without_calibration_says_what_to_do(segments, tmp_path):
    with pytest.raises(ConfigError, match="--calibration-data"):
        export_tflite_segment(segments[1], torch.zeros(2, 16, 14, 14), tmp_path, "s", ["tflite-int8-static"])


def test_unknown_variant_is_a_config_error(segments, tmp_path):
    with pytest.raises(ConfigError, match="tflite-fp16"):
        export_tflite_segment(segments[1], torch.zeros(2, 16, 14, 14), tmp_path, "s", ["tflite-int4"])


def test_generic_names_map_positionally_to_manifest_names(segments, tmp_path):
    """A caller that does not pass names gets output_i in the file; the runner's names still apply in order."""
    res = export_tflite_segment(segments[0], torch.zeros(2, 1, 28, 28), tmp_path, "g", ["tflite"])
    extra = res["tflite"]["extra"]
    assert extra["outputs"] == ["output_0", "output_1"]
    sess = LiteRTSession(tmp_path / "g.tflite", extra=extra, names=(["input"], ["boundary0", "exit0"]))
    assert sess.input_names == ["input"] and sess.output_names == ["boundary0", "exit0"]
    x, _ = fashion("test", 3)
    b, e0 = sess.run({"input": x})
    assert b.shape == (3, 16, 14, 14) and e0.shape == (3, 10)
    with pytest.raises(BundleError, match="re-export"):
        LiteRTSession(tmp_path / "g.tflite", extra=extra, names=(["input"], ["exit0"]))


def test_fixed_batch_model_loops_over_samples(segments, tmp_path):
    """A batch-1 model (what the exporter writes when dynamic batch fails) still serves any batch."""
    import litert_torch

    from edgeexit.exporters.tflite import named_io

    names = SegmentNames("input", ("boundary0", "exit0"))
    model = litert_torch.convert(named_io(segments[0], names), (), {"input": torch.zeros(1, 1, 28, 28)})
    path = tmp_path / "fixed.tflite"
    path.write_bytes(model.model_content())
    sess = LiteRTSession(path)
    assert not sess.dynamic_batch
    x, _ = fashion("test", 4)
    b, e0 = sess.run({"input": x})
    with torch.no_grad():
        ref_b, ref_e0 = segments[0](torch.from_numpy(x))
    assert np.abs(e0 - ref_e0.numpy()).max() < 1e-4 and b.shape == (4, 16, 14, 14)


def test_wrong_feed_name_is_invalid_tensor(exported):
    out, res = exported
    sess = LiteRTSession(out / res[0]["tflite"]["file"])
    with pytest.raises(InvalidTensor, match="input"):
        sess.run({"boundary0": np.zeros((1, 1, 28, 28), np.float32)})


class MeanHead(torch.nn.Module):
    """A segment whose first op is a mean right on its input: litert-torch cannot keep that batch symbolic."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, b):
        return (self.fc(b.mean(dim=(2, 3))),)


class FlattenHead(torch.nn.Module):
    """flatten + Linear: the batch-1 model bakes its batch into a reshape, so resizing it would be wrong."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16 * 14 * 14, 10)

    def forward(self, b):
        return (self.fc(b.flatten(1)),)


@pytest.mark.parametrize(("head", "resizable"), [(MeanHead, True), (FlattenHead, False)])
def test_batch_one_fallback_is_verified_and_stated(tmp_path, head, resizable):
    torch.manual_seed(0)
    module = head().eval()
    sample = torch.rand(2, 16, 14, 14)
    res = export_tflite_segment(module, sample, tmp_path, "h", list(VARIANTS), torch.rand(64, 16, 14, 14).numpy(),
                                names=SegmentNames("boundary0", ("exit1",)))
    x = torch.rand(5, 16, 14, 14)
    with torch.no_grad():
        (ref,) = module(x)
    for variant, entry in res.items():
        assert entry["batch"] == "fixed:1" and entry["extra"]["resizable"] is resizable, variant
        sess = LiteRTSession(tmp_path / entry["file"], extra=entry["extra"])
        assert sess.dynamic_batch is resizable  # resize when verified, else loop over samples
        (got,) = sess.run({"boundary0": x.numpy()})
        assert got.shape == (5, 10)
        if variant == "tflite":
            assert np.abs(got - ref.numpy()).max() < 1e-4
