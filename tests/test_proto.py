"""The committed stubs match proto/, and our messages are the Open Inference Protocol's, field for field."""

from __future__ import annotations

import pytest

from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.runtime.proto import regenerate

MESSAGES = [
    "ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse", "ModelReadyRequest",
    "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse", "ModelMetadataRequest",
    "ModelMetadataResponse", "ModelInferRequest", "ModelInferResponse", "InferParameter", "InferTensorContents",
]


def test_regenerated_stubs_are_identical_to_committed(tmp_path):
    pytest.importorskip("grpc_tools")
    for path in regenerate.generate(out_dir=tmp_path):
        committed = regenerate.STUB_DIR / path.name
        assert committed.read_text() == path.read_text(), f"{path.name} is stale: run python -m {regenerate.__name__}"


def _fields(desc) -> dict:
    out = {f.name: (f.number, f.type, f.is_repeated) for f in desc.fields}
    for nested in desc.nested_types:
        out[nested.name] = _fields(nested)
    return out


@pytest.mark.parametrize("name", MESSAGES)
def test_message_matches_tritonclient(name):
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    ours = pb.DESCRIPTOR.message_types_by_name[name]
    theirs = service_pb2.DESCRIPTOR.message_types_by_name[name]
    assert ours.full_name == theirs.full_name == f"inference.{name}"
    assert _fields(ours) == _fields(theirs)


def test_service_methods_are_a_subset_of_triton():
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    names = [m.name for m in ours.methods]
    assert names == ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]
    for m in ours.methods:
        t = theirs.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (t.input_type.full_name, t.output_type.full_name)


def test_bytes_round_trip_through_tritonclient_messages():
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    req = pb.ModelInferRequest(model_name="m@1", id="r1", raw_input_contents=[b"\x00\x01"])
    req.parameters["edgeexit.scale"].double_param = 0.25
    req.parameters["edgeexit.zero_point"].int64_param = -3
    t = req.inputs.add(name="boundary1", datatype="INT8", shape=[1, 2])
    t.parameters["edgeexit.compression"].string_param = "zstd"
    theirs = service_pb2.ModelInferRequest.FromString(req.SerializeToString())
    assert theirs.model_name == "m@1" and theirs.id == "r1"
    assert theirs.parameters["edgeexit.scale"].double_param == 0.25
    assert theirs.parameters["edgeexit.zero_point"].int64_param == -3
    assert list(theirs.inputs[0].shape) == [1, 2]
    assert theirs.inputs[0].parameters["edgeexit.compression"].string_param == "zstd"
    assert pb.ModelInferRequest.FromString(theirs.SerializeToString()) == req
