"""The device side's OIP v2 client for offloading a boundary tensor to the cloud service.

Every failure becomes an edgeexit error (``status.error_for``) carrying the server's message, so the device
runtime decides on fallback by exception type alone: LinkTimeout, PeerUnavailable, InvalidTensor, OffloadError.
A successful call returns an ``Offload``: the outputs (it reads as their mapping) and the time the server says
it spent (``edgeexit.queue_us`` / ``edgeexit.compute_us``), None when the server does not report it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np

from edgeexit.errors import ConfigError, EdgeExitError, InvalidTensor, OffloadError, PeerUnavailable
from edgeexit.runtime.codec import WireTensor
from edgeexit.runtime.oip_messages import ParamValue, ServerTiming, outputs_from_pb, params_from_pb, params_to_pb
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


class InferenceClient:
    """A channel to one OIP v2 server. Thread-safe; reuse one per target."""

    def __init__(self, target: str, options: ClientOptions | None = None):
        self.target = target
        self.options = options or ClientOptions()
        o = self.options
        channel_options = [
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
        ]
        if o.tls_ca:
            creds = channel_credentials(o.tls_ca, o.tls_cert, o.tls_key)
            self._channel = grpc.secure_channel(target, creds, options=channel_options)
        else:
            if o.tls_cert or o.tls_key:
                raise ConfigError("a client certificate needs tls_ca too (the CA that signed the server cert)")
            self._channel = grpc.insecure_channel(target, options=channel_options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._metadata = bearer_metadata(o.token)

    def infer(self, model: str, input_name: str, tensor: WireTensor, *, timeout: float,
              request_id: str = "") -> Offload:
        """Send one tensor; return its outputs as float32 with the server's timing. Raises edgeexit errors."""
        req = pb.ModelInferRequest(model_name=model, id=request_id)
        req.inputs.add(name=input_name, datatype=tensor.datatype, shape=list(tensor.shape))
        req.raw_input_contents.append(bytes(tensor.data))
        params_to_pb(tensor.params, req.parameters)
        try:
            resp = self._stub.ModelInfer(req, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_for(e.code(), e.details() or "") from None
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
        our token, so a wrong token fails it as ``PeerRefused`` (gRPC's health service would not ask for one)."""
        try:
            ready = self._stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout, metadata=self._metadata).ready
        except grpc.RpcError as e:
            raise error_for(e.code(), e.details() or "") from None
        if not ready:
            raise PeerUnavailable("the cloud service answers but is not ready (still loading its models?)")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
