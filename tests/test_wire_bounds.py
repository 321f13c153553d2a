"""Issue 13 items 3, 4, 5, 8: bounded decompression and sizes, finite answers, exactly one zstd frame.

Unit tests of codec.decode, then every case through a real server on loopback (build_server + build_handlers of
the tiny bundle, with the limits under test), each followed by a valid request answered correctly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import zstandard

from edgeexit.errors import InvalidTensor
from edgeexit.runtime import codec
from edgeexit.runtime.batching import BatchOptions
from edgeexit.runtime.oip_messages import (
    P_MAX_BATCH_ROWS,
    ModelMetadata,
    TensorMeta,
    metadata_params_from_pb,
    metadata_to_pb,
    outputs_from_pb,
    params_to_pb,
    request_from_pb,
)
from edgeexit.runtime.oip_server import ServerHandle, ServerOptions, build_server
from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.service import ServiceOptions, build_handlers

C = grpc.StatusCode
BOMB_SHAPE = [10000, 16, 14, 14]  # the request: boundary1 of the tiny bundle, 125 MB as FP32


def _zeros_frame(nbytes: int, content_size: bool = True) -> bytes:
    """A zstd frame of ``nbytes`` zeros, compressed chunk by chunk (never holding the zeros in memory)."""
    c = zstandard.ZstdCompressor(write_content_size=content_size)
    obj = c.compressobj(size=nbytes if content_size else -1)
    chunk, parts, left = bytes(1 << 20), [], nbytes
    while left:
        n = min(left, len(chunk))
        parts.append(obj.compress(chunk if n == len(chunk) else bytes(n)))
        left -= n
    return b"".join(parts) + obj.flush()


# -- codec.decode ------------------------------------------------------------------------------------------------
@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).random((3, 16, 7, 7), dtype=np.float32)


def _zstd(params: dict | None = None) -> dict:
    return {codec.P_COMPRESSION: "zstd", **(params or {})}


@pytest.mark.parametrize("shape", [[2**62, 4], [2**40, 2**40, 2**40], [10**30, 1], BOMB_SHAPE])
def test_huge_shapes_are_refused_before_allocating(shape):
    # 2**62 * 4 * 4 bytes wraps an int64 product to 0 or a negative number: the old "needs -12544 bytes"
    with pytest.raises(InvalidTensor, match=r"shape \[.*would take .* at most 67108864 bytes .*--max-message-mb"):
        codec.decode(b"\0" * 64, "FP32", shape)


def test_a_zstd_bomb_is_refused_from_its_declared_shape_before_decompressing():
    bomb = _zeros_frame(16 << 20)
    assert len(bomb) < 2000
    with pytest.raises(InvalidTensor, match="at most 1048576 bytes"):
        codec.decode(bomb, "FP32", [1 << 22], _zstd(), max_bytes=1 << 20)
    assert codec.decode(bomb, "FP32", [1 << 22], _zstd(), max_bytes=16 << 20).shape == (1 << 22,)


def test_a_frame_without_content_size_is_bounded_by_the_shape():
    bomb = _zeros_frame(64 << 20, content_size=False)
    assert zstandard.frame_content_size(bomb) == -1
    with pytest.raises(InvalidTensor, match="zstd"):
        codec.decode(bomb, "FP32", [3, 16, 7, 7], _zstd())
    fine = _zeros_frame(3 * 16 * 7 * 7 * 4, content_size=False)
    np.testing.assert_array_equal(codec.decode(fine, "FP32", [3, 16, 7, 7], _zstd()), 0)


def test_a_frame_declaring_another_size_is_refused(x):
    frame = zstandard.ZstdCompressor().compress(x.tobytes() + bytes(4))
    with pytest.raises(InvalidTensor, match="declares 9412 bytes but the shape needs 9408"):
        codec.decode(frame, "FP32", list(x.shape), _zstd())


@pytest.mark.parametrize("tail,match", [
    (bytes(1 << 20), "followed by 1048576 more bytes"),  # the frame + 1 MiB of junk
    (b"\x01", "followed by 1 more bytes"),
    ("frame", "followed by"),  # a second frame
])
def test_exactly_one_zstd_frame(x, tail, match):
    frame = codec.encode(x, "fp32", compress=True).data
    data = frame + (frame if tail == "frame" else tail)
    with pytest.raises(InvalidTensor, match=match):
        codec.decode(data, "FP32", list(x.shape), _zstd())


@pytest.mark.parametrize("mangle,match", [
    (lambda f: f[:-1], "truncated"),
    (lambda f: f[:6], "truncated"),
    (lambda f: b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + bytes(4) + f, "not a zstd frame"),  # skippable
    (lambda f: f[:4] + b"\x08" + f[5:], "reserved|invalid|zstd"),  # reserved bit of the frame header
])
def test_mangled_frames(x, mangle, match):
    frame = codec.encode(x, "fp32", compress=True).data
    with pytest.raises(InvalidTensor, match=match):
        codec.decode(mangle(frame), "FP32", list(x.shape), _zstd())


@pytest.mark.parametrize("kwargs", [{"write_checksum": True}, {"write_content_size": False}, {"level": 19}])
def test_valid_frames_still_decode(x, kwargs):
    frame = zstandard.ZstdCompressor(**kwargs).compress(x.tobytes())
    np.testing.assert_array_equal(codec.decode(frame, "FP32", list(x.shape), _zstd()), x)


def test_many_tiny_blocks_are_refused_without_walking_them_all(x):
    c = zstandard.ZstdCompressor().compressobj()
    raw = x.tobytes()
    data = b"".join(c.compress(raw[i:i + 16]) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
                    for i in range(0, len(raw), 16)) + c.flush()
    with pytest.raises(InvalidTensor, match="more than 25 blocks"):
        codec.decode(data, "FP32", list(x.shape), _zstd())


@pytest.mark.parametrize("scale,zero,match", [
    (True, 0, "edgeexit.scale must be a number .* not bool"),
    ("0.5", 0, "edgeexit.scale must be a number .* not str"),
    (float("nan"), 0, r"edgeexit.scale must be a positive finite number in \[1.18e-38, 1.33e\+36\]"),
    (float("inf"), 0, "edgeexit.scale must be a positive finite"),
    (1e308, 0, "edgeexit.scale must be a positive finite"),  # (q - zp) * 1e308 overflows float32
    (10**37, 0, "edgeexit.scale must be a positive finite"),
    (0.0, 0, "positive"),
    (0.1, True, "edgeexit.zero_point must be an int64 .* not bool"),
    (0.1, float("nan"), "edgeexit.zero_point must be an int64 .* not float"),
    (0.1, float("inf"), "edgeexit.zero_point must be an int64 .* not float"),
    (0.1, 2**62, r"edgeexit.zero_point must be an int in \[-128, 127\], got 4611686018427387904"),
    (0.1, -129, r"\[-128, 127\]"),
])
def test_int8_parameters_are_typed_and_ranged(scale, zero, match):
    q = np.arange(-128, 128, dtype=np.int8)
    with pytest.raises(InvalidTensor, match=match):
        codec.decode(q.tobytes(), "INT8", [256], {codec.P_SCALE: scale, codec.P_ZERO: zero})


@pytest.mark.parametrize("scale,zero", [(1, 0), (0.02, -128), (1.3e36, 127), (1.2e-38, 5)])
def test_int8_parameters_at_their_limits_give_finite_values(scale, zero):
    q = np.arange(-128, 128, dtype=np.int8)
    out = codec.decode(q.tobytes(), "INT8", [256], {codec.P_SCALE: scale, codec.P_ZERO: zero})
    assert np.isfinite(out).all()


# -- protobuf conversions -----------------------------------------------------------------------------------------
def _typed(datatype: str, shape: list[int], **contents) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="input", datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents))
    return req


@pytest.mark.parametrize("req,match", [
    (_typed("INT8", [2], int_contents=[1, 300]), r"INT8 values must lie in \[-128, 127\]"),
    (_typed("UINT8", [2], uint_contents=[1, 256]), r"UINT8 values must lie in \[0, 255\]"),
    (_typed("FP32", [2**62, 2**62], fp32_contents=[1.0]), "needs 21267647932558653966460912964485513216 values"),
    (_typed("FP32", [-1, -1], fp32_contents=[1.0]), "negative"),
])
def test_typed_contents_are_checked_against_the_shape(req, match):
    with pytest.raises(InvalidTensor, match=match):
        request_from_pb(req)


def test_typed_contents_in_range_decode():
    t = request_from_pb(_typed("INT8", [3], int_contents=[-128, 0, 127])).inputs["input"]
    assert np.frombuffer(t.data, np.int8).tolist() == [-128, 0, 127]


@pytest.mark.parametrize("shape", [[2**62, 4], [-2, -2], [-1, 4]])
def test_outputs_with_impossible_shapes_are_refused(shape):
    resp = pb.ModelInferResponse()
    resp.outputs.add(name="y", datatype="FP32", shape=shape)
    resp.raw_output_contents.append(bytes(16))
    with pytest.raises(InvalidTensor, match="negative|do not fit"):
        outputs_from_pb(resp)


def test_metadata_parameters_travel_as_mlserver_field_6_and_triton_clients_skip_them():
    meta = ModelMetadata("m", [TensorMeta("x", "FP32", [-1, 4])], [], params={P_MAX_BATCH_ROWS: 7})
    wire = metadata_to_pb(meta).SerializeToString()
    assert metadata_params_from_pb(pb.ModelMetadataResponse.FromString(wire)) == {P_MAX_BATCH_ROWS: 7}
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    theirs = service_pb2.ModelMetadataResponse.FromString(wire)
    assert theirs.name == "m" and list(theirs.inputs[0].shape) == [-1, 4]


# -- through a real server ----------------------------------------------------------------------------------------
StartServer = Callable[..., ServerHandle]


@pytest.fixture
def start(service_bundle) -> Iterator[StartServer]:
    """``start(rows=..., max_mb=...)``: the tiny bundle's service on 127.0.0.1:0 with those limits."""
    started: list[ServerHandle] = []

    def make(rows: int = 256, max_mb: float = 64.0, batch: int = 1) -> ServerHandle:
        max_bytes = int(max_mb * (1 << 20))
        opts = ServiceOptions(batching=BatchOptions(max_batch_size=batch), max_batch_rows=rows,
                              max_message_bytes=max_bytes)
        handle = build_server(build_handlers(service_bundle, opts), ServerOptions(max_message_bytes=max_bytes))
        started.append(handle.start())
        return handle

    yield make
    for h in started:
        h.stop(0.5)


@pytest.fixture(scope="module")
def runner(service_bundle) -> SegmentRunner:
    return SegmentRunner(service_bundle)


@pytest.fixture(scope="module")
def valid(runner) -> tuple[np.ndarray, np.ndarray]:
    """A real boundary1 batch and the final exit's logits the tail must answer for it."""
    shape = [int(d) for d in runner.manifest.input.shape[1:]]
    raw = np.random.default_rng(3).random((2, *shape), dtype=np.float32)
    boundary = runner.run(runner.normalize(raw), 0, 2).boundary
    return boundary, runner.run(boundary, 2).exits[len(runner.manifest.exits) - 1]


def _request(model: str, name: str, datatype: str, shape: list[int], data: bytes,
             params: dict | None = None) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=name, datatype=datatype, shape=shape)
    params_to_pb(params or {}, req.parameters)
    req.raw_input_contents.append(data)
    return req


def _call(handle: ServerHandle, req: pb.ModelInferRequest) -> pb.ModelInferResponse:
    with grpc.insecure_channel(handle.target) as ch:
        return pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)


def _refused(handle: ServerHandle, req: pb.ModelInferRequest, *matches: str) -> str:
    with pytest.raises(grpc.RpcError) as e:
        _call(handle, req)
    assert e.value.code() == C.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    for m in matches:
        assert m in e.value.details()
    return e.value.details()


def _answers_correctly(handle: ServerHandle, runner: SegmentRunner, valid) -> None:
    boundary, want = valid
    model = f"{runner.manifest.name}@1"
    wire = codec.encode(boundary, "fp32", compress=True)
    out = outputs_from_pb(_call(handle, _request(model, "boundary1", wire.datatype, wire.shape, wire.data,
                                                 wire.params)))
    np.testing.assert_allclose(out[f"exit{len(runner.manifest.exits) - 1}"], want, rtol=1e-5, atol=1e-5)


def _bomb_request(runner: SegmentRunner) -> pb.ModelInferRequest:
    frame = _zeros_frame(int(np.prod(BOMB_SHAPE)) * 4)
    assert len(frame) < 5000  # the was 3,850 bytes
    return _request(f"{runner.manifest.name}@1", "boundary1", "FP32", BOMB_SHAPE, frame, _zstd())


def test_the_zstd_bomb_is_refused_by_the_row_limit(start, runner, valid):
    h = start(rows=256)
    _refused(h, _bomb_request(runner), "10000 rows", "at most 256", "--max-batch-rows")
    _answers_correctly(h, runner, valid)


def test_the_zstd_bomb_is_refused_by_the_message_limit_when_rows_allow_it(start, runner, valid):
    h = start(rows=1 << 62, max_mb=8)
    _refused(h, _bomb_request(runner), "125440000 bytes", "--max-message-mb")
    _answers_correctly(h, runner, valid)


@pytest.mark.parametrize("rows", [2**62, 2**63 - 1, 2**40])
def test_huge_declared_rows_are_invalid_argument_not_internal(start, runner, valid, rows):
    h = start(rows=1 << 63)
    req = _request(f"{runner.manifest.name}@1", "boundary1", "FP32", [rows, 16, 14, 14], bytes(64))
    _refused(h, req, "would take", "--max-message-mb")
    _answers_correctly(h, runner, valid)


def test_a_wrong_declared_shape_is_refused_before_decompressing(start, runner, valid):
    h = start()
    bomb = _zeros_frame(1 << 26, content_size=False)
    req = _request(f"{runner.manifest.name}@1", "boundary1", "FP32", [1, 2**40], bomb, _zstd())
    _refused(h, req, "bundle expects")
    _answers_correctly(h, runner, valid)


def test_frame_plus_junk_is_refused(start, runner, valid):
    h = start()
    boundary, _ = valid
    wire = codec.encode(boundary, "fp32", compress=True)
    req = _request(f"{runner.manifest.name}@1", "boundary1", "FP32", wire.shape, wire.data + bytes(1 << 20),
                   wire.params)
    _refused(h, req, "followed by 1048576 more bytes", "exactly one zstd frame")
    _answers_correctly(h, runner, valid)


@pytest.mark.parametrize("scale,zero,match", [
    (None, float("nan"), codec.P_ZERO), (None, float("inf"), codec.P_ZERO), (None, 2**62, "[-128, 127]"),
    (1e308, None, codec.P_SCALE), (True, None, "not bool"), (float("nan"), None, codec.P_SCALE),
])
def test_int8_parameters_through_the_server(start, runner, valid, scale, zero, match):
    h = start()
    boundary, _ = valid
    wire = codec.encode(boundary, "int8", runner.manifest.split_points[1].quantization)
    params = dict(wire.params)
    if scale is not None:
        params[codec.P_SCALE] = scale
    if zero is not None:
        params[codec.P_ZERO] = zero
    req = _request(f"{runner.manifest.name}@1", "boundary1", "INT8", wire.shape, wire.data, params)
    _refused(h, req, match)
    _answers_correctly(h, runner, valid)


@pytest.mark.parametrize("value", [3e38, -3e38])
@pytest.mark.parametrize("whole", [True, False])
def test_inputs_that_drive_the_model_to_non_finite_outputs_are_refused(start, runner, valid, value, whole):
    h = start(batch=4)
    if whole:
        model, name, shape = runner.manifest.name, "input", [int(d) for d in runner.manifest.input.shape[1:]]
    else:
        model, name, shape = f"{runner.manifest.name}@1", "boundary1", [16, 14, 14]
    x = np.full((1, *shape), value, np.float32)
    _refused(h, _request(model, name, "FP32", list(x.shape), x.tobytes()), "non-finite outputs",
             "check the input range")
    _answers_correctly(h, runner, valid)


def test_raw_pixels_outside_0_1_are_answered_like_the_agent_does(start, runner):
    """The agent refuses only non-finite input or logits (DeviceRuntime._check_input, the exit policy), so the
    cloud does the same: a finite out-of-range input the model keeps finite is answered."""
    h = start()
    shape = [int(d) for d in runner.manifest.input.shape[1:]]
    x = np.full((1, *shape), 100.0, np.float32)
    out = outputs_from_pb(_call(h, _request(runner.manifest.name, "input", "FP32", list(x.shape), x.tobytes())))
    assert all(np.isfinite(v).all() for v in out.values())


def test_model_metadata_shows_the_row_limit(start, runner):
    h = start(rows=42)
    with grpc.insecure_channel(h.target) as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(
            pb.ModelMetadataRequest(name=f"{runner.manifest.name}@1"), timeout=10)
    assert list(resp.inputs[0].shape)[0] == -1
    assert metadata_params_from_pb(resp) == {P_MAX_BATCH_ROWS: 42}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.parametrize("rows", [256, 1 << 62])  # refused by the row limit, and by the size limit alone
def test_many_bomb_requests_do_not_grow_the_server(start, runner, valid, rows):
    h = start(rows=rows)
    req = _bomb_request(runner)
    with grpc.insecure_channel(h.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for _ in range(20):  # warm up: thread stacks, channel buffers
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(req, timeout=30)
        before = _rss_mb()
        for _ in range(300):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(req, timeout=30)
            assert e.value.code() == C.INVALID_ARGUMENT
        growth = _rss_mb() - before
    assert growth <= 20, f"RSS grew by {growth:.1f} MB over 300 refused bomb requests"
    _answers_correctly(h, runner, valid)


def test_serve_cli_has_the_row_limit():
    import argparse

    from edgeexit.cli import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "b.edgeexit", "--max-batch-rows", "8"])
    assert args.max_batch_rows == 8
    assert parser.parse_args(["serve", "b.edgeexit"]).max_batch_rows == 256


def test_the_agent_refuses_huge_shapes_and_trailing_bytes(agent_bundle, raw_batch):
    """The agent decodes through the same oip_input/codec path: same refusals, then it still answers."""
    from edgeexit.runtime.agent import Agent, AgentOptions
    from edgeexit.runtime.device import DeviceOptions

    agent = Agent(agent_bundle, AgentOptions(DeviceOptions(policy="never", split="device"),
                                             listen="127.0.0.1:0")).start()
    try:
        model = agent.runtime.model_name
        wire = codec.encode(raw_batch, "fp32", compress=True)
        cases = [
            (_request(model, "input", "FP32", [2**62, *wire.shape[1:]], bytes(64)), "--max-batch-rows"),
            (_request(model, "input", "FP32", wire.shape, wire.data + bytes(1 << 20), wire.params), "one zstd frame"),
        ]
        for req, match in cases:
            _refused(agent, req, match)
        out = outputs_from_pb(_call(agent, _request(model, "input", "FP32", wire.shape, wire.data, wire.params)))
        r = SegmentRunner(agent_bundle)
        np.testing.assert_array_equal(out["label"], r.run_all(r.normalize(raw_batch))[-1].argmax(1))
    finally:
        agent.stop()
