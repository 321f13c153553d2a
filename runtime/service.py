"""The cloud offload service: a bundle's whole model and every tail, as OIP v2 handlers with dynamic batching.

Model names: ``<model>`` takes the raw input (``input``: FP32 pixels in [0, 1], or UINT8 where k means k/255,
1 byte per pixel, which the device sends for cloud-only; the runtime applies the bundle's normalisation like
the device does) and returns every exit; ``<model>@<s>`` takes ``boundary{s}`` encoded per
``runtime/codec.py`` (FP32, FP16 or INT8 with ``edgeexit.scale``/``edgeexit.zero_point``, optionally zstd;
parameters in the request or on the tensor) and returns the exits of segments ``s+1..``, FP32. A model with
several inputs (``Manifest.extra_inputs``) takes them all on ``<model>`` (token ids as INT64) and, on a tail, the
boundary plus the extra inputs its segments read (``Manifest.carried``), each as it is; rows of one request must
agree on every named axis (a sequence length), and only requests of the same shapes batch together.
ModelMetadata lists one datatype per input (the protocol has room for one): FP32, which every client can send;
UINT8 on ``<model>`` is the documented alternative.

Bounds, checked on the declared shape before anything is decompressed or allocated: at most
``max_batch_rows`` rows per request (``--max-batch-rows``, 256) and at most ``max_message_bytes`` bytes per
decoded tensor (``--max-message-mb``, the same limit gRPC applies to the message, so zstd cannot slip past it).
Where the row limit shows: the input's batch axis stays -1 in ModelMetadata (Triton does the same and keeps
``max_batch_size`` in its ModelConfig extension, which OIP lacks), and the limit travels as the int64 parameter
``edgeexit.max_batch_rows`` in MLServer's ModelMetadataResponse ``parameters`` extension (field 6; Triton and
KServe clients skip it; ``oip_messages.metadata_params_from_pb`` reads it). The refusal names it too.

Answers are finite or refused: an input that drives the model to NaN/inf (e.g. FP32 values near +-3e38) gets
INVALID_ARGUMENT, as the device agent refuses it (its exit policy refuses non-finite logits). Raw pixels are not
range-checked beyond that, again like the agent, so the device and the cloud accept the same inputs.

Every response carries the server's own time as int64 microsecond parameters: ``edgeexit.queue_us`` (from the
handler receiving the request, its tensor decoding included, until its batch starts running) and
``edgeexit.compute_us`` (that batch's run time, shared by every request batched with it), so the device can
tell a slow link from a busy server.

Identity: every model reports the bundle's digest (``Bundle.digest``) in ModelMetadata ``versions`` and as each
response's ``model_version``. A request naming a bundle (string parameter ``edgeexit.bundle``, as the agent
sends) other than the served one is refused with FAILED_PRECONDITION, whose message names the served digest's
first 12 hex digits: answering it would be silently wrong after a half-finished rollout. A request without the
parameter (tritonclient, KServe, curl) is served. A request's ``model_version`` may be "", "1" or the digest;
any other is NOT_FOUND, as Triton answers for a version it does not serve.

Fleet safety: the client's deadline reaches the batcher, which drops a request whose deadline passed before its
batch starts (DEADLINE_EXCEEDED, never computed), and the queue is bounded (``BatchOptions.max_queue`` rows,
``--max-queue``): a request that does not fit fails at once with RESOURCE_EXHAUSTED, so the device falls back
instead of waiting out its deadline. Both count in ``edgeexit_server_dropped_total{reason}``. Queue and compute
times also feed ``edgeexit_server_queue_seconds{model}`` and ``edgeexit_server_compute_seconds{model}``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeexit.bundle import Bundle, TensorSpec
from edgeexit.errors import BundleMismatch, ConfigError, InvalidTensor
from edgeexit.runtime import codec
from edgeexit.runtime.batching import BatchOptions, DynamicBatcher
from edgeexit.runtime.metrics import ServerMetrics
from edgeexit.runtime.oip_input import decode_input, decode_inputs
from edgeexit.runtime.oip_messages import (
    P_BUNDLE,
    P_MAX_BATCH_ROWS,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ServerTiming,
    TensorMeta,
)
from edgeexit.runtime.runner import SegmentRunner, check_axes, check_tensor
from edgeexit.runtime.status import mismatch_message


@dataclass
class ServiceOptions:
    backend: str = "onnxruntime"  # onnxruntime | litert
    threads: int = 1  # intra-op threads per segment session
    batching: BatchOptions = field(default_factory=BatchOptions)
    fmt: str | None = None  # exported variant, e.g. "tflite-int8-static"; None = the backend's fp32 format
    max_batch_rows: int = 256  # rows one request may carry (--max-batch-rows)
    max_message_bytes: int = codec.MAX_DECODED_BYTES  # largest decoded tensor: the server's --max-message-mb
    providers: tuple[str, ...] = ("cpu",)  # onnxruntime execution providers in order (--providers), CPU last

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1:
            raise ConfigError("--max-batch-rows must be at least 1")
        if self.max_message_bytes < 1:
            raise ConfigError("--max-message-mb must be positive")


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1e6))


def _meta_shape(shape: list[int | str]) -> list[int]:
    return [-1 if isinstance(d, str) else int(d) for d in shape]


class TailHandler:
    """Runs segments ``start..`` of a bundle for one model name (start 0 = the whole model)."""

    def __init__(self, runner: SegmentRunner, start: int, options: ServiceOptions,
                 metrics: ServerMetrics | None = None):
        m = runner.manifest
        self.runner, self.start = runner, start
        self.name = m.name if start == 0 else f"{m.name}@{start - 1}"
        self.input_spec: TensorSpec = m.input if start == 0 else m.split_points[start - 1].tensor
        extras = {t.name: t for t in m.extra_inputs}
        self.carried = [extras[n] for n in m.carried(start - 1)]  # extra model inputs this model takes too
        self.exits = [j for seg in m.segments[start:] for j in seg.exits]
        self.max_rows, self.max_bytes = options.max_batch_rows, options.max_message_bytes
        self.version = m.model_digest()  # the only model_version served besides "" and "1" (see oip_server)
        self.metrics = metrics
        on_batch = (lambda n: metrics.observe_batch(self.name, n)) if metrics else None
        on_drop = metrics.observe_drop if metrics else None
        self.batcher = DynamicBatcher(self._run, options.batching, on_batch, name=self.name, on_drop=on_drop)

    def metadata(self) -> ModelMetadata:
        first = codec.AS_IS[self.input_spec.dtype]  # FP32 for images and boundaries; INT64 for token ids
        inputs = [TensorMeta(t.name, first if i == 0 else codec.AS_IS[t.dtype], _meta_shape(t.shape))
                  for i, t in enumerate([self.input_spec, *self.carried])]
        specs = {t.name: t for seg in self.runner.manifest.segments for t in seg.outputs}
        outputs = [TensorMeta(f"exit{j}", "FP32", _meta_shape(specs[f"exit{j}"].shape)) for j in self.exits]
        return ModelMetadata(self.name, inputs, outputs, platform=f"edgeexit_{self.runner.backend}",
                             versions=[self.version], params={P_MAX_BATCH_ROWS: self.max_rows})

    def ready(self) -> bool:
        return True

    def decode(self, request: InferRequest) -> np.ndarray | tuple[np.ndarray, ...]:
        """The request's one input as a validated float32 batch, or every input of a multi-input model (raises
        InvalidTensor)."""
        if self.carried or self.input_spec.dtype != "float32":
            specs = [self.input_spec, *self.carried]
            accepts = codec.INPUT_DATATYPES if self.start == 0 else codec.BOUNDARY_DATATYPES
            xs = decode_inputs(request, self.name, specs, accepts, max_rows=self.max_rows, max_bytes=self.max_bytes)
            check_axes(dict(zip([s.name for s in specs], xs, strict=True)), specs, self.runner.manifest.dims)
            return tuple(xs)
        t = request.inputs.get(self.input_spec.name)
        if t is not None and t.datatype == codec.PIXELS and self.start != 0:
            raise InvalidTensor(f"{self.name}: {codec.PIXELS} is only for raw pixels sent to "
                                f"{self.runner.manifest.name!r}; send the boundary tensor as FP32, FP16 or INT8")
        accepts = codec.INPUT_DATATYPES if self.start == 0 else codec.BOUNDARY_DATATYPES  # so errors fit the model
        x = decode_input(request, self.name, self.input_spec.name, accepts, shape=self.input_spec.shape,
                         max_rows=self.max_rows, max_bytes=self.max_bytes, copy=False)  # tails only read it
        check_tensor(x, self.input_spec)
        return x

    def check_bundle(self, request: InferRequest) -> None:
        """Refuse a request naming another bundle (BundleMismatch); one naming none is served."""
        sent = request.params.get(P_BUNDLE)
        if sent is None:
            return
        if not isinstance(sent, str):
            raise InvalidTensor(f"request parameter {P_BUNDLE!r} must be a string (the bundle's sha256 digest), "
                                f"got {type(sent).__name__}")
        if sent.strip().lower() != self.version:
            raise BundleMismatch(mismatch_message(self.name, self.version, sent), served=self.version)

    def infer(self, request: InferRequest) -> InferResponse:
        arrived = time.perf_counter()
        self.check_bundle(request)
        done = self.batcher.submit(self.decode(request), deadline=request.deadline)
        for name, out in done.outputs.items():  # this request's rows only: a batch-mate's input is not its fault
            if not np.isfinite(out).all():
                raise InvalidTensor(f"{self.name}: the input drives the model to non-finite outputs ({name} has "
                                    f"NaN or inf); check the input range")
        queue_s = done.started - arrived
        timing = ServerTiming(queue_us=_us(queue_s), compute_us=_us(done.run_s))
        if self.metrics is not None:  # the same numbers as the response's queue_us/compute_us
            self.metrics.observe_timing(self.name, max(queue_s, 0.0), done.run_s)
        return InferResponse(done.outputs, timing.params())

    def _run(self, x: np.ndarray | tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        if isinstance(x, tuple):  # a multi-input model: its first input, then the carried ones
            extras = {t.name: a for t, a in zip(self.carried, x[1:], strict=True)}
            out = self.runner.run(x[0], start=self.start, extras=extras)
            return {f"exit{j}": out.exits[j] for j in self.exits}
        if self.start == 0:
            x = self.runner.normalize(x)
        out = self.runner.run(x, start=self.start)
        return {f"exit{j}": out.exits[j] for j in self.exits}

    def close(self) -> None:
        self.batcher.close()


def build_handlers(bundle: Bundle | str | Path, options: ServiceOptions | None = None,
                   metrics: ServerMetrics | None = None) -> list[TailHandler]:
    """One handler for the whole model and one per split point, sharing one runner (sessions open lazily)."""
    options = options or ServiceOptions()
    runner = SegmentRunner(bundle, backend=options.backend, threads=options.threads, fmt=options.fmt,
                           providers=options.providers)
    for k in range(runner.num_segments):
        runner.session(k)  # open every session now: no first-request stall, no racing lazy opens
        runner.prepare(k)  # and each tail's merged session (one onnxruntime call per request: runtime/merge.py)
    return [TailHandler(runner, start, options, metrics) for start in range(runner.num_segments)]
