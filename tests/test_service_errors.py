"""Malformed requests each get the expected status and a message, and the server keeps serving."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import zstandard

from edgeexit.errors import BundleError, ConfigError, InvalidTensor, LinkTimeout, OffloadError, ShapeError
from edgeexit.runtime import codec
from edgeexit.runtime.oip_server import InferenceServicer, ServerOptions
from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc
from edgeexit.runtime.service import ServiceOptions, build_handlers
from edgeexit.runtime.status import ModelNotFound, status_for

C = grpc.StatusCode
MAX_MB = 1  # the server's message limit in these tests, so "oversized" stays small


@dataclass
class Case:
    """How to spoil a good request: a mutation of (model, inputs, raw, params) and the status expected."""

    id: str
    code: grpc.StatusCode
    model: str | None = None
    name: str | None = None
    datatype: str | None = None
    shape: list[int] | None = None
    raw: bytes | None = None
    params: dict = field(default_factory=dict)
    tensor_params: dict = field(default_factory=dict)
    drop_params: tuple[str, ...] = ()
    inputs: int = 1
    raw_count: int | None = None
    outputs: list[str] = field(default_factory=list)
    message: str = ""


def _int8_request(model: str, x: np.ndarray, quant: dict) -> tuple[codec.WireTensor, str]:
    return codec.encode(x, "int8", quant), model


def _build(case: Case, model: str, input_name: str, x: np.ndarray, quant: dict) -> pb.ModelInferRequest:
    wire = codec.encode(x, "int8", quant)
    params = {k: v for k, v in wire.params.items() if k not in case.drop_params}
    params.update(case.params)
    req = pb.ModelInferRequest(model_name=case.model or model, id=case.id)
    from edgeexit.runtime.oip_messages import params_to_pb

    params_to_pb(params, req.parameters)
    for i in range(case.inputs):
        t = req.inputs.add(name=case.name or (input_name if i == 0 else f"{input_name}_{i}"),
                           datatype=case.datatype or wire.datatype, shape=case.shape or wire.shape)
        params_to_pb(case.tensor_params, t.parameters)
    raw = case.raw if case.raw is not None else wire.data
    for _ in range(case.inputs if case.raw_count is None else case.raw_count):
        req.raw_input_contents.append(raw)
    for o in case.outputs:
        req.outputs.add(name=o)
    return req


def _cases(shape: list[int]) -> list[Case]:
    n = int(np.prod(shape))
    big = MAX_MB * (1 << 20) + 1000
    return [
        Case("unknown model", C.NOT_FOUND, model="no-such-model", message="not served here"),
        Case("unknown split", C.NOT_FOUND, model="{name}@99", message="not served here"),
        Case("wrong input name", C.INVALID_ARGUMENT, name="boundary7", message="takes input"),
        Case("wrong shape", C.INVALID_ARGUMENT, shape=[shape[0], *[d + 1 for d in shape[1:]]],
             raw=bytes(shape[0] * int(np.prod([d + 1 for d in shape[1:]]))), message="shape"),
        Case("wrong rank", C.INVALID_ARGUMENT, shape=[n], message="shape"),
        Case("wrong dtype", C.INVALID_ARGUMENT, datatype="FP64", message="boundary tensor as FP32, FP16 or INT8"),
        Case("short bytes", C.INVALID_ARGUMENT, raw=bytes(n - 1), message="needs"),
        Case("extra bytes", C.INVALID_ARGUMENT, raw=bytes(n + 1), message="needs"),
        Case("int8 without scale", C.INVALID_ARGUMENT, drop_params=(codec.P_SCALE,), message=codec.P_SCALE),
        Case("negative scale", C.INVALID_ARGUMENT, params={codec.P_SCALE: -0.5}, message="positive"),
        Case("scale not a number", C.INVALID_ARGUMENT, params={codec.P_SCALE: "abc"}, message="cannot decode"),
        Case("bad zstd", C.INVALID_ARGUMENT, tensor_params={codec.P_COMPRESSION: "zstd"}, message="zstd"),
        Case("unknown compression", C.INVALID_ARGUMENT, params={codec.P_COMPRESSION: "lz4"}, message="lz4"),
        Case("NaN", C.INVALID_ARGUMENT, datatype="FP32", drop_params=(codec.P_SCALE, codec.P_ZERO),
             raw=np.full(shape, np.nan, np.float32).tobytes(), message="NaN"),
        Case("inf", C.INVALID_ARGUMENT, datatype="FP16", drop_params=(codec.P_SCALE, codec.P_ZERO),
             raw=np.full(shape, np.inf, np.float16).tobytes(), message="inf"),
        Case("oversized message", C.RESOURCE_EXHAUSTED, raw=bytes(big)),
        Case("empty inputs", C.INVALID_ARGUMENT, inputs=0, message="exactly one input"),
        Case("two inputs", C.INVALID_ARGUMENT, inputs=2, message="exactly one input"),
        Case("raw count mismatch", C.INVALID_ARGUMENT, raw_count=2, message="raw_input_contents"),
        Case("negative dimension", C.INVALID_ARGUMENT, shape=[-1, *shape[1:]], message="negative"),
        Case("empty batch", C.INVALID_ARGUMENT, shape=[0, *shape[1:]], raw=b"", message="empty"),
        Case("unknown requested output", C.INVALID_ARGUMENT, outputs=["exit42"], message="exit42"),
        Case("zstd bomb", C.INVALID_ARGUMENT, tensor_params={codec.P_COMPRESSION: "zstd"},
             raw=zstandard.ZstdCompressor().compress(bytes(100 * n)), message="zstd"),
    ]


@pytest.fixture
def grpc_stub(serve):
    server = serve(ServerOptions(max_message_bytes=MAX_MB << 20))
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)])
    yield pb_grpc.GRPCInferenceServiceStub(channel), server
    channel.close()


def test_malformed_requests_table(grpc_stub, service_bundle, boundary_batch):
    from edgeexit.bundle import Bundle

    stub, server = grpc_stub
    m = Bundle.load(service_bundle).manifest
    split = m.split_points[0]
    x = boundary_batch(0, 2)
    model = f"{m.name}@0"
    good = _build(Case("good", C.OK), model, "boundary0", x, split.quantization)
    cases = _cases(list(x.shape))
    assert len(cases) >= 15
    for case in cases:
        case.model = case.model.format(name=m.name) if case.model else None
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(_build(case, model, "boundary0", x, split.quantization), timeout=10)
        assert e.value.code() == case.code, f"{case.id}: {e.value.code()} {e.value.details()}"
        assert case.message in (e.value.details() or ""), f"{case.id}: {e.value.details()}"
        resp = stub.ModelInfer(good, timeout=10)  # the server still serves a good request
        assert len(resp.outputs) == len(resp.raw_output_contents) > 0, case.id
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    errors = server.metrics.value("edgeexit_errors_total", {"code": "INVALID_ARGUMENT"})
    assert errors == sum(c.code == C.INVALID_ARGUMENT for c in cases)


def test_model_metadata_of_unknown_model_is_not_found(grpc_stub):
    stub, _ = grpc_stub
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=5)
    assert e.value.code() == C.NOT_FOUND and "nope" in e.value.details()


@pytest.mark.parametrize(("exc", "code"), [
    (ModelNotFound("m"), C.NOT_FOUND), (InvalidTensor("t"), C.INVALID_ARGUMENT),
    (ShapeError("s"), C.INVALID_ARGUMENT), (ConfigError("c"), C.FAILED_PRECONDITION),
    (BundleError("b"), C.FAILED_PRECONDITION), (OffloadError("o"), C.UNAVAILABLE),
    (LinkTimeout("l"), C.DEADLINE_EXCEEDED), (ZeroDivisionError("z"), C.INTERNAL),
])
def test_status_mapping(exc, code):
    got, message = status_for(exc)
    assert got == code and str(exc) in message


class _AbortContext:
    """Records what the servicer aborts with, the way grpc's context does (abort raises)."""

    def abort(self, code, details):
        self.code, self.details = code, details
        raise grpc.RpcError(details)


def test_servicer_in_process(service_bundle, boundary_batch):
    handlers = build_handlers(service_bundle, ServiceOptions())
    servicer = InferenceServicer(handlers)
    ctx = _AbortContext()
    name = handlers[1].name
    assert servicer.ServerLive(pb.ServerLiveRequest(), ctx).live
    assert servicer.ModelReady(pb.ModelReadyRequest(name=name), ctx).ready
    assert servicer.ModelMetadata(pb.ModelMetadataRequest(name=name), ctx).inputs[0].name == "boundary0"
    x = boundary_batch(0, 2)
    req = pb.ModelInferRequest(model_name=name, raw_input_contents=[x.tobytes()])
    req.inputs.add(name="boundary0", datatype="FP32", shape=list(x.shape))
    resp = servicer.ModelInfer(req, ctx)
    assert resp.model_name == name and [o.shape[0] for o in resp.outputs] == [2] * len(resp.outputs)
    req.raw_input_contents[0] = x.tobytes()[:-4]
    with pytest.raises(grpc.RpcError):
        servicer.ModelInfer(req, ctx)
    assert ctx.code == C.INVALID_ARGUMENT and "needs" in ctx.details
    with pytest.raises(grpc.RpcError):
        servicer.ModelMetadata(pb.ModelMetadataRequest(name="nope"), ctx)
    assert ctx.code == C.NOT_FOUND
    with pytest.raises(ConfigError, match="unique"):
        InferenceServicer([handlers[0], handlers[0]])
