"""Validation after export: chain every segment in onnxruntime and compare every exit to torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeexit.bundle import Bundle
from edgeexit.errors import ToleranceError
from edgeexit.exporters.sources import Traced
from edgeexit.runtime.runner import SegmentRunner


def validation_inputs(traced: Traced, real: tuple[np.ndarray, ...] | None, seed: int
                      ) -> list[tuple[str, tuple[np.ndarray, ...]]]:
    """(label, one array per model input) cases: random (and real, when given) inputs at batch 1 and 5 (only the
    fixed batch for a static model). A multi-input model's random cases are its archive's example rows (random
    token ids could be out of any vocabulary), cycled to the batch, and the same at half the named axes' length."""
    rng = np.random.default_rng(seed)
    sizes = (1, 5) if traced.dynamic_batch else (traced.input_shape[0],)
    cases = []
    for b in sizes:
        if traced.multi:
            ex = tuple(t.numpy() for t in traced.example)
            rows = np.arange(b) % len(ex[0])
            cases.append((f"example rows, batch {b}", tuple(np.ascontiguousarray(a[rows]) for a in ex)))
        else:
            cases.append((f"random batch {b}", (rng.random((b, *traced.input_shape[1:]), dtype=np.float32),)))
        if real is not None and len(real[0]) >= b:
            cases.append((f"real batch {b}", tuple(np.ascontiguousarray(a[:b]) for a in real)))
    if traced.multi and traced.dims:
        cases.append(("example rows, half length", _shortened(cases[-1][1], traced)))
    return cases


def _shortened(xs: tuple[np.ndarray, ...], traced: Traced) -> tuple[np.ndarray, ...]:
    """``xs`` cut to half of each named axis (at least 2)."""
    out = []
    for a, inp in zip(xs, traced.inputs, strict=True):
        idx = tuple(slice(0, max(2, a.shape[i] // 2)) if isinstance(ax, str) and ax != "batch" else slice(None)
                    for i, ax in enumerate(inp.axes))
        out.append(np.ascontiguousarray(a[idx]))
    return tuple(out)


def validate_bundle(root: Path, reference: torch.nn.Module, cases: list[tuple[str, tuple[np.ndarray, ...]]],
                    atol: float, rtol: float) -> float:
    """Raise ToleranceError naming segment and exit on disagreement; return the worst absolute error."""
    runner = SegmentRunner(Bundle.load(root), threads=1)
    owner = {j: s.index for s in runner.manifest.segments for j in s.exits}
    names = [t.name for t in runner.manifest.extra_inputs]
    worst = 0.0
    for label, (x, *extra) in cases:
        got = runner.run_all(x, dict(zip(names, extra, strict=True)))
        with torch.no_grad():
            want = [t.numpy() for t in reference(*(torch.from_numpy(a) for a in (x, *extra)))]
        for j, (g, w) in enumerate(zip(got, want, strict=True)):
            err = float(np.max(np.abs(g - w))) if g.size else 0.0
            worst = max(worst, err)
            if g.shape != w.shape or not np.allclose(g, w, atol=atol, rtol=rtol):
                raise ToleranceError(
                    f"segment {owner[j]} exit {j} differs from torch on {label}: max |diff| {err:.3g} "
                    f"(atol {atol}, rtol {rtol}); try another --opset or report the model's unusual ops"
                )
    return worst
