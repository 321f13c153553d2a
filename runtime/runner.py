"""Chain a bundle's segments on one backend and return exit logits: the engine under export validation,
evaluate, profile, the agent and the cloud service.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeexit.bundle import BATCH, Bundle, TensorSpec
from edgeexit.errors import ConfigError, InvalidTensor
from edgeexit.logs import event
from edgeexit.runtime.backends import (
    BACKEND_FORMATS,
    CPU,
    GPU_HINT,
    SegmentIO,
    SegmentSession,
    open_session,
    provider_names,
    resolve_providers,
)

log = logging.getLogger("edgeexit.runtime.runner")


@dataclass
class SegmentOutput:
    boundary: np.ndarray | None  # None after the last segment
    exits: dict[int, np.ndarray]  # exit index -> logits [batch, classes]


def check_tensor(x: np.ndarray, spec: TensorSpec) -> None:
    """Raise InvalidTensor unless ``x`` has the spec's dtype and non-batch shape."""
    if not isinstance(x, np.ndarray):
        raise InvalidTensor(f"{spec.name}: expected a numpy array, got {type(x).__name__}")
    if x.dtype != np.dtype(spec.dtype):
        raise InvalidTensor(f"{spec.name}: dtype {x.dtype} but the bundle expects {spec.dtype}; cast it first")
    want = [d for d in spec.shape]
    ok = x.ndim == len(want) and all(w == BATCH or int(w) == n for w, n in zip(want, x.shape, strict=True))
    if not ok:
        raise InvalidTensor(f"{spec.name}: shape {list(x.shape)} but the bundle expects {want} ('batch' is any size)")


def normalize(x: np.ndarray, norm: dict[str, list[float]] | None) -> np.ndarray:
    """Per-channel ``(x - mean) / std`` for raw [N, C, ...] inputs; ``norm`` None leaves them as they are."""
    if not norm:
        return x
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = np.asarray(norm["mean"], np.float32).reshape(shape)
    std = np.asarray(norm["std"], np.float32).reshape(shape)
    return ((x - mean) / std).astype(np.float32)


class SegmentRunner:
    """Runs segments of a bundle. Sessions open lazily, so a tail-only server never loads the head.

    ``providers``: the execution providers asked for (``--providers`` names, e.g. ``("cuda", "cpu")``; CPU by
    default, as on every device), resolved once against this onnxruntime (``backends.resolve_providers``);
    ``device_id`` pins the GPU ones (a Triton instance's GPU)."""

    def __init__(self, bundle: Bundle | str | Path, backend: str = "onnxruntime", threads: int = 1,
                 fmt: str | None = None, providers: Sequence[str] = ("cpu",), device_id: int | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        if backend not in BACKEND_FORMATS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {sorted(BACKEND_FORMATS)}")
        self.backend = backend
        self.threads = threads
        self.fmt = fmt or BACKEND_FORMATS[backend]
        if not self.fmt.startswith(BACKEND_FORMATS[backend]):
            raise ConfigError(f"backend {backend!r} runs {BACKEND_FORMATS[backend]}* formats, not {self.fmt!r}; "
                              f"pick a matching --backend or format")
        self.manifest = self.bundle.manifest
        if isinstance(providers, str):
            providers = providers.split(",")
        gpu = [p for p in providers if p.strip().lower() != "cpu"]  # the CPU-only default needs no onnxruntime
        if gpu and backend != "onnxruntime":
            raise ConfigError(f"--providers {','.join(providers)} is for the onnxruntime backend; {backend!r} "
                              "runs on the CPU")
        self.providers = resolve_providers(providers, device_id=device_id) if gpu else [CPU]
        self.session_providers: list[str] | None = None  # what the last opened onnxruntime session got
        self._sessions: dict[int, SegmentSession] = {}
        self._steps: dict[int, tuple[SegmentSession, str, list[int], bool]] = {}

    @property
    def num_segments(self) -> int:
        return len(self.manifest.segments)

    def session(self, k: int) -> SegmentSession:
        if k not in self._sessions:
            path = self.bundle.segment_path(k, self.fmt)
            seg = self.manifest.segments[k]
            io = SegmentIO([t.name for t in seg.inputs], [t.name for t in seg.outputs], seg.files[self.fmt].extra,
                           seg.inputs, seg.outputs)
            self._sessions[k] = open_session(path, self.backend, self.threads, self.fmt, io, self.providers)
            self._log_providers(k)
        return self._sessions[k]

    def _log_providers(self, k: int) -> None:
        """Say which providers a session really got (first session, and any that differ): a GPU build of
        onnxruntime without CUDA's libraries lists CUDA as available, then runs the session on the CPU."""
        got = getattr(self._sessions[k], "providers", None)
        said, self.session_providers = self.session_providers, got
        if got is None or got == said or provider_names(self.providers) == [CPU]:
            return
        event(log, "session_providers", segment=k, requested=provider_names(self.providers), providers=got)
        lost = [p for p in provider_names(self.providers) if p not in got]
        if lost:
            log.warning("segment %d asked onnxruntime for %s but runs on %s (its libraries failed to load: %s); "
                        "falling back to CPU", k, lost, got, GPU_HINT)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Apply the manifest's input normalisation (if any) to raw inputs."""
        return normalize(x, self.manifest.input.normalization)

    def _step(self, k: int) -> tuple[SegmentSession, str, list[int], bool]:
        """(session, input name, exits, is last) of segment k, resolved once: run() is a hot path."""
        if k not in self._steps:
            seg = self.manifest.segments[k]
            self._steps[k] = (self.session(k), seg.inputs[0].name, seg.exits, k == self.num_segments - 1)
        return self._steps[k]

    def _run_unchecked(self, k: int, x: np.ndarray, exits: dict[int, np.ndarray]) -> np.ndarray | None:
        sess, name, owned, last = self._step(k)
        outs = sess.run({name: x})
        exit_outs = outs if last else outs[1:]
        for j, logits in zip(owned, exit_outs, strict=True):
            exits[j] = logits
        return None if last else outs[0]

    def run_segment(self, k: int, x: np.ndarray) -> SegmentOutput:
        check_tensor(x, self.manifest.segments[k].inputs[0])
        exits: dict[int, np.ndarray] = {}
        boundary = self._run_unchecked(k, x, exits)
        return SegmentOutput(boundary, exits)

    def run(self, x: np.ndarray, start: int = 0, stop: int | None = None) -> SegmentOutput:
        """Run segments ``start..stop-1`` on ``x`` (the input for start=0, else boundary{start-1}).

        Only ``x`` is validated: later boundaries come from our own segments, whose shapes the bundle fixes.
        """
        stop = self.num_segments if stop is None else stop
        if not 0 <= start < stop <= self.num_segments:
            raise ConfigError(f"segment range {start}..{stop} is outside 0..{self.num_segments}")
        check_tensor(x, self.manifest.segments[start].inputs[0])
        exits: dict[int, np.ndarray] = {}
        cur: np.ndarray | None = x
        for k in range(start, stop):
            cur = self._run_unchecked(k, cur, exits)
        return SegmentOutput(cur, exits)

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Every exit's logits for a (normalised) input batch, shallowest first."""
        out = self.run(x)
        return [out.exits[j] for j in range(len(self.manifest.exits))]
