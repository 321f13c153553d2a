"""Chain a bundle's segments on one backend and return exit logits: the engine under export validation,
evaluate, profile, the agent and the cloud service.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeexit.bundle import BATCH, Bundle, TensorSpec
from edgeexit.errors import BundleError, ConfigError, InvalidTensor
from edgeexit.logs import event
from edgeexit.runtime.backends import (
    BACKEND_FORMATS,
    CPU,
    GPU_HINT,
    OrtSession,
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
    ok = x.ndim == len(want) and all(isinstance(w, str) or int(w) == n for w, n in zip(want, x.shape, strict=True))
    if not ok:
        raise InvalidTensor(f"{spec.name}: shape {list(x.shape)} but the bundle expects {want} (a named axis such as "
                            "'batch' is any size)")


def check_axes(feeds: dict[str, np.ndarray], specs: Sequence[TensorSpec], dims: dict[str, dict[str, int]]) -> None:
    """Raise InvalidTensor unless every input has its spec's dtype and shape (a non-empty batch), each named axis
    (the batch too) has one size across the inputs (a mask as long as its input_ids) and no named axis is longer
    than the bundle allows."""
    sizes: dict[str, tuple[int, str]] = {}
    for spec in specs:
        if spec.name not in feeds:
            raise InvalidTensor(f"input {spec.name!r} is missing; this model takes {[t.name for t in specs]}")
        x = feeds[spec.name]
        check_tensor(x, spec)
        if x.ndim == 0 or len(x) == 0:
            raise InvalidTensor(f"{spec.name}: the batch is empty; send at least one row")
        if x.dtype.kind == "i" and x.size and x.min() < 0:  # token ids and masks: a negative one is a mistake
            raise InvalidTensor(f"{spec.name}: holds negative values ({int(x.min())}); ids and masks are >= 0")
        for axis, n in zip(spec.shape, x.shape, strict=True):
            if not isinstance(axis, str):
                continue
            if n == 0:
                raise InvalidTensor(f"{spec.name}: its {axis!r} axis is empty; send at least one element")
            if axis in sizes and sizes[axis][0] != n:
                raise InvalidTensor(f"{spec.name}: its {axis!r} axis is {n} long but {sizes[axis][1]}'s is "
                                    f"{sizes[axis][0]}; they must match")
            sizes.setdefault(axis, (n, spec.name))
            top = dims.get(axis, {}).get("max")
            if top is not None and n > top:
                raise InvalidTensor(f"{spec.name}: its {axis!r} axis is {n} long; this model takes at most {top} "
                                    "(truncate the input in the app, e.g. the tokenizer's max_length)")


def _checker(spec: TensorSpec) -> Callable[[np.ndarray], None]:
    """``check_tensor`` for one spec, its facts resolved once: a few attribute compares per call when the
    batch is the only free axis (every bundle's case), the full check (and its message) otherwise."""
    dtype = np.dtype(spec.dtype)
    shape = list(spec.shape)
    if not shape or shape[0] != BATCH or any(isinstance(d, str) for d in shape[1:]):
        return lambda x: check_tensor(x, spec)
    tail = tuple(int(d) for d in shape[1:])

    def check(x: np.ndarray) -> None:
        if not (isinstance(x, np.ndarray) and x.dtype == dtype and x.shape[1:] == tail and x.ndim == len(shape)):
            check_tensor(x, spec)  # raises, saying what is wrong

    return check


@dataclass(frozen=True)
class _Step:
    """One session call of ``run``: a segment, or a merged range of them (runtime/merge.py)."""

    fn: Callable[[list[str] | None, dict[str, np.ndarray], None], list[np.ndarray]]  # (out names, feeds, None)
    names: list[str] | None  # the output names fn takes: boundary first, then exits
    name: str  # its input's name
    exits: tuple[int, ...]  # the exits its outputs carry, in order
    boundary: bool  # outputs start with a boundary tensor (the range does not end the model)
    check: Callable[[np.ndarray], None]  # check_tensor for its input
    carried: tuple[str, ...] = ()  # the extra model inputs it reads too (by name, after ``name``)


def _caller(sess: SegmentSession) -> tuple[Callable, list[str] | None]:
    """(fn, output names) calling ``sess`` with ``fn(names, feeds, None)``: onnxruntime's C++ run directly when
    the session offers it (``OrtSession.run_fn``), one Python frame fewer per call; else its ``run``."""
    fn = getattr(sess, "run_fn", None)
    if fn is not None:
        return fn, list(sess.output_names)
    return (lambda _names, feeds, _opts: sess.run(feeds)), None


def _index_errors(fn: Callable, specs: Sequence[TensorSpec]) -> Callable:
    """``fn`` with onnxruntime's refusal of an out-of-range index (a token id past the vocabulary, which a
    Gather cannot look up) raised as InvalidTensor: the caller's mistake, not the server's. Only segments that
    take integer inputs pay for the extra frame."""
    names = [t.name for t in specs if t.dtype.startswith("int")]

    def run(out_names, feeds, opts):
        try:
            return fn(out_names, feeds, opts)
        except InvalidTensor:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            if "out of bounds" in str(e) or "out of range" in str(e) or "indices" in str(e).lower():
                raise InvalidTensor(f"{', '.join(names)}: a value is outside what the model can look up (e.g. a "
                                    "token id past the vocabulary); use the model's own tokenizer") from None
            raise

    return run


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
    ``device_id`` pins the GPU ones (a Triton instance's GPU).

    ``merge``: run a range of two or more segments (``run(x, start, stop)``, ``run_all``) as one onnxruntime
    session merged from their files at first use (runtime/merge.py; ``prepare`` builds it ahead), instead of
    one call per segment. On by default for onnxruntime; needs the ``onnx`` package, without which (and on
    LiteRT) the segments are chained one by one. ``run_segment`` always runs one segment's own session."""

    def __init__(self, bundle: Bundle | str | Path, backend: str = "onnxruntime", threads: int = 1,
                 fmt: str | None = None, providers: Sequence[str] = ("cpu",), device_id: int | None = None,
                 merge: bool = True):
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
        self._steps: dict[int, _Step] = {}
        self._ranges: dict[tuple[int, int], _Step | None] = {}  # (start, stop) -> merged session, None: chain
        self._lock = threading.Lock()
        self.merge = merge and backend == "onnxruntime"
        self._exit_order = tuple(range(len(self.manifest.exits)))

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

    def _step(self, k: int) -> _Step:
        """Segment k's call, input check and exits, resolved once: run() is a hot path."""
        step = self._steps.get(k)
        if step is None:
            seg = self.manifest.segments[k]
            sess = self.session(k)
            fn, names = _caller(sess)
            if any(t.dtype.startswith("int") for t in seg.inputs):
                fn = _index_errors(fn, seg.inputs)
            step = self._steps[k] = _Step(fn, names, seg.inputs[0].name, tuple(seg.exits),
                                          k < self.num_segments - 1, _checker(seg.inputs[0]),
                                          tuple(t.name for t in seg.inputs[1:]))
        return step

    def _feeds(self, step: _Step, x: np.ndarray, extras: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """The step's feeds: ``x`` and the extra inputs it reads, from ``extras``."""
        if not step.carried:
            return {step.name: x}
        feeds = {step.name: x}
        for name in step.carried:
            if extras is None or name not in extras:
                raise InvalidTensor(f"input {name!r} is missing; this model also takes "
                                    f"{[t.name for t in self.manifest.extra_inputs]}")
            feeds[name] = extras[name]
        return feeds

    def check_inputs(self, x: np.ndarray, extras: dict[str, np.ndarray] | None = None) -> None:
        """Raise InvalidTensor unless ``x`` and ``extras`` are what the model takes (dtype, shape, named axes
        agreeing across inputs and within the bundle's limits)."""
        m = self.manifest
        check_axes({m.input.name: x, **(extras or {})}, m.inputs, m.dims)

    def _merged(self, start: int, stop: int) -> _Step | None:
        """One session for segments start..stop-1 (runtime/merge.py), built once; None: chain them instead."""
        key = (start, stop)
        if key in self._ranges:
            return self._ranges[key]
        with self._lock:  # callers run on many threads: build each range once
            if key not in self._ranges:
                self._ranges[key] = self._open_merged(start, stop) if self.merge else None
        return self._ranges[key]

    def _open_merged(self, start: int, stop: int) -> _Step | None:
        if any(len(s.inputs) > 1 for s in self.manifest.segments[start:stop]):
            return None  # segments reading extra model inputs (an attention mask) run one by one
        try:
            from edgeexit.runtime.merge import merge_range

            model = merge_range(self.bundle, start, stop, self.fmt)
        except ImportError:  # no onnx here (a LiteRT-style install): chaining is correct, only slower
            self.merge = False
            event(log, "merge_unavailable", reason="the onnx package is not installed; segments run one by one")
            return None
        except Exception as e:  # noqa: BLE001 - any failure (onnx's parse errors too): chaining still works,
            # and opening the segments one by one raises the BundleError that says what is wrong with a file
            log.warning("cannot merge segments %d..%d (%s); running them one by one", start, stop - 1, e)
            return None
        segs = self.manifest.segments[start:stop]
        last = stop < self.num_segments
        specs = {t.name: t for s in segs for t in s.outputs}
        exits = tuple(j for s in segs for j in s.exits)
        outs = ([specs[f"boundary{stop - 1}"]] if last else []) + [specs[f"exit{j}"] for j in exits]
        io = SegmentIO([segs[0].inputs[0].name], [t.name for t in outs], {}, [segs[0].inputs[0]], outs)
        try:
            sess = OrtSession(model, self.threads, io, self.providers, label=f"segments {start}..{stop - 1} merged")
        except BundleError as e:  # the segments' own sessions say what is wrong with a file, if anything is
            log.warning("cannot open segments %d..%d merged (%s); running them one by one", start, stop - 1, e)
            return None
        event(log, "merged_session", start=start, stop=stop, segments=stop - start)
        return _Step(*_caller(sess), segs[0].inputs[0].name, exits, last, _checker(segs[0].inputs[0]))

    def prepare(self, start: int = 0, stop: int | None = None) -> None:
        """Open now what ``run(x, start, stop)`` will use (the merged session of the range, else its segments'
        sessions): no first-request stall, and no lazy opens racing on the serving threads."""
        stop = self.num_segments if stop is None else stop
        self._check_range(start, stop)
        if stop - start < 2 or self._merged(start, stop) is None:
            for k in range(start, stop):
                self._step(k)

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start < stop <= self.num_segments:
            raise ConfigError(f"segment range {start}..{stop} is outside 0..{self.num_segments}")

    def run_segment(self, k: int, x: np.ndarray, extras: dict[str, np.ndarray] | None = None) -> SegmentOutput:
        """Segment ``k`` on ``x`` (and the extra model inputs it reads, from ``extras``)."""
        step = self._steps.get(k) or self._step(k)
        step.check(x)
        feeds = self._feeds(step, x, extras)
        if step.carried:
            check_axes(feeds, self.manifest.segments[k].inputs, self.manifest.dims)
        outs = step.fn(step.names, feeds, None)
        if step.boundary:
            return SegmentOutput(outs[0], dict(zip(step.exits, outs[1:], strict=True)))
        return SegmentOutput(None, dict(zip(step.exits, outs, strict=True)))

    def run(self, x: np.ndarray, start: int = 0, stop: int | None = None,
            extras: dict[str, np.ndarray] | None = None) -> SegmentOutput:
        """Run segments ``start..stop-1`` on ``x`` (the input for start=0, else boundary{start-1}); ``extras``:
        the model's extra inputs (name -> array) for a model that takes several (``Manifest.carried``).

        Only ``x`` is validated: later boundaries come from our own segments, whose shapes the bundle fixes.
        A range of two or more segments runs as one merged session when it can (``merge``); the answers are
        the same, to float rounding.
        """
        stop = self.num_segments if stop is None else stop
        self._check_range(start, stop)
        if stop - start > 1 and self.merge:
            step = self._ranges.get((start, stop)) or self._merged(start, stop)
            if step is not None:
                step.check(x)
                outs = step.fn(step.names, {step.name: x}, None)
                if step.boundary:
                    return SegmentOutput(outs[0], dict(zip(step.exits, outs[1:], strict=True)))
                return SegmentOutput(None, dict(zip(step.exits, outs, strict=True)))
        out = self.run_segment(start, x, extras)
        exits = out.exits
        cur = out.boundary
        for k in range(start + 1, stop):
            step = self._steps.get(k) or self._step(k)
            outs = step.fn(step.names, self._feeds(step, cur, extras) if step.carried else {step.name: cur}, None)
            if step.boundary:
                cur = outs[0]
                exits.update(zip(step.exits, outs[1:], strict=True))
            else:
                cur = None
                exits.update(zip(step.exits, outs, strict=True))
        return SegmentOutput(cur, exits)

    def run_all(self, x: np.ndarray, extras: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """Every exit's logits for a (normalised) input batch (and its extra inputs), shallowest first."""
        step = (self._ranges.get((0, self.num_segments)) or self._merged(0, self.num_segments)) \
            if self.merge and self.num_segments > 1 else None
        if step is not None and step.exits == self._exit_order:  # the merged outputs are the answer as they are
            step.check(x)
            return step.fn(step.names, {step.name: x}, None)
        out = self.run(x, extras=extras)
        return [out.exits[j] for j in range(len(self.manifest.exits))]
