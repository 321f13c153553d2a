"""The JSON side of the Open Inference Protocol v2 REST API (KServe v2 / Triton), with the binary-data extension.

Plain conversions between HTTP bodies and the ``oip_messages`` dataclasses the handlers take, so REST and gRPC
requests reach the very same ``ModelHandler``. What ``tritonclient.http`` sends and reads:

- a request body is a JSON object, optionally followed by binary tensor data; the header
  ``Inference-Header-Content-Length`` then gives the JSON's length. An input carries ``data`` (a JSON list, flat
  or nested, row-major) or ``parameters.binary_data_size`` (that many bytes, taken from the binary part in the
  order of the inputs).
- an output is returned as JSON ``data`` unless binary is asked for: per output ``parameters.binary_data``, or
  for every output the request parameter ``binary_data_output``. Binary outputs follow the JSON in the order of
  the outputs, each with ``parameters.binary_data_size``; the response header says the JSON's length.

Everything a client can get wrong raises ``InvalidTensor`` (400), with what to send instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from edgeexit.errors import InvalidTensor
from edgeexit.runtime import codec
from edgeexit.runtime.oip_messages import (
    DATATYPE_NUMPY,
    NUMPY_DATATYPE,
    InferRequest,
    InferResponse,
    InputTensor,
    ModelMetadata,
    ParamValue,
)
from edgeexit.runtime.status import clip, clip_names

HEADER_LENGTH = "Inference-Header-Content-Length"
# Parameters of the REST transport itself: consumed here, never passed to a handler.
P_BINARY_SIZE, P_BINARY, P_BINARY_OUTPUT = "binary_data_size", "binary_data", "binary_data_output"

# gRPC status -> HTTP status, the one table (see the README's REST section for the choices).
# FAILED_PRECONDITION -> 400, not 412: HTTP's 412 means a conditional header (If-Match, ...) failed, which no OIP
# client sends; Triton's and KServe's REST servers answer a request their model refuses with 400, and proxies do
# not retry a 400. RESOURCE_EXHAUSTED (our only source: a full queue, Overloaded) -> 503, not 429: the server is
# busy, not this client too chatty; Triton answers its own full queue with 503, and load balancers retry a 503
# on another replica, as the agent falls back at once.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


@dataclass
class OutputWants:
    """Which outputs the client asked for, and which of them travel as binary data."""

    names: list[str] = field(default_factory=list)  # empty: every output
    binary: dict[str, bool] = field(default_factory=dict)  # per requested output
    binary_default: bool = False  # request parameter binary_data_output


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidTensor(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _params(value: Any, what: str) -> dict[str, ParamValue]:
    """A JSON ``parameters`` object: bool, int, float or string values (what InferParameter carries)."""
    if value is None:
        return {}
    out: dict[str, ParamValue] = {}
    for key, v in _object(value, f"{what} parameters").items():
        if not isinstance(v, bool | int | float | str):
            raise InvalidTensor(f"{what} parameter {clip(key)} is a {type(v).__name__}; parameters are bool, "
                                "number or string")
        out[key] = v
    return out


def parse_infer(body: bytes, header_length: int | None, model: str, version: str) -> tuple[InferRequest, OutputWants]:
    """An InferRequest (and the output wishes) from a REST infer body; InvalidTensor for anything malformed."""
    size = len(body) if header_length is None else header_length
    if not 0 <= size <= len(body):
        raise InvalidTensor(f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes; send the "
                            "length of the JSON part")
    try:
        doc = json.loads(body[:size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidTensor(f"the request body is not valid JSON ({e}); send an OIP v2 inference request "
                            '{"inputs": [{"name", "shape", "datatype", "data"}]}' +
                            (f", with {HEADER_LENGTH} giving the JSON's length before binary data"
                             if header_length is None else "")) from None
    doc = _object(doc, "the request body")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidTensor('the request needs "inputs": a non-empty list of {"name", "shape", "datatype", "data"}')
    binary, offset = memoryview(body)[size:], 0
    inputs: dict[str, InputTensor] = {}
    for i, raw in enumerate(raw_inputs):
        t = _object(raw, f"input {i}")
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
            raise InvalidTensor(f"input {i} needs a string name, a string datatype and a shape list")
        if name in inputs:
            raise InvalidTensor(f"input {clip(name)} appears twice; send each input once")
        if any(isinstance(d, bool) for d in shape):
            raise InvalidTensor(f"input {clip(name)}: shape must be a list of integers")
        dims = codec.check_shape(shape)
        params = _params(t.get("parameters"), f"input {clip(name)}")
        nbytes = params.pop(P_BINARY_SIZE, None)
        if nbytes is not None:
            if "data" in t:
                raise InvalidTensor(f"input {clip(name)} has both data and {P_BINARY_SIZE}; send only one")
            if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes <= len(binary) - offset:
                raise InvalidTensor(f"input {clip(name)}: {P_BINARY_SIZE} {nbytes!r} does not fit the "
                                    f"{len(binary) - offset} binary bytes left in the body")
            data = bytes(binary[offset:offset + nbytes])
            offset += nbytes
        elif "data" in t:
            data = _json_tensor(t["data"], datatype, dims, name)
        else:
            raise InvalidTensor(f"input {clip(name)} has no data; send data (a JSON list) or binary data with "
                                f"parameters.{P_BINARY_SIZE}")
        inputs[name] = InputTensor(datatype, dims, data, params)
    if offset != len(binary):
        raise InvalidTensor(f"the body has {len(binary) - offset} binary bytes no input claims; set each input's "
                            f"parameters.{P_BINARY_SIZE} (and {HEADER_LENGTH} to the JSON's length)")
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidTensor("the request id must be a string")
    params = _params(doc.get("parameters"), "request")
    binary_default = params.pop(P_BINARY_OUTPUT, False)
    wants = OutputWants(binary_default=bool(binary_default))
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidTensor('"outputs" must be a list of {"name", "parameters"}')
    for i, raw in enumerate(outputs):
        o = _object(raw, f"output {i}")
        name = o.get("name")
        if not isinstance(name, str):
            raise InvalidTensor(f"output {i} needs a string name")
        oparams = _params(o.get("parameters"), f"output {clip(name)}")
        if "classification" in oparams:
            raise InvalidTensor(f"output {clip(name)}: the classification extension is not supported; read the "
                                "label output (agent) or the logits")
        wants.names.append(name)
        wants.binary[name] = bool(oparams.get(P_BINARY, wants.binary_default))
    request = InferRequest(model=model, inputs=inputs, params=params, id=request_id, outputs=list(wants.names),
                           version=version)
    return request, wants


def _json_tensor(data: Any, datatype: str, dims: list[int], name: str) -> bytes:
    """Row-major bytes of a JSON ``data`` list (flat or nested), checked against the datatype and shape."""
    dtype = DATATYPE_NUMPY.get(datatype)
    if dtype is None:
        raise InvalidTensor(f"input {clip(name)}: datatype {clip(datatype)} cannot travel as JSON here; use one of "
                            f"{sorted(DATATYPE_NUMPY)}")
    want = np.dtype(dtype)
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        values = None
    if values is None or values.dtype.kind not in "biuf":
        raise InvalidTensor(f"input {clip(name)}: data must be a (nested) list of numbers"
                            f"{' (true/false for BOOL)' if want.kind == 'b' else ''}")
    if values.size != math.prod(dims):
        raise InvalidTensor(f"input {clip(name)}: shape {dims} needs {math.prod(dims)} values, data has "
                            f"{values.size}")
    if (want.kind == "b") != (values.dtype.kind == "b") or (want.kind in "iu" and values.dtype.kind == "f"):
        raise InvalidTensor(f"input {clip(name)}: {datatype} data must be "
                            f"{'true/false' if want.kind == 'b' else 'integers' if want.kind in 'iu' else 'numbers'}")
    if want.kind in "iu" and values.size:
        info = np.iinfo(want)
        if values.min() < info.min or values.max() > info.max:
            raise InvalidTensor(f"input {clip(name)}: {datatype} values must lie in [{info.min}, {info.max}]")
    return np.ascontiguousarray(values.astype(want)).tobytes()


def encode_infer(model: str, version: str, request_id: str, response: InferResponse,
                 wants: OutputWants) -> tuple[bytes, int | None]:
    """The response body and, when binary outputs follow the JSON, the JSON's length (for HEADER_LENGTH)."""
    names = wants.names or list(response.outputs)
    missing = [n for n in names if n not in response.outputs]
    if missing:
        raise InvalidTensor(f"requested outputs {clip_names(missing)} do not exist; this model has "
                            f"{sorted(response.outputs)}")
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": []}
    if request_id:
        doc["id"] = request_id
    if response.params:
        doc["parameters"] = {k: _json_value(v) for k, v in response.params.items()}
    chunks: list[bytes] = []
    for name in names:
        arr = np.ascontiguousarray(response.outputs[name])
        datatype = NUMPY_DATATYPE.get(arr.dtype)
        if datatype is None:
            raise TypeError(f"output {name!r} has dtype {arr.dtype}, which the protocol cannot carry")
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if wants.binary.get(name, wants.binary_default):
            chunks.append(arr.tobytes())
            out["parameters"] = {P_BINARY_SIZE: len(chunks[-1])}
        else:
            out["data"] = arr.reshape(-1).tolist()
        doc["outputs"].append(out)
    header = dumps(doc)
    return (header + b"".join(chunks), len(header)) if chunks else (header, None)


def metadata_json(meta: ModelMetadata) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.outputs],
    }
    if meta.params:  # e.g. edgeexit.max_batch_rows; REST has room for it (gRPC carries it as MLServer's field 6)
        doc["parameters"] = {k: _json_value(v) for k, v in meta.params.items()}
    return doc


def _json_value(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def dumps(doc: Any) -> bytes:
    # NaN/inf are not JSON; a probability never is one, so refusing beats sending what parsers reject.
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
