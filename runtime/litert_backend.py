"""LiteRT (TFLite) backend: one segment file on the ``ai_edge_litert`` Interpreter, behind the same
``SegmentSession`` interface as onnxruntime. Imports neither torch nor TensorFlow.

It speaks the ONNX segment's names (``input`` / ``boundary{k}`` / ``exit{j}``) whatever the TFLite signature
calls them: the manifest entry's ``extra`` gives the signature key of each output in ONNX order, and the
runner may pass the ONNX names themselves. int8 inputs/outputs (static int8 models) are quantised and
dequantised with the model's own scale/zero-point, so callers always exchange float32.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeexit.errors import BundleError, InvalidTensor

_ONNX_NAME = re.compile(r"^(input|boundary(\d+)|exit(\d+))$")
_GENERIC_NAME = re.compile(r"^output_(\d+)$")


@dataclass(frozen=True)
class _Port:
    """One signature tensor: interpreter index, dtype and (for int8) its affine parameters."""

    index: int
    dtype: np.dtype
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.dtype in (np.dtype(np.int8), np.dtype(np.uint8))

    @classmethod
    def from_details(cls, d: Mapping[str, Any]) -> _Port:
        scale, zero = d.get("quantization", (0.0, 0))
        return cls(int(d["index"]), np.dtype(d["dtype"]), float(scale), int(zero))


def default_output_order(keys: Sequence[str]) -> list[str]:
    """Signature outputs in ONNX order when nothing records it: boundary first, then exits by number
    (signatures sort by name, so exit10 would precede exit2); litert's generic output_i by i."""

    def rank(key: str) -> tuple[int, int, str]:
        m = _ONNX_NAME.match(key)
        if m and m.group(2) is not None:
            return (0, int(m.group(2)), key)
        if m and m.group(3) is not None:
            return (1, int(m.group(3)), key)
        g = _GENERIC_NAME.match(key)
        return (2, int(g.group(1)), key) if g else (3, 0, key)

    return sorted(keys, key=rank)


class LiteRTSession:
    """A TFLite segment pinned to a thread count; resizes for any batch on dynamic-batch models and loops
    over samples on fixed-batch ones."""

    def __init__(self, path: Path | str, threads: int = 1, extra: Mapping[str, Any] | None = None,
                 names: tuple[Sequence[str], Sequence[str]] | None = None):
        from ai_edge_litert.interpreter import Interpreter

        path = Path(path)
        if not path.is_file():
            raise BundleError(f"TFLite segment {path} is missing; re-export with `--formats tflite`")
        try:
            self._interp = Interpreter(model_path=str(path), num_threads=threads)
        except Exception as e:  # ValueError, RuntimeError, ...: anything the interpreter says about a bad file
            raise BundleError(f"{path} is not a loadable TFLite model ({e}); re-export the bundle") from e
        extra = extra or {}
        sig_key = self._signature_key(extra.get("signature"))
        runner = self._interp.get_signature_runner(sig_key)
        in_details = runner.get_input_details()
        out_details = runner.get_output_details()
        if len(in_details) != 1:
            raise BundleError(f"{path}: a segment has exactly one input, this model has {list(in_details)}")
        sig_in = next(iter(in_details))
        sig_out = list(extra.get("outputs") or default_output_order(list(out_details)))
        if sorted(sig_out) != sorted(out_details):
            raise BundleError(f"{path}: manifest lists outputs {sig_out} but the model has {list(out_details)}; "
                              "re-export the bundle")
        onnx_in, onnx_out = self._onnx_names(sig_in, sig_out, names, path)
        self.input_names = [onnx_in]
        self.output_names = onnx_out
        self._input = _Port.from_details(in_details[sig_in])
        self._outputs = [_Port.from_details(out_details[k]) for k in sig_out]
        signature = [int(d) for d in in_details[sig_in]["shape_signature"]]
        # A fixed-batch model the exporter verified after resize_tensor_input ("resizable") is resized too;
        # any other fixed-batch model is fed chunk by chunk.
        self._dynamic_batch = signature[0] == -1 or bool(extra.get("resizable"))
        self._fixed_batch = max(1, signature[0])
        self._allocated_batch: int | None = None
        self._lock = threading.Lock()
        self.path = path
        self._ranks = ([len(signature)], [len(out_details[k]["shape_signature"]) for k in sig_out])

    def io_facts(self) -> tuple[list[Any], list[Any]]:
        """(name, dims, dtype) of the input and outputs, for ``backends.check_io``: ranks only (TFLite may fix
        a batch the manifest keeps symbolic), dtypes only where the session does not convert (int8 ports)."""

        def facts(names: list[str], ranks: list[int], ports: list[_Port]) -> list[Any]:
            zipped = zip(names, ranks, ports, strict=True)
            return [(n, [None] * r, None if p.quantized else str(p.dtype)) for n, r, p in zipped]

        ins = facts(self.input_names, self._ranks[0], [self._input])
        return ins, facts(self.output_names, self._ranks[1], self._outputs)

    def _signature_key(self, wanted: str | None) -> str:
        keys = list(self._interp.get_signature_list())
        if wanted in keys:
            return wanted
        if len(keys) == 1:
            return keys[0]
        raise BundleError(f"TFLite model has signatures {keys}; the manifest must name one (extra.signature)")

    @staticmethod
    def _onnx_names(sig_in: str, sig_out: list[str], names: tuple[Sequence[str], Sequence[str]] | None,
                    path: Path) -> tuple[str, list[str]]:
        if names is None:
            return sig_in, list(sig_out)
        want_in, want_out = list(names[0]), list(names[1])
        if len(want_in) != 1 or len(want_out) != len(sig_out):
            raise BundleError(f"{path} has outputs {sig_out} but the manifest expects {want_out}; "
                              "re-export the bundle")
        return want_in[0], want_out

    @property
    def dynamic_batch(self) -> bool:
        """True when any batch runs in one invoke (resize), False when the session loops over fixed chunks."""
        return self._dynamic_batch

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        name = self.input_names[0]
        if name not in feeds:
            raise InvalidTensor(f"feed {name!r} is missing (got {sorted(feeds)}); this segment reads {name!r}")
        x = np.asarray(feeds[name])
        if x.ndim == 0:
            raise InvalidTensor(f"{name}: expected a batched tensor, got a scalar")
        if self._dynamic_batch or x.shape[0] == self._fixed_batch:
            return self._invoke(x)
        # Fixed-batch model (manifest "fixed:<n>"): run chunk by chunk and stitch the outputs back together.
        # Samples are independent at inference, so a short last chunk is padded with zeros and cut off again.
        n, size = x.shape[0], self._fixed_batch
        padded = np.concatenate([x, np.zeros((-n % size, *x.shape[1:]), x.dtype)]) if n % size else x
        parts = [self._invoke(padded[i:i + size]) for i in range(0, len(padded), size)]
        return [np.concatenate(chunks, axis=0)[:n] for chunks in zip(*parts, strict=True)]

    def _invoke(self, x: np.ndarray) -> list[np.ndarray]:
        batch = x.shape[0]
        # An interpreter holds one set of tensors: concurrent callers (gRPC threads, batcher instances) take turns.
        with self._lock:
            if self._allocated_batch != batch:
                if self._dynamic_batch:
                    self._interp.resize_tensor_input(self._input.index, list(x.shape), strict=False)
                self._interp.allocate_tensors()
                self._allocated_batch = batch
            self._interp.set_tensor(self._input.index, self._to_model(x))
            self._interp.invoke()
            return [self._from_model(self._interp.get_tensor(p.index), p) for p in self._outputs]

    def _to_model(self, x: np.ndarray) -> np.ndarray:
        p = self._input
        if not p.quantized:
            return np.ascontiguousarray(x, dtype=p.dtype)
        info = np.iinfo(p.dtype)
        q = np.round(x.astype(np.float32) / np.float32(p.scale)) + p.zero_point
        return np.clip(q, info.min, info.max).astype(p.dtype)

    @staticmethod
    def _from_model(y: np.ndarray, p: _Port) -> np.ndarray:
        if not p.quantized:
            return y.astype(np.float32, copy=False)
        return ((y.astype(np.float32) - np.float32(p.zero_point)) * np.float32(p.scale)).astype(np.float32)
