"""One decoding of an OIP input tensor for the service and the agent: tensor-level parameters count (as Triton
and KServe clients send them), decoding errors become InvalidTensor, and both servers refuse alike."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from edgeexit.errors import InvalidTensor
from edgeexit.runtime import codec
from edgeexit.runtime.agent import Agent, AgentOptions
from edgeexit.runtime.device import DeviceOptions
from edgeexit.runtime.oip_input import decode_input
from edgeexit.runtime.oip_messages import InferRequest, InputTensor, outputs_from_pb, params_to_pb
from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc
from edgeexit.runtime.runner import SegmentRunner


def _request(x: np.ndarray, *, compress: bool = False, on_tensor: bool = True, name: str = "input",
             ) -> InferRequest:
    wire = codec.encode(x, "fp32", compress=compress)
    t = InputTensor(wire.datatype, wire.shape, wire.data, dict(wire.params) if on_tensor else {})
    return InferRequest("m", {name: t}, {} if on_tensor else dict(wire.params))


def test_tensor_and_request_parameters_both_decode():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for on_tensor in (True, False):
        np.testing.assert_array_equal(decode_input(_request(x, compress=True, on_tensor=on_tensor), "m", "input"), x)


def test_tensor_parameters_win_over_request_parameters():
    x = np.ones((2, 2), np.float32)
    req = _request(x, compress=True)
    req.params[codec.P_COMPRESSION] = "lz4"  # wrong at request level, right on the tensor
    np.testing.assert_array_equal(decode_input(req, "m", "input"), x)


def test_refusals_say_what_to_send():
    x = np.ones((2, 2), np.float32)
    with pytest.raises(InvalidTensor, match="exactly one input 'input', got none"):
        decode_input(InferRequest("m", {}), "m", "input")
    with pytest.raises(InvalidTensor, match="takes input 'input', not 'x'"):
        decode_input(_request(x, name="x"), "m", "input")
    with pytest.raises(InvalidTensor, match=r"input 'input' takes raw \[0, 1\] pixels as FP32 or FP16, not INT8"):
        t = InputTensor("INT8", [2], b"\x00\x01", {codec.P_SCALE: 0.1, codec.P_ZERO: 0})
        decode_input(InferRequest("m", {"input": t}), "m", "input", ("FP32", "FP16"))
    bad_scale = InputTensor("INT8", [2], b"\x00\x01", {codec.P_SCALE: "abc", codec.P_ZERO: 0})
    with pytest.raises(InvalidTensor, match="cannot decode with the given parameters"):
        decode_input(InferRequest("m", {"input": bad_scale}), "m", "input")
    with pytest.raises(InvalidTensor, match="batch is empty"):
        decode_input(_request(np.zeros((0, 2), np.float32)), "m", "input")


@pytest.fixture
def agent(agent_bundle):
    a = Agent(agent_bundle, AgentOptions(DeviceOptions(policy="never"), listen="127.0.0.1:0")).start()
    yield a
    a.stop()


def _call(target: str, req: pb.ModelInferRequest) -> pb.ModelInferResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)


def test_the_agent_reads_tensor_level_compression(agent, agent_bundle, raw_batch):
    """A zstd-compressed input whose parameters ride on the tensor (before, the agent only read request-level
    parameters and refused these bytes)."""
    wire = codec.encode(raw_batch, "fp32", compress=True)
    req = pb.ModelInferRequest(model_name=agent.runtime.model_name)
    t = req.inputs.add(name="input", datatype="FP32", shape=wire.shape)
    params_to_pb(wire.params, t.parameters)
    req.raw_input_contents.append(wire.data)
    labels = outputs_from_pb(_call(agent.target, req))["label"]
    r = SegmentRunner(agent_bundle)
    np.testing.assert_array_equal(labels, r.run_all(r.normalize(raw_batch))[-1].argmax(1))


def test_the_agent_turns_undecodable_parameters_into_invalid_argument(agent, raw_batch):
    req = pb.ModelInferRequest(model_name=agent.runtime.model_name)
    t = req.inputs.add(name="input", datatype="FP32", shape=list(raw_batch.shape))
    t.parameters[codec.P_COMPRESSION].string_param = "zstd"  # but the bytes are not a zstd frame
    req.raw_input_contents.append(raw_batch.tobytes())
    with pytest.raises(grpc.RpcError) as e:
        _call(agent.target, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "zstd" in e.value.details()
