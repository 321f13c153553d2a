"""A generic Open Inference Protocol v2 gRPC server, shared by the cloud service and the device agent.

A server hosts ``ModelHandler`` objects (one per model name). The servicer decodes protobuf into plain
dataclasses (``oip_messages``), calls the handler, and maps raised edgeexit errors to gRPC statuses in one
place (``status``). ``build_server`` adds TLS / mTLS, a bearer-token interceptor, deliberately raised
message limits, the standard gRPC health service and Prometheus metrics; ``stop(grace)`` drains.

Every RPC is registered without a request deserializer and parses its bytes itself: grpcio (1.85) answers a
request its deserializer refuses with INTERNAL, logs a traceback and keeps ~16 KB per such request. Parsing
here answers INVALID_ARGUMENT and keeps nothing. Prometheus ``/metrics`` is plain HTTP without auth, so it
binds to ``metrics_host`` (loopback by default), whatever the gRPC ``host``.

Versions: a handler with a ``version`` (the cloud service: its bundle digest) reports it as the response's
``model_version`` and accepts a request's model_version of "", "1" or that version; any other is NOT_FOUND, as
Triton answers for a version it does not serve (ModelReady says not ready). The client's deadline travels into
the handler as ``InferRequest.deadline``; a request whose deadline passed while it waited for a worker thread
is dropped before decoding (DEADLINE_EXCEEDED, ``edgeexit_server_dropped_total{reason="deadline"}``).
Keepalive (``KEEPALIVE_OPTIONS``): see the comments there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgeexit.errors import ConfigError, InvalidTensor, LinkTimeout
from edgeexit.runtime.metrics import ServerMetrics
from edgeexit.runtime.oip_messages import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    metadata_to_pb,
    request_from_pb,
    response_to_pb,
    split_raw_contents,
)
from edgeexit.runtime.oip_rest import RestServer
from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc
from edgeexit.runtime.security import TokenInterceptor, server_credentials
from edgeexit.runtime.status import ModelNotFound, clip, grpc_status, status_for

SERVICE_NAME = "inference.GRPCInferenceService"
UNKNOWN_MODEL = "<unknown>"  # metrics label of requests for models not served (client-chosen names)

# Every RPC of the service: name, request and response message.
RPCS: tuple[tuple[str, type[Message], type[Message]], ...] = (
    ("ServerLive", pb.ServerLiveRequest, pb.ServerLiveResponse),
    ("ServerReady", pb.ServerReadyRequest, pb.ServerReadyResponse),
    ("ModelReady", pb.ModelReadyRequest, pb.ModelReadyResponse),
    ("ServerMetadata", pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    ("ModelMetadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    ("ModelInfer", pb.ModelInferRequest, pb.ModelInferResponse),
)

# HTTP/2 keepalive. Cellular NATs and cloud load balancers drop idle connections silently; pings keep them open
# and find dead ones. gRPC's server defaults refuse client pings more often than every 5 min, or any ping without
# a call in flight, and answer them with GOAWAY "too_many_pings": the agent (pinging every ~30 s, also when idle)
# would lose its channel. So: accept client pings down to every 0.5 s, also with no call in flight; ping idle
# clients every 60 s ourselves and drop a connection whose ping goes unanswered for 20 s.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 60_000),  # our own pings to the client, every 60 s
    ("grpc.keepalive_timeout_ms", 20_000),  # an unanswered ping for 20 s closes the connection
    ("grpc.keepalive_permit_without_calls", 1),  # accept (and send) pings on connections without calls
    ("grpc.http2.min_ping_interval_without_data_ms", 500),  # client pings closer than this are "strikes"
    ("grpc.http2.max_pings_without_data", 0),  # no cap on our pings between data frames
)
_NO_DEADLINE_S = 1e8  # grpcio reports "no deadline" as a time_remaining of ~inf or years


@runtime_checkable
class ModelHandler(Protocol):
    """One servable model. ``infer`` raises edgeexit errors for bad requests (mapped to statuses).

    Optionally a ``version: str`` attribute: the only model_version served besides "" and "1" (see above)."""

    name: str

    def metadata(self) -> ModelMetadata: ...

    def ready(self) -> bool: ...

    def infer(self, request: InferRequest) -> InferResponse: ...


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port; the bound one is ServerHandle.port
    tls_cert: str | None = None  # PEM server certificate (with tls_key: TLS)
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA that must have signed client certificates (mTLS)
    token: str | None = None  # require `authorization: Bearer <token>` on every inference RPC
    max_message_bytes: int = 64 << 20  # gRPC's 4 MB default is too small for real boundary tensors
    workers: int = 16  # gRPC handler threads (concurrent requests in flight)
    metrics_port: int | None = None  # serve Prometheus /metrics over HTTP here (0 picks a port)
    metrics_host: str = "127.0.0.1"  # /metrics has no TLS or auth: loopback unless asked, whatever `host` is
    http_port: int | None = None  # also serve OIP v2 REST on `host` here (0 picks a port): runtime/oip_rest.py
    server_name: str = "edgeexit"
    server_version: str = "0.1.0"

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key as well")
        if self.max_message_bytes <= 0 or self.workers <= 0:
            raise ConfigError("max message bytes and workers must be positive")
        for what, port in (("port", self.port), ("metrics port", self.metrics_port), ("HTTP port", self.http_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(f"{what} {port} is not a TCP port; use 0..65535 (0 picks a free one)")
        if not self.metrics_host or any(c.isspace() for c in self.metrics_host):
            raise ConfigError(f"metrics host {self.metrics_host!r} is not an address; use e.g. 127.0.0.1 "
                              "(loopback, the default) or 0.0.0.0 (every interface)")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """OIP v2 servicer over a dict of handlers; usable in-process (tests call its methods directly)."""

    def __init__(self, handlers: list[ModelHandler], metrics: ServerMetrics | None = None,
                 name: str = "edgeexit", version: str = "0.1.0"):
        self.handlers = {h.name: h for h in handlers}
        if len(self.handlers) != len(handlers):
            raise ConfigError("two handlers share a model name; every model name must be unique")
        self.metrics = metrics or ServerMetrics()
        self.name, self.version = name, version

    def handler(self, model: str, version: str = "") -> ModelHandler:
        h = self.handlers.get(model)
        if h is None:
            raise ModelNotFound(f"model {clip(model)} is not served here; available: {sorted(self.handlers)}")
        if not _serves_version(h, version):
            raise ModelNotFound(f"version {clip(version)} of model {clip(model)} is not served; served: "
                                f"[{h.version}]; leave model_version empty (or send that one)")  # type: ignore[attr-defined]
        return h

    @grpc_status
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @grpc_status
    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=all(h.ready() for h in self.handlers.values()))

    @grpc_status
    def ModelReady(self, request, context):
        # An unknown model or version is ready=false, not NOT_FOUND: Triton's answer (kept on purpose, core#508),
        # and tritonclient's and KServe's is_model_ready then return False instead of raising (README, wire).
        h = self.handlers.get(request.name)
        return pb.ModelReadyResponse(ready=bool(h is not None and _serves_version(h, request.version) and h.ready()))

    @grpc_status
    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=self.name, version=self.version, extensions=[])

    @grpc_status
    def ModelMetadata(self, request, context):
        # An empty name asks a one-model server (the agent) for its model, so an app's client can discover it
        # (edgeexit.client); with several models it stays NOT_FOUND, listing them.
        only = next(iter(self.handlers)) if len(self.handlers) == 1 else ""
        return metadata_to_pb(self.handler(request.name or only, request.version).metadata())

    def ModelInfer(self, request, context, raw: list[bytes | memoryview] | None = None):
        """``raw``: the request's raw_input_contents when ``_parsing`` split them off its bytes (no copies)."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            try:
                decoded = request_from_pb(request, raw)
            except (ValueError, OverflowError) as e:  # e.g. typed contents out of the datatype's range
                raise InvalidTensor(f"cannot decode the request's inputs: {e}; check each input's datatype "
                                    "and contents") from e
            handler = self.handler(decoded.model, decoded.version)
            decoded.deadline = self._deadline(context)
            response = handler.infer(decoded)
            return response_to_pb(decoded.model, decoded.id, response, decoded.outputs,
                                  getattr(handler, "version", "1"))
        except Exception as e:  # noqa: BLE001 - every error becomes a status; the server keeps serving
            code, message = status_for(e)
        finally:
            # Unknown model names are client-chosen strings: label them together to bound cardinality.
            label = request.model_name if request.model_name in self.handlers else UNKNOWN_MODEL
            self.metrics.observe_request(label, code.name, time.perf_counter() - start)
        context.abort(code, message)

    def _deadline(self, context: grpc.ServicerContext) -> float | None:
        """The client's deadline as a time.monotonic() instant (None: it set none); LinkTimeout if already past."""
        time_remaining = getattr(context, "time_remaining", None)  # in-process test contexts may lack it
        remaining = time_remaining() if callable(time_remaining) else None
        if remaining is None or remaining > _NO_DEADLINE_S:
            return None
        if remaining <= 0:  # it waited for a worker thread until its client gave up: spare the decoding
            self.metrics.observe_drop("deadline")
            raise LinkTimeout("the request's deadline passed before a worker thread took it; it was not computed. "
                              "Give requests a longer deadline, or add workers or replicas")
        return time.monotonic() + remaining

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Every RPC, taking the request as bytes (no deserializer) and parsing it in ``_parsing``."""
        return {name: grpc.unary_unary_rpc_method_handler(
                    self._parsing(name, request_cls), request_deserializer=None,
                    response_serializer=response_cls.SerializeToString)
                for name, request_cls, response_cls in RPCS}

    def _parsing(self, name: str, request_cls: type[Message]) -> Callable[[bytes, grpc.ServicerContext], Any]:
        method = getattr(self, name)
        what = request_cls.DESCRIPTOR.name

        def handle(data: bytes, context: grpc.ServicerContext) -> Any:
            # ModelInfer: the tensors' bytes are split off as views and only the rest is parsed (see
            # oip_messages.split_raw_contents); anything unusual is parsed whole, as every other RPC.
            split = split_raw_contents(data) if name == "ModelInfer" else None
            try:
                request = request_cls.FromString(data if split is None else split[0])
            except DecodeError:
                request = None
            if request is None:  # outside the except block: abort's exception carries no parse traceback
                if name == "ModelInfer":
                    self.metrics.observe_request(UNKNOWN_MODEL, grpc.StatusCode.INVALID_ARGUMENT.name, 0.0)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"request is not a valid {what} protobuf; send an Open Inference Protocol v2 "
                              f"{what} (e.g. with tritonclient.grpc)")
            return method(request, context) if split is None else method(request, context, split[1])

        return handle


def _serves_version(h: ModelHandler, version: str) -> bool:
    own = getattr(h, "version", None)
    return own is None or version in ("", "1", own)


class ServerHandle:
    """A built server: ``start()``, the bound ``port``, ``stop(grace)`` that drains, metrics."""

    def __init__(self, server: grpc.Server, port: int, servicer: InferenceServicer,
                 health_servicer: health.HealthServicer, options: ServerOptions):
        self.server, self.port, self.servicer = server, port, servicer
        self.health, self.options = health_servicer, options
        self.metrics = servicer.metrics
        self.metrics_port: int | None = None
        self.rest: RestServer | None = None  # the REST front (options.http_port), same handlers
        self.http_port: int | None = None

    @property
    def target(self) -> str:
        return f"{self.options.host}:{self.port}"

    def start(self) -> ServerHandle:
        o = self.options
        if o.http_port is not None:  # bind before gRPC starts: a taken port fails the start cleanly
            self.rest = RestServer(self.servicer, o.host, o.http_port, token=o.token, tls_cert=o.tls_cert,
                                   tls_key=o.tls_key, tls_client_ca=o.tls_client_ca,
                                   max_message_bytes=o.max_message_bytes)
            self.http_port = self.rest.port
        self.server.start()
        if self.rest is not None:
            self.rest.start()
        if self.options.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.options.metrics_port, self.options.metrics_host)
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new RPCs, let in-flight ones finish within ``grace`` seconds, then stop (blocks)."""
        self.health.enter_graceful_shutdown()
        if self.rest is not None:
            self.rest.begin_stop()
        self.server.stop(grace).wait()
        if self.rest is not None:
            self.rest.close(grace)
        for h in self.servicer.handlers.values():
            close = getattr(h, "close", None)
            if callable(close):
                close()
        self.metrics.close()


def build_server(handlers: list[ModelHandler], options: ServerOptions | None = None,
                 metrics: ServerMetrics | None = None) -> ServerHandle:
    """Build (and bind, not start) a server for ``handlers``. Call ``.start()`` on the result.

    Pass ``metrics`` when the handlers record into it too (e.g. batch sizes); by default a fresh registry.
    """
    options = options or ServerOptions()  # the options checked themselves when made
    grpc_options = [
        ("grpc.max_receive_message_length", options.max_message_bytes),
        ("grpc.max_send_message_length", options.max_message_bytes),
        ("grpc.so_reuseport", 0),  # port 0 must give a port nobody else is serving on
        *KEEPALIVE_OPTIONS,
    ]
    interceptors = [TokenInterceptor(options.token)] if options.token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="oip"),
                         interceptors=interceptors, options=grpc_options,
                         maximum_concurrent_rpcs=None)
    servicer = InferenceServicer(handlers, metrics or ServerMetrics(), options.server_name, options.server_version)
    rpc_handlers = servicer.method_handlers()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, rpc_handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, rpc_handlers)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    address = f"{options.host}:{options.port}"
    try:
        if options.tls_cert:
            creds = server_credentials(options.tls_cert, options.tls_key, options.tls_client_ca)
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise ConfigError(f"cannot listen on {address} ({e}); pick another --host/--port") from e
    if port == 0:
        raise ConfigError(f"cannot listen on {address}; the port is taken or the host is not local")
    return ServerHandle(server, port, servicer, health_servicer, options)
