"""Measure a bundle's per-segment latency and the wire codec's cost on this machine (torch-free).

Segments are timed interleaved (seg0, seg1, ..., seg0, seg1, ...) so that a noisy neighbour slows all of
them alike; medians and p90s are kept. The result is a :class:`LatencyProfile` the planner reads.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence

import numpy as np

from edgeexit.logs import ProgressBar
from edgeexit.profiles import LatencyProfile
from edgeexit.reports import markdown_table
from edgeexit.runtime import codec
from edgeexit.runtime.runner import SegmentRunner


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t) * 1e3


def sample_inputs(runner: SegmentRunner, batch: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """Inputs of the bundle's shapes (named axes at their example size) for timing: uniform [0, 1) floats;
    integer inputs (token ids, masks) all ones, valid for any vocabulary and mask."""
    m = runner.manifest

    def one(spec):
        shape = m.example_shape(spec, batch)
        return rng.random(shape, dtype=np.float32) if spec.dtype == "float32" else np.ones(shape, spec.dtype)

    return one(m.input), ({t.name: one(t) for t in m.extra_inputs} if m.extra_inputs else None)


def _inputs_per_segment(runner: SegmentRunner, batch: int, rng: np.random.Generator
                        ) -> tuple[list[np.ndarray], dict[str, np.ndarray] | None]:
    x, extras = sample_inputs(runner, batch, rng)
    feeds = [x]
    for k in range(runner.num_segments - 1):
        feeds.append(runner.run_segment(k, feeds[-1], extras).boundary)
    return feeds, extras


def measure_profile(runner: SegmentRunner, batches: Sequence[int] = (1,), repeats: int = 30, warmup: int = 3,
                    progress: bool = False) -> LatencyProfile:
    """Median and p90 latency of every segment per batch size, and codec cost per split point (batch 1)."""
    rng = np.random.default_rng(0)
    median: dict[int, list[float]] = {}
    p90: dict[int, list[float]] = {}
    boundaries: list[np.ndarray] = []
    bar = ProgressBar(len(batches) * (repeats + warmup), progress, "profile", unit="round")
    for b in batches:
        feeds, extras = _inputs_per_segment(runner, b, rng)
        if b == 1:
            boundaries = feeds[1:]
        times = np.zeros((repeats, runner.num_segments))
        for r in range(-warmup, repeats):
            for k in range(runner.num_segments):
                t = _timed(runner.run_segment, k, feeds[k], extras)
                if r >= 0:
                    times[r, k] = t
            bar.update()
        median[b] = [float(v) for v in np.median(times, axis=0)]
        p90[b] = [float(v) for v in np.percentile(times, 90, axis=0)]
    bar.close()
    if not boundaries:
        boundaries = _inputs_per_segment(runner, 1, rng)[0][1:]
    enc_ms, dec_ms = _codec_costs(runner, boundaries, repeats)
    return LatencyProfile(runner.backend, runner.threads, median, p90, enc_ms, dec_ms,
                          host=f"{platform.node()} {platform.machine()}")


def _codec_costs(runner: SegmentRunner, boundaries: list[np.ndarray], repeats: int
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    enc_ms: dict[str, list[float]] = {}
    dec_ms: dict[str, list[float]] = {}
    for enc in codec.ENCODINGS:
        for s, x in enumerate(boundaries):
            quant = runner.manifest.split_points[s].quantization
            if enc == "int8" and not quant:
                break
            e_t, d_t = [], []
            for _ in range(max(5, repeats // 3)):
                t = time.perf_counter()
                w = codec.encode(x, enc, quant=quant)
                e_t.append((time.perf_counter() - t) * 1e3)
                d_t.append(_timed(codec.decode, w.data, w.datatype, w.shape, w.params))
            enc_ms.setdefault(enc, []).append(float(np.median(e_t)))
            dec_ms.setdefault(enc, []).append(float(np.median(d_t)))
    return enc_ms, dec_ms


def profile_table(profile: LatencyProfile) -> str:
    segments = len(next(iter(profile.segment_ms.values())))
    headers = ["batch", *(f"seg{k} ms" for k in range(segments)), "total ms"]
    rows = [[str(b), *(f"{v:.3f}" for v in vals), f"{sum(vals):.3f}"] for b, vals in sorted(profile.segment_ms.items())]
    return markdown_table(headers, rows, left=len(headers))
