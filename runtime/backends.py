"""Inference backends behind one small interface, so every caller can pick onnxruntime or LiteRT.

A backend opens one segment file and runs it on named numpy arrays. Imports are lazy: a device with only
LiteRT installed never imports onnxruntime, and the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeexit.errors import ConfigError

# backend name -> the bundle format it runs
BACKEND_FORMATS = {"onnxruntime": "onnx", "litert": "tflite"}


@dataclass(frozen=True)
class SegmentIO:
    """What the manifest knows about one segment file: its ONNX-style tensor names and the format's ``extra``
    facts (e.g. the TFLite signature mapping). Backends whose files carry the names themselves ignore it."""

    input_names: list[str]
    output_names: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


class SegmentSession(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run on named inputs; return outputs in ``output_names`` order."""
        ...


class OrtSession:
    """An onnxruntime session pinned to a thread count (1 by default: a phone-class core)."""

    def __init__(self, path: Path, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._sess.run(self.output_names, feeds)


def open_session(path: Path, backend: str = "onnxruntime", threads: int = 1, fmt: str | None = None,
                 io: SegmentIO | None = None) -> SegmentSession:
    """Open one segment file with the named backend (``io``: the manifest's names/extra for that file)."""
    if backend == "onnxruntime":
        return OrtSession(path, threads)
    if backend == "litert":
        from edgeexit.runtime.litert_backend import LiteRTSession

        if io is None:
            return LiteRTSession(path, threads)
        return LiteRTSession(path, threads, extra=io.extra, names=(io.input_names, io.output_names))
    raise ConfigError(f"unknown backend {backend!r}; choose one of {sorted(BACKEND_FORMATS)}")
