"""The wire codec: round trips per encoding, and every malformed payload refused with InvalidTensor."""

import numpy as np
import pytest

from edgeexit.errors import InvalidTensor
from edgeexit.runtime import codec


@pytest.fixture
def relu_tensor():
    rng = np.random.default_rng(0)
    return np.maximum(rng.normal(size=(3, 16, 7, 7)), 0).astype(np.float32)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("encoding,atol", [("fp32", 0.0), ("fp16", 2e-3), ("int8", None)])
def test_round_trip(relu_tensor, encoding, atol, compress):
    quant = codec.affine_params(relu_tensor.min(), relu_tensor.max())
    wire = codec.encode(relu_tensor, encoding, quant=quant, compress=compress)
    back = codec.decode(wire.data, wire.datatype, wire.shape, wire.params)
    assert back.dtype == np.float32 and back.shape == relu_tensor.shape
    # int8: rounding error is at most half a quantisation step
    tol = quant["scale"] / 2 + 1e-6 if atol is None else atol
    np.testing.assert_allclose(back, relu_tensor, atol=tol, rtol=0 if encoding != "fp16" else 1e-3)


def test_int8_keeps_zero_exact(relu_tensor):
    quant = codec.affine_params(0.0, float(relu_tensor.max()))
    wire = codec.encode(relu_tensor, "int8", quant=quant)
    back = codec.decode(wire.data, wire.datatype, wire.shape, wire.params)
    assert np.all(back[relu_tensor == 0] == 0)


def test_sizes(relu_tensor):
    n = relu_tensor.size
    quant = codec.affine_params(0, 1)
    for enc in codec.ENCODINGS:
        assert len(codec.encode(relu_tensor, enc, quant=quant).data) == codec.encoded_bytes(n, enc)
    sparse = np.zeros((1, 64, 32, 32), np.float32)
    assert len(codec.encode(sparse, "fp32", compress=True).data) < sparse.nbytes / 50


def test_int8_without_calibration_says_what_to_do(relu_tensor):
    with pytest.raises(InvalidTensor, match="calibration-data"):
        codec.encode(relu_tensor, "int8")


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda w: (w.data[:-4], w.datatype, w.shape, w.params), "needs .* bytes"),
        (lambda w: (w.data + b"\0" * 4, w.datatype, w.shape, w.params), "needs .* bytes"),
        (lambda w: (w.data, "INT64", w.shape, w.params), "is not on the wire"),
        (lambda w: (w.data, w.datatype, [3, -16, 7, 7], w.params), "negative"),
        (lambda w: (w.data, w.datatype, w.shape, {codec.P_COMPRESSION: "gzip"}), "unknown compression"),
        (lambda w: (b"garbage", w.datatype, w.shape, {codec.P_COMPRESSION: "zstd"}), "zstd"),
    ],
)
def test_malformed_fp32(relu_tensor, mutate, match):
    wire = codec.encode(relu_tensor, "fp32")
    with pytest.raises(InvalidTensor, match=match):
        codec.decode(*mutate(wire))


def test_int8_needs_params_and_positive_scale(relu_tensor):
    wire = codec.encode(relu_tensor, "int8", quant=codec.affine_params(0, 3))
    with pytest.raises(InvalidTensor, match="scale"):
        codec.decode(wire.data, wire.datatype, wire.shape, {})
    with pytest.raises(InvalidTensor, match="positive"):
        codec.decode(wire.data, wire.datatype, wire.shape, {codec.P_SCALE: -1.0, codec.P_ZERO: 0})


def test_non_finite_refused(relu_tensor):
    bad = relu_tensor.copy()
    bad[0, 0, 0, 0] = np.nan
    wire = codec.encode(bad, "fp32")
    with pytest.raises(InvalidTensor, match="NaN"):
        codec.decode(wire.data, wire.datatype, wire.shape, wire.params)


def test_zstd_bomb_is_bounded():
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b"\0" * (8 << 20))
    with pytest.raises(InvalidTensor):
        codec.decode(bomb, "FP32", [1, 4], {codec.P_COMPRESSION: "zstd"})
