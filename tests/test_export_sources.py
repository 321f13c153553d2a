"""Every accepted model source exported for real (ONNX written, validated, re-run in onnxruntime), and the
errors for sources we refuse: each names what to do."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from edgeexit.bundle import Bundle
from edgeexit.errors import BundleError, ConfigError, ExportError, ShapeError, ToleranceError
from edgeexit.exporters import ExportOptions, export_model
from edgeexit.runtime.runner import SegmentRunner
from tests.fixtures_bundles import TinyDenseNet, TinyResNet, TinySequential, digits_28, make_bundle, seeded

SHAPE = (1, 1, 28, 28)


class AsList(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return list(self.inner(x))


def _assert_matches(bundle_dir, model, x):
    runner = SegmentRunner(bundle_dir)
    got = runner.run_all(runner.normalize(x))
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(x))]
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_concat_model_list_outputs_auto_split_with_normalization(tmp_path):
    """Dense (concatenating) skips, exits returned as a list, auto split points, runtime normalisation."""
    norm = {"mean": [0.5], "std": [0.25]}
    dense = seeded(TinyDenseNet())
    out = make_bundle(tmp_path, AsList(dense), split_points="auto", normalize=norm, calibration_data=digits_28(200))
    m = Bundle.load(out).manifest
    assert m.input.normalization == norm and m.export["split_points"] == "auto"
    assert len(m.segments) > 3  # stage boundaries were added to the exit branch points
    assert all(p.quantization is not None for p in m.split_points)

    class Normalized(torch.nn.Module):
        def forward(self, x):
            return dense((x - 0.5) / 0.25)

    for b in (1, 5):
        _assert_matches(out, Normalized(), digits_28(b, seed=b))


@pytest.mark.slow
def test_pt2_dynamic_batch(tmp_path):
    model = seeded(TinySequential())
    ep = torch.export.export(model, (torch.rand(2, *SHAPE[1:]),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, tmp_path / "m.pt2")
    b = export_model(tmp_path / "m.pt2", tmp_path / "m.edgeexit",
                     options=ExportOptions(split_points="exits", progress=False))
    assert b.manifest.export["source"] == "pt2" and b.manifest.export["batch"] == "dynamic"
    assert b.manifest.input.shape == ["batch", 1, 28, 28]
    _assert_matches(tmp_path / "m.edgeexit", model, digits_28(5))


@pytest.mark.slow
def test_pt2_static_batch_warns_and_works_at_batch_1(tmp_path, caplog):
    model = seeded(TinySequential())
    torch.export.save(torch.export.export(model, (torch.rand(*SHAPE),)), tmp_path / "s.pt2")
    with caplog.at_level("WARNING", logger="edgeexit"):  # the log record itself: stderr depends on who configured
        b = export_model(tmp_path / "s.pt2", tmp_path / "s.edgeexit",
                         options=ExportOptions(split_points="exits", progress=False))
    assert "static batch of 1" in caplog.text
    assert all(s.files["onnx"].batch == "fixed:1" for s in b.manifest.segments)
    _assert_matches(tmp_path / "s.edgeexit", model, digits_28(1))


@pytest.mark.slow
def test_torchscript_archive(tmp_path):
    model = seeded(TinySequential())
    torch.jit.trace(model, torch.rand(2, *SHAPE[1:])).save(str(tmp_path / "m.ts"))
    b = export_model(tmp_path / "m.ts", tmp_path / "ts.edgeexit",
                     options=ExportOptions(input_shape=SHAPE, split_points="exits", progress=False))
    assert b.manifest.export["source"] == "torchscript"
    _assert_matches(tmp_path / "ts.edgeexit", model, digits_28(5))


def test_pickle_needs_trust_pickle(tmp_path):
    torch.save(seeded(TinySequential()), tmp_path / "whole.pt")
    with pytest.raises(ExportError, match="--trust-pickle"):
        export_model(tmp_path / "whole.pt", tmp_path / "p.edgeexit", options=ExportOptions(input_shape=SHAPE))
    assert not (tmp_path / "p.edgeexit").exists()


@pytest.mark.slow
def test_pickle_with_trust_pickle(tmp_path):
    model = seeded(TinySequential())
    torch.save(model, tmp_path / "whole.pt")
    b = export_model(tmp_path / "whole.pt", tmp_path / "p.edgeexit",
                     options=ExportOptions(input_shape=SHAPE, trust_pickle=True, split_points="exits", progress=False))
    assert b.manifest.export["source"] == "pickle"
    _assert_matches(tmp_path / "p.edgeexit", model, digits_28(5))


def test_factory_weights_must_fit_strictly(tmp_path):
    sd = seeded(TinyResNet()).state_dict()
    sd.pop("final.fc.bias")
    torch.save(sd, tmp_path / "sd.pt")
    opts = ExportOptions(input_shape=SHAPE, factory="tests.fixtures_bundles:TinyResNet",
                         weights=str(tmp_path / "sd.pt"))
    with pytest.raises(ExportError, match="strict"):
        export_model(None, tmp_path / "f.edgeexit", options=opts)


def test_missing_model_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        export_model(tmp_path / "nope.pt2", tmp_path / "x.edgeexit", options=ExportOptions())


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "x.edgeexit").mkdir()
    with pytest.raises(ConfigError, match="--force"):
        export_model(seeded(TinySequential()), tmp_path / "x.edgeexit", options=ExportOptions(input_shape=SHAPE))


@pytest.mark.slow
def test_tolerance_failure_names_segment_and_exit_and_leaves_nothing(tmp_path):
    """With a zero tolerance onnxruntime's float rounding must fail validation; no bundle may remain."""
    out = tmp_path / "t.edgeexit"
    with pytest.raises(ToleranceError, match=r"segment \d exit \d"):
        export_model(seeded(TinySequential()), out, options=ExportOptions(
            input_shape=SHAPE, split_points="exits", atol=0.0, rtol=0.0, progress=False))
    assert list(tmp_path.iterdir()) == []


def test_corrupted_segment_file_is_a_bundle_error(tiny_bundle, tmp_path):
    copy = tmp_path / "c.edgeexit"
    shutil.copytree(tiny_bundle, copy)
    seg = copy / "segments" / "seg1.onnx"
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="seg1.onnx fails its sha256"):
        Bundle.load(copy)


def test_wrong_calibration_shape(tmp_path):
    with pytest.raises(ShapeError, match="calibration inputs"):
        export_model(seeded(TinySequential()), tmp_path / "w.edgeexit", options=ExportOptions(
            input_shape=SHAPE, calibration_data=np.zeros((4, 1, 8, 8), np.float32), progress=False))
