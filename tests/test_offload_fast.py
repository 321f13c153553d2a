"""The offload hot path: requests the client serialises itself (``client.request_bytes``) and the server's split
parse (``oip_messages.split_raw_contents``: tensor bytes as views, the rest parsed by protobuf) give exactly what
the protobuf paths gave, for every encoding; malformed bytes are still INVALID_ARGUMENT."""

from __future__ import annotations

import random

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError

from edgeexit.bundle import Bundle
from edgeexit.runtime import codec
from edgeexit.runtime.client import InferenceClient, request_bytes
from edgeexit.runtime.oip_messages import P_BUNDLE, outputs_from_pb, params_to_pb, request_from_pb, split_raw_contents
from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc

CASES = [("fp32", False), ("fp16", False), ("int8", False), ("fp32", True), ("int8", True)]


def _protobuf_request(model: str, name: str, wire: codec.WireTensor, request_id: str = "",
                      bundle: str | None = None) -> pb.ModelInferRequest:
    """The request as the client built it before: a protobuf message."""
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.add(name=name, datatype=wire.datatype, shape=list(wire.shape))
    req.raw_input_contents.append(bytes(wire.data))
    params_to_pb({**wire.params, P_BUNDLE: bundle} if bundle else wire.params, req.parameters)
    return req


def _wires(quant: dict) -> list[codec.WireTensor]:
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    pixels = np.rint(np.random.default_rng(1).random((2, 1, 6, 6)) * 255).astype(np.float32) / 255
    return ([codec.encode(x, enc, quant if enc == "int8" else None, compress=z) for enc, z in CASES]
            + [codec.encode_input(pixels), codec.encode_input(pixels, compress=True)])


QUANT = {"scale": 0.02, "zero_point": -3}


@pytest.mark.parametrize("request_id", ["", "req-7 é"])
@pytest.mark.parametrize("bundle", [None, "ab" * 32])
def test_client_bytes_equal_the_protobuf_request(request_id, bundle):
    for wire in _wires(QUANT):
        for _ in range(2):  # the second call comes from the header cache
            data = request_bytes("m@0", "boundary0", wire, request_id, bundle)
            assert pb.ModelInferRequest.FromString(data) == _protobuf_request("m@0", "boundary0", wire, request_id,
                                                                             bundle)


def test_header_cache_keeps_parameter_types_apart():
    wire = codec.encode(np.ones((1, 2), np.float32))
    for value in (True, 1, 1.0):
        wire.params["flag"] = value
        req = pb.ModelInferRequest.FromString(request_bytes("m", "x", wire))
        assert req.parameters["flag"].WhichOneof("parameter_choice") == {bool: "bool_param", int: "int64_param",
                                                                         float: "double_param"}[type(value)]


def test_split_parse_equals_whole_parse_and_decodes_equal():
    for wire in _wires(QUANT):
        data = request_bytes("m@0", "boundary0", wire, "id1", "cd" * 32)
        split = split_raw_contents(data)
        assert split is not None
        rest, raw = split
        fast = request_from_pb(pb.ModelInferRequest.FromString(rest), raw)
        slow = request_from_pb(pb.ModelInferRequest.FromString(data))
        assert (fast.model, fast.params, fast.id, list(fast.inputs)) == (slow.model, slow.params, slow.id,
                                                                         list(slow.inputs))
        a, b = fast.inputs["boundary0"], slow.inputs["boundary0"]
        assert isinstance(a.data, memoryview) and bytes(a.data) == b.data
        params = {**fast.params, **a.params}
        view = codec.decode(a.data, a.datatype, a.shape, params, copy=False)
        np.testing.assert_array_equal(view, codec.decode(b.data, b.datatype, b.shape, params))
        assert view.dtype == np.float32


def test_fp32_view_is_read_only_and_copy_is_not():
    wire = codec.encode(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert not codec.decode(wire.data, "FP32", [2, 3], copy=False).flags.writeable
    assert codec.decode(wire.data, "FP32", [2, 3]).flags.writeable


@pytest.mark.parametrize("values", [[np.nan], [1.0, np.inf], [-np.inf], [3e38, 3e38, np.nan]])
def test_non_finite_refused_and_large_finite_values_accepted(values):
    x = np.asarray(values, np.float32)
    with pytest.raises(codec.InvalidTensor, match="NaN or inf"):
        codec.decode(x.tobytes(), "FP32", [len(values)], copy=False)
    big = np.full(4, 3e38, np.float32)  # finite, though any sum of them overflows
    np.testing.assert_array_equal(codec.decode(big.tobytes(), "FP32", [4], copy=False), big)


def test_split_agrees_with_protobuf_on_mutated_bytes():
    """Random corruptions: the split either declines (None: whole parse) or yields exactly the whole parse."""
    rng = random.Random(0)
    base = request_bytes("m@0", "boundary0", codec.encode(np.ones((1, 8), np.float32)), "r", "ef" * 32)
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(data) + 1)
            if op < 0.6 and i < len(data):
                data[i] = rng.randrange(256)
            elif op < 0.8:
                del data[i:]
            else:
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
        data = bytes(data)
        try:
            whole = pb.ModelInferRequest.FromString(data)
        except DecodeError:
            whole = None
        split = split_raw_contents(data)
        if split is None:
            continue
        try:
            part = pb.ModelInferRequest.FromString(split[0])
        except DecodeError:
            part = None
        assert (part is None) == (whole is None), data.hex()
        if part is not None:
            assert list(whole.raw_input_contents) == [bytes(v) for v in split[1]]
            whole.ClearField("raw_input_contents")
            assert part == whole


@pytest.mark.parametrize("data", [b"\x3a\x05abc", b"\x3b", b"\xff" * 11, b"\x0a\x02m", b"\x3a\x80"])
def test_malformed_requests_are_invalid_argument(serve, data):
    server = serve()
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            call(data, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("encoding,compress", CASES)
def test_client_answers_equal_the_protobuf_path(serve, service_bundle, boundary_batch, encoding, compress):
    """Through a real server: the client's own bytes and the protobuf request give the same outputs."""
    bundle = Bundle.load(service_bundle)
    manifest, server = bundle.manifest, serve()
    split = manifest.split_points[0]
    wire = codec.encode(boundary_batch(0, 3), encoding, split.quantization, compress=compress)
    model = f"{manifest.name}@0"
    with InferenceClient(server.target, bundle=bundle.digest) as client:
        fast = client.infer(model, split.tensor.name, wire, timeout=10)
    with grpc.insecure_channel(server.target) as channel:
        slow = outputs_from_pb(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            _protobuf_request(model, split.tensor.name, wire, bundle=bundle.digest), timeout=10))
    assert sorted(fast) == sorted(slow)
    for name in slow:
        np.testing.assert_array_equal(fast[name], slow[name])
