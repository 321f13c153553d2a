"""The onnxruntime_onnx flavour's tails (exporters/triton_onnx.py), run by onnxruntime directly (the Triton here
has only the python backend): each merged model must answer what `edgeexit serve` answers for the same wire bytes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeexit.bundle import Bundle
from edgeexit.errors import ExportError
from edgeexit.exporters.triton_onnx import TailSpec, write_onnx_tail
from edgeexit.runtime import codec
from edgeexit.runtime.batching import BatchOptions
from edgeexit.runtime.oip_messages import InferRequest, InputTensor
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.service import ServiceOptions, TailHandler, build_handlers

ATOL = 1e-5
NORM = {"mean": [0.3], "std": [0.4]}


def _copy(src: Path, dst: Path, **manifest_changes) -> Bundle:
    """A copy of a bundle with manifest edits (files untouched, so checksums still hold)."""
    shutil.copytree(src, dst)
    b = Bundle.load(dst)
    for key, value in manifest_changes.items():
        if key == "normalization":
            b.manifest.input.normalization = value
        elif key == "quantization":
            for p in b.manifest.split_points:
                p.quantization = value
    b.save()
    return Bundle.load(dst)


@pytest.fixture(scope="module")
def bundles(tiny_bundle, tmp_path_factory) -> dict[str, Bundle]:
    tmp = tmp_path_factory.mktemp("triton_onnx")
    return {"plain": Bundle.load(tiny_bundle),
            "normalised": _copy(tiny_bundle, tmp / "norm.edgeexit", normalization=NORM),
            "uncalibrated": _copy(tiny_bundle, tmp / "raw.edgeexit", quantization=None)}


@pytest.fixture(scope="module")
def handlers(bundles) -> Iterator[dict[str, list[TailHandler]]]:
    opts = ServiceOptions(batching=BatchOptions(max_batch_size=1))  # serve's own path, no batching delay
    hs = {k: build_handlers(bundles[k], opts) for k in ("plain", "normalised")}
    yield hs
    for group in hs.values():
        for h in group:
            h.close()


def _serve(handler: TailHandler, wire: codec.WireTensor) -> dict[str, np.ndarray]:
    t = InputTensor(wire.datatype, list(wire.shape), wire.data)
    return handler.infer(InferRequest(handler.name, {handler.input_spec.name: t}, dict(wire.params))).outputs


def _onnx(path: Path, spec: TailSpec, wire: codec.WireTensor) -> dict[str, np.ndarray]:
    """What Triton's onnxruntime backend does: the raw bytes as a tensor of the model's datatype, no parameters."""
    x = np.frombuffer(wire.data, codec.NUMPY[wire.datatype]).reshape(wire.shape)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {spec.input.name: x})
    return dict(zip([o.name for o in sess.get_outputs()], outs, strict=True))


def _check_same(path: Path, spec: TailSpec, handler: TailHandler, wire: codec.WireTensor) -> None:
    want, got = _serve(handler, wire), _onnx(path, spec, wire)
    assert list(got) == list(want) == [o.name for o in spec.outputs]
    for name in want:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ATOL, err_msg=name)


def _pixels(rows: int, seed: int = 0) -> np.ndarray:
    """Raw inputs on the 8-bit grid (k/255), so the whole model can take them as UINT8 too."""
    return np.random.default_rng(seed).integers(0, 256, (rows, 1, 28, 28)).astype(np.float32) / np.float32(255)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("split", [0, 1])
def test_tail_equals_serve(bundles, handlers, boundary_batch, tmp_path, split, encoding):
    bundle, handler = bundles["plain"], handlers["plain"][split + 1]
    path = tmp_path / "model.onnx"
    spec = write_onnx_tail(bundle, split + 1, encoding, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    meta = handler.metadata()  # same names and shapes as serve's model, so the agent cannot tell them apart
    assert spec.model == meta.name == f"tiny@{split}"
    assert spec.input.name == meta.inputs[0].name and [-1, *spec.input.dims] == meta.inputs[0].shape
    assert [(o.name, [-1, *o.dims]) for o in spec.outputs] == [(o.name, o.shape) for o in meta.outputs]
    assert spec.input.datatype == codec.DATATYPES[encoding]
    quant = bundle.manifest.split_points[split].quantization
    for rows in (1, 5):  # dynamic batch
        wire = codec.encode(boundary_batch(split, rows, seed=rows), encoding, quant)
        _check_same(path, spec, handler, wire)


def test_int8_prologue_uses_the_calibrated_parameters(bundles, boundary_batch, tmp_path):
    """The DequantizeLinear constants are the manifest's: the same int8 bytes read with the wrong scale differ."""
    bundle = bundles["plain"]
    spec = write_onnx_tail(bundle, 1, "int8", tmp_path / "m.onnx")
    quant = bundle.manifest.split_points[0].quantization
    wire = codec.encode(boundary_batch(0, 3), "int8", quant)
    got = _onnx(tmp_path / "m.onnx", spec, wire)["exit2"]
    x = codec.decode(wire.data, "INT8", wire.shape, {codec.P_SCALE: quant["scale"] * 2,
                                                       codec.P_ZERO: quant["zero_point"]})
    wrong = SegmentRunner(bundle).run(x, start=1).exits[2]
    assert not np.allclose(got, wrong, atol=1e-3)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert init["edgeexit_scale"] == np.float32(quant["scale"])
    assert init["edgeexit_zero_point"] == quant["zero_point"] and init["edgeexit_zero_point"].dtype == np.int8


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "uint8"])
@pytest.mark.parametrize("which", ["plain", "normalised"])
def test_whole_model_equals_serve(bundles, handlers, tmp_path, which, encoding):
    bundle, handler = bundles[which], handlers[which][0]
    path = tmp_path / "model.onnx"
    spec = write_onnx_tail(bundle, 0, encoding, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert spec.model == "tiny" and spec.input.name == "input" and spec.input.dims == (1, 28, 28)
    assert [o.name for o in spec.outputs] == ["exit0", "exit1", "exit2"]
    for rows in (1, 5):
        x = _pixels(rows, seed=rows)
        wire = codec.encode_input(x) if encoding == "uint8" else codec.encode(x, encoding)
        assert wire.datatype == spec.input.datatype
        _check_same(path, spec, handler, wire)


def test_normalisation_is_in_the_graph(bundles, tmp_path):
    """The normalised bundle's whole model differs from the plain one's on the same pixels (so the test above
    compares something), and equals the plain graph fed (x - mean) / std."""
    plain = write_onnx_tail(bundles["plain"], 0, "fp32", tmp_path / "plain.onnx")
    norm = write_onnx_tail(bundles["normalised"], 0, "fp32", tmp_path / "norm.onnx")
    x = _pixels(4)
    a = _onnx(tmp_path / "norm.onnx", norm, codec.encode(x))["exit2"]
    b = _onnx(tmp_path / "plain.onnx", plain, codec.encode(x))["exit2"]
    c = _onnx(tmp_path / "plain.onnx", plain, codec.encode((x - np.float32(0.3)) / np.float32(0.4)))["exit2"]
    assert not np.allclose(a, b, atol=1e-3)
    np.testing.assert_allclose(a, c, rtol=0, atol=ATOL)


def test_int8_without_calibration_says_how_to_fix(bundles, tmp_path):
    with pytest.raises(ExportError, match=r"edgeexit export \.\.\. --calibration-data") as e:
        write_onnx_tail(bundles["uncalibrated"], 1, "int8", tmp_path / "m.onnx")
    assert "split point 0" in str(e.value)
    assert not (tmp_path / "m.onnx").exists()
    write_onnx_tail(bundles["uncalibrated"], 1, "fp16", tmp_path / "m.onnx")  # other encodings still work


@pytest.mark.parametrize(("start", "encoding", "match"), [
    (0, "int8", "raw pixels"), (1, "uint8", "boundary tensor"), (1, "zstd", "zstd cannot work"),
    (3, "fp32", "segments 0..2"),
])
def test_refused_encodings(bundles, tmp_path, start, encoding, match):
    with pytest.raises(ExportError, match=match):
        write_onnx_tail(bundles["plain"], start, encoding, tmp_path / "m.onnx")
