"""The device side's OIP v2 client for offloading a boundary tensor to the cloud service.

Every failure becomes an edgeexit error (``status.error_for``) carrying the server's message, so the device
runtime decides on fallback by exception type alone: LinkTimeout, PeerUnavailable, InvalidTensor, OffloadError.
A successful call returns an ``Offload``: the outputs (it reads as their mapping) and the time the server says
it spent (``edgeexit.queue_us`` / ``edgeexit.compute_us``), None when the server does not report it.

Identity: a client made with ``bundle=<digest>`` names it on every request (parameter ``edgeexit.bundle``); a
server running another bundle refuses with ``BundleMismatch``, and ``check_health`` (with ``model``) compares
the digest a server lists in ModelMetadata ``versions`` before any request is sent.

The channel: one target or several (``cloud_targets.parse_cloud``: round-robin with client-side health checks),
HTTP/2 keepalive pings every ``keepalive_s`` (cellular NATs drop idle connections silently; `edgeexit serve`
accepts pings down to every 0.5 s, also without calls, see ``oip_server.KEEPALIVE_OPTIONS``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from edgeexit.errors import (
    BundleMismatch,
    ConfigError,
    EdgeExitError,
    InvalidTensor,
    OffloadError,
    PeerUnavailable,
)
from edgeexit.runtime.cloud_targets import parse_cloud
from edgeexit.runtime.codec import WireTensor
from edgeexit.runtime.oip_messages import (
    P_BUNDLE,
    ParamValue,
    ServerTiming,
    outputs_from_pb,
    params_from_pb,
    params_to_pb,
)
from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc
from edgeexit.runtime.security import bearer_metadata, channel_credentials
from edgeexit.runtime.status import error_for


@dataclass
class ClientOptions:
    tls_ca: str | None = None  # PEM path of the CA that signed the server cert (enables TLS)
    tls_cert: str | None = None  # client cert/key for mTLS
    tls_key: str | None = None
    token: str | None = None  # sent as `authorization: Bearer <token>`
    max_message_bytes: int = 64 << 20
    # The name the servers' certificates are checked against (grpc.ssl_target_name_override); needed for TLS to a
    # list of addresses (see cloud_targets), otherwise the target's host name.
    tls_server_name: str | None = None
    # HTTP/2 keepalive: a ping every keepalive_s, also while idle; no answer within keepalive_timeout_s closes the
    # connection (the next request reconnects). Must stay above the server's minimum ping interval (serve: 0.5 s).
    keepalive_s: float = 30.0
    keepalive_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not (self.keepalive_s >= 1.0 and self.keepalive_timeout_s > 0):
            raise ConfigError(f"keepalive: ping interval >= 1 s and a positive timeout, got {self.keepalive_s} s "
                              f"and {self.keepalive_timeout_s} s")


@dataclass(frozen=True)
class Offload(Mapping[str, np.ndarray]):
    """A cloud answer: output name -> float32 array, and the server's own timing when it reports it."""

    outputs: dict[str, np.ndarray]
    server: ServerTiming | None = None  # None: an older server (or another OIP server) sent no timing
    params: dict[str, ParamValue] = field(default_factory=dict)  # every response parameter, as sent

    # Reads as the outputs' mapping, so callers that only want tensors index it directly.
    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)


_DIGEST = re.compile(r"[0-9a-f]{64}")
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def request_bytes(model: str, input_name: str, tensor: WireTensor, request_id: str = "",
                  bundle: str | None = None) -> bytes:
    """A serialised ModelInferRequest carrying one tensor, equal (as a message) to building it with protobuf.

    Protobuf reads fields in any order, so the per-call parts follow a header cached per model, tensor layout
    and parameters: the id (field 3) and the tensor's bytes (field 7), copied once into the result.
    """
    params = {**tensor.params, P_BUNDLE: bundle} if bundle else tensor.params
    try:
        # Types in the key: True == 1 == 1.0 as keys, but they travel as bool, int64 and double parameters.
        items = tuple((k, type(v), v) for k, v in params.items())
        header = _header(model, input_name, tensor.datatype, tuple(tensor.shape), items)
    except TypeError:  # an unhashable parameter value: params_to_pb says what is wrong with it
        header = _header_uncached(model, input_name, tensor.datatype, list(tensor.shape), params)
    parts = [header]
    if request_id:
        rid = request_id.encode()
        parts += [b"\x1a", _varint(len(rid)), rid]
    parts += [b"\x3a", _varint(len(tensor.data)), tensor.data]
    return b"".join(parts)


@functools.lru_cache(maxsize=256)
def _header(model: str, input_name: str, datatype: str, shape: tuple[int, ...],
            items: tuple[tuple[str, type, ParamValue], ...]) -> bytes:
    return _header_uncached(model, input_name, datatype, list(shape), {k: v for k, _, v in items})


def _header_uncached(model: str, input_name: str, datatype: str, shape: list[int],
                     params: Mapping[str, ParamValue]) -> bytes:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=input_name, datatype=datatype, shape=shape)
    params_to_pb(dict(params), req.parameters)
    return req.SerializeToString()


def multi_request_bytes(model: str, tensors: Sequence[tuple[str, WireTensor]], request_id: str = "",
                        bundle: str | None = None) -> bytes:
    """A serialised ModelInferRequest carrying several tensors (a boundary and the extra model inputs carried
    with it), each with its encoding parameters on the tensor itself, since they differ (an int8 boundary's
    scale is not the mask's)."""
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    for name, t in tensors:
        tensor = req.inputs.add(name=name, datatype=t.datatype, shape=list(t.shape))
        params_to_pb(dict(t.params), tensor.parameters)
        req.raw_input_contents.append(bytes(t.data))
    if bundle:
        params_to_pb({P_BUNDLE: bundle}, req.parameters)
    return req.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class InferenceClient:
    """A channel to one OIP v2 server, or several (round-robin). Thread-safe; reuse one per target.

    ``bundle``: the digest of the bundle this device runs, sent with every request; ``model``: the model whose
    ModelMetadata ``check_health`` compares against it (both optional: a plain client sends neither)."""

    def __init__(self, target: str, options: ClientOptions | None = None, *, bundle: str | None = None,
                 model: str | None = None):
        cloud = parse_cloud(target)
        self.target = target
        self.options = options or ClientOptions()
        self.bundle, self.model = bundle, model
        o = self.options
        channel_options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", o.max_message_bytes),
            ("grpc.max_send_message_length", o.max_message_bytes),
            # Reconnect quickly after an outage: a channel that saw a dead server retries on a backoff (grpc's
            # default: 1 s growing to 120 s), and the breaker's health checks fail fast until it has reconnected.
            # 0.1 s growing to 0.5 s (+20% jitter) keeps recovery within ~1 s of the link's return, at the
            # cost of one TCP connect every 0.5 s while the cloud is down.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 500),
            # ...and a connect attempt that hangs (packets dropped) is abandoned after 2 s, not grpc's 20 s;
            # 2 s still covers a TCP + TLS handshake over a slow (3G, ~300 ms RTT) link.
            ("grpc.min_reconnect_backoff_ms", 2000),
            ("grpc.keepalive_time_ms", round(o.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", round(o.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),  # idle connections are the ones NATs drop
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging between requests (default: 2 pings, then stop)
        ]
        if (config := cloud.service_config()) is not None:
            channel_options.append(("grpc.service_config", config))
        if o.tls_ca:
            creds = channel_credentials(o.tls_ca, o.tls_cert, o.tls_key)
            if (name := cloud.tls_name(o.tls_server_name)) is not None:
                channel_options.append(("grpc.ssl_target_name_override", name))
            self._channel = grpc.secure_channel(cloud.target, creds, options=channel_options)
        else:
            if o.tls_cert or o.tls_key:
                raise ConfigError("a client certificate needs tls_ca too (the CA that signed the server cert)")
            self._channel = grpc.insecure_channel(cloud.target, options=channel_options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        # ModelInfer with the request serialised here (request_bytes): the tensor is copied once, not into a
        # protobuf message and again out of it.
        self._infer = self._channel.unary_unary(_MODEL_INFER, request_serializer=None,
                                                response_deserializer=pb.ModelInferResponse.FromString,
                                                _registered_method=True)
        self._metadata = bearer_metadata(o.token)

    def infer(self, model: str, input_name: str, tensor: WireTensor, *, timeout: float,
              request_id: str = "", extra: Sequence[tuple[str, WireTensor]] = ()) -> Offload:
        """Send one tensor (and ``extra`` named ones: the inputs a multi-input model carries); return its outputs
        as float32 with the server's timing. Raises edgeexit errors."""
        if extra:
            data = multi_request_bytes(model, [(input_name, tensor), *extra], request_id, self.bundle)
        else:
            data = request_bytes(model, input_name, tensor, request_id, self.bundle)
        try:
            resp = self._infer(data, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e) from None
        try:
            outputs = {k: v.astype(np.float32, copy=False) for k, v in outputs_from_pb(resp).items()}
        except InvalidTensor as e:
            raise OffloadError(f"the cloud sent a malformed response: {e}") from e
        params = params_from_pb(resp.parameters)
        return Offload(outputs, ServerTiming.from_params(params), params)

    def ready(self, timeout: float = 1.0) -> bool:
        """ServerReady; False on any failure (unreachable, refused, timeout)."""
        try:
            self.check_health(timeout)
        except EdgeExitError:
            return False
        return True

    def check_health(self, timeout: float = 1.0) -> None:
        """Raise the edgeexit error that says why the server is not usable (None when it is): a ServerReady with
        our token, so a wrong token fails it as ``PeerRefused`` (gRPC's health service would not ask for one);
        then, with ``bundle`` and ``model``, ``BundleMismatch`` when the model's ModelMetadata lists digests
        (64 hex digits, as `edgeexit serve` does) and ours is not among them. Integer versions (Triton) pass:
        such a server checks the request parameter itself."""
        try:
            ready = self._stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout, metadata=self._metadata).ready
            if ready and self.bundle and self.model:
                meta = self._stub.ModelMetadata(pb.ModelMetadataRequest(name=self.model), timeout=timeout,
                                                metadata=self._metadata)
                digests = [v for v in meta.versions if _DIGEST.fullmatch(v)]
                if digests and self.bundle not in digests:
                    raise self._mismatch(digests[0], f"{self.model} lists versions {list(meta.versions)[:4]}")
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # it serves another model: not ours to judge here
                return
            raise self._error(e) from None
        if not ready:
            raise PeerUnavailable("the cloud service answers but is not ready (still loading its models?)")

    def _error(self, e: grpc.RpcError) -> EdgeExitError:
        err = error_for(e.code(), e.details() or "")
        return self._mismatch(err.served, str(err)) if isinstance(err, BundleMismatch) else err

    def _mismatch(self, served: str, detail: str) -> BundleMismatch:
        """A BundleMismatch naming both digests in full first (log lines clip long messages)."""
        return BundleMismatch(f"the cloud runs bundle {served}, this device bundle {self.bundle}: their answers "
                              f"differ; answering on the device until the same bundle runs on both ({detail})",
                              served=served)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
