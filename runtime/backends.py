"""Inference backends behind one small interface, so every caller can pick onnxruntime or LiteRT.

A backend opens one segment file and runs it on named numpy arrays. Imports are lazy: a device with only
LiteRT installed never imports onnxruntime, and the reverse.

A segment file is untrusted input (its sha256 only says it is the file the manifest names): any failure to
load it is a ``BundleError``, and an opened session whose inputs/outputs differ from the manifest's (names,
order, ranks, fixed dims, dtypes where the format keeps them) is refused before it runs anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeexit.bundle import BATCH, TensorSpec
from edgeexit.errors import BundleError, ConfigError, EdgeExitError

# backend name -> the bundle format it runs
BACKEND_FORMATS = {"onnxruntime": "onnx", "litert": "tflite"}


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


class OrtSession:
    """An onnxruntime session pinned to a thread count (1 by default: a phone-class core)."""

    def __init__(self, path: Path, threads: int = 1, io: SegmentIO | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # InvalidProtobuf, Fail, NoSuchFile, ...: onnxruntime's own, not EdgeExitErrors
            raise BundleError(f"{Path(path).name} is not a loadable ONNX model ({_first_line(e)}); the bundle is "
                              "corrupt or hostile, re-export it") from None
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        if io is not None:
            check_io(Path(path), io, _ort_facts(self._sess.get_inputs()), _ort_facts(self._sess.get_outputs()))

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._sess.run(self.output_names, feeds)


def open_session(path: Path, backend: str = "onnxruntime", threads: int = 1, fmt: str | None = None,
                 io: SegmentIO | None = None) -> SegmentSession:
    """Open one segment file with the named backend (``io``: the manifest's names/extra for that file)."""
    if backend == "onnxruntime":
        return OrtSession(path, threads, io)
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
