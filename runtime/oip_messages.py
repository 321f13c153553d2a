"""Plain Python views of Open Inference Protocol messages, and the conversions to and from protobuf.

Handlers never see protobuf: the servicer decodes a ModelInferRequest into an ``InferRequest`` and encodes the
handler's ``InferResponse`` back. The client uses the same conversions for parameters and outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeexit.errors import InvalidTensor
from edgeexit.runtime import codec
from edgeexit.runtime.proto import grpc_service_pb2 as pb

ParamValue = bool | int | float | str

# Protocol datatype <-> numpy dtype for the tensors we send back (and accept as typed contents).
DATATYPE_NUMPY = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
NUMPY_DATATYPE = {np.dtype(v): k for k, v in DATATYPE_NUMPY.items()}
_DTYPES = {k: np.dtype(v) for k, v in DATATYPE_NUMPY.items()}
# Which InferTensorContents field carries which datatype when a client does not send raw bytes.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


# ModelMetadata parameter: the most rows one request may carry (`edgeexit serve --max-batch-rows`).
P_MAX_BATCH_ROWS = "edgeexit.max_batch_rows"
# MLServer's OIP dialect (dataplane.proto) adds `map<string, InferParameter> parameters = 6` to
# ModelMetadataResponse. Triton's and KServe's messages stop at field 5, and our descriptor must match theirs field
# for field (tests/test_proto.py), so the map entries are written as protobuf unknown fields: Triton/KServe clients
# skip them, MLServer-dialect clients read them as `parameters`, and metadata_params_from_pb reads them here.
_METADATA_PARAMS_FIELD = 6

# Request parameter (string): the digest of the bundle the sender runs (``Bundle.digest``). `edgeexit serve` refuses
# a request naming another bundle (FAILED_PRECONDITION) and serves one without it. A parameter, not model_version:
# Triton's model versions must be integers, and the agent talks to Triton and to serve alike.
P_BUNDLE = "edgeexit.bundle"

# Response parameters with the server's own time for a request, int64 microseconds (KServe's InferParameter
# has no double): queue = arrival at the model until its batch starts running; compute = the batch's run time.
P_QUEUE_US = "edgeexit.queue_us"
P_COMPUTE_US = "edgeexit.compute_us"


@dataclass(frozen=True)
class ServerTiming:
    """How long the server spent on a request, as it reports it (see P_QUEUE_US / P_COMPUTE_US)."""

    queue_us: int
    compute_us: int

    @property
    def total_s(self) -> float:
        return (self.queue_us + self.compute_us) / 1e6

    def params(self) -> dict[str, ParamValue]:
        return {P_QUEUE_US: int(self.queue_us), P_COMPUTE_US: int(self.compute_us)}

    @staticmethod
    def from_params(params: dict[str, ParamValue]) -> ServerTiming | None:
        """The timing in response parameters; None when the server did not send both (e.g. an older one)."""
        q, c = params.get(P_QUEUE_US), params.get(P_COMPUTE_US)
        # bool is an int in Python; a flag is not a time. Negative times come only from a broken server.
        ints = [v for v in (q, c) if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
        return ServerTiming(int(q), int(c)) if len(ints) == 2 else None


@dataclass
class TensorMeta:
    name: str
    datatype: str
    shape: list[int]  # -1 for a variable axis (batch)


@dataclass
class ModelMetadata:
    name: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    platform: str = "edgeexit"
    versions: list[str] = field(default_factory=lambda: ["1"])
    # Model-level facts such as the row limit (P_MAX_BATCH_ROWS). The OIP/Triton ModelMetadataResponse has no
    # field for them; they travel in MLServer's extension field (see metadata_to_pb).
    params: dict[str, ParamValue] = field(default_factory=dict)


@dataclass
class InputTensor:
    datatype: str
    shape: list[int]
    data: bytes | memoryview  # raw row-major bytes as sent (maybe compressed: see params); a view from the server
    params: dict[str, ParamValue] = field(default_factory=dict)


@dataclass
class InferRequest:
    model: str
    inputs: dict[str, InputTensor]
    params: dict[str, ParamValue] = field(default_factory=dict)
    id: str = ""
    outputs: list[str] = field(default_factory=list)  # requested outputs; empty means all
    version: str = ""  # the request's model_version ("" = whichever the server serves)
    deadline: float | None = None  # time.monotonic() when the client stops waiting; None = no deadline


@dataclass
class InferResponse:
    outputs: dict[str, np.ndarray]
    params: dict[str, ParamValue] = field(default_factory=dict)


def param_value(p: pb.InferParameter) -> ParamValue | None:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def params_from_pb(mapping) -> dict[str, ParamValue]:
    return {k: v for k in mapping if (v := param_value(mapping[k])) is not None}  # faster than upb's .items()


def params_to_pb(params: dict[str, ParamValue], mapping) -> None:
    """Fill a protobuf ``map<string, InferParameter>`` (bool before int: bool is an int in Python)."""
    for key, value in params.items():
        if isinstance(value, bool | np.bool_):
            mapping[key].bool_param = bool(value)
        elif isinstance(value, int | np.integer):
            mapping[key].int64_param = int(value)
        elif isinstance(value, float | np.floating):
            mapping[key].double_param = float(value)
        elif isinstance(value, str):
            mapping[key].string_param = value
        else:
            raise InvalidTensor(f"parameter {key!r} has unsupported type {type(value).__name__}")


def _typed_contents_bytes(t: pb.ModelInferRequest.InferInputTensor) -> bytes:
    name = _CONTENTS_FIELD.get(t.datatype)
    if name is None or t.datatype not in DATATYPE_NUMPY:
        raise InvalidTensor(f"input {t.name!r}: {t.datatype} data must travel as raw_input_contents")
    values = getattr(t.contents, name)
    dims = codec.check_shape(list(t.shape))
    if len(values) != math.prod(dims):  # Python ints: a huge shape cannot wrap around to match
        raise InvalidTensor(f"input {t.name!r}: shape {dims} needs {math.prod(dims)} values in {name}, "
                            f"got {len(values)}")
    dtype = np.dtype(DATATYPE_NUMPY[t.datatype])
    if dtype.kind in "iu" and dtype.itemsize < 4:  # int_contents/uint_contents carry 32-bit values
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidTensor(f"input {t.name!r}: {t.datatype} values must lie in [{info.min}, {info.max}]")
        return wide.astype(dtype).tobytes()
    return np.asarray(values, dtype=dtype).tobytes()


def request_from_pb(req: pb.ModelInferRequest, raw: list[bytes | memoryview] | None = None) -> InferRequest:
    """Decode a ModelInferRequest; raises InvalidTensor when raw contents and inputs do not line up.

    ``raw``: the request's raw_input_contents when ``split_raw_contents`` took them out of its bytes."""
    raw = list(req.raw_input_contents) if raw is None else raw
    if raw and len(raw) != len(req.inputs):
        raise InvalidTensor(f"{len(req.inputs)} inputs but {len(raw)} raw_input_contents; send one per input")
    inputs: dict[str, InputTensor] = {}
    for i, t in enumerate(req.inputs):
        if t.name in inputs:
            raise InvalidTensor(f"input {t.name!r} appears twice; send each input once")
        if raw and t.HasField("contents"):
            raise InvalidTensor(f"input {t.name!r} has typed contents and raw_input_contents; send only one")
        data = raw[i] if raw else _typed_contents_bytes(t)
        inputs[t.name] = InputTensor(t.datatype, [int(d) for d in t.shape], data, params_from_pb(t.parameters))
    return InferRequest(model=req.model_name, inputs=inputs, params=params_from_pb(req.parameters), id=req.id,
                        outputs=[o.name for o in req.outputs], version=req.model_version)


_RAW_INPUT_CONTENTS = 7  # ModelInferRequest field number (repeated bytes)


def split_raw_contents(data: bytes) -> tuple[bytes, list[memoryview]] | None:
    """A serialised ModelInferRequest as (its bytes without raw_input_contents, those contents as zero-copy views
    of ``data``, in order); None when it is not plain enough to split (then parse it whole).

    Parsing the rest with protobuf gives the same message minus field 7 (fields may come in any order and
    repeat; field 7 entries are independent of the others), and protobuf still judges everything but the
    splitting: a truncated field, a bad length or a wire type other than varint, 64-bit, length-delimited and
    32-bit returns None, so the whole-message parse refuses it as before. Saves copying every tensor twice.
    """
    view, n, pos = memoryview(data), len(data), 0
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    while pos < n:
        start = pos
        key, pos = _varint(data, pos)
        kind = key & 7
        if kind == 0:
            _, pos = _varint(data, pos)
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == 2:
            size, pos = _varint(data, pos)
            if size < 0:
                return None
            if key >> 3 == _RAW_INPUT_CONTENTS and pos + size <= n:
                raw.append(view[pos:pos + size])
                pos += size
                continue
            pos += size
        else:
            return None
        if pos > n or pos < 0:
            return None
        rest.append(view[start:pos])
    if pos != n:
        return None
    return b"".join(rest), raw


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A protobuf varint at ``pos``: (value, position after it); (-1, len + 1) when truncated or over 10 bytes."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        b = data[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i + 1
        shift += 7
    return -1, len(data) + 1


def response_to_pb(model: str, request_id: str, resp: InferResponse, wanted: list[str],
                   version: str = "1") -> pb.ModelInferResponse:
    names = wanted or list(resp.outputs)
    missing = [n for n in names if n not in resp.outputs]
    if missing:
        raise InvalidTensor(f"requested outputs {missing} do not exist; this model has {sorted(resp.outputs)}")
    out = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    params_to_pb(resp.params, out.parameters)
    for name in names:
        arr = np.ascontiguousarray(resp.outputs[name])
        datatype = NUMPY_DATATYPE.get(arr.dtype)
        if datatype is None:
            raise TypeError(f"output {name!r} has dtype {arr.dtype}, which the protocol cannot carry")
        out.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        out.raw_output_contents.append(arr.tobytes())
    return out


def outputs_from_pb(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Output name -> numpy array (in the datatype sent) from a ModelInferResponse with raw contents."""
    outputs, raw = resp.outputs, resp.raw_output_contents  # each protobuf field read once: upb access is slow
    if len(raw) != len(outputs):
        raise InvalidTensor(f"response has {len(outputs)} outputs but {len(raw)} raw contents")
    result: dict[str, np.ndarray] = {}
    for t, data in zip(outputs, raw, strict=True):
        name, datatype = t.name, t.datatype
        dtype = _DTYPES.get(datatype)
        if dtype is None:
            raise InvalidTensor(f"output {name!r} has datatype {datatype}, which edgeexit cannot read")
        shape = codec.check_shape(t.shape)
        if codec.tensor_bytes(shape, dtype.itemsize) != len(data):  # Python ints: no int64 wrap
            raise InvalidTensor(f"output {name!r}: {len(data)} bytes do not fit shape {shape} of {datatype}")
        result[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
    return result


def metadata_to_pb(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    out = pb.ModelMetadataResponse(name=meta.name, versions=meta.versions, platform=meta.platform)
    for t in meta.inputs:
        out.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
    for t in meta.outputs:
        out.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
    if meta.params:  # as unknown field 6 (see _METADATA_PARAMS_FIELD): serialised with the message, kept on parse
        entries = pb.ModelInferRequest()  # any message with a parameters map: the entry layout is the same
        params_to_pb(meta.params, entries.parameters)
        out.MergeFromString(b"".join(_length_delimited(_METADATA_PARAMS_FIELD, pb.ModelInferRequest.ParametersEntry(
            key=k, value=v).SerializeToString()) for k, v in entries.parameters.items()))
    return out


def metadata_params_from_pb(resp: pb.ModelMetadataResponse) -> dict[str, ParamValue]:
    """The parameters of a ModelMetadataResponse (MLServer's field 6), e.g. P_MAX_BATCH_ROWS; {} when absent."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    result: dict[str, ParamValue] = {}
    for f in UnknownFieldSet(resp):
        if f.field_number == _METADATA_PARAMS_FIELD and isinstance(f.data, bytes):
            entry = pb.ModelInferRequest.ParametersEntry.FromString(f.data)
            if (v := param_value(entry.value)) is not None:
                result[entry.key] = v
    return result


def _length_delimited(number: int, payload: bytes) -> bytes:
    """One protobuf field of wire type 2 (tag, varint length, bytes)."""
    out = bytearray()
    for v in ((number << 3) | 2, len(payload)):
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out) + payload
