"""The agent process: a local Open Inference Protocol v2 server around a DeviceRuntime.

An app on the device calls it with an unmodified tritonclient (model ``<model>``, input ``input`` FP32
[-1, C, H, W], raw [0, 1] pixels). Outputs, one row per input row:

    label          INT64 [B]      predicted class
    probabilities  FP32  [B, C]   the answering exit's softmax
    exit           INT32 [B]      index of the exit head that answered
    decided        INT32 [B]      where: 0 = device (early exit), 1 = cloud, 2 = device-fallback

Response parameters add the batch's latency breakdown as int64 microseconds (``edgeexit.device_us``,
``encode_us``, ``network_us``, ``total_us``, and ``cloud_us`` when the cloud reported its time),
``edgeexit.bytes_sent``, ``edgeexit.split`` and, after a fallback, ``edgeexit.fallback``. Events (start, ready,
fallback, circuit, probe, stop) go through stdlib logging; `edgeexit agent` writes them, like every other record,
as one JSON object per line on stderr (edgeexit.logs). Prometheus metrics share the server's registry.
Never imports torch.

Readiness when the cloud is not usable: the agent still answers every request on the device, so ServerReady and
ModelReady stay true. What the cloud does shows in (1) gRPC health: service ``edgeexit.cloud`` is SERVING while
offloads work, NOT_SERVING while the cloud is unreachable or refuses our token/TLS/bundle, UNKNOWN until the
first check (absent when the agent runs device-only); (2) one WARNING line per change (``cloud_refused`` with
reason auth|tls|bundle, ``cloud_unreachable``, ``cloud_ok``; see runtime/cloud_health.py); (3) metrics:
``edgeexit_agent_cloud_errors_total{reason}`` counts every failed cloud call, offloads and background checks
(reason auth, tls, bundle, overloaded, unavailable, timeout, error) and ``edgeexit_agent_cloud_status`` is 1 ok,
0 unknown, -1 unreachable, -2 refused. "bundle": the cloud runs another bundle than this device (the agent names
its digest on every request: a half-finished rollout), so rows are answered on the device; the log line carries
both digests. "overloaded": the service's queue was full and the request fell back at once (not a status).
The other agent metrics (rows per exit and decided, fallbacks by the same reasons, bytes sent, the current split,
the link estimate, the circuit) are listed in the README's "Metrics" table.

A model with several inputs (``input_ids`` and ``attention_mask``, INT64 [-1, -1]) takes each by name in its own
dtype, as ModelMetadata lists them; the tokenizer stays in the app (the `tokenizers` package, the model's own
tokenizer.json). A request's inputs share their sequence length, at most the bundle's ``dims`` max.

Bounds on what apps send, checked on the declared shape before anything is decompressed or run: at most
``max_batch_rows`` rows per request and ``max_message_bytes`` per message and per decoded tensor, as serve does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import signal
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from grpc_health.v1 import health_pb2
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from edgeexit.errors import ConfigError
from edgeexit.hostport import parse_hostport
from edgeexit.logs import event
from edgeexit.runtime import backends, codec
from edgeexit.runtime.decided import DECIDED_NAMES
from edgeexit.runtime.device import DeviceOptions, DeviceRuntime, Result
from edgeexit.runtime.metrics import LATENCY_BUCKETS
from edgeexit.runtime.micro_batch import MicroBatcher
from edgeexit.runtime.oip_input import decode_input, decode_inputs
from edgeexit.runtime.oip_messages import InferRequest, InferResponse, ModelMetadata, TensorMeta
from edgeexit.runtime.oip_server import ServerHandle, ServerOptions, build_server

CIRCUIT_STATES = {"closed": 0, "half-open": 1, "open": 2}
CLOUD_HEALTH_SERVICE = "edgeexit.cloud"  # gRPC health service name whose status is the cloud's
CLOUD_STATUS = {"ok": 1, "unknown": 0, "unreachable": -1, "refused": -2}
# The device runtime logs these itself (WARNING, once per change); the agent only turns them into health/metrics.
CLOUD_EVENTS = {"cloud_ok": "ok", "cloud_unreachable": "unreachable", "cloud_refused": "refused"}
INPUT_DATATYPES = ("FP32", "FP16")  # raw [0, 1] pixels
MAX_BATCH_ROWS = 256  # the default rows per app request, as `edgeexit serve --max-batch-rows`
log = logging.getLogger(__name__)


class AgentMetrics:
    """Agent metrics, registered in the server's registry so one /metrics shows both (names: README "Metrics").

    Every label is bounded: ``exit`` by the bundle's exits, ``decided`` by device/cloud/device-fallback,
    ``split`` by the bundle's split values, ``reason`` by breaker.failure_reason's fixed set.
    """

    def __init__(self, registry: Any, runtime: DeviceRuntime | None = None):
        self.rows = Counter("edgeexit_agent_rows", "Answered rows by the exit head that answered and where it was "
                            "decided (device, cloud, device-fallback)", ["exit", "decided"], registry=registry)
        self.fallbacks = Counter("edgeexit_agent_fallbacks", "Offloads that fell back to the device, by reason: "
                                 "auth, tls, bundle, overloaded, unavailable, timeout, error", ["reason"],
                                 registry=registry)
        self.offload = Histogram("edgeexit_agent_offload_seconds", "Network time of the offloads that succeeded",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.sent = Counter("edgeexit_agent_sent_bytes", "Bytes of offloaded tensors on the wire (request payloads "
                            "of successful offloads; link probes not counted)", registry=registry)
        self.split = Gauge("edgeexit_agent_split", "1 for the split the last request ran with (device, cloud, N: "
                           "segments 0..N on the device, cascade@N), 0 for the splits used before", ["split"],
                           registry=registry)
        self.bandwidth = Gauge("edgeexit_agent_link_bandwidth_bytes_per_second", "Uplink bandwidth the agent "
                               "estimates from its offloads (NaN until measured)", registry=registry)
        self.rtt = Gauge("edgeexit_agent_link_rtt_seconds", "Round-trip time to the cloud the agent estimates "
                         "(NaN until measured)", registry=registry)
        self.circuit = Gauge("edgeexit_agent_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
                             registry=registry)
        self.cloud_errors = Counter("edgeexit_agent_cloud_errors", "Failed cloud calls (offloads and health checks) "
                                    "by reason: auth, tls, bundle, overloaded, unavailable, timeout, error",
                                    ["reason"], registry=registry)
        self.cloud_status = Gauge("edgeexit_agent_cloud_status", "The cloud: 1 ok, 0 unknown, -1 unreachable, "
                                  "-2 refused (credentials or bundle)", registry=registry)
        self._split_lock = threading.Lock()
        self._current_split: str | None = None
        self._rows: dict[tuple[int, int], MetricWrapperBase] = {}  # (exit, decided code) -> its labelled child
        if runtime is not None:
            # Read at scrape time: the estimate is the link monitor's, no copy to keep in step.
            self.bandwidth.set_function(lambda: _or_nan(runtime.link.estimate().bandwidth_bps, 1 / 8))
            self.rtt.set_function(lambda: _or_nan(runtime.link.estimate().rtt_s))
            self.set_split(runtime.split)

    def count_rows(self, exits: np.ndarray, codes: np.ndarray) -> None:
        """Count answered rows by (exit, decided code); labelled children are looked up once each."""
        pairs = [(int(exits[0]), int(codes[0]))] if len(exits) == 1 else zip(exits.tolist(), codes.tolist(),
                                                                               strict=True)
        for key, n in Tally(pairs).items():
            child = self._rows.get(key)
            if child is None:
                child = self._rows[key] = self.rows.labels(exit=str(key[0]), decided=DECIDED_NAMES[key[1]])
            child.inc(n)

    def set_split(self, split: Any) -> None:
        """Mark ``split`` as the current one (a state set: the previous one drops to 0)."""
        label = str(split)
        if label == self._current_split:  # the usual case, read without the lock (a str swap is atomic)
            return
        with self._split_lock:
            if label == self._current_split:
                return
            if self._current_split is not None:
                self.split.labels(split=self._current_split).set(0)
            self.split.labels(split=label).set(1)
            self._current_split = label


def _or_nan(value: float | None, scale: float = 1.0) -> float:
    return float("nan") if value is None else value * scale


class AgentHandler:
    """ModelHandler for the generic OIP server: decodes the app's tensor, runs the DeviceRuntime.

    Device-only (split ``device``, no adapter) with ``micro_batch_rows`` > 1, concurrent requests are micro-batched
    (runtime/micro_batch.py): each app gets its own rows; ``edgeexit.device_us`` is then its batch's compute and
    ``edgeexit.total_us`` its own time in the agent, waiting for the batch included."""

    def __init__(self, runtime: DeviceRuntime, max_rows: int = MAX_BATCH_ROWS, max_bytes: int = 64 << 20,
                 micro_batch_rows: int = 1):
        self.runtime = runtime
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.name = runtime.model_name
        self.metrics: AgentMetrics | None = None
        m = runtime.manifest
        # Every input by its name and dtype (token ids and a mask), or None: the one FP32 pixel input.
        self._specs = m.inputs if m.extra_inputs or m.input.dtype != "float32" else None
        # Not for multi-input models: a batch concatenates rows, so it could only join requests whose every input
        # has the same shape, and apps pad text to their own lengths (their requests would seldom match).
        device_only = runtime.split == "device" and runtime.adapter is None and self._specs is None
        self._batcher = MicroBatcher(self._run, micro_batch_rows) if device_only and micro_batch_rows > 1 else None

    def metadata(self) -> ModelMetadata:
        specs = self._specs or [self.runtime.manifest.input]  # one pixel input: named "input", FP32, as always
        inputs = [TensorMeta(t.name if self._specs else "input", codec.AS_IS[t.dtype] if self._specs else "FP32",
                             [-1 if isinstance(d, str) else int(d) for d in t.shape]) for t in specs]
        c = self.runtime.num_classes
        return ModelMetadata(
            name=self.name,
            inputs=inputs,
            outputs=[TensorMeta("label", "INT64", [-1]), TensorMeta("probabilities", "FP32", [-1, c]),
                     TensorMeta("exit", "INT32", [-1]), TensorMeta("decided", "INT32", [-1])],
        )

    def ready(self) -> bool:
        return True

    def infer(self, request: InferRequest) -> InferResponse:
        if self._specs is not None:  # the runtime checks them together: named axes agree, within the bundle's
            xs = decode_inputs(request, self.name, self._specs, INPUT_DATATYPES, max_rows=self.max_rows,
                               max_bytes=self.max_bytes)
            res = self._run(xs[0], {t.name: a for t, a in zip(self._specs[1:], xs[1:], strict=True)})
            rows, total_ms = slice(None), res.latency.total_ms
        elif self._batcher is None:
            res = self._run(self._decode(request))
            rows, total_ms = slice(None), res.latency.total_ms
        else:
            x = self._decode(request)
            t0 = time.perf_counter()
            # Checked here, alone: one app's bad tensor must not fail the batch it would have joined.
            share = self._batcher.submit(self.runtime.check_input(x))
            res, rows, total_ms = share.result, slice(share.start, share.stop), (time.perf_counter() - t0) * 1e3
        lat = res.latency
        params: dict[str, Any] = {
            "edgeexit.split": str(res.split), "edgeexit.bytes_sent": int(res.bytes_sent),
            # Times as int64 microseconds: KServe's InferParameter has no double (its client drops them).
            "edgeexit.device_us": _us(lat.device_ms), "edgeexit.encode_us": _us(lat.encode_ms),
            "edgeexit.network_us": _us(lat.network_ms), "edgeexit.total_us": _us(total_ms),
        }
        if lat.cloud_ms is not None:  # the cloud's own queue + compute, when it reported them
            params["edgeexit.cloud_us"] = _us(lat.cloud_ms)
        if res.fallback_reason:
            params["edgeexit.fallback"] = res.fallback_reason
        return InferResponse(
            outputs={"label": res.labels[rows].astype(np.int64, copy=False),
                     "probabilities": res.probabilities[rows].astype(np.float32, copy=False),
                     "exit": res.exits[rows].astype(np.int32, copy=False), "decided": res.decided_codes[rows]},
            params=params,
        )

    def _decode(self, request: InferRequest) -> np.ndarray:
        inp = self.runtime.manifest.input
        return decode_input(request, self.name, inp.name, INPUT_DATATYPES, shape=inp.shape, max_rows=self.max_rows,
                            max_bytes=self.max_bytes)

    def _run(self, x: np.ndarray, extras: dict[str, np.ndarray] | None = None) -> Result:
        """One runtime call (a whole micro-batch when batching; a multi-input model's first input, the others
        in ``extras``), counted once in the metrics."""
        res = self.runtime.infer(x) if extras is None else self.runtime.infer(x, extras)
        self._observe(res)
        return res

    def _observe(self, res: Result) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        m.count_rows(np.asarray(res.exits), res.decided_codes)
        if res.bytes_sent:
            m.offload.observe(res.latency.network_ms / 1000.0)
            m.sent.inc(res.bytes_sent)
        if res.split is not None:
            m.set_split(res.split)

    def close(self) -> None:
        self.runtime.close()


def _us(ms: float) -> int:
    return round(ms * 1000.0)


@dataclass
class AgentOptions:
    device: DeviceOptions = field(default_factory=DeviceOptions)
    listen: str = "127.0.0.1:8101"  # HOST:PORT (port 0 picks one) or unix:PATH; 8101: README, "Ports"
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"  # /metrics is plain HTTP without auth: loopback unless asked
    # Requests served at once (gRPC handler threads), each running the device's segments and its offload: with
    # more apps calling than workers, the rest queue here, and the cloud's batches hold at most this many.
    workers: int = 4
    grace_s: float = 5.0  # how long SIGTERM waits for in-flight requests
    max_batch_rows: int = MAX_BATCH_ROWS  # rows per app request (--max-batch-rows)
    max_message_bytes: int = 64 << 20  # per app message and per decoded tensor, so zstd cannot slip past it
    # Device-only: concurrent app requests run as one batch of at most this many rows (1 = each on its own, the
    # default: with the default 4 workers batches hold 2-3 rows, which measured no CPU saving per request on the
    # camera model and lower throughput on shared cores; more workers batch more, at ~3 MB RSS per row in flight).
    micro_batch_rows: int = 1
    http_port: int | None = None  # also OIP v2 REST on the listen host (0 picks a port): runtime/oip_rest.py

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1 (requests the agent serves at once), got {self.workers}")
        if self.micro_batch_rows < 1:
            raise ConfigError(f"micro_batch_rows must be >= 1 (1 turns micro-batching off), got "
                              f"{self.micro_batch_rows}")
        if self.max_batch_rows < 1 or self.max_message_bytes < 1:
            raise ConfigError(f"--max-batch-rows and --max-message-mb must be positive, got {self.max_batch_rows} "
                              f"and {self.max_message_bytes} bytes")
        self.server_options()  # checks listen and the metrics port
        if not self.grace_s >= 0:
            raise ConfigError(f"grace_s must be >= 0, got {self.grace_s}")

    def server_options(self) -> ServerOptions:
        """The OIP server's options (for unix:PATH it also binds a private loopback port; see Agent)."""
        host, port, _ = parse_listen(self.listen)
        return ServerOptions(host=host, port=port, metrics_port=self.metrics_port, metrics_host=self.metrics_host,
                             workers=self.workers, server_name="edgeexit-agent",
                             max_message_bytes=self.max_message_bytes, http_port=self.http_port)


def _release_free_heap() -> None:
    """Give the heap that loading left free back to the OS (glibc keeps it): parsing and optimising the ONNX
    graphs leaves ~7-10 MB of free pages resident (measured with the camera bundle). No-op off glibc."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)


def parse_listen(listen: str) -> tuple[str, int, str | None]:
    """(host, port, unix path or None)."""
    if listen.startswith("unix:"):
        path = listen[len("unix:"):]
        if not path:
            raise ConfigError("--listen unix:PATH needs a socket path")
        return "127.0.0.1", 0, path
    try:
        host, port = parse_hostport(listen, "--listen")
    except ConfigError as e:
        raise ConfigError(f"{e}, or unix:PATH") from None
    return host, port, None


class Agent:
    """Build, start and stop the agent; ``serve_forever`` blocks until SIGTERM/SIGINT."""

    def __init__(self, bundle: str | Path, options: AgentOptions):
        self.options = options
        event(log, "start", bundle=str(bundle), split=str(options.device.split), cloud=options.device.cloud,
              encoding=options.device.encoding, on_failure=options.device.on_failure, workers=options.workers)
        # Events come from request and health-check threads, from the runtime's start-up check on: those before
        # the metrics exist wait in _early.
        self._sync = threading.RLock()
        self._early: list[tuple[str, dict[str, Any]]] = []
        backends.INTRA_OP_SPINNING = False  # many apps on cores they share with us: see runtime/backends.py
        self.runtime = DeviceRuntime(bundle, options.device, on_event=self._on_event)
        self.handler = AgentHandler(self.runtime, options.max_batch_rows, options.max_message_bytes,
                                    options.micro_batch_rows)
        self.unix_path = parse_listen(options.listen)[2]
        self.handle: ServerHandle = build_server([self.handler], options.server_options())
        if self.unix_path:
            # build_server binds TCP only; the loopback port it picked stays private to this host.
            Path(self.unix_path).unlink(missing_ok=True)
            if not self.handle.server.add_insecure_port(f"unix:{self.unix_path}"):
                raise ConfigError(f"cannot listen on unix:{self.unix_path}; check the directory exists")
        with self._sync:
            self.metrics = AgentMetrics(self.handle.metrics.registry, self.runtime)
            self._cloud_changed("unknown")
            for name, fields in self._early:
                self._record(name, fields)
            self._early.clear()
        self.handler.metrics = self.metrics
        self._stop = threading.Event()
        _release_free_heap()

    @property
    def target(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else self.handle.target

    def start(self) -> Agent:
        self.handle.start()
        event(log, "ready", target=self.target, model=self.runtime.model_name, split=str(self.runtime.split),
              cloud_model=self.runtime.cloud_model, metrics_port=self.handle.metrics_port)
        return self

    def stop(self) -> None:
        self.handle.stop(self.options.grace_s)  # drains in-flight requests, then closes the runtime
        if self.unix_path:
            Path(self.unix_path).unlink(missing_ok=True)
        event(log, "stop")

    def serve_forever(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        if self.handle.http_port is not None:  # before "ready on": launchers stop reading stdout there
            print(f"http on {self.handle.options.host}:{self.handle.http_port}", flush=True)
        print(f"ready on {self.target}", flush=True)
        # Wake up now and then: a signal that lands on one of gRPC's threads only runs its Python handler when
        # the main thread next runs Python code, and a wait without a timeout may never return to it.
        while not self._stop.wait(0.5):
            pass
        self.stop()

    def _on_event(self, name: str, fields: dict[str, Any]) -> None:
        if name != "cloud_error" and name not in CLOUD_EVENTS:  # those are counted / logged by the runtime
            event(log, name, **fields)
        with self._sync:
            if getattr(self, "metrics", None) is None:
                self._early.append((name, fields))
            else:
                self._record(name, fields)

    def _record(self, name: str, fields: dict[str, Any]) -> None:
        """One event into the metrics and the cloud's health status (with _sync held)."""
        if name == "fallback":
            self.metrics.fallbacks.labels(reason=fields.get("cause", "error")).inc()
        elif name == "circuit":
            self.metrics.circuit.set(CIRCUIT_STATES.get(fields.get("new", ""), -1))
        elif name == "cloud_error":
            self.metrics.cloud_errors.labels(reason=fields.get("reason", "error")).inc()
        elif name in CLOUD_EVENTS:
            self._cloud_changed(CLOUD_EVENTS[name])

    def _cloud_changed(self, state: str) -> None:
        """Mirror the cloud's status in the gauge and the ``edgeexit.cloud`` health service (with _sync held)."""
        self.metrics.cloud_status.set(CLOUD_STATUS.get(state, 0))
        if self.runtime.options.cloud is None:
            return  # device-only (no cloud configured): no cloud health to report
        status = {"ok": health_pb2.HealthCheckResponse.SERVING, "unknown": health_pb2.HealthCheckResponse.UNKNOWN}
        self.handle.health.set(CLOUD_HEALTH_SERVICE, status.get(state, health_pb2.HealthCheckResponse.NOT_SERVING))
