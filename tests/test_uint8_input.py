"""Raw pixels travel as UINT8 (1 byte each, k meaning k/255) to the whole model: the codec's round trip is exact
for k/255 pixels and never rounds anything else, and the service answers the same logits for FP32 and UINT8 of
the same image (our client and an unmodified tritonclient)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit.errors import InvalidTensor
from edgeexit.runtime import codec
from edgeexit.runtime.client import InferenceClient
from edgeexit.runtime.runner import SegmentRunner


def test_every_level_round_trips_bit_for_bit():
    x = (np.arange(256, dtype=np.float32) / np.float32(255)).reshape(1, 1, 16, 16)
    wire = codec.encode_input(x)
    assert wire.datatype == "UINT8" and len(wire.data) == x.size == codec.encoded_bytes(x.size, "uint8")
    back = codec.decode(wire.data, wire.datatype, wire.shape, wire.params)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, x)
    # k/255 computed another way (float64 then cast; k * (1/255) in float32) is the same pixel.
    via64 = (np.arange(256) / 255.0).astype(np.float32)
    via_mul = np.arange(256, dtype=np.float32) * np.float32(1 / 255)
    for other in (via64, via_mul):
        w = codec.encode_input(other)
        assert w.datatype == "UINT8"
        np.testing.assert_allclose(codec.decode(w.data, w.datatype, w.shape), other, rtol=0, atol=4e-6)


def test_compressed_pixels_round_trip():
    x = np.zeros((2, 1, 28, 28), np.float32)
    x[:, :, 10:18, 10:18] = np.float32(200) / np.float32(255)
    wire = codec.encode_input(x, compress=True)
    assert wire.datatype == "UINT8" and wire.params[codec.P_COMPRESSION] == "zstd" and len(wire.data) < x.size
    np.testing.assert_array_equal(codec.decode(wire.data, wire.datatype, wire.shape, wire.params), x)


@pytest.mark.parametrize("values", [
    [0.5 / 255, 0.0],  # between two levels: rounding would change the input
    [1.5, 0.0],  # outside [0, 1]
    [-1 / 255, 0.0],
    [np.nan, 0.0],
    [np.inf, 0.0],
])
def test_anything_off_the_pixel_grid_is_never_rounded(values):
    x = np.asarray(values, np.float32)
    assert codec.pixel_levels(x) is None
    wire = codec.encode_input(x)
    assert wire.datatype == "FP32"
    np.testing.assert_array_equal(np.frombuffer(wire.data, np.float32), x)
    assert codec.encode_input(x, fallback="fp16").datatype == "FP16"
    assert codec.encode_input(x, fallback="int8").datatype == "FP32"  # no calibration for raw inputs


def test_uint8_bytes_must_match_the_shape():
    with pytest.raises(InvalidTensor, match="needs 4 bytes"):
        codec.decode(b"\x00\x01\x02", "UINT8", [4])


@pytest.fixture
def image(service_bundle) -> np.ndarray:
    shape = [int(d) for d in SegmentRunner(service_bundle).manifest.input.shape[1:]]
    levels = np.random.default_rng(5).integers(0, 256, (3, *shape))
    return (levels.astype(np.float32) / np.float32(255)).astype(np.float32)


def test_service_answers_the_same_logits_for_fp32_and_uint8(serve, service_bundle, image):
    m = SegmentRunner(service_bundle).manifest
    server = serve()
    wire = codec.encode_input(image)
    assert wire.datatype == "UINT8" and len(wire.data) * 4 == image.nbytes
    with InferenceClient(server.target) as client:
        as_fp32 = client.infer(m.name, m.input.name, codec.encode(image), timeout=10)
        as_uint8 = client.infer(m.name, m.input.name, wire, timeout=10)
    assert sorted(as_uint8) == sorted(as_fp32) == [f"exit{j}" for j in range(len(m.exits))]
    for k in as_fp32:
        np.testing.assert_array_equal(as_uint8[k], as_fp32[k])  # the server decoded the very same floats


def test_tritonclient_can_send_uint8_pixels(serve, service_bundle, image):
    tc = pytest.importorskip("tritonclient.grpc")
    runner = SegmentRunner(service_bundle)
    m = runner.manifest
    server = serve()
    client = tc.InferenceServerClient(server.target)
    try:
        raw = np.rint(image * 255).astype(np.uint8)  # what a camera hands over
        inp = tc.InferInput(m.input.name, list(raw.shape), "UINT8")
        inp.set_data_from_numpy(raw)
        last = f"exit{len(m.exits) - 1}"
        got = client.infer(m.name, [inp]).as_numpy(last)
        np.testing.assert_allclose(got, runner.run_all(runner.normalize(image))[-1], atol=1e-5)
    finally:
        client.close()


def test_uint8_is_refused_for_a_boundary_tensor(serve, service_bundle, boundary_batch):
    name = SegmentRunner(service_bundle).manifest.name
    server = serve()
    b = boundary_batch(0, 1)
    wire = codec.WireTensor(np.zeros(b.size, np.uint8).tobytes(), "UINT8", list(b.shape))
    with InferenceClient(server.target) as client, pytest.raises(InvalidTensor, match="only for raw pixels"):
        client.infer(f"{name}@0", "boundary0", wire, timeout=10)
