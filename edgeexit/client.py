"""The public client for apps: send raw pixels to an `edgeexit agent`, get labels back, errors typed.

    from edgeexit.client import EdgeExitClient

    with EdgeExitClient("127.0.0.1:8001") as agent:
        result = agent.infer(images)          # [B, C, H, W]: float32 pixels in [0, 1], or uint8 images
        result.label, result.decided          # int64 [B], ["device" | "cloud" | "device-fallback", ...]

It needs only numpy, grpcio and protobuf (no onnxruntime, no torch): it imports edgeexit's errors, the OIP
messages and their status mapping, nothing that runs a model. Every failure is an ``EdgeExitError`` from
``edgeexit.errors`` (``runtime.status.app_error_for``), never a raw ``grpc.RpcError``: ``PeerUnavailable`` (the
agent is not running there), ``LinkTimeout`` (no answer within ``timeout_s``), ``InvalidTensor`` (the input does
not fit, found before sending when the shape is wrong), ``PeerRefused`` (token or TLS), ``ModelNotFound``.

Inputs: the agent takes FP32 (or FP16) pixels in [0, 1]; float16 is sent as FP16, float32 and float64 as FP32,
and uint8 images as k/255 in FP32 (the agent accepts no UINT8). Other dtypes are refused.

A model with several inputs (a text model; the tokenizer stays in the app) takes them by name, each in the
datatype the agent's ModelMetadata lists (integers widen, e.g. int32 token ids go as INT64; nothing narrows)::

    result = agent.infer({"input_ids": ids, "attention_mask": mask})   # int64 [B, S] each
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np

from edgeexit.errors import ConfigError, EdgeExitError, InvalidTensor, OffloadError, PeerRefused
from edgeexit.runtime.decided import to_names
from edgeexit.runtime.oip_messages import ModelMetadata, ParamValue, TensorMeta, outputs_from_pb, params_from_pb
from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc
from edgeexit.runtime.security import bearer_metadata, channel_credentials
from edgeexit.runtime.status import app_error_for

__all__ = ["EdgeExitClient", "Latency", "Result"]

_OUTPUTS = ("label", "probabilities", "exit", "decided")
# OIP datatype -> numpy dtype, for inputs sent by name as they are
_DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "INT8": np.int8,
           "UINT8": np.uint8}


@dataclass(frozen=True)
class Latency:
    """The agent's own breakdown of a request, in milliseconds (response parameters ``edgeexit.*_us``)."""

    device_ms: float  # the device's segments
    encode_ms: float  # encoding the boundary tensor for the cloud
    network_ms: float  # the offload's round trip
    total_ms: float  # the whole request inside the agent
    cloud_ms: float | None = None  # the cloud's own queue + compute, when it reported them

    @staticmethod
    def from_params(params: dict[str, ParamValue]) -> Latency:
        def ms(key: str) -> float | None:
            v = params.get(f"edgeexit.{key}_us")
            return v / 1000.0 if isinstance(v, int) and not isinstance(v, bool) else None

        return Latency(ms("device") or 0.0, ms("encode") or 0.0, ms("network") or 0.0, ms("total") or 0.0,
                       ms("cloud"))


@dataclass(frozen=True)
class Result:
    """One answer, a row per input row."""

    label: np.ndarray  # int64 [B]: predicted class
    probabilities: np.ndarray  # float32 [B, C]: the answering exit's softmax
    exit: np.ndarray  # int32 [B]: index of the exit head that answered
    decided: list[str]  # per row: "device" (early exit), "cloud" or "device-fallback"
    latency: Latency
    model: str
    params: dict[str, ParamValue] = field(default_factory=dict)  # every response parameter (split, fallback, ...)
    seconds: float = 0.0  # wall time of the call as the app saw it


class EdgeExitClient:
    """A channel to one agent (``HOST:PORT`` or ``unix:PATH``). Thread-safe; reuse one per agent.

    ``model``: discovered from the agent's ModelMetadata when not given. ``tls_ca`` turns TLS on (``tls_cert``
    and ``tls_key`` add a client certificate; ``server_name`` overrides the name checked in the server's
    certificate); ``token`` is sent as ``authorization: Bearer``. Nothing is sent until the first call."""

    def __init__(self, target: str, *, model: str | None = None, token: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 server_name: str | None = None, timeout_s: float = 30.0, max_message_bytes: int = 64 << 20):
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be positive (seconds to wait for an answer), got {timeout_s}")
        self.target, self.timeout_s = target, timeout_s
        self._model: str | None = model
        self._meta: ModelMetadata | None = None
        self._lock = threading.Lock()
        options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", max_message_bytes),
                                                ("grpc.max_send_message_length", max_message_bytes)]
        if tls_ca:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            creds = channel_credentials(tls_ca, tls_cert, tls_key)
            self._channel = grpc.secure_channel(target, creds, options=options)
        elif tls_cert or tls_key or server_name:
            raise ConfigError("tls_cert, tls_key and server_name need tls_ca too (the CA that signed the agent's "
                              "certificate)")
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._auth = bearer_metadata(token)

    def _call(self, rpc: str, request: object, timeout_s: float | None) -> object:
        try:
            return getattr(self._stub, rpc)(request, timeout=timeout_s or self.timeout_s, metadata=self._auth)
        except grpc.RpcError as e:
            raise app_error_for(e.code(), e.details() or "", self.target) from None

    def ready(self, timeout_s: float | None = None) -> bool:
        """ServerReady: False when the agent is unreachable or not ready; raises PeerRefused for a wrong token or
        TLS setting (a mistake to fix, not a state to wait out)."""
        try:
            return bool(self._call("ServerReady", pb.ServerReadyRequest(), timeout_s).ready)
        except PeerRefused:
            raise
        except EdgeExitError:
            return False

    def metadata(self, timeout_s: float | None = None) -> ModelMetadata:
        """The model's name, inputs and outputs as the agent describes them (fetched once, then cached)."""
        with self._lock:
            if self._meta is None:
                resp = self._call("ModelMetadata", pb.ModelMetadataRequest(name=self._model or ""), timeout_s)
                tensors = [[TensorMeta(t.name, t.datatype, list(t.shape)) for t in ts]
                           for ts in (resp.inputs, resp.outputs)]
                self._meta = ModelMetadata(resp.name, *tensors, platform=resp.platform, versions=list(resp.versions))
                self._model = resp.name
            return self._meta

    @property
    def model(self) -> str:
        return self._model or self.metadata().name

    def infer(self, x: np.ndarray | Mapping[str, np.ndarray], *, timeout_s: float | None = None) -> Result:
        """Classify a batch ``x`` [B, C, H, W] of raw pixels, or, for a model with several inputs, a mapping of
        every input's name to its batch (``{"input_ids": ids, "attention_mask": mask}``). Raises edgeexit errors
        only."""
        meta = self.metadata(timeout_s)
        if isinstance(x, Mapping):
            return self._send(meta, _named_request(meta, x), timeout_s)
        if len(meta.inputs) != 1:
            raise ConfigError(f"{meta.name} at {self.target} takes {len(meta.inputs)} inputs "
                              f"{[t.name for t in meta.inputs]}; pass them by name: infer({{name: array, ...}})")
        want = meta.inputs[0]
        x, datatype = _pixels(np.asarray(x))
        shape = list(x.shape)
        if len(shape) != len(want.shape) or any(w != -1 and w != d for w, d in zip(want.shape, shape, strict=False)):
            hint = "; add the batch axis (x[None])" if shape == want.shape[1:] else ""
            raise InvalidTensor(f"input shape {shape} does not fit {meta.name}'s {want.shape} (-1: any number of "
                                f"rows){hint}")
        if shape[0] == 0:
            raise InvalidTensor("the batch is empty; send at least one row")
        req = pb.ModelInferRequest(model_name=meta.name)
        req.inputs.add(name=want.name, datatype=datatype, shape=shape)
        req.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
        return self._send(meta, req, timeout_s)

    def _send(self, meta: ModelMetadata, req: pb.ModelInferRequest, timeout_s: float | None) -> Result:
        t0 = time.perf_counter()
        resp = self._call("ModelInfer", req, timeout_s)
        seconds = time.perf_counter() - t0
        try:
            out = outputs_from_pb(resp)
            missing = [n for n in _OUTPUTS if n not in out]
            if missing:
                raise InvalidTensor(f"outputs {missing} are missing (got {sorted(out)}); is {self.target} an "
                                    "`edgeexit agent`?")
            decided = to_names(out["decided"])
        except InvalidTensor as e:
            raise OffloadError(f"{self.target} sent an answer this client cannot read: {e}") from None
        params = params_from_pb(resp.parameters)
        return Result(out["label"], out["probabilities"], out["exit"], decided, Latency.from_params(params),
                      meta.name, params, seconds)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EdgeExitClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _named_request(meta: ModelMetadata, inputs: Mapping[str, np.ndarray]) -> pb.ModelInferRequest:
    """Every input of ``meta`` by name, in its datatype (a safe cast only) and declared shape; InvalidTensor
    before sending anything otherwise."""
    names = [t.name for t in meta.inputs]
    if sorted(inputs) != sorted(names):
        raise InvalidTensor(f"{meta.name} takes the inputs {names}, got {sorted(inputs)}")
    req = pb.ModelInferRequest(model_name=meta.name)
    rows = set()
    for want in meta.inputs:
        a = np.asarray(inputs[want.name])
        dtype = np.dtype(_DTYPES.get(want.datatype, object))
        # widen within a kind only (uint into int too): uint8 pixels must not pass as FP32 0..255 by the way
        same_kind = a.dtype.kind == dtype.kind or a.dtype.kind + dtype.kind == "ui"
        if not (same_kind and np.can_cast(a.dtype, dtype, "safe")):
            raise InvalidTensor(f"{want.name}: dtype {a.dtype} but the agent takes {want.datatype} (this client only "
                                "widens ints to ints and floats to floats); cast it first")
        if a.ndim != len(want.shape) or any(w != -1 and w != d for w, d in zip(want.shape, a.shape, strict=False)):
            raise InvalidTensor(f"{want.name}: shape {list(a.shape)} does not fit {want.shape} (-1: any size)")
        if a.ndim == 0 or a.shape[0] == 0:
            raise InvalidTensor(f"{want.name}: the batch is empty; send at least one row")
        rows.add(a.shape[0])
        req.inputs.add(name=want.name, datatype=want.datatype, shape=list(a.shape))
        req.raw_input_contents.append(np.ascontiguousarray(a, dtype=dtype).tobytes())
    if len(rows) != 1:
        raise InvalidTensor(f"the inputs {names} must have the same number of rows, got {sorted(rows)}")
    return req


def _pixels(x: np.ndarray) -> tuple[np.ndarray, str]:
    """``x`` as the agent takes it: (array, OIP datatype)."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0), "FP32"  # the agent takes no UINT8: k -> k/255
    if x.dtype == np.float16:
        return x, "FP16"
    if x.dtype in (np.float32, np.float64):
        return x.astype(np.float32, copy=False), "FP32"
    raise InvalidTensor(f"pixels of dtype {x.dtype} are not supported; send float32 in [0, 1] or uint8 images")
