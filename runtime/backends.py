"""Inference backends behind one small interface, so every caller can pick onnxruntime or LiteRT.

A backend opens one segment file and runs it on named numpy arrays. Imports are lazy: a device with only
LiteRT installed never imports onnxruntime, and the reverse.

A segment file is untrusted input (its sha256 only says it is the file the manifest names): any failure to
load it is a ``BundleError``, and an opened session whose inputs/outputs differ from the manifest's (names,
order, ranks, fixed dims, dtypes where the format keeps them) is refused before it runs anything.

Execution providers (the cloud side's ``--providers``): onnxruntime sessions open with the providers asked for
that this onnxruntime build has, in the order asked, always ending with CPU (``resolve_providers``); one asked
for but missing is said once at WARNING, and a session that did not get one it asked for (a GPU build without
CUDA's libraries) says so too. The device never asks for anything but CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeexit.bundle import BATCH, TensorSpec
from edgeexit.errors import BundleError, ConfigError, EdgeExitError

# backend name -> the bundle format it runs
BACKEND_FORMATS = {"onnxruntime": "onnx", "litert": "tflite"}
# --providers names -> onnxruntime's execution providers; CPU always ends the list (the fallback)
PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "cpu": "CPUExecutionProvider"}
CPU = PROVIDERS["cpu"]
_LABELS = {"cuda": "CUDA", "tensorrt": "TensorRT", "cpu": "CPU"}
GPU_HINT = "install edgeexit[gpu] on a machine with CUDA 13 and cuDNN 9; see the README's GPU section"
# A provider asked for with its options, as onnxruntime takes it: a name, or (name, {"device_id": "1"}).
Provider = str | tuple[str, dict[str, str]]
log = logging.getLogger("edgeexit.runtime.backends")


def parse_providers(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"cuda,tensorrt,cpu"`` (or a sequence of names) as validated names in order, without repeats."""
    names = [n.strip().lower() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    bad = [n for n in names if n not in PROVIDERS]
    if bad or not names:
        raise ConfigError(f"unknown execution provider {(bad or [''])[0]!r} in --providers; choose from "
                          f"{', '.join(PROVIDERS)} (comma-separated, in order of preference, e.g. cuda,cpu)")
    return tuple(dict.fromkeys(names))


def resolve_providers(names: Sequence[str], available: Sequence[str] | None = None,
                      device_id: int | None = None) -> list[Provider]:
    """The onnxruntime providers to open sessions with: those of ``names`` this build has (``available``,
    default ``onnxruntime.get_available_providers()``), in that order, then CPU. Each missing one is logged
    at WARNING here (call this once per runner, so it is said once). ``device_id`` pins the GPU ones."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    chosen: list[Provider] = []
    for name in parse_providers(names):
        ep = PROVIDERS[name]
        if ep == CPU:
            continue
        if ep not in available:
            log.warning("%s requested but this onnxruntime has no %s (%s); falling back to %s", _LABELS[name], ep,
                        GPU_HINT, _next_choice(names, name, available))
            continue
        chosen.append((ep, {"device_id": str(device_id)}) if device_id is not None else ep)
    return [*chosen, CPU]


def _next_choice(names: Sequence[str], missing: str, available: Sequence[str]) -> str:
    """What runs instead of ``missing``: the next asked-for provider that this build has, else CPU."""
    rest = list(parse_providers(names))
    for n in rest[rest.index(missing) + 1:]:
        if PROVIDERS[n] in available and n != "cpu":
            return _LABELS[n]
    return "CPU"


def provider_names(providers: Sequence[Provider]) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


@dataclass(frozen=True)
class SegmentIO:
    """What the manifest knows about one segment file: its ONNX-style tensor names and the format's ``extra``
    facts (e.g. the TFLite signature mapping). Backends whose files carry the names themselves ignore it."""

    input_names: list[str]
    output_names: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    inputs: list[TensorSpec] = field(default_factory=list)  # the manifest's specs, when known: checked on open
    outputs: list[TensorSpec] = field(default_factory=list)


# One tensor as a session reports it: name, dims (an int, or None when symbolic/dynamic), dtype (None: the
# backend converts, e.g. a static-int8 TFLite model behind float32).
PortFacts = tuple[str, list[int | None], str | None]
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
               "tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(int32)": "int32"}


def check_io(path: Path, io: SegmentIO, got_in: list[PortFacts], got_out: list[PortFacts]) -> None:
    """BundleError unless the opened file has the inputs/outputs the manifest says, in its order."""
    for part, want, got in (("inputs", io.inputs, got_in), ("outputs", io.outputs, got_out)):
        if not want:
            continue
        names = [g[0] for g in got]
        if names != [w.name for w in want]:
            raise BundleError(f"{path.name} has {part} {names[:8]} but the manifest says {[w.name for w in want][:8]};"
                              " the file does not match the manifest, re-export the bundle")
        for w, (name, dims, dtype) in zip(want, got, strict=True):
            fixed_ok = all(d is None or s == BATCH or s == d for s, d in zip(w.shape, dims, strict=False))
            if len(dims) != len(w.shape) or not fixed_ok or (dtype is not None and dtype != w.dtype):
                raise BundleError(f"{path.name}: {part[:-1]} {name!r} is {dtype or 'any'} {dims} but the manifest "
                                  f"says {w.dtype} {w.shape}; the file does not match the manifest, re-export it")


def _ort_facts(ports: list[Any]) -> list[PortFacts]:
    return [(p.name, [d if isinstance(d, int) and d > 0 else None for d in (p.shape or [])],
             _ORT_DTYPES.get(p.type, p.type)) for p in ports]


class SegmentSession(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run on named inputs; return outputs in ``output_names`` order."""
        ...


# onnxruntime's intra-op threads spin between operators (its default: the lowest single-stream latency). A process
# serving concurrent callers on shared cores sets this False before opening sessions (the agent does): spinning
# threads burn the cores the others need (camera model, 2 threads, one caller: 40 ms of CPU per 9 ms forward).
INTRA_OP_SPINNING = True


class OrtSession:
    """An onnxruntime session pinned to a thread count (1 by default: a phone-class core), on ``providers``
    (onnxruntime's names, ``resolve_providers``; CPU by default). ``providers`` is what it really got."""

    def __init__(self, path: Path | bytes, threads: int = 1, io: SegmentIO | None = None,
                 providers: Sequence[Provider] = (CPU,), label: str | None = None):
        import onnxruntime as ort

        # ``path`` may be a serialised model (a merged range, runtime/merge.py): ``label`` names it in errors.
        label = label or ("merged model" if isinstance(path, bytes) else Path(path).name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads > 1 and not INTRA_OP_SPINNING:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            model = path if isinstance(path, bytes) else str(path)
            self._sess = ort.InferenceSession(model, sess_options=opts, providers=list(providers))
        except Exception as e:  # InvalidProtobuf, Fail, NoSuchFile, ...: onnxruntime's own, not EdgeExitErrors
            raise BundleError(f"{label} is not a loadable ONNX model ({_first_line(e)}); the bundle is "
                              "corrupt or hostile, re-export it") from None
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self.providers: list[str] = list(self._sess.get_providers())
        if io is not None:
            check_io(Path(label), io, _ort_facts(self._sess.get_inputs()), _ort_facts(self._sess.get_outputs()))
        # The hot path. On CPU alone, call the C++ session directly: InferenceSession.run re-checks the feed
        # names (the runner feeds exactly the names it checked on open) and wraps the call for a GPU
        # provider's fallback to CPU, which a CPU-only session never takes. GPU sessions keep that wrapper.
        # ``run_fn(output_names, feeds, run_options)``: what ``run`` calls, for callers that skip even that frame.
        raw = getattr(self._sess, "_sess", None)
        cpu_only = self.providers == [CPU]
        self.run_fn = raw.run if cpu_only and raw is not None and hasattr(raw, "run") else self._sess.run

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.run_fn(self.output_names, feeds, None)


def open_session(path: Path, backend: str = "onnxruntime", threads: int = 1, fmt: str | None = None,
                 io: SegmentIO | None = None, providers: Sequence[Provider] = (CPU,)) -> SegmentSession:
    """Open one segment file with the named backend (``io``: the manifest's names/extra for that file;
    ``providers``: onnxruntime's execution providers, see ``resolve_providers``)."""
    if backend == "onnxruntime":
        return OrtSession(path, threads, io, providers)
    if provider_names(providers) != [CPU]:
        raise ConfigError(f"--providers is for the onnxruntime backend; {backend!r} runs on the CPU")
    if backend == "litert":
        from edgeexit.runtime.litert_backend import LiteRTSession

        try:
            if io is None:
                return LiteRTSession(path, threads)
            sess = LiteRTSession(path, threads, extra=io.extra, names=(io.input_names, io.output_names))
        except EdgeExitError:
            raise
        except Exception as e:  # the interpreter's own errors on a file that is not the model it should be
            raise BundleError(f"{Path(path).name} is not a loadable TFLite segment ({_first_line(e)}); the bundle "
                              "is corrupt or hostile, re-export it") from None
        check_io(Path(path), io, *sess.io_facts())
        return sess
    raise ConfigError(f"unknown backend {backend!r}; choose one of {sorted(BACKEND_FORMATS)}")


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."
